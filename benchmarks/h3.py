"""H3: the diagonal SSM's FFT route against its scan route, and decoding speed.

    .venv/bin/python benchmarks/h3.py                       # the README table
    .venv/bin/python benchmarks/h3.py --seqs 512 --decode-preset tiny   # quick

1. One H3 mixer (q/k/v projections, shift SSM, diagonal SSM, output
   projection) at the 125M width (768 channels, N = 64), batch 1, for each
   sequence length: the "fft" route (kernel + FFT convolution) and the "scan"
   route (complex recurrence through `linear_scan`, the backend's default
   method). Reports the median time of `--rounds` runs after compilation, and
   XLA's scratch memory for the compiled call (``temp_size_in_bytes``: the
   peak of intermediate buffers, excluding parameters, inputs and outputs).
   Both routes are checked to agree first.
2. Decoding: `generate` on a randomly initialised preset (default 125m),
   batch 1, greedy; tokens/s of the decode loop alone (the difference of two
   generation lengths, both compiled first).

There is no official anchor: the original H3 needs CUDA (flash-attn), so the
ratio reported is scan / fft on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import numpy as np
from penzai import pz

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recurrent_lm.core.context import DocumentContext
from recurrent_lm.models import h3
from recurrent_lm.params import parameter_values
from recurrent_lm.sampling import decode


def mixer_function(width: int, d_state: int, method: str):
    """A jitted ``f(params, x [B, T, D]) -> y`` for one H3 mixer."""
    config = h3.H3Config(
        vocab_size=8,
        hidden_size=width,
        num_hidden_layers=1,
        num_attention_heads=1,
        attn_layer_idx=(),
        d_state=d_state,
    )
    model = h3.build_model(dataclasses.replace(config, ssm_method=method), jax.random.key(0))
    mixer = h3.mixer(model, 0)
    skeleton, params = pz.unbind_params(mixer, freeze=True)

    @jax.jit
    def run(params, x):
        layer = skeleton.bind_variables(params)
        named = pz.nx.wrap(x).tag("batch", "seq", "embedding")
        steps = x.shape[1]
        pos = pz.nx.wrap(
            np.broadcast_to(np.arange(steps, dtype=np.int32), x.shape[:2])
        ).tag("batch", "seq")
        context = DocumentContext.build(pos)
        return layer(named, context=context).unwrap("batch", "seq", "embedding")

    return run, params


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_mixer(args) -> list[str]:
    rows = [
        "| seq | route | time (ms) | tokens/s | XLA scratch memory (MiB) | scan / fft time |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    functions = {
        m: mixer_function(args.width, args.d_state, m) for m in ("fft", "scan")
    }
    for seq in args.seqs:
        x = jax.random.normal(jax.random.key(seq), (args.batch, seq, args.width))
        results = {}
        outputs = {}
        for method, (run, params) in functions.items():
            compiled = run.lower(params, x).compile()
            memory = compiled.memory_analysis()
            scratch = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20
            outputs[method] = np.asarray(compiled(params, x))
            results[method] = (
                median_time(lambda c=compiled, p=params, x=x: c(p, x), args.rounds),
                scratch,
            )
        error = np.max(np.abs(outputs["fft"] - outputs["scan"])) / np.max(
            np.abs(outputs["scan"])
        )
        assert error < 1e-4, f"fft and scan disagree at seq {seq}: {error}"
        for method, (seconds, scratch) in results.items():
            ratio = results["scan"][0] / results["fft"][0]
            rows.append(
                f"| {seq} | {method} | {1e3 * seconds:.1f} | {args.batch * seq / seconds:,.0f}"
                f" | {scratch:,.0f} | {ratio:.2f}x |"
            )
        print(rows[-2], rows[-1], sep="\n", flush=True)
    return rows


def bench_decode(args) -> list[str]:
    config = h3.H3Config.from_preset(args.decode_preset)
    values = jax.jit(lambda key: parameter_values(h3.build_model(config, key)))(
        jax.random.key(0)
    )
    model = pz.bind_variables(
        h3.build_model(config, None),
        [pz.Parameter(label=label, value=value) for label, value in values.items()],
    )
    prompt = [
        list(np.random.default_rng(0).integers(0, config.vocab_size, args.prompt))
    ]
    rows = [
        "| model | prompt | new tokens | decode tokens/s | ms / token |",
        "|---|---:|---:|---:|---:|",
    ]
    # Two generation lengths, each compiled first: their time difference is
    # the decode loop alone (prefill and host work cancel out).
    short = max(1, args.new_tokens // 4)
    runs = {
        n: (lambda n=n: decode.generate(model, prompt, max_new_tokens=n))
        for n in (short, args.new_tokens)
    }
    for run in runs.values():
        run()
    times = {n: median_time(run, 3) for n, run in runs.items()}
    per_token = (times[args.new_tokens] - times[short]) / (args.new_tokens - short)
    rows.append(
        f"| {args.decode_preset} | {args.prompt} | {args.new_tokens} | {1 / per_token:.1f}"
        f" | {1e3 * per_token:.1f} |"
    )
    print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--d-state", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-preset", default="125m", choices=sorted(h3.PRESETS))
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    print(f"H3 mixer, width {args.width}, N {args.d_state}, batch {args.batch}")
    table = bench_mixer(args)
    if not args.skip_decode:
        table += [""] + bench_decode(args)
    print("\n".join(table))


if __name__ == "__main__":
    main()
