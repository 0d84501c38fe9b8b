"""Griffin decoding: recurrent_lm's generate against the official recurrentgemma sampler.

    .venv/bin/python benchmarks/griffin_decode.py                 # the README config
    .venv/bin/python benchmarks/griffin_decode.py --width 256 --vocab 4096 --steps 64   # quick

Same weights (ours converted from the official ones), greedy decoding, one run.
Reports:
* time to first token for a prompt: warm (both compiled for that length) and
  for a new prompt length (the official sampler recompiles for every prompt
  length; ours pads prompts to a bucket);
* decode tokens/s at batch 1 and 8 (steady state, after compilation);
* peak memory of the compiled decode loop for 1k and 8k generated tokens
  (XLA's memory analysis: inputs (parameters, state, buffers) + temporaries);
* the memory-bandwidth bound: bytes of parameters and state read per decode
  step over the machine's measured bandwidth (copy, and read-only, which is
  what decoding does; the bound uses the read rate), and how close each
  implementation gets to it.
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

from benchmarks import common as common_args
from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm.sampling import decode


class _Vocab:
    """What the official sampler asks of its SentencePiece vocabulary here."""

    def pad_id(self):
        return 0

    def eos_id(self):
        return 1

    def bos_id(self):
        return 2


def timed(fn, repeats=1):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def copy_bandwidth(megabytes=512, repeats=7) -> float:
    """STREAM-style copy rate: bytes read + written per second by an in-place
    (donated) elementwise update, so no fresh pages are touched."""
    update = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = update(jnp.ones((megabytes * 2**20 // 4,), jnp.float32))
    nbytes = x.nbytes
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x = jax.block_until_ready(update(x))
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def read_bandwidth(megabytes=512, repeats=7) -> float:
    """Bytes read per second by a jitted sum: decoding only reads its weights."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    _, seconds = timed(lambda: total(x), repeats)
    return x.nbytes / seconds


def memory_bytes(compiled) -> int:
    """Inputs (parameters, state, buffers) plus XLA's temporaries of a compiled call."""
    analysis = compiled.memory_analysis()
    return analysis.argument_size_in_bytes + analysis.temp_size_in_bytes


class Official:
    def __init__(self, config, params):
        self.sampler = rg.Sampler(rg.Griffin(config), _Vocab(), params)
        self.params = params

    def prefill(self, ids, steps):
        # The official prefill donates its token buffer: hand it a copy.
        ids = jnp.array(ids, copy=True)
        lengths = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)
        return self.sampler._compiled_prompt_processing_fn(self.params, ids, None, lengths, steps, False, False)

    def decode(self, state):
        return self.sampler._compiled_sample_fn(self.params, state, False)

    def decode_memory(self, ids, steps) -> int:
        state = self.prefill(ids, steps)
        # Lower on flat leaves: lowering rebuilds argument trees with placeholder
        # leaves, which the official SamplingState's type checks reject.
        leaves, treedef = jax.tree.flatten(state)
        loop = jax.jit(lambda params, leaves: self.sampler._sample_fn(
            params, jax.tree.unflatten(treedef, leaves), False))
        return memory_bytes(loop.lower(self.params, leaves).compile())


class Ours:
    def __init__(self, model):
        self.model = model

    def prepare(self, ids, steps):
        settings = dict(max_new_tokens=steps)
        (self.skeleton, self.params, state, pids, pos, self.settings, self.sampling,
         _) = decode._prepare(self.model, [list(map(int, row)) for row in np.asarray(ids)], settings, 64, None)
        self.steps = steps
        return state, pids, pos

    def prefill(self, ids, steps):
        state, pids, pos = self.prepare(ids, steps)
        return decode._prefill(self.skeleton, self.params, state, pids, pos, jax.random.key(0),
                               self.sampling, self.settings, None)

    def decode(self, carry):
        return decode._decode(self.skeleton, self.params, carry, self.steps, self.sampling, self.settings)

    def decode_memory(self, ids, steps) -> int:
        carry = self.prefill(ids, steps)
        lowered = decode._decode.lower(self.skeleton, self.params, carry, steps, self.sampling, self.settings)
        return memory_bytes(lowered.compile())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args.add_model_arguments(parser)
    parser.add_argument("--prompt", type=int, default=256, help="prompt length")
    parser.add_argument("--steps", type=int, default=128, help="decode steps timed")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)

    config = common_args.official_config(args, common.ScanType.LINEAR_NATIVE)
    init_ids = jnp.zeros((1, 8), jnp.int32)
    params = rg.Griffin(config).init(jax.random.key(0), init_ids, jnp.arange(8)[None])["params"]
    model = convert.from_official_params(jax.device_get(params), attention_window_size=args.window)
    official, ours = Official(config, params), Ours(model)
    rng = np.random.default_rng(0)
    prompt = lambda batch, length: jnp.asarray(rng.integers(3, args.vocab, (batch, length)), jnp.int32)

    copy, bandwidth = copy_bandwidth(), read_bandwidth()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(ours.prefill(prompt(1, 8), 2).state))
    print(f"# copy bandwidth {copy / 1e9:.1f} GB/s (read + write), read bandwidth"
          f" {bandwidth / 1e9:.1f} GB/s; parameters {param_bytes / 1e6:.0f} MB;"
          f" state {state_bytes / 1e6:.2f} MB per sequence. Bound = bytes read per step /"
          " read bandwidth.")

    rows = []
    # Time to first token at batch 1.
    ids = prompt(1, args.prompt)
    for name, impl in (("official", official), ("recurrent_lm", ours)):
        _, first = timed(lambda: impl.prefill(ids, args.steps))            # compiles
        _, warm = timed(lambda: impl.prefill(ids, args.steps), repeats=5)
        other = prompt(1, args.prompt - 3)                                 # a new prompt length
        _, new_length = timed(lambda: impl.prefill(other, args.steps))
        rows.append((name, first, warm, new_length))
    print("\n| implementation | first prefill s (compile) | TTFT warm ms | TTFT new prompt length s |")
    print("|---|---|---|---|")
    for name, first, warm, new_length in rows:
        print(f"| {name} | {first:.1f} | {warm * 1e3:.0f} | {new_length:.2f} |")
    ratio_warm = rows[1][2] / rows[0][2]
    ratio_new = rows[1][3] / rows[0][3]
    print(f"\nTTFT ratio ours/official: warm {ratio_warm:.2f}x, new prompt length {ratio_new:.2f}x")

    print("\n| batch | implementation | decode tokens/s | ms/step | bound ms/step | of bound |")
    print("|---|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        ids = prompt(batch, args.prompt)
        bound = (param_bytes + batch * state_bytes) / bandwidth
        for name, impl in (("official", official), ("recurrent_lm", ours)):
            jax.block_until_ready(impl.decode(impl.prefill(ids, args.steps)))  # compile
            seconds = []
            for _ in range(3):
                carry = impl.prefill(ids, args.steps)
                jax.block_until_ready(carry)
                _, t = timed(lambda: impl.decode(carry))
                seconds.append(t)
            per_step = statistics.median(seconds) / (args.steps - 1)
            print(f"| {batch} | {name} | {batch / per_step:,.1f} | {per_step * 1e3:.1f} |"
                  f" {bound * 1e3:.1f} | {bound / per_step:.0%} |")

    print("\n| generated tokens | official decode peak MB | recurrent_lm decode peak MB |")
    print("|---|---|---|")
    ids = prompt(1, args.prompt)
    for steps in (1024, 8192):
        print(f"| {steps} | {official.decode_memory(ids, steps) / 1e6:.1f} |"
              f" {ours.decode_memory(ids, steps) / 1e6:.1f} |")


if __name__ == "__main__":
    main()
