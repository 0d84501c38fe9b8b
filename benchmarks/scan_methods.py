"""The three linear-scan implementations against the memory-bandwidth floor.

    .venv/bin/python benchmarks/scan_methods.py [--shapes 512x256,2048x256] [--grad] [--scaled]

For each shape (T x D, batch 1, float32) times, round-robin, `linear_scan`
with each method and a fused ``a*b + b`` over the same arrays (the floor: the
same 12 bytes per element a recurrence must move). Reports median ms,
multiples of the floor, and first-call (compile) time. This is how the
per-backend default in `recurrent_lm.layers.recurrence` was chosen.

``--scaled`` times `scaled_linear_scan` instead, as RWKV's WKV runs it: decay
``log(a)``, two mantissas (``b`` and ones) sharing the log-scale ``10 b``
(same floor, so the multiples compare the two forms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from penzai import pz

from recurrent_lm.layers import recurrence


def make_scan(method, chunk_size, grad, scaled=False):
    names = ("batch", "seq", "lru")

    def scan(a, b):
        h, _ = recurrence.linear_scan(
            pz.nx.wrap(a).tag(*names),
            pz.nx.wrap(b).tag(*names),
            method=method,
            chunk_size=chunk_size,
        )
        return h.unwrap(*names)

    def scaled_scan(a, b):
        b = pz.nx.wrap(b).tag(*names)
        h, _ = recurrence.scaled_linear_scan(
            pz.nx.wrap(jnp.log(a)).tag(*names),
            (b, pz.nx.ones(b.named_shape)),
            10.0 * b,
            method=method,
            chunk_size=chunk_size,
        )
        return h.mantissas[0].unwrap(*names) + h.mantissas[1].unwrap(*names) * h.log_scale.unwrap(*names)

    if scaled:
        scan = scaled_scan

    if grad:
        return jax.jit(jax.grad(lambda a, b: jnp.sum(scan(a, b) ** 2), argnums=(0, 1)))
    return jax.jit(scan)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="512x256,2048x256,8192x256,512x2560,2048x2560")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--grad", action="store_true", help="time forward + backward")
    parser.add_argument("--scaled", action="store_true", help="time scaled_linear_scan")
    args = parser.parse_args(argv)

    print(f"{'scaled_linear_scan' if args.scaled else 'linear_scan'}, backend"
          f" {jax.default_backend()}, {os.cpu_count()} CPUs, float32, batch 1,"
          f" {'forward+backward' if args.grad else 'forward'}, chunk {args.chunk_size},"
          f" {args.rounds} rounds; x = time / floor\n")
    print("| T x D | floor ms | " + " | ".join(recurrence.SCAN_METHODS) + " | compile s (" +
          "/".join(recurrence.SCAN_METHODS) + ") |")
    print("|---|---|" + "---|" * len(recurrence.SCAN_METHODS) + "---|")
    for shape in args.shapes.split(","):
        steps, width = (int(v) for v in shape.split("x"))
        ka, kb = jax.random.split(jax.random.key(0))
        a = jax.random.uniform(ka, (1, steps, width), minval=0.9, maxval=0.999)
        b = jax.random.normal(kb, (1, steps, width))
        fns = {"floor": jax.jit(lambda a, b: a * b + b)}
        compile_s = {}
        for method in recurrence.SCAN_METHODS:
            fns[method] = make_scan(method, args.chunk_size, args.grad, args.scaled)
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(a, b))
            compile_s[name] = time.perf_counter() - start
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(a, b))
                times[name].append(time.perf_counter() - start)
        floor = statistics.median(times["floor"])
        cells = [f"{statistics.median(times[m]) * 1e3:.2f} ms (x{statistics.median(times[m]) / floor:.1f})"
                 for m in recurrence.SCAN_METHODS]
        compiles = "/".join(f"{compile_s[m]:.2f}" for m in recurrence.SCAN_METHODS)
        print(f"| {steps} x {width} | {floor * 1e3:.2f} | " + " | ".join(cells) + f" | {compiles} |")


if __name__ == "__main__":
    main()
