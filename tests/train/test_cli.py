"""The training CLI: one flag per TrainConfig field, the README's commands parse."""

import dataclasses
import os
import re
import shlex

import pytest

from recurrent_lm.train import TrainConfig, cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EVERY_FLAG = """
--model rwkv --preset small --config hidden_size=64 --config 'block_types=["recurrent"]'
--param-dtype bfloat16 --compute-dtype bfloat16 --no-scan-layers --remat block
--init-checkpoint base/ --lora-rank 4
--lora-alpha 8 --lora-target mlp_block --lora-target linear_x
--data a.txt --data docs/ --tokenizer tok.model --tokenizer-vocab-size 2048 --seq-len 256
--batch-size 16 --eval-fraction 0.2
--steps 7 --seed 3 --lr 1e-3 --lr-schedule linear --warmup-steps 5 --decay-steps 9
--min-lr-ratio 0.2 --weight-decay 0.01 --adam-b1 0.8 --adam-b2 0.99 --adam-eps 1e-6
--grad-clip 0.5 --grad-accum 2 --max-tokens-per-device 512 --loss-chunk-size 64
--eval-interval 50 --eval-batches 4 --checkpoint-dir run/ --checkpoint-interval 10
--keep-checkpoints 2 --no-async-checkpoints --resume --metrics-file m.jsonl
--save-model out/ --save-adapters adapters/ --stop-after 5 --no-progress
--mesh data=2,model=4 --shard embedding=model --shard mlp=null
"""

EVERY_FIELD = TrainConfig(
    model="rwkv",
    preset="small",
    config_overrides={"hidden_size": 64, "block_types": ["recurrent"]},
    param_dtype="bfloat16",
    compute_dtype="bfloat16",
    scan_layers=False,
    remat="block",
    init_checkpoint="base/",
    lora_rank=4,
    lora_alpha=8.0,
    lora_targets=("mlp_block", "linear_x"),
    data=("a.txt", "docs/"),
    tokenizer="tok.model",
    tokenizer_vocab_size=2048,
    seq_len=256,
    batch_size=16,
    eval_fraction=0.2,
    steps=7,
    seed=3,
    learning_rate=1e-3,
    lr_schedule="linear",
    warmup_steps=5,
    decay_steps=9,
    min_lr_ratio=0.2,
    weight_decay=0.01,
    adam_b1=0.8,
    adam_b2=0.99,
    adam_eps=1e-6,
    grad_clip=0.5,
    grad_accum=2,
    max_tokens_per_device=512,
    loss_chunk_size=64,
    eval_interval=50,
    eval_batches=4,
    checkpoint_dir="run/",
    checkpoint_interval=10,
    keep_checkpoints=2,
    async_checkpoints=False,
    resume=True,
    metrics_file="m.jsonl",
    save_model="out/",
    save_adapters="adapters/",
    stop_after=5,
    progress=False,
    mesh="data=2,model=4",
    sharding_overrides={"embedding": "model", "mlp": None},
)


def _config(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


def test_every_field_has_exactly_one_flag():
    parser = cli.build_parser()
    dests = [a.dest for a in parser._actions if a.dest != "help"]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(dests) == sorted(fields + list(cli.DISTRIBUTED_ARGS) + list(cli.COMPILE_ONLY_ARGS))
    assert all(f.metadata["help"] for f in dataclasses.fields(TrainConfig))


def test_flags_set_every_field():
    for field in dataclasses.fields(TrainConfig):  # the flags below change them all
        default = TrainConfig()
        assert getattr(EVERY_FIELD, field.name) != getattr(default, field.name), field
    assert _config(shlex.split(EVERY_FLAG)) == EVERY_FIELD
    assert _config([]) == TrainConfig()


def _command_line(argv):
    """The config `main` runs: flags given, then the preset's recipe, then defaults."""
    return cli.config_from_args(cli.build_parser().parse_args(argv), cli.given_settings(argv))


def test_released_presets_default_to_the_pretraining_recipe():
    base = ["--model", "griffin", "--preset", "recurrentgemma-2b", "--batch-size", "128"]
    config = _command_line(base)
    assert (config.compute_dtype, config.param_dtype) == ("bfloat16", "float32")
    assert (config.scan_layers, config.remat, config.mesh) == (True, "block", "fsdp=-1")
    assert (config.loss_chunk_size, config.max_tokens_per_device) == (1024, 8192)
    assert config.batch_size == 128 and config.grad_accum == 1
    assert config == TrainConfig.for_preset("griffin", "recurrentgemma-2b", batch_size=128)
    # A flag wins over the recipe, even one that names the plain default.
    flags = ["--remat", "none", "--compute-dtype", "float32", "--mesh", "data=2"]
    config = _command_line([*base, *flags])
    assert (config.remat, config.compute_dtype, config.mesh) == ("none", "float32", "data=2")
    assert config.loss_chunk_size == 1024
    # The experiment preset, and a config built directly, keep the plain defaults.
    assert _command_line(["--preset", "tiny"]) == TrainConfig()
    assert _config(base) == TrainConfig(model="griffin", preset="recurrentgemma-2b", batch_size=128)


def test_grad_clip_zero_turns_clipping_off():
    assert _config(["--grad-clip", "0"]).grad_clip is None
    assert TrainConfig(grad_clip=0.0) == TrainConfig(grad_clip=None)


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--lr-schedule", "exponential"])
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--steps", "many"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        _config(["--config", "hidden_size"])


def _readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("python -m recurrent_lm.train "):
            line = re.sub(r"[\[\]]|\.\.\.|#.*", " ", line)
            yield shlex.split(line)[3:]


def test_readme_training_commands_parse():
    commands = list(_readme_commands())
    assert len(commands) >= 4
    for argv in commands:
        config = _config(argv)
        assert config.data or config.resume, argv
