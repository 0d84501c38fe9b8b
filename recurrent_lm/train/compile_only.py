"""A run's training step compiled for a TPU slice this machine does not have.

    python -m recurrent_lm.train --model griffin --preset recurrentgemma-2b \\
        --mesh fsdp=16 --batch-size 128 --seq-len 8192 --compute-dtype bfloat16 \\
        --compile-only v5e:4x4 --report report.json

The TPU compiler (``libtpu``, the ``jax[tpu]`` extra) runs on any host:
`jax.experimental.topologies` describes the slice's devices, and the step the
run would execute (same sharding rules, optimizer, gradient accumulation,
dtype policy and loss) is lowered on abstract arrays and compiled for them. No
parameter is created and no data or tokenizer is read: the vocabulary is the
preset's. The compiler refuses a program that does not fit a chip's HBM.

The report gives the compiler's per-chip memory, flops and bytes, the
collectives in the compiled program, and a roofline ESTIMATE of the step time
from the chip's published peak FLOP/s and HBM bandwidth (`CHIPS`).

Beware: the compiler's `cost_analysis` counts a while loop's body once (a
``lax.scan`` over microbatches or layers reports a fraction of the work), so
the report also gives the model's flops from its shapes (6 x parameters x
tokens plus attention) and the estimate uses those.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm.core import registry, stack
from recurrent_lm.layers.attention import Attention
from recurrent_lm.params import abstract_parameters
from recurrent_lm.train import sharding
from recurrent_lm.train.build import resolve_grad_accum
from recurrent_lm.train.config import TrainConfig
from recurrent_lm.train.steps import step_functions


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Google Cloud TPU documentation)."""

    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float  # bytes / s


GIB = 1024**3
CHIPS = {
    "v4": Chip(32 * GIB, 275e12, 1.2e12),
    "v5e": Chip(16 * GIB, 197e12, 819e9),
    "v5p": Chip(95 * GIB, 459e12, 2.765e12),
    "v6e": Chip(32 * GIB, 918e12, 1.64e12),
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def topology_devices(topology: str):
    """The devices of a TPU slice named like ``v5e:4x4`` (needs libtpu)."""
    chip = topology.split(":")[0]
    if chip not in CHIPS or ":" not in topology:
        raise ValueError(
            f"unknown TPU topology {topology!r}: give <chip>:<shape> with chip one of"
            f" {sorted(CHIPS)}, e.g. v5e:4x4 or v5p:2x2x2."
        )
    # No TPU is used: let several compile-only processes share libtpu (it otherwise
    # takes a machine-wide lock file, held by whichever process loaded it first).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        description = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as error:  # what libtpu raises varies; the message says what
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot describe TPU topology {topology!r} ({first}); the TPU compiler comes"
            ' with pip install "jax[tpu]" (libtpu).'
        ) from None
    return list(description.devices)


def collective_counts(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{op: {"count", "bytes"}}`` of the collectives in compiled HLO text.

    Bytes are each op's result per device (async ``-start`` ops counted once);
    ops inside a loop body count once, like `cost_analysis`.
    """
    found = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for match in pattern.finditer(hlo_text):
        shapes, op = match.group(1), match.group(2)
        size = 0
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes):
            count = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            size += count * _DTYPE_BYTES.get(dtype, 4)
        if op in ("all-gather", "collective-permute") and match.group(3) and shapes.startswith("("):
            size //= 2  # async start ops return (operand, result): count the result once
        found[op]["count"] += 1
        found[op]["bytes"] += size
    return found


def attention_flops_per_token(skeleton, abstract, seq_len: int) -> float:
    """Training flops per token of the attention score and mix products
    (3 x forward; a causal global layer sees (T + 1) / 2 keys on average,
    a windowed one at most W + 1)."""
    total = 0.0
    for layer in pz.select(skeleton).at_instances_of(Attention).get_sequence():
        slot = pz.select(layer.query).at_instances_of(pz.ParameterSlot).get_sequence()[0]
        shape = abstract[slot.label].named_shape
        width = shape["heads"] * shape["projection"]
        keys = (seq_len + 1) / 2 if layer.window_size is None else min(layer.window_size + 1, seq_len)
        total += 3 * 2 * 2 * width * keys
    return total


def _abstract_step_inputs(cfg: TrainConfig, abstract, mesh, rules, micro: int):
    """(step functions, params, optimizer state, batch) of the run as abstract
    arrays in their shardings, as `loop.train` would place them."""
    param_axes = {label: tuple(v.named_shape) for label, v in abstract.items()}
    shapes = {label: tuple(v.named_shape.values()) for label, v in abstract.items()}
    shardings = sharding.parameter_shardings(param_axes, shapes, mesh, rules)
    params = {
        label: jax.ShapeDtypeStruct(shapes[label], v.dtype, sharding=shardings[label])
        for label, v in abstract.items()
    }
    fns = step_functions(cfg, param_axes)
    # The optimizer state as a run creates it (`init_optimizer_state`): moments
    # (leaves under a parameter's label, of its shape) follow the parameter,
    # everything else (counts) is replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def placed(path, leaf):
        label = getattr(path[-1], "key", None) if path else None
        same = label in params and params[label].shape == leaf.shape
        target = params[label].sharding if same else replicated
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target)

    opt_state = jax.tree_util.tree_map_with_path(
        placed, jax.eval_shape(fns.optimizer.init, params)
    )
    batch = jax.ShapeDtypeStruct(
        (cfg.grad_accum, micro, cfg.seq_len), jnp.int32,
        sharding=sharding.batch_sharding(mesh, 3, batch_dim=1),
    )
    return fns, params, opt_state, batch


def compile_report(cfg: TrainConfig, topology: str) -> dict[str, Any]:
    """Compiles `cfg`'s training step for `topology` and measures it (see module doc)."""
    devices = topology_devices(topology)
    chip = CHIPS[topology.split(":")[0]]
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    cfg = resolve_grad_accum(cfg, mesh)
    micro = cfg.batch_size // cfg.grad_accum
    model_type = registry.get(cfg.model)
    overrides = {"param_dtype": cfg.param_dtype, **cfg.config_overrides}
    config = model_type.config_class.from_preset(cfg.preset, **overrides)
    if model_type.default_scan_method and config.scan_method is None:
        # Unset, the form is resolved for the backend of the process (this CPU
        # host): compile what a run on the TPU would use.
        config = dataclasses.replace(config, scan_method=model_type.default_scan_method("tpu"))
    rules = sharding.rules_for(model_type.name, cfg.sharding_overrides)

    # What the run steps: the model scanned (and rematerialised) as the run prepares it.
    build = functools.partial(model_type.build_model, config)
    skeleton, abstract = stack.abstract_prepared(build, scan=cfg.scan_layers, remat=cfg.remat)
    skeleton = sharding.shard_residual_stream(skeleton, mesh, rules)
    fns, params, opt_state, batch = _abstract_step_inputs(cfg, abstract, mesh, rules, micro)
    shapes = {label: p.shape for label, p in params.items()}
    start = time.perf_counter()
    lowered = fns.train_step.lower(params, opt_state, skeleton, batch, batch)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        detail = str(error).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
        raise ValueError(
            f"the training step does not fit a {topology} chip: {detail} Lower the rows per"
            " chip (--batch-size, --grad-accum), --seq-len or --loss-chunk-size, or use more chips."
        ) from None
    compile_seconds = time.perf_counter() - start

    memory = compiled.memory_analysis()
    per_device = (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        - memory.alias_size_in_bytes + memory.temp_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    num_params = sum(math.prod(s) for s in shapes.values())
    tokens = cfg.batch_size * cfg.seq_len
    model_flops = tokens * (
        6 * num_params + attention_flops_per_token(build(None), abstract_parameters(build), cfg.seq_len)
    )
    model_flops_per_device = model_flops / len(devices)
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    compute_s = model_flops_per_device / chip.peak_bf16_flops
    memory_s = bytes_accessed / chip.hbm_bandwidth
    step_s = max(compute_s, memory_s)
    return {
        "topology": topology,
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "model": cfg.model,
        "preset": cfg.preset,
        "parameters": num_params,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "grad_accum": cfg.grad_accum,
        "compute_dtype": cfg.compute_dtype,
        "scan_method": getattr(config, "scan_method", None),
        "tokens_per_step": tokens,
        "per_device_memory_bytes": per_device,
        "memory_analysis": {
            "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
        },
        "device_memory_bytes": chip.hbm_bytes,
        "flops_per_device": float(cost.get("flops", 0.0)),
        "flops_per_device_source": "compiler cost_analysis (a loop body counts once)",
        "model_flops_per_device": model_flops_per_device,
        "model_flops_source": "6 x parameters x tokens + attention scores/mix, / devices",
        "bytes_accessed_per_device": bytes_accessed,
        "collectives": collective_counts(compiled.as_text()),
        "compile_seconds": compile_seconds,
        "estimate": {
            "note": "roofline ESTIMATE: max(model flops / peak bf16 FLOP/s, compiler bytes / HBM bandwidth)",
            "peak_bf16_flops": chip.peak_bf16_flops,
            "hbm_bandwidth": chip.hbm_bandwidth,
            "step_seconds": step_s,
            "tokens_per_second": tokens / step_s if step_s else None,
            "mfu_upper_bound": compute_s / step_s if step_s else None,
        },
    }


def summary(report: dict[str, Any]) -> str:
    """One screen of the report."""
    gib = lambda b: f"{b / GIB:.2f} GiB"
    memory = report["memory_analysis"]
    lines = [
        f"{report['model']} {report['preset']} ({report['parameters'] / 1e9:.2f}B parameters) on"
        f" {report['topology']} ({report['devices']} x {report['device_kind']}), mesh {report['mesh']}",
        f"step: {report['batch_size']} x {report['seq_len']} tokens ({report['tokens_per_step']:,}),"
        f" grad_accum {report['grad_accum']}, compute {report['compute_dtype']},"
        f" scan {report['scan_method']}",
        f"memory per chip: {gib(report['per_device_memory_bytes'])} of {gib(report['device_memory_bytes'])}"
        f" (arguments {gib(memory['argument_bytes'])}, outputs {gib(memory['output_bytes'])},"
        f" aliased {gib(memory['alias_bytes'])}, temporaries {gib(memory['temp_bytes'])})",
        f"flops per chip: model {report['model_flops_per_device']:.3e},"
        f" compiler {report['flops_per_device']:.3e} (loop bodies once)",
        f"bytes accessed per chip: {report['bytes_accessed_per_device']:.3e}",
        "collectives: " + ", ".join(
            f"{op} {c['count']} ({c['bytes'] / 2**20:.1f} MiB)"
            for op, c in report["collectives"].items() if c["count"]
        ),
        f"compiled in {report['compile_seconds']:.1f} s",
        f"ESTIMATE: {report['estimate']['step_seconds']:.3f} s/step,"
        f" {report['estimate']['tokens_per_second'] or 0:,.0f} tokens/s,"
        f" MFU <= {report['estimate']['mfu_upper_bound'] or 0:.0%}",
    ]
    return "\n".join(lines)


def run(cfg: TrainConfig, topology: str, report_path: str | None) -> dict[str, Any]:
    report = compile_report(cfg, topology)
    print(summary(report))
    if report_path:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
