"""Training loop: metrics, step hook, exact resume (stop, kill, corruption), errors."""

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from integrity_helpers import flip_middle, largest_file
from penzai import pz
from train_setup import STEPS, reference_learning_rate

from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.core import sites
from recurrent_lm.train import checkpointing, cli, data, sharding, train

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
    # The run pinned the residual stream's sharding at its sites; the model it
    # returns has plain sites again (nothing tied to the run's mesh).
    model = setup.reference.model
    assert pz.select(model).at_instances_of(sharding.ShardedActivation).count() == 0
    assert pz.select(model).at_instances_of(sites.Site).count() > 0


def test_stop_then_resume_gives_the_same_losses(setup):
    config = setup.config_for("stopped", stop_after=3)
    first = train(config)
    assert first.final_step == 3
    second = train(dataclasses.replace(config, stop_after=None, resume=True))
    assert second.start_step == 3
    for step in range(1, STEPS + 1):
        got = first.losses.get(step, second.losses.get(step))
        assert got == setup.reference.losses[step], step  # bitwise


# The CLI, run with a step hook that SIGKILLs the process right after step 4's
# checkpoint is requested (an asynchronous save may still be in flight, or be
# committed without its manifest yet), as a pre-emption would.
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
    flags = [*setup.cli_flags("killed"), "--checkpoint-interval", "1"]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *flags],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL, no clean shutdown
    assert sorted(setup.metrics_losses("killed")) == [1, 2, 3, 4]
    # The same command with --resume (in this process: the compiled step is cached).
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", checkpointing.CorruptCheckpointWarning)
        assert cli.main([*flags, "--resume"]) == 0
    # Step 4 may have been cut off before its commit (orbax drops it) or before its
    # manifest (moved aside with a warning); either way step 3 is intact.
    moved = [str(w.message) for w in warned if w.category is checkpointing.CorruptCheckpointWarning]
    assert all("step 4" in m and "incomplete" in m for m in moved), moved
    assert setup.metrics_losses("killed") == setup.reference.losses  # bitwise, steps 1-6


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(setup):
    """256 bytes flipped in the middle of the newest checkpoint's largest file, size
    unchanged: `--resume` names the file, moves the step aside and resumes from the
    previous one with the reference losses."""
    flags = setup.cli_flags("corrupt")
    assert cli.main([*flags, "--stop-after", "4"]) == 0
    victim = largest_file(setup.directory / "corrupt" / "4")
    flip_middle(victim)
    with pytest.warns(checkpointing.CorruptCheckpointWarning) as warned:
        assert cli.main([*flags, "--resume"]) == 0
    (message,) = [
        str(w.message) for w in warned if w.category is checkpointing.CorruptCheckpointWarning
    ]
    assert "step 4" in message and f"{victim} is corrupt" in message
    assert os.path.isdir(setup.directory / "corrupt" / "corrupt-4")
    assert setup.metrics_losses("corrupt") == setup.reference.losses  # bitwise, steps 1-6


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


def _refused_resume_differences(setup, **changes) -> list[str]:
    """The differences a resume of the reference run with `changes` is refused for."""
    config = dataclasses.replace(
        setup.config, checkpoint_dir=setup.reference_dir, resume=True, **changes
    )
    with pytest.raises(checkpointing.RunMismatchError) as info:
        train(config)
    return [line.strip() for line in str(info.value).splitlines()[1:-1]]


def test_resume_with_changed_data_is_refused(setup, tmp_path):
    changed = tmp_path / os.path.basename(setup.corpus)  # same name, other content
    with open(setup.corpus) as f:
        changed.write_text(f.read() + "\n\n\nthe old cat sleeps on the warm mat")
    (line,) = _refused_resume_differences(setup, data=(str(changed),))
    assert line.startswith("data_fingerprint: checkpoint '"), line


def test_resume_with_another_tokenizer_is_refused(setup, tmp_path):
    vocab_size = tokenizer_lib.Tokenizer.load(setup.tokenizer).vocab_size
    other = tokenizer_lib.train(
        [setup.corpus], tmp_path / "bpe", vocab_size=vocab_size, model_type="bpe"
    )
    assert other.vocab_size == vocab_size  # the model is the same; only the tokenizer differs
    (line,) = _refused_resume_differences(setup, tokenizer=str(tmp_path / "bpe.model"))
    assert line.startswith("tokenizer_sha256: checkpoint '"), line


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
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(setup):
    """`jax.distributed` on this machine: 2 processes of 2 CPU devices each (a
    coordinator on 127.0.0.1), mesh data=4, each process feeding only its own
    rows (`BatchIterator`'s per-process slice): the single-process losses, and
    one checkpoint written together."""
    port = _free_port()
    directory = setup.directory / "two_processes"
    flags = [*setup.cli_flags("two_processes"), "--mesh", "data=4", "--stop-after", "3",
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "recurrent_lm.train", *flags, "--process-id", str(i)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    losses = setup.metrics_losses("two_processes")
    assert sorted(losses) == [1, 2, 3]
    np.testing.assert_allclose(
        [losses[s] for s in (1, 2, 3)], [setup.reference.losses[s] for s in (1, 2, 3)], rtol=2e-5
    )
    assert {"2", "3"} <= set(os.listdir(directory))
