"""Compile time of scanned vs unrolled layer stacks (`recurrent_lm.core.stack`).

    .venv/bin/python benchmarks/scan_layers_compile.py                 # RecurrentGemma-2B
    .venv/bin/python benchmarks/scan_layers_compile.py --preset tiny --seq 128

For each way of running the blocks (unrolled; scanned without remat; scanned
with ``remat="block"``: "scanned+remat") it lowers and compiles, on abstract inputs
(`jax.ShapeDtypeStruct`: no weight is materialised), the forward pass (logits
of a [batch, seq] batch) and the training step a run compiles
(`recurrent_lm.train.steps.step_functions`: value_and_grad of the chunked
next-token loss, global-norm clipping, AdamW). Prints a Markdown table of
trace + lower and compile seconds, and the compiled programs' temporary memory.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recurrent_lm.core import functional, registry, stack
from recurrent_lm.train import steps
from recurrent_lm.train.config import TrainConfig

MODES = {
    "unrolled": dict(scan=False, remat="none"),
    "scanned": dict(scan=True, remat="none"),
    "scanned+remat": dict(scan=True, remat="block"),
}


def timed_compile(jitted, *args):
    """(trace + lower seconds, compile seconds, temporary bytes)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", float("nan")) if memory else float("nan")
    return lowered_at - start, done - lowered_at, temp


def measure(model: str, preset: str, batch: int, seq: int, mode: dict, what: list[str]):
    architecture = registry.get(model)
    config = architecture.config_class.from_preset(preset)
    build = functools.partial(architecture.build_model, config)
    skeleton, abstract = stack.abstract_prepared(build, **mode)
    segments = [
        f"{s.repeats}x{len(s.group.sublayers)}" if isinstance(s, stack.ScannedBlocks) else "1"
        for s in skeleton.blocks.sublayers
    ]
    param_axes = {label: tuple(v.named_shape) for label, v in abstract.items()}
    params = {
        label: jax.ShapeDtypeStruct(tuple(v.named_shape.values()), v.dtype)
        for label, v in abstract.items()
    }
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    row = {"segments": " + ".join(segments) if len(segments) < 8 else f"{len(segments)} blocks"}
    if "forward" in what:
        named = lambda p: steps.named_params(param_axes, p, "float32")
        forward = jax.jit(lambda p, i, s: functional.call(skeleton, named(p), {}, i, s)[0])
        row["forward"] = timed_compile(forward, params, ids, ids)
    if "train" in what:
        cfg = TrainConfig(model=model, preset=preset, batch_size=batch, seq_len=seq)
        fns = steps.step_functions(cfg, param_axes)
        opt_state = jax.eval_shape(fns.optimizer.init, params)
        tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
        row["train"] = timed_compile(fns.train_step, params, opt_state, skeleton, tokens, tokens)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="griffin")
    parser.add_argument("--preset", default="recurrentgemma-2b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--what", nargs="+", default=["forward", "train"],
                        choices=["forward", "train"])
    args = parser.parse_args()
    print(f"{args.model} {args.preset}, batch {args.batch} x {args.seq} tokens,"
          f" {jax.devices()[0].platform}, jax {jax.__version__}\n", flush=True)
    rows = {}
    for name in args.modes:
        rows[name] = measure(args.model, args.preset, args.batch, args.seq, MODES[name], args.what)
        print(f"  {name}: {rows[name]}", file=sys.stderr, flush=True)
    header = ["blocks", "segments"]
    for what in args.what:
        header += [f"{what}: trace+lower s", f"{what}: compile s", f"{what}: temp GiB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in rows.items():
        cells = [name, row["segments"]]
        for what in args.what:
            lower, compile_s, temp = row[what]
            cells += [f"{lower:.1f}", f"{compile_s:.1f}", f"{temp / 2**30:.2f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
