"""The benchmark model shared by the Griffin benchmarks: arguments and official config."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Width 1024, 8 layers (R, R, A), 8 heads, vocab 32k, window 2048 by default."""
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--window", type=int, default=2048)


def official_config(args, scan_type=None):
    """The official `recurrentgemma` GriffinConfig for the parsed arguments."""
    import recurrentgemma.jax as rg
    from recurrentgemma import common

    pattern = [common.TemporalBlockType.RECURRENT] * 2 + [common.TemporalBlockType.ATTENTION]
    return rg.GriffinConfig(
        vocab_size=args.vocab,
        width=args.width,
        mlp_expanded_width=3 * args.width,
        num_heads=args.heads,
        block_types=tuple(pattern[i % 3] for i in range(args.layers)),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=args.window,
        logits_soft_cap=30.0,
        lru_width=args.width,
        scan_type=scan_type or common.ScanType.AUTO,
    )


def round_robin(candidates, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each ``name -> fn()``, timed in turn for `rounds` rounds
    (machine noise then hits every candidate alike)."""
    import time

    import jax

    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def fastest_threads(fn, counts=(1, 2)) -> tuple[int, dict[int, float]]:
    """The torch thread count among `counts` with which `fn()` runs fastest
    (one warm-up and one timed call each), and every count's seconds; sets it.
    On a shared 2-core machine torch's OpenMP pool can be ~40x slower with 2
    threads than with 1 on many small ops (its workers wait on cores that
    other processes hold)."""
    import time

    import torch

    seconds = {}
    for count in counts:
        torch.set_num_threads(count)
        fn()
        start = time.perf_counter()
        fn()
        seconds[count] = time.perf_counter() - start
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, seconds
