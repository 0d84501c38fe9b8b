"""Mamba-1 and Mamba-2 on CPU: recurrent_lm against transformers' torch path.

    .venv/bin/python benchmarks/mamba.py                    # the README config (both 130m shapes)
    .venv/bin/python benchmarks/mamba.py --layers 2 --seq 128 --ssd-steps 256   # quick

For each family (``--families``, default both), the "130m" preset's shape
(Mamba-1: width 768, 24 layers, inner 1536, N = 16; Mamba-2: width 768, 24
layers, 24 heads of 64, N = 128, one group), ``--layers`` to shorten it,
random weights (HF's initialisation), float32, batch 1. Our model is written
with `checkpoints_conversion.mamba.save_hf_checkpoint` and loaded by
transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (its reference
torch code: neither ``mamba_ssm`` nor ``causal_conv1d`` is installed), so
both run the same weights; their logits are compared. In one process:

* forward over ``--seq`` tokens (logits at every position): first call,
  then the median of ``--rounds`` runs timed round-robin: ours with every
  scan form (the CPU default first: Mamba-1's fused `selective_scan`,
  Mamba-2's sequential `matrix_scan`), HF's forward (``use_cache=False``),
  and the model's matrix products alone (`bandwidth.product_floor`, a floor
  under any implementation); the XLA temporary memory of each compiled
  forward of ours;
* greedy decoding at batch 1: ours through `generate`'s compiled decode
  loop, each timing right after a read-bandwidth probe, ``--decode-pairs``
  times (`bandwidth.interleaved_fraction`: fraction of the bound = tokens/s
  x bytes per token / probe bandwidth, the median over the pairs),
  and HF's ``generate`` with its cache (one token at a time; seconds per
  token = (time for ``--steps`` + 1 tokens - time for 1) / ``--steps``),
  for reference;
* the recurrences alone at ``--ssd-steps`` positions, batch 1, on one
  mixer's shape: Mamba-1's selective scan (fused `selective_scan` against
  `linear_scan` on the materialised [T, inner, N] decays and inputs, then
  ``C . h``: the path a captured state site takes, and the associative and
  chunked forms) and Mamba-2's SSD (`matrix_scan` sequential against
  chunked, scalar decay per head): time and the XLA temporary memory of
  each compiled function (``memory_analysis().temp_size_in_bytes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

import recurrent_lm
from benchmarks import bandwidth
from benchmarks.common import fastest_threads, round_robin
from checkpoints_conversion import mamba as convert
from recurrent_lm.core import functional
from recurrent_lm.layers import matrix_recurrence, recurrence
from recurrent_lm.layers.mamba import MambaMixer, selective_scan
from recurrent_lm.layers.mamba2 import Mamba2Mixer
from recurrent_lm.models import mamba, mamba2

FAMILIES = {
    "mamba": (mamba, MambaMixer, ("sequential", "associative", "chunked"), "MambaForCausalLM"),
    "mamba2": (mamba2, Mamba2Mixer, ("sequential", "chunked"), "Mamba2ForCausalLM"),
}


def with_scan_method(model, mixer_class, method: str):
    """`model` with every mixer using `method` (the same parameter arrays)."""
    return pz.select(model).at_instances_of(mixer_class).apply(
        lambda layer: dataclasses.replace(layer, scan_method=method))


def temp_bytes(fn, *args) -> int:
    """XLA's temporary buffer bytes of ``jax.jit(fn)`` compiled for `args`."""
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def forward_temp_bytes(model, ids) -> int:
    apply, params, state = functional.functional(model)
    return temp_bytes(lambda params, ids: apply(params, state, ids, None)[0], params, jnp.asarray(ids))


def hf_decode_seconds(hf, prompt, steps: int, repeats: int = 3) -> float:
    """HF's greedy ``generate`` with its cache: median seconds per decoded token."""
    import torch

    ids = torch.as_tensor(prompt, dtype=torch.long)

    def run(new):
        start = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              use_cache=True, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new, out.shape
        return time.perf_counter() - start

    run(2)
    runs = [(run(steps + 1) - run(1)) / steps for _ in range(repeats)]
    return statistics.median(runs)


def bench_family(family: str, args, rng) -> None:
    import torch
    import transformers

    module, mixer_class, methods, hf_class = FAMILIES[family]
    config = module.PRESETS["130m"]
    config = dataclasses.replace(config, num_hidden_layers=args.layers or config.num_hidden_layers)
    model = module.build_model(config, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "hf")
        convert.save_hf_checkpoint(model, path)
        hf = getattr(transformers, hf_class).from_pretrained(path, torch_dtype=torch.float32).eval()
    params = sum(x.size for x in jax.tree.leaves(recurrent_lm.functional(model)[1]))

    ids = rng.integers(1, config.vocab_size, (1, args.seq)).astype(np.int32)
    default = recurrence.default_scan_method() if family == "mamba" else \
        matrix_recurrence.default_matrix_scan_method()
    methods = (default, *[m for m in methods if m != default])
    variants = {m: with_scan_method(model, mixer_class, m) for m in methods}
    label = lambda m: f"recurrent_lm ({m}{', CPU default' if m == default else ''})"
    ours = {label(m): recurrent_lm.jit_forward(v) for m, v in variants.items()}
    memory = {label(m): forward_temp_bytes(v, ids) for m, v in variants.items()}
    hf_name = f"transformers {transformers.__version__} {hf_class} (torch path)"
    torch_ids = torch.as_tensor(ids, dtype=torch.long)

    def hf_forward():
        with torch.no_grad():
            return hf(torch_ids, use_cache=False).logits

    with torch.no_grad():
        threads, calibration = fastest_threads(lambda: hf(torch_ids[:, :64], use_cache=False))
    candidates = {name: (lambda f=f: f(ids)) for name, f in ours.items()}
    candidates[hf_name] = hf_forward
    first, errors = {}, {}
    reference = None
    for name in reversed(candidates):  # HF first: the reference
        start = time.perf_counter()
        out = candidates[name]()
        out = out.numpy() if hasattr(out, "numpy") else np.asarray(jax.block_until_ready(out))
        first[name] = time.perf_counter() - start
        if reference is None:
            reference = out
        else:
            errors[name] = float(np.abs(out - reference).max() / np.abs(reference).max())
    del reference
    times = round_robin(candidates, args.rounds)
    forward = {name: statistics.median(t) for name, t in times.items()}
    floor_flops, floor_seconds = bandwidth.product_floor(model, args.seq)
    floor = statistics.median(floor_seconds)

    prompt = rng.integers(1, config.vocab_size, (1, args.prompt)).astype(np.int32)
    state_bytes = bandwidth.state_bytes(model)
    decoded = bandwidth.interleaved_fraction(model, prompt, args.steps, args.decode_pairs, args.probe_runs)
    probe, step_ours = decoded.probe, decoded.seconds
    step_hf = hf_decode_seconds(hf, prompt, args.steps)

    load = os.getloadavg()
    shape = (f"inner {config.intermediate_size}, N = {config.state_size}" if family == "mamba" else
             f"{config.num_heads} heads of {config.head_dim}, N = {config.state_size},"
             f" {config.n_groups} group(s)")
    print(f"\n## {family}: 130m shape, width {config.hidden_size}, {config.num_hidden_layers} layers, {shape},"
          f" vocab {config.vocab_size}, {params / 1e6:.1f} M parameters, float32, batch 1; {os.cpu_count()}"
          f" CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); JAX"
          f" {jax.__version__}, torch {torch.__version__} ({threads} thread(s): 64-token call with 1 / 2"
          f" threads {', '.join(f'{t * 1e3:.0f}' for t in calibration.values())} ms)\n")
    print(f"Forward, {args.seq} tokens (logits at every position), {args.rounds} rounds round-robin:\n")
    print("| implementation | first call s | median ms | tokens/s | vs transformers | XLA temp MB |"
          " max rel. logit diff to HF |")
    print("|---|---|---|---|---|---|---|")
    base = forward[hf_name]
    for name in candidates:
        ratio = base / forward[name]
        mark = f"**{ratio:.2f}x**" if name == label(default) else f"{ratio:.2f}x"
        mem = f"{memory[name] / 1e6:.0f}" if name in memory else "-"
        print(f"| {name} | {first[name]:.1f} | {forward[name] * 1e3:.0f} | {args.seq / forward[name]:,.0f} |"
              f" {mark} | {mem} | {errors.get(name, 0):.1e} |")
    print(f"| the model's matrix products alone (a floor for any implementation) | - | {floor * 1e3:.0f} |"
          f" {args.seq / floor:,.0f} | {base / floor:.2f}x | - | - |")
    ours_default = forward[label(default)]
    print(f"\nMatrix products: {floor_flops / 1e9:.1f} GFLOP at {floor_flops / floor / 1e9:.0f} GFLOP/s."
          f" Ours (default) spends {(ours_default - floor) * 1e3:.0f} ms beyond them, transformers"
          f" {(base - floor) * 1e3:.0f} ms; transformers / 1.5 = {base / 1.5 * 1e3:.0f} ms"
          f" ({'above' if base / 1.5 > floor else 'below'} the floor).")

    bound = probe.bound_seconds(state_bytes)
    low, high = probe.spread
    print(f"\nDecode, batch 1, greedy, {args.steps} tokens after a {args.prompt}-token prompt; ours:"
          f" {args.decode_pairs} (probe, decode) pairs back to back, the median pair shown"
          f" (fractions {', '.join(f'{f:.0%}' for f in decoded.fractions)}); transformers: median of 3."
          f" Bytes per token: {probe.nbytes / 1e6:.1f} MB of weights (every matrix; the tied head in full)"
          f" + {state_bytes / 1e6:.2f} MB of state.\n")
    print("| implementation | tokens/s | ms/token | probe bandwidth, median (min-max) | bound ms/token |"
          " of the bound |")
    print("|---|---|---|---|---|---|")
    print(f"| recurrent_lm (`generate`'s decode loop) | {1 / step_ours:.1f} | {step_ours * 1e3:.2f} |"
          f" {probe.bandwidth / 1e9:.1f} GB/s ({low / 1e9:.1f}-{high / 1e9:.1f}) | {bound * 1e3:.2f} |"
          f" **{decoded.fraction:.0%}** |")
    print(f"| {hf_name.replace('(torch path)', '')}`generate` with its cache | {1 / step_hf:.1f} |"
          f" {step_hf * 1e3:.2f} | (the same probe) | {bound * 1e3:.2f} |"
          f" {probe.fraction(step_hf, state_bytes):.0%} |")
    print(f"\nOurs / transformers: forward {base / ours_default:.2f}x, decode {step_hf / step_ours:.2f}x.")


def timed_candidates(candidates, args_of, rounds):
    """(first-call seconds, median seconds, temp bytes) of each jitted ``name -> fn``."""
    results = {}
    for name, fn in candidates.items():
        args = args_of(name)
        compiled = jax.jit(fn)
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        results[name] = [time.perf_counter() - start, None, temp_bytes(fn, *args)]
    times = round_robin({n: (lambda f=jax.jit(fn), a=args_of(n): f(*a)) for n, fn in candidates.items()},
                        rounds)
    for name, t in times.items():
        results[name][1] = statistics.median(t)
    return results


def bench_primitives(args, rng) -> None:
    steps = args.ssd_steps
    wrap = lambda x, *names: pz.nx.wrap(jnp.asarray(x, jnp.float32)).tag(*names)
    normal = lambda *shape: rng.standard_normal(shape)

    # Mamba-1 130m mixer: inner 1536, N = 16.
    inner, size = mamba.PRESETS["130m"].intermediate_size, mamba.PRESETS["130m"].state_size
    u = wrap(normal(1, steps, inner), "batch", "seq", "inner")
    dt = wrap(rng.uniform(1e-3, 0.1, (1, steps, inner)), "batch", "seq", "inner")
    a = wrap(-np.tile(np.arange(1, size + 1), (inner, 1)), "inner", "state")
    b = wrap(normal(1, steps, size), "batch", "seq", "state")
    c = wrap(normal(1, steps, size), "batch", "seq", "state")

    def fused(u, dt, a, b, c):
        return selective_scan(u, dt, a, b, c)[0].data_array

    def materialised(method):
        def run(u, dt, a, b, c):
            decay = pz.nx.nmap(jnp.exp)(dt * a)
            h, _ = recurrence.linear_scan(decay, (dt * u) * b, method=method)
            return pz.nx.nmap(jnp.sum)((h * c).untag("state")).data_array
        return run

    m1 = {"selective_scan (fused, CPU default)": fused}
    for method in ("sequential", "associative", "chunked"):
        m1[f"linear_scan {method} on [T, inner, N], then C . h"] = materialised(method)
    m1_results = timed_candidates(m1, lambda name: (u, dt, a, b, c), args.rounds)

    # Mamba-2 130m mixer: 24 heads, value 64, key (state) 128, scalar decay per head.
    config = mamba2.PRESETS["130m"]
    heads, value, key = config.num_heads, config.head_dim, config.state_size
    keyed = lambda: wrap(normal(1, steps, heads, key) / np.sqrt(key), "batch", "seq", "heads", "state")
    r, k = keyed(), keyed()
    v = wrap(normal(1, steps, heads, value), "batch", "seq", "heads", "projection")
    log_decay = wrap(-rng.uniform(0.001, 0.1, (1, steps, heads)), "batch", "seq", "heads")

    def ssd(method, chunk=matrix_recurrence.DEFAULT_CHUNK_SIZE):
        def run(r, log_decay, k, v):
            y, _ = matrix_recurrence.matrix_scan(r, log_decay, k, v, key_axis="state",
                                                 value_axis="projection", method=method, chunk_size=chunk)
            return y.data_array
        return run

    m2 = {"matrix_scan sequential (CPU default)": ssd("sequential")}
    for chunk in args.chunks:
        m2[f"matrix_scan chunked, chunks of {chunk}"] = ssd("chunked", chunk)
    m2_results = timed_candidates(m2, lambda name: (r, log_decay, k, v), args.rounds)

    load = os.getloadavg()
    print(f"\n## The recurrences alone, {steps} positions, batch 1, float32 (load average {load[0]:.1f} /"
          f" {load[1]:.1f} / {load[2]:.1f})\n")
    for title, results in ((f"Mamba-1 selective scan, inner {inner} x N = {size}", m1_results),
                           (f"Mamba-2 SSD, {heads} heads x {value} x {key} state, scalar decay", m2_results)):
        print(f"{title}:\n")
        print("| form | first call s | median ms | tokens/s | speed vs the first row | XLA temp MB |")
        print("|---|---|---|---|---|---|")
        base = next(iter(results.values()))[1]
        for name, (first, seconds, nbytes) in results.items():
            print(f"| {name} | {first:.1f} | {seconds * 1e3:.1f} | {steps / seconds:,.0f} | {base / seconds:.2f}x |"
                  f" {nbytes / 1e6:.1f} |")
        print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default="mamba,mamba2")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the preset's 24)")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--probe-runs", type=int, default=20)
    parser.add_argument("--decode-pairs", type=int, default=5, help="(probe, decode) timings alternated")
    parser.add_argument("--ssd-steps", type=int, default=2048, help="positions of the primitives (0: skip)")
    parser.add_argument("--chunks", default="64,128,256", help="the SSD chunked form's chunk sizes")
    args = parser.parse_args(argv)
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    rng = np.random.default_rng(0)
    for family in args.families.split(","):
        if family:
            bench_family(family, args, rng)
    if args.ssd_steps:
        bench_primitives(args, rng)


if __name__ == "__main__":
    main()
