"""Training loop: metrics, step hook, exact resume (stop, kill, corruption), errors."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_setup import STEPS, reference_learning_rate

from recurrent_lm.train import checkpointing, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reference_run_learns_and_writes_metrics(setup):
    losses = setup.reference.losses
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5
    with open(os.path.join(setup.reference_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert {"step", "loss", "tokens_per_s", "grad_norm", "learning_rate"} <= set(r)
        assert r["tokens_per_s"] > 0 and np.isfinite(r["loss"])
        # Step n's record shows the rate of update n - 1 (0-based): the one it used.
        expected_lr = reference_learning_rate(setup.config, r["step"] - 1)
        assert r["learning_rate"] == pytest.approx(expected_lr, rel=1e-6)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    # on_step_end saw every step, after its record (eval loss included) was complete.
    assert setup.reference_hook_calls == [(r["step"], r) for r in records]
    assert set(setup.reference.eval_losses) == {3, 6}
    # Checkpoints: keep the last 2, plus our marker and the tokenizer-free layout.
    names = set(os.listdir(setup.reference_dir))
    assert {"4", "6", checkpointing.MARKER} <= names and "2" not in names


def test_stop_then_resume_gives_the_same_losses(setup):
    config = setup.config_for("stopped", stop_after=3)
    first = train(config)
    assert first.final_step == 3
    second = train(dataclasses.replace(config, stop_after=None, resume=True))
    assert second.start_step == 3
    for step in range(1, STEPS + 1):
        got = first.losses.get(step, second.losses.get(step))
        assert got == setup.reference.losses[step], step  # bitwise


# The CLI's settings, run with a step hook that SIGKILLs the process right after
# step 4's checkpoint is requested (an async save may still be in flight), as a
# pre-emption would.
KILL_SCRIPT = """
import os, signal, sys
from recurrent_lm.train import cli, train

def kill_after_step_4(step, record):
    if step == 4:
        os.kill(os.getpid(), signal.SIGKILL)

config = cli.config_from_args(cli.build_parser().parse_args(sys.argv[1:]))
train(config, on_step_end=kill_after_step_4)
"""


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_losses(setup):
    directory = setup.directory / "killed"
    metrics = directory / "metrics.jsonl"
    command = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        "--model",
        "griffin",
        "--preset",
        "tiny",
        "--data",
        setup.corpus,
        "--tokenizer",
        setup.tokenizer,
        "--steps",
        str(STEPS),
        "--decay-steps",
        str(STEPS),
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--seed",
        "0",
        "--warmup-steps",
        "2",
        "--learning-rate",
        "3e-3",
        "--eval-interval",
        "0",
        "--eval-fraction",
        "0.1",
        "--config",
        "num_hidden_layers=2",
        "--config",
        'block_types=["recurrent", "attention"]',
        "--checkpoint-dir",
        str(directory),
        "--checkpoint-interval",
        "1",
        "--metrics-file",
        str(metrics),
        "--no-progress",
    ]
    proc = subprocess.run(
        command,
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL, no clean shutdown
    resumed = train(setup.config_for("killed", resume=True, metrics_file=str(metrics)))
    assert resumed.start_step in (3, 4)  # the step-4 save may have been cut off
    for step in range(resumed.start_step + 1, STEPS + 1):
        assert resumed.losses[step] == setup.reference.losses[step], step
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert r["loss"] == setup.reference.losses[r["step"]]


def _largest_file(directory):
    files = [
        os.path.join(root, n) for root, _, names in os.walk(directory) for n in names
    ]
    return max(files, key=os.path.getsize)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(setup):
    config = setup.config_for("corrupt", stop_after=4)
    train(config)
    victim = _largest_file(os.path.join(config.checkpoint_dir, "4", "state"))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.warns(checkpointing.CorruptCheckpointWarning, match="step 4"):
        resumed = train(dataclasses.replace(config, stop_after=None, resume=True))
    assert resumed.start_step == 2
    assert os.path.isdir(os.path.join(config.checkpoint_dir, "corrupt-4"))
    for step in range(3, STEPS + 1):
        assert resumed.losses[step] == setup.reference.losses[step], step


def test_resume_with_other_settings_is_refused_naming_them(setup):
    config = dataclasses.replace(
        setup.config,
        checkpoint_dir=setup.reference_dir,
        resume=True,
        learning_rate=1e-3,
        config_overrides={"intermediate_size": 96},
    )
    with pytest.raises(checkpointing.RunMismatchError) as info:
        train(config)
    message = str(info.value)
    assert "learning_rate: checkpoint 0.003, now 0.001" in message
    assert "model_config.intermediate_size: checkpoint 128, now 96" in message
    assert "config_overrides.intermediate_size" in message


def test_bad_inputs_fail_clearly_and_write_nothing(setup, tmp_path):
    base = dataclasses.replace(setup.config, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(data.DataError, match="does not exist"):
        train(dataclasses.replace(base, data=(str(tmp_path / "missing.txt"),)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(data.DataError, match="holds no text"):
        train(dataclasses.replace(base, data=(str(empty),)))
    with pytest.raises(data.DataError, match="longer than the whole training stream"):
        train(dataclasses.replace(base, seq_len=1_000_000))
    with pytest.raises(ValueError, match="unknown GriffinConfig preset 'huge'"):
        train(dataclasses.replace(base, preset="huge"))
    with pytest.raises(ValueError, match="unknown architecture 'transformerxl'; known: \\['gemma'"):
        train(dataclasses.replace(base, model="transformerxl"))
    with pytest.raises(ValueError, match="grad_accum 3 does not divide batch_size 8"):
        dataclasses.replace(base, grad_accum=3)
    assert not (tmp_path / "run").exists()
    # A directory that is not ours is left alone.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(
        checkpointing.CheckpointDirError, match="not a recurrent_lm training"
    ):
        train(dataclasses.replace(base, checkpoint_dir=str(foreign)))
    assert os.listdir(foreign) == ["notes.txt"]
    # Starting over an existing run needs --resume; resuming needs a checkpoint.
    with pytest.raises(checkpointing.CheckpointDirError, match="pass --resume"):
        train(dataclasses.replace(base, checkpoint_dir=setup.reference_dir))
    with pytest.raises(checkpointing.CheckpointDirError, match="no checkpoint"):
        train(
            dataclasses.replace(base, checkpoint_dir=str(tmp_path / "new"), resume=True)
        )


def test_cli_reports_bad_input_with_exit_code_2(setup, tmp_path, capsys):
    from recurrent_lm.train import cli

    code = cli.main(
        [
            "--data",
            str(tmp_path / "nope.txt"),
            "--tokenizer",
            setup.tokenizer,
            "--no-progress",
        ]
    )
    assert code == 2
    assert "data path" in capsys.readouterr().err


SHARDED_SCRIPT = """
import json, sys
import jax
import recurrent_lm.models
from recurrent_lm.params import parameter_values
from recurrent_lm.train import TrainConfig, sharding, train

assert len(jax.devices()) == 8
args = json.loads(sys.argv[1])
settings = args["settings"]
result = train(TrainConfig(**settings))
values = parameter_values(result.model)
table = values["embedder.embeddings"].data_array
loaded = sharding.load_sharded(args["model_dir"], sharding.make_mesh("data=1,fsdp=2,model=4"))
up = parameter_values(loaded)["blocks.0.mlp_block.up.weights"].data_array
print(json.dumps({"losses": result.losses,
                  "table": str(table.sharding.spec), "loaded": str(up.sharding.spec)}))
"""


@pytest.mark.slow
def test_grad_accumulation_and_sharding_match_one_device(setup):
    """8 host devices, mesh data=2 x fsdp=2 x model=2, 2 microbatches: same losses."""
    settings = dataclasses.asdict(
        dataclasses.replace(
            setup.config, mesh="data=2,fsdp=2,model=2", grad_accum=2, eval_interval=0
        )
    )
    arguments = json.dumps({"settings": settings, "model_dir": setup.model_dir})
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, arguments],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    sharded = {int(k): v for k, v in out["losses"].items()}
    reference = setup.reference.losses
    np.testing.assert_allclose(
        [sharded[s] for s in range(1, STEPS + 1)],
        [reference[s] for s in range(1, STEPS + 1)],
        rtol=2e-5,
    )
    assert out["table"] == "P('model', 'fsdp')"  # {vocabulary, embedding}
    assert out["loaded"] == "P('model', 'fsdp')"  # {mlp, embedding}
