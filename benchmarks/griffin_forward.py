"""Griffin forward: recurrent_lm against the official `recurrentgemma`, same weights.

    .venv/bin/python benchmarks/griffin_forward.py            # the README config
    .venv/bin/python benchmarks/griffin_forward.py --seq 256  # quicker

Builds a random official model, converts it with our converter (so both run
the same weights), checks the logits agree, then times, round-robin:
our forward with each scan implementation, and the official forward with its
default CPU scan (LINEAR_NATIVE, lax.scan unroll 128) and its associative scan.
Reports the first-call time (trace + compile + run), the median run time,
tokens/s and the ratio to the official default. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recurrentgemma.jax as rg
from recurrentgemma import common

import recurrent_lm
from benchmarks import common as common_args
from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm.layers import recurrence


def official_forward(config, scan_type):
    model = rg.Griffin(config._replace(scan_type=scan_type))

    @jax.jit
    def run(params, ids, pos):
        logits, _ = model.apply({"params": params}, ids, pos, return_cache=False)
        return logits

    return run


def time_first_call(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args.add_model_arguments(parser)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-official-linear", action="store_true",
                        help="skip the official LINEAR_NATIVE scan (slow to compile)")
    args = parser.parse_args(argv)

    config = common_args.official_config(args)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
    pos = jnp.broadcast_to(jnp.arange(args.seq), ids.shape)
    params = rg.Griffin(config).init(jax.random.key(0), ids[:, :8], pos[:, :8])["params"]
    params = jax.device_get(params)

    candidates = {}
    for method in recurrence.SCAN_METHODS:
        model = convert.from_official_params(
            params, attention_window_size=args.window, scan_method=method
        )
        forward = recurrent_lm.jit_forward(model)
        candidates[f"recurrent_lm ({method})"] = lambda f=forward: f(ids, pos)
    official_kinds = [("ASSOCIATIVE_NATIVE", common.ScanType.ASSOCIATIVE_NATIVE)]
    if not args.skip_official_linear:
        official_kinds.insert(0, ("LINEAR_NATIVE", common.ScanType.LINEAR_NATIVE))
    for name, scan_type in official_kinds:
        run = official_forward(config, scan_type)
        candidates[f"official ({name})"] = lambda r=run: r(params, ids, pos)
    reference = "official (LINEAR_NATIVE)" if not args.skip_official_linear else "official (ASSOCIATIVE_NATIVE)"

    first = {name: time_first_call(fn) for name, fn in candidates.items()}
    outputs = {name: np.asarray(fn()) for name, fn in candidates.items()}
    ref_out = outputs[reference]
    scale = np.abs(ref_out).max()
    for name, out in outputs.items():
        rel = np.abs(out - ref_out).max() / scale
        print(f"# {name}: max relative logit difference to {reference}: {rel:.2e}")

    times = common_args.round_robin(candidates, args.rounds)

    tokens = args.batch * args.seq
    ref_median = statistics.median(times[reference])
    ref_first = first[reference]
    print(
        f"\nGriffin forward, width {args.width}, {args.layers} layers (R,R,A), vocab"
        f" {args.vocab}, seq {args.seq}, batch {args.batch}, window {args.window},"
        f" float32, backend {jax.default_backend()}, {os.cpu_count()} CPUs,"
        f" {args.rounds} rounds\n"
    )
    print("| implementation | first call s | median run ms | tokens/s | throughput vs official | first call vs official |")
    print("|---|---|---|---|---|---|")
    for name in candidates:
        median = statistics.median(times[name])
        print(
            f"| {name} | {first[name]:.1f} | {median * 1e3:.0f} | {tokens / median:,.0f}"
            f" | {ref_median / median:.2f}x | {first[name] / ref_first:.2f}x |"
        )


if __name__ == "__main__":
    main()
