"""`--compile-only TOPOLOGY`: the run's training step compiled for a TPU slice by
the real TPU compiler (libtpu, the dev extra) on this CPU host."""

import json
import math

import jax
import pytest

from recurrent_lm.models import griffin
from recurrent_lm.params import parameter_values
from recurrent_lm.train import cli, compile_only

pytest.importorskip("libtpu", reason="the TPU compiler comes with jax[tpu] (the dev extra)")

ARGS = ["--model", "griffin", "--preset", "tiny", "--config", "vocab_size=512",
        "--mesh", "fsdp=4", "--batch-size", "8", "--seq-len", "64", "--compute-dtype", "bfloat16"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile_only") / "report.json"
    assert cli.main([*ARGS, "--compile-only", "v5e:2x2", "--report", str(path)]) == 0
    with open(path) as f:
        return json.load(f)


def test_report_describes_the_compiled_step(report):
    assert (report["topology"], report["devices"]) == ("v5e:2x2", 4)
    assert "v5" in report["device_kind"].lower()
    assert report["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
    assert report["tokens_per_step"] == 8 * 64
    # The TPU's scan form, not this CPU host's (sequential), when the config leaves it unset.
    assert report["scan_method"] == "associative"
    memory = report["memory_analysis"]
    assert report["per_device_memory_bytes"] == (
        memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    )
    # params + 2 Adam moments in float32, a quarter per chip (FSDP), at least.
    config = griffin.GriffinConfig.from_preset("tiny", vocab_size=512)
    model = griffin.build_model(config, jax.random.key(0))
    count = sum(v.data_array.size for v in parameter_values(model).values())
    assert report["parameters"] == count
    assert memory["argument_bytes"] >= 3 * 4 * count / 4
    assert 0 < report["per_device_memory_bytes"] < report["device_memory_bytes"]
    # The model's flops: 6N per token plus its one windowed attention layer.
    attention = 3 * 2 * 2 * config.num_attention_heads * config.head_dim * min(config.attention_window_size + 1, 64)
    expected = 8 * 64 * (6 * count + attention) / 4
    assert report["model_flops_per_device"] == pytest.approx(expected, rel=1e-9)
    assert report["flops_per_device"] > 0 and report["bytes_accessed_per_device"] > 0
    # FSDP: parameters gathered for use, gradients reduced.
    collectives = report["collectives"]
    assert collectives["all-gather"]["count"] > 0 and collectives["all-gather"]["bytes"] > 0
    assert collectives["all-reduce"]["count"] + collectives["reduce-scatter"]["count"] > 0
    # FSDP gathers weights, not rows: each chip keeps its own rows (the residual
    # stream is pinned to them). Left to itself the partitioner kept the weights in
    # place and gathered every chip's activations instead (measured: all-gather
    # 12x and all-reduce 6x the bfloat16 parameter bytes; now 2.5x and 0.75x).
    assert collectives["all-gather"]["bytes"] < 4 * 2 * count
    assert collectives["all-reduce"]["bytes"] < 4 * count
    estimate = report["estimate"]
    assert estimate["step_seconds"] == pytest.approx(max(
        report["model_flops_per_device"] / estimate["peak_bf16_flops"],
        report["bytes_accessed_per_device"] / estimate["hbm_bandwidth"],
    ))
    assert 0 < estimate["mfu_upper_bound"] <= 1


def test_collectives_are_read_from_hlo_text():
    hlo = """
  %all-gather-start.1 = (bf16[4,8]{1,0}, bf16[16,8]{1,0}) all-gather-start(%p), dimensions={0}
  %all-reduce.2 = f32[10]{0} all-reduce(%x), to_apply=%add
  %rs = (f32[2,3]{1,0}, f32[4]{0}) reduce-scatter(%a, %b), dimensions={0}
"""
    found = compile_only.collective_counts(hlo)
    assert found["all-gather"] == {"count": 1, "bytes": (4 * 8 + 16 * 8) * 2 // 2}
    assert found["all-reduce"] == {"count": 1, "bytes": 40}
    assert found["reduce-scatter"] == {"count": 1, "bytes": (6 + 4) * 4}
    assert found["all-to-all"]["count"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--compile-only", "v9x:2x2"], "unknown TPU topology 'v9x:2x2'"),
    (["--report", "r.json"], "--report needs --compile-only"),
    (["--compile-only", "v5e:2x2", "--mesh", "fsdp=8"], "8 devices but 4 are available"),
])
def test_bad_requests_are_one_line_errors(argv, message, capsys):
    base = ["--model", "griffin", "--preset", "tiny", "--batch-size", "8"]
    assert cli.main([*base, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_parameters_are_created_in_their_shardings():
    """The run's initialiser compiled for 4 chips (fsdp=4): each chip's outputs
    are exactly its shards (the embedding table a quarter), and no temporary
    holds a whole parameter."""

    from recurrent_lm.train import sharding

    devices = compile_only.topology_devices("v5e:2x2")
    mesh = sharding.make_mesh("fsdp=4", devices=devices)
    config = griffin.GriffinConfig.from_preset("tiny", vocab_size=512)
    init, abstract = sharding.sharded_initializer(
        griffin.build_model, config, mesh, sharding.rules_for("griffin")
    )
    compiled = init.lower(jax.random.key(0)).compile()
    outputs = compiled.output_shardings
    shard_bytes = {
        label: math.prod(outputs[label].shard_shape(tuple(v.named_shape.values()))) * v.dtype.itemsize
        for label, v in abstract.items()
    }
    sizes = {label: math.prod(v.named_shape.values()) * v.dtype.itemsize for label, v in abstract.items()}
    assert shard_bytes["embedder.embeddings"] * 4 == sizes["embedder.embeddings"]
    # TPU layouts pad small arrays to whole tiles: compare with the same
    # initialiser replicating everything, padded alike.
    whole, _ = sharding.sharded_initializer(
        griffin.build_model, config, mesh, {}
    )
    replicated = whole.lower(jax.random.key(0)).compile().memory_analysis()
    memory = compiled.memory_analysis()
    assert sum(shard_bytes.values()) < 0.4 * sum(sizes.values())
    assert memory.output_size_in_bytes < 0.6 * replicated.output_size_in_bytes
    assert memory.temp_size_in_bytes < max(sizes.values())
