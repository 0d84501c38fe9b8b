"""RWKV-4 on CPU: recurrent_lm against HF transformers' RwkvForCausalLM, same weights.

    .venv/bin/python benchmarks/rwkv.py                       # the README config (169m-like)
    .venv/bin/python benchmarks/rwkv.py --hidden 256 --layers 4 --steps 32   # quick

Builds a random HF model (RWKV-4 169m shape by default: width 768, 12 layers,
vocab 50277, float32), converts its weights with our converter, checks that
the logits agree, then, in one run:

* forward over a sequence (default 1024, batch 1): median of ``--rounds``
  runs each (round-robin), after a warm-up call; HF in eval mode under
  ``torch.no_grad`` (its CPU path runs WKV as a Python loop over time);
* greedy decoding at batch 1: tokens/s of the steady state. HF: one
  ``model(token, state=state)`` call per token (its generation loop does the
  same). Ours: `generate`'s compiled ``lax.while_loop``;
* the decode bandwidth bound: bytes a step must read (every parameter but
  the embedding table, of which one row is read, plus the state) over the
  bandwidth of `benchmarks.bandwidth.weight_probe` (every weight matrix
  through a matrix-vector product of its shape, ``--probe-runs`` times, in
  this process right before the decode timing; median, min and max), and
  over the machine's copy and plain read bandwidths (as in
  ``benchmarks/griffin_decode.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recurrent_lm
from benchmarks.bandwidth import OurDecode, weight_probe
from benchmarks.griffin_decode import copy_bandwidth, read_bandwidth
from checkpoints_conversion import rwkv as convert
from recurrent_lm.models import rwkv


def hf_model(config: rwkv.RwkvConfig):
    import torch
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(0)
    values = {
        k: v
        for k, v in convert.hf_config_dict(config).items()
        if k not in ("architectures", "model_type", "dtype")
    }
    return RwkvForCausalLM(RwkvConfig(**values)).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--prompt", type=int, default=16, help="prompt length before decoding"
    )
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--probe-runs", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    config = rwkv.RwkvConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers
    )
    reference = hf_model(config)
    # Weights before any eval forward: HF rescales them in place on the first one.
    state_dict = {
        k: v.detach().numpy().copy() for k, v in reference.state_dict().items()
    }
    model = convert.from_hf_state_dict(state_dict, config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, args.vocab, (1, args.seq)).astype(np.int32)
    forward = recurrent_lm.jit_forward(model)
    torch_ids = torch.from_numpy(ids.astype(np.int64))

    def hf_forward():
        with torch.no_grad():
            return reference(torch_ids).logits

    start = time.perf_counter()
    ours_logits = np.asarray(forward(ids))
    first_ours = time.perf_counter() - start
    start = time.perf_counter()
    hf_logits = hf_forward().numpy()
    first_hf = time.perf_counter() - start
    error = np.abs(ours_logits - hf_logits).max() / np.abs(hf_logits).max()
    print(
        f"# max relative logit difference (HF eval, rescale_every={config.rescale_every}): {error:.1e}"
    )

    times = {"recurrent_lm": [], "HF transformers": []}
    for _ in range(args.rounds):
        for name, fn in (
            ("recurrent_lm", lambda: forward(ids)),
            ("HF transformers", hf_forward),
        ):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    forward_ours, forward_hf = (statistics.median(times[n]) for n in times)

    # Decoding, batch 1.
    prompt = rng.integers(1, args.vocab, (1, args.prompt)).astype(np.int32)
    probe = weight_probe(model, args.probe_runs)
    step_ours = OurDecode(model).seconds_per_token(prompt, args.steps)

    def hf_decode(steps):
        with torch.no_grad():
            out = reference(torch.from_numpy(prompt.astype(np.int64)), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(steps):
                out = reference(token, state=out.state, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - start) / steps

    hf_decode(4)  # warm-up
    step_hf = statistics.median(hf_decode(args.steps) for _ in range(3))

    values = convert.to_hf_state_dict(model)
    param_bytes = sum(
        v.nbytes for k, v in values.items() if k != "rwkv.embeddings.weight"
    )
    param_bytes += values["rwkv.embeddings.weight"][0].nbytes  # one row
    state_bytes = 5 * 4 * args.hidden * args.layers
    copy, read = copy_bandwidth(), read_bandwidth()
    bound_copy = (param_bytes + state_bytes) / copy
    bound_read = (param_bytes + state_bytes) / read
    bound_probe = probe.bound_seconds(state_bytes)
    assert probe.nbytes == param_bytes, (probe.nbytes, param_bytes)

    load = os.getloadavg()[0]
    print(
        f"\nRWKV-4, width {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32,"
        f" {os.cpu_count()} CPUs (load average {load:.1f}), JAX {jax.__version__}, torch"
        f" {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"bytes read per decode step {param_bytes / 1e6:.0f} MB (+ state {state_bytes / 1e3:.0f} kB);"
        f" weight probe {probe.describe()}; copy bandwidth {copy / 1e9:.1f} GB/s (read + write),"
        f" read bandwidth {read / 1e9:.1f} GB/s\n"
    )
    print("| | HF transformers | recurrent_lm | ratio |")
    print("|---|---|---|---|")
    print(
        f"| forward, seq {args.seq}: first call s | {first_hf:.2f} | {first_ours:.2f} |"
        f" {first_hf / first_ours:.2f}x |"
    )
    print(
        f"| forward, seq {args.seq}: median ms (tokens/s) | {forward_hf * 1e3:.0f}"
        f" ({args.seq / forward_hf:,.0f}) | {forward_ours * 1e3:.0f} ({args.seq / forward_ours:,.0f}) |"
        f" **{forward_hf / forward_ours:.2f}x** |"
    )
    print(
        f"| decode batch 1: tokens/s (ms/step) | {1 / step_hf:.1f} ({step_hf * 1e3:.1f}) |"
        f" {1 / step_ours:.1f} ({step_ours * 1e3:.1f}) | {step_hf / step_ours:.2f}x |"
    )
    print(
        f"| decode: of the weight-probe bound ({bound_probe * 1e3:.1f} ms/step) |"
        f" {bound_probe / step_hf:.0%} | **{bound_probe / step_ours:.0%}** | |"
    )
    print(
        f"| decode: of the copy-bandwidth bound ({bound_copy * 1e3:.1f} ms/step) |"
        f" {bound_copy / step_hf:.0%} | {bound_copy / step_ours:.0%} | |"
    )
    print(
        f"| decode: of the read-bandwidth bound ({bound_read * 1e3:.1f} ms/step) |"
        f" {bound_read / step_hf:.0%} | {bound_read / step_ours:.0%} | |"
    )


if __name__ == "__main__":
    main()
