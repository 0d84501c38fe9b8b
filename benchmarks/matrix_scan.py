"""`matrix_scan`: the sequential form against the chunked form, and a matmul floor.

    .venv/bin/python benchmarks/matrix_scan.py [--steps 2048] [--heads 12] [--width 64]
        [--value-width M] [--chunks 16,32,64,128] [--rounds 3] [--scalar-decay]
    # Mamba-2 130m's SSD: --heads 24 --width 128 --value-width 64 --scalar-decay

Times (round-robin, median of `--rounds`) the forward pass of `matrix_scan`
at batch 1, float32, state heads x M x N (M = N unless ``--value-width``), with and without the rank-one term,
per-channel decay (``--scalar-decay``: one per head and step). Reports ms,
tokens/s, the ratio to the sequential form (> 1: faster), and the chunked
form's matmul floors: its FLOPs counted from the algorithm (`chunked_flops`)
at two rates measured in the same run, that of one square float32
``jnp.matmul`` of the same FLOPs (the machine's best: "floor", "floor x" =
time / that) and that of the chunked form's own typical product, a batch of
(heads x chunks) [C, N] x [N, M] products ("batched floor": what the
algorithm would take if all of its work ran as fast as its products can).
The sequential form's FLOPs (`sequential_flops`) give its own rate. This is
how the CPU default in `recurrent_lm.layers.matrix_recurrence` was chosen.
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

from penzai import pz

from recurrent_lm.layers import matrix_recurrence

KEYED = ("batch", "seq", "heads", "state")
VALUED = ("batch", "seq", "heads", "projection")


def chunked_flops(steps, heads, n, m, chunk, rank_one, scalar_decay):
    """FLOPs (a multiply-add is 2) of the chunked form's products, all chunks.

    Counts what `_chunked` computes, masked parts included: per chunk the
    within-block scores (per key channel unless the decay is scalar), the
    cross-block products, the triangular solve, the outputs and state terms,
    and the scan's state update.
    """
    sub = matrix_recurrence._sub_block(chunk)
    chunk = min(chunk, -(-steps // sub) * sub)
    blocks, chunks = chunk // sub, -(-steps // chunk)

    def scores(keys):
        if scalar_decay:
            return 2 * keys * chunk * chunk * n
        near = (2 * keys + 1) * blocks * sub * sub * n
        far = (blocks * chunk * n + 2 * keys * chunk * chunk * n) if blocks > 1 else 0
        return near + far

    c2 = chunk * chunk
    if rank_one:
        per_chunk = (
            2 * scores(2)
            + 2 * c2 * m  # A_ak V
            + c2 * (n + m)  # triangular solve
            + 2 * c2 * n  # Y_rb W
            + 4 * c2 * m  # Y_rb U_v, Y_rk V
            + 2 * chunk * n * n  # W^T B~
            + 4 * chunk * m * n  # U_v^T B~, V^T K~
            + 2 * chunk * n * m  # outputs from the entering state
            + 2 * m * n * n  # state update across chunks
        )
    else:
        per_chunk = scores(1) + 2 * c2 * m + 4 * chunk * m * n + m * n
    return heads * chunks * per_chunk


def sequential_flops(steps, heads, n, m, rank_one):
    """FLOPs of the sequential form: per step and head, the decay (M N), the
    outer product v k^T added (2 M N), the read-out (2 M N) and, with the
    rank-one term, S a and its outer product with b (4 M N)."""
    return heads * steps * m * n * (5 + (4 if rank_one else 0))


def make_scan(method, chunk_size, rank_one, scalar_decay):
    def scan(r, log_decay, k, v, a, b):
        wrap = lambda x, names: pz.nx.wrap(x).tag(*names)
        y, _ = matrix_recurrence.matrix_scan(
            wrap(r, KEYED),
            wrap(log_decay, KEYED[:3] if scalar_decay else KEYED),
            wrap(k, KEYED),
            wrap(v, VALUED),
            wrap(a, KEYED) if rank_one else None,
            wrap(b, KEYED) if rank_one else None,
            method=method,
            chunk_size=chunk_size,
        )
        return y.unwrap(*VALUED)

    return jax.jit(scan)


def time_round_robin(fns, args, rounds):
    times = {name: [] for name in fns}
    compile_s = {}
    for name, (fn, fn_args) in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        compile_s[name] = time.perf_counter() - start
    for _ in range(rounds):
        for name, (fn, fn_args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--width", type=int, default=64, help="N, the key width")
    parser.add_argument("--value-width", type=int, default=None, help="M (default N)")
    parser.add_argument("--chunks", default="16,32,64,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scalar-decay", action="store_true")
    args = parser.parse_args(argv)
    steps, heads, n = args.steps, args.heads, args.width
    m = args.value_width or n
    chunks = [int(c) for c in args.chunks.split(",")]

    rng = np.random.default_rng(0)
    shape = (1, steps, heads, n)
    normal = lambda: jnp.asarray(rng.normal(size=shape), jnp.float32)
    r, k = normal(), normal() / np.sqrt(n)
    v = jnp.asarray(rng.normal(size=(*shape[:-1], m)), jnp.float32)
    sig = lambda x: 1 / (1 + jnp.exp(-x))
    log_decay = -np.exp(-0.5) * sig(normal())
    if args.scalar_decay:
        log_decay = log_decay[..., 0]
    kk = normal()
    kk = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    a, b = -kk, kk * sig(normal())
    inputs = (r, log_decay, k, v, a, b)

    print(
        f"matrix_scan forward, backend {jax.default_backend()}, {os.cpu_count()} CPUs,"
        f" float32, batch 1, T={steps}, heads x M x N = {heads} x {m} x {n},"
        f" {'scalar' if args.scalar_decay else 'per-channel'} decay, {args.rounds}"
        " rounds (median; the machine may be shared: times are noisy, ratios less so)\n"
    )
    print(
        "| rank-one | method | ms | tokens/s | vs sequential | GFLOP | GFLOP/s | floor ms"
        " | floor x | batched floor ms | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rank_one in (False, True):
        fns = {
            "sequential": (
                make_scan("sequential", 64, rank_one, args.scalar_decay),
                inputs,
            )
        }
        floors = {}
        for chunk in chunks:
            fns[f"chunked C={chunk}"] = (
                make_scan("chunked", chunk, rank_one, args.scalar_decay),
                inputs,
            )
            flops = chunked_flops(
                steps, heads, n, m, chunk, rank_one, args.scalar_decay
            )
            side = max(8, round((flops / 2) ** (1 / 3)))
            x = jnp.asarray(rng.normal(size=(side, side)), jnp.float32)
            fns[f"floor C={chunk}"] = (jax.jit(jnp.matmul), (x, x))
            batch = heads * -(-steps // chunk)
            fns[f"batched C={chunk}"] = (
                jax.jit(lambda p, q: jnp.einsum("bij,bjk->bik", p, q)),
                (
                    jnp.asarray(rng.normal(size=(batch, chunk, n)), jnp.float32),
                    jnp.asarray(rng.normal(size=(batch, n, m)), jnp.float32),
                ),
            )
            floors[chunk] = flops
        med, compile_s = time_round_robin(fns, inputs, args.rounds)
        seq = med["sequential"]
        seq_flops = sequential_flops(steps, heads, n, m, rank_one)
        label = "yes" if rank_one else "no"
        print(
            f"| {label} | sequential | {seq * 1e3:.1f} | {steps / seq:,.0f} | 1.00 |"
            f" {seq_flops / 1e9:.2f} | {seq_flops / seq / 1e9:.0f} | - | - | - |"
            f" {compile_s['sequential']:.1f} |"
        )
        for chunk in chunks:
            t = med[f"chunked C={chunk}"]
            floor = med[f"floor C={chunk}"]
            batch = heads * -(-steps // chunk)
            batched_rate = 2 * batch * chunk * n * m / med[f"batched C={chunk}"]
            print(
                f"| {label} | chunked C={chunk} | {t * 1e3:.1f} | {steps / t:,.0f} |"
                f" {seq / t:.2f} | {floors[chunk] / 1e9:.2f} | {floors[chunk] / t / 1e9:.0f} |"
                f" {floor * 1e3:.1f} | {t / floor:.1f} | {floors[chunk] / batched_rate * 1e3:.1f} |"
                f" {compile_s[f'chunked C={chunk}']:.1f} |"
            )


if __name__ == "__main__":
    main()
