"""RWKV-7 on CPU: recurrent_lm against BlinkDL's x070 runtime and KerasHub's RWKV7Backbone.

    .venv/bin/python benchmarks/rwkv7.py                  # the README config (the 0.1b shape)
    .venv/bin/python benchmarks/rwkv7.py --hidden 256 --layers 2 --vocab 4096 --seq 128   # quick

Shape of the "0.1b" preset by default (width 768, 12 layers, heads of 64,
vocab 65536, low-rank widths 64 / 64 / 32 / 128, float32), batch 1. One
random state dict in BlinkDL's x070 layout (`tests/rwkv7_cases.py`), written
to a ``.pth``; his runtime (PyPI ``rwkv`` 0.8.32, ``RWKV_V7_ON=1``, "cpu
fp32", torch.jit-scripted) loads that file, ours is converted from the same
tensors, and the logits are compared. KerasHub's ``RWKV7Backbone``
(``KERAS_BACKEND=jax``, its pure-JAX operator: ``rwkv_ops`` is not installed)
is built with the same sizes and its own random weights, and jitted through
``stateless_call``. In one process:

* forward over ``--seq`` tokens (the same ids for all; logits at every
  position): first call, then the median of ``--rounds`` runs timed
  round-robin. Ours with the CPU default scan (sequential) and with
  ``scan_method="chunked"``; his sequence mode (``forward(ids,
  full_output=True)``, which runs the WKV recurrence as a Python loop over
  time in TorchScript); KerasHub's backbone (logits included);
* greedy decoding at batch 1: ours through `generate`'s compiled decode loop,
  his one-token mode (``forward([token], state)`` per token, argmax on the
  host, as his pipeline does): seconds per token, median of 3 runs of
  ``--steps`` tokens after a ``--prompt``-token prompt;
* the read-bandwidth bound (`benchmarks.bandwidth`): right before each decode
  timing, a probe reads the weights the way the step does (every matrix
  through a matrix-vector product of the same shape and layout; ours in JAX,
  his in torch with his stored layout), ``--probe-runs`` times; fraction of
  the bound = tokens/s x bytes per token / probe bandwidth (median; min and
  max printed). The JAX probe multiplies row-major [out, in] copies of the
  matrices (the machine's best matrix-vector rate: the bound for both
  implementations); a second JAX probe through our layers on their stored
  arrays shows what our storage layouts cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Run as a script, this directory comes first on the path, and its rwkv.py would
# shadow BlinkDL's `rwkv` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))  # rwkv7_cases: random files in his layout, his runtime

import rwkv7_cases

import recurrent_lm
from benchmarks import bandwidth
from benchmarks.common import fastest_threads, round_robin
from checkpoints_conversion import rwkv as convert
from recurrent_lm.layers.rwkv7 import TimeMix7
from recurrent_lm.models import rwkv7


def with_scan_method(model, method: str):
    """`model` with every time mix using `method` (the same parameter arrays)."""
    return pz.select(model).at_instances_of(TimeMix7).apply(
        lambda layer: dataclasses.replace(layer, scan_method=method))


def keras_backbone(case: rwkv7_cases.Case):
    """KerasHub's RWKV7Backbone with the case's sizes, random weights, as a
    jitted ``ids -> logits``."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    decay, rate, value, gate = case.ranks
    backbone = keras_hub.models.RWKV7Backbone(
        hidden_size=case.hidden, head_size=case.head_size, num_layers=case.layers,
        vocabulary_size=case.vocab, intermediate_dim=case.intermediate, gate_lora=gate,
        mv_lora=value, aaa_lora=rate, decay_lora=decay, dtype="float32",
    )
    trainable = [v.value for v in backbone.trainable_variables]
    frozen = [v.value for v in backbone.non_trainable_variables]

    @jax.jit
    def run(trainable, frozen, ids):
        inputs = {"token_ids": ids, "padding_mask": jnp.ones_like(ids)}
        return backbone.stateless_call(trainable, frozen, inputs)[0]

    count = sum(int(np.prod(v.shape)) for v in trainable + frozen)
    return (lambda ids: run(trainable, frozen, ids)), count


def his_decode_seconds(runtime, prompt, steps: int, repeats: int = 3) -> float:
    """His one-token mode, greedy: median seconds per token."""
    import torch

    runs = []
    for _ in range(repeats):
        logits, state = runtime.forward([int(t) for t in prompt], None)
        token = int(torch.argmax(logits))
        start = time.perf_counter()
        for _ in range(steps):
            logits, state = runtime.forward([token], state)
            token = int(torch.argmax(logits))
        runs.append((time.perf_counter() - start) / steps)
    return statistics.median(runs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    preset = rwkv7.PRESETS["0.1b"]
    parser.add_argument("--hidden", type=int, default=preset.hidden_size)
    parser.add_argument("--layers", type=int, default=preset.num_hidden_layers)
    parser.add_argument("--vocab", type=int, default=preset.vocab_size)
    parser.add_argument("--head-size", type=int, default=preset.head_size)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=16, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--probe-runs", type=int, default=20)
    args = parser.parse_args(argv)

    import torch

    ranks = rwkv7.suggested_ranks(args.hidden)
    case = rwkv7_cases.Case(
        "bench", vocab=args.vocab, hidden=args.hidden, head_size=args.head_size, layers=args.layers,
        ranks=ranks, intermediate=4 * args.hidden, seq=args.seq, batch=1)
    start = time.perf_counter()
    state_dict = rwkv7_cases.blinkdl_state_dict(case)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x070.pth")
        rwkv7_cases.save_pth(state_dict, path)
        his = rwkv7_cases.his_runtime(path)
    model = convert.from_blinkdl_state_dict(state_dict)
    del state_dict
    print(f"# weights written and loaded in {time.perf_counter() - start:.0f} s")
    keras_forward, keras_count = keras_backbone(case)
    params = sum(x.size for x in jax.tree.leaves(recurrent_lm.functional(model)[1]))
    print(f"# parameters: ours and his {params:,}, KerasHub's {keras_count:,}")

    rng = np.random.default_rng(0)
    ids = rng.integers(1, args.vocab, (1, args.seq)).astype(np.int32)
    id_list = [int(t) for t in ids[0]]
    ours = {
        "recurrent_lm (sequential, CPU default)": recurrent_lm.jit_forward(with_scan_method(model, "sequential")),
        "recurrent_lm (chunked)": recurrent_lm.jit_forward(with_scan_method(model, "chunked")),
    }

    def his_forward():
        return his.forward(id_list, None, full_output=True)[0]

    candidates = {name: (lambda f=f: f(ids)) for name, f in ours.items()}
    candidates["BlinkDL rwkv 0.8.32 (torch, sequence mode)"] = his_forward
    candidates["KerasHub 0.32 RWKV7Backbone (JAX)"] = lambda: keras_forward(jnp.asarray(ids))
    seq_threads, seq_calibration = fastest_threads(lambda: his.forward(id_list[:16], None, full_output=True))
    first, outputs = {}, {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        outputs[name] = np.asarray(jax.block_until_ready(fn()))
        first[name] = time.perf_counter() - start
    names = list(candidates)
    reference = outputs[names[2]]
    for name in names[:2]:
        error = np.abs(outputs[name][0] - reference).max() / np.abs(reference).max()
        print(f"# {name}: max relative logit difference to BlinkDL's runtime {error:.1e}")
    del outputs
    times = round_robin(candidates, args.rounds)
    forward = {name: statistics.median(t) for name, t in times.items()}
    floor_flops, floor_seconds = bandwidth.product_floor(model, args.seq)
    floor = statistics.median(floor_seconds)

    # Decoding at batch 1, each right after its bandwidth probe.
    prompt = rng.integers(1, args.vocab, (1, args.prompt)).astype(np.int32)
    state_bytes = bandwidth.state_bytes(model)
    probe = bandwidth.weight_probe(model, args.probe_runs)
    step_ours = bandwidth.OurDecode(model).seconds_per_token(prompt, args.steps)
    stored = bandwidth.weight_probe(model, args.probe_runs, as_stored=True)
    state = his.forward(id_list[:2], None)[1]
    one_threads, one_calibration = fastest_threads(lambda: his.forward([3], [x.clone() for x in state]))
    his_probe = bandwidth.torch_probe([v for k, v in his.z.items() if k != "emb.weight"], args.probe_runs)
    step_his = his_decode_seconds(his, prompt[0], args.steps)

    load = os.getloadavg()
    print(
        f"\nRWKV-7, width {args.hidden}, {args.layers} layers, heads of {args.head_size}, vocab"
        f" {args.vocab}, low-rank {'/'.join(map(str, ranks))}, {params / 1e6:.1f} M parameters, float32,"
        f" batch 1; {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
        f" (1 / 5 / 15 min); JAX {jax.__version__}, torch {torch.__version__}\n"
    )
    base = forward[names[0]]
    print(f"Forward, {args.seq} tokens (logits at every position), {args.rounds} rounds round-robin:\n")
    print("| implementation | first call s | median ms | tokens/s | recurrent_lm (default) speed-up |")
    print("|---|---|---|---|---|")
    for name in names:
        speedup = forward[name] / base
        mark = f"**{speedup:.2f}x**" if name in names[2:] else f"{speedup:.2f}x"
        print(f"| {name} | {first[name]:.1f} | {forward[name] * 1e3:.0f} | {args.seq / forward[name]:,.0f} |"
              f" {mark} |")
    print(f"| the model's matrix products alone (a floor for any implementation) | - | {floor * 1e3:.0f} |"
          f" {args.seq / floor:,.0f} | {floor / base:.2f}x |")
    keras = forward[names[3]]
    print(f"\nMatrix products: {floor_flops / 1e9:.1f} GFLOP at {floor_flops / floor / 1e9:.0f} GFLOP/s (5 passes,"
          f" after the forward timings). Ours spends {(base - floor) * 1e3:.0f} ms beyond them, KerasHub"
          f" {(keras - floor) * 1e3:.0f} ms; KerasHub / 1.5 = {keras / 1.5 * 1e3:.0f} ms"
          f" ({'above' if keras / 1.5 > floor else 'below'} the floor).")

    bound = probe.bound_seconds(state_bytes)
    print(
        f"\nDecode, batch 1, greedy, {args.steps} tokens after a {args.prompt}-token prompt (median of 3)."
        f" Bytes per token: {probe.nbytes / 1e6:.1f} MB of weights (every matrix; one embedding row)"
        f" + {state_bytes / 1e6:.2f} MB of state.\n"
    )
    print("| implementation | tokens/s | ms/token | probe bandwidth, median (min-max) | bound ms/token |"
          " of the bound |")
    print("|---|---|---|---|---|---|")
    low, high = probe.spread
    print(f"| recurrent_lm (`generate`'s decode loop) | {1 / step_ours:.1f} | {step_ours * 1e3:.1f} |"
          f" JAX probe {probe.bandwidth / 1e9:.1f} GB/s ({low / 1e9:.1f}-{high / 1e9:.1f}) | {bound * 1e3:.1f} |"
          f" **{probe.fraction(step_ours, state_bytes):.0%}** |")
    low_h, high_h = his_probe.spread
    his_bound = (probe.nbytes + state_bytes) / his_probe.bandwidth
    print(f"| BlinkDL rwkv 0.8.32 (one-token mode) | {1 / step_his:.1f} | {step_his * 1e3:.1f} |"
          f" JAX probe (the same); torch probe on his matrices {his_probe.bandwidth / 1e9:.1f} GB/s"
          f" ({low_h / 1e9:.1f}-{high_h / 1e9:.1f}) | {bound * 1e3:.1f}; torch probe's {his_bound * 1e3:.1f} |"
          f" {probe.fraction(step_his, state_bytes):.0%}; of the torch probe's {his_bound / step_his:.0%} |")
    calibration = lambda seconds: ", ".join(f"{n}: {t * 1e3:.0f} ms" for n, t in seconds.items())
    print(f"\nHis torch threads (the faster of 1 and 2): sequence mode {seq_threads} (16-token call with"
          f" 1 / 2 threads: {calibration(seq_calibration)}), one-token mode {one_threads} (one token:"
          f" {calibration(one_calibration)}).")
    print(f"Probe through the layers' own contractions on the stored layouts (after our decode timing):"
          f" {stored.describe()}; our decode reached {stored.fraction(step_ours, state_bytes):.0%} of that."
          f" Ours / his decode speed {step_his / step_ours:.2f}x.")


if __name__ == "__main__":
    main()
