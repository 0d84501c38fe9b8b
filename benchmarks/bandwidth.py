"""Decode against the read-bandwidth bound: a probe that reads a model's weights
the way a decode step does, and our compiled decode loop, timed.

A batch-1 decode step reads every weight matrix once, through one
matrix-vector product each, plus the recurrent state; it is bound by memory
bandwidth. A generic bandwidth figure (a jitted sum over one big array, a
STREAM copy) measures a different access pattern than ~150 matrix-vector
products over 1-200 MB matrices. `weight_probe` measures the bound with the
decode step's access pattern instead, on the model's own weights:

* one jitted function multiplies every weight matrix of the model (each
  `pz.nn.Linear`) by a vector, as a row-major [out, in] matrix-vector
  product of its shape (the fastest layout for XLA:CPU's product, so a slow
  storage layout in the model shows as a low fraction, not as a low bound;
  ``as_stored=True`` runs the layer's own contraction on the stored array
  instead), sums every other parameter (norm scales, token-shift mixes,
  decays), and reads one row of an untied embedding table (a tied one is
  read in full, as its decode is a matrix product);
* it is called `repeats` times (after a warm-up); bandwidth = bytes read /
  seconds, reported as the median with its min and max.

Then ``fraction of the bound = tokens/s x bytes per token / probe bandwidth``
with bytes per token = the probe's bytes + the state (read and written once).

    probe = weight_probe(model)                     # right before the timing
    seconds = OurDecode(model).seconds_per_token(prompt, steps=64)
    fraction = probe.fraction(seconds, state_bytes)

On a shared machine the bandwidth drifts between runs (the same probe read
12-20 GB/s within minutes here), so a probe and a decode timed minutes apart
can be 30 % off; `interleaved_fraction` alternates them and reports the
median of the per-pair fractions.

`torch_probe` does the same for a torch implementation's weight matrices
(``x @ W`` as that runtime computes it), to read its decode figures against
its own layout's bandwidth.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import functional
from recurrent_lm.sampling import decode


@dataclasses.dataclass(frozen=True)
class Probe:
    """Bytes one pass reads, and the seconds of each pass."""

    nbytes: int
    seconds: tuple[float, ...]

    @property
    def bandwidth(self) -> float:
        """Median bytes per second."""
        return self.nbytes / statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) bytes per second over the passes."""
        return self.nbytes / max(self.seconds), self.nbytes / min(self.seconds)

    def bound_seconds(self, state_bytes: int = 0) -> float:
        """Seconds per decode step at the median probe bandwidth."""
        return (self.nbytes + state_bytes) / self.bandwidth

    def fraction(self, seconds_per_token: float, state_bytes: int = 0) -> float:
        """Share of the bound reached: bound seconds / measured seconds."""
        return self.bound_seconds(state_bytes) / seconds_per_token

    def describe(self) -> str:
        low, high = self.spread
        return (f"{self.bandwidth / 1e9:.1f} GB/s (min {low / 1e9:.1f}, max {high / 1e9:.1f},"
                f" {len(self.seconds)} runs)")


def _timed_passes(fn, repeats: int) -> tuple[float, ...]:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return tuple(times)


def weight_probe(model, repeats: int = 20, *, as_stored: bool = False) -> Probe:
    """Reads `model`'s weights as a batch-1 decode step does (see the module docstring).

    Every weight matrix of a `pz.nn.Linear` goes through one matrix-vector
    product: by default on a row-major [out, in] copy (prod of its output
    axes x prod of its input axes: the fastest layout for XLA:CPU's
    matrix-vector product, so the bound does not inherit a slow storage
    layout); with `as_stored`, through the layer itself on its stored array
    (exactly the step's contraction: compare the two to see what the
    layout costs). Other parameters are summed; an untied embedding table
    gives one row (a tied one is read in full, like a head).
    """
    linears = pz.select(model).at_instances_of(pz.nn.Linear).get_sequence()
    tables = pz.select(model).at_instances_of(pz.nn.EmbeddingTable).get_sequence()
    tied = bool(pz.select(model).at_instances_of(pz.nn.EmbeddingDecode).get_sequence())
    by_label = {layer.weights.label: layer for layer in linears}
    table_labels = {table.embeddings.label for table in tables}
    _, params, _ = functional.split(model)
    rng = np.random.default_rng(0)
    one_token = {axes.BATCH: 1, axes.SEQ: 1}
    matrices, vectors, others, nbytes = {}, {}, {}, 0
    for label, value in params.items():
        shape = value.named_shape
        nbytes += value.data_array.nbytes
        if label in by_label:
            ins = by_label[label].in_axis_names
            outs = [a for a in shape if a not in ins]
            size = int(np.prod([shape[a] for a in ins]))
            if as_stored:
                # A non-constant input per matrix: XLA cannot fold the product away.
                named = {**one_token, **{a: shape[a] for a in ins}}
                data = rng.standard_normal(tuple(named.values())).astype(value.dtype)
                vectors[label] = pz.nx.wrap(jnp.asarray(data)).tag(*named)
                matrices[label] = value
            else:
                vectors[label] = jnp.asarray(rng.standard_normal(size).astype(value.dtype))
                matrices[label] = jnp.asarray(value.unwrap(*outs, *ins).reshape(-1, size))
        elif label in table_labels and not tied:
            nbytes -= value.data_array.nbytes - value.data_array.nbytes // shape[axes.VOCABULARY]
            others[label] = value  # one row
        else:
            others[label] = value

    @jax.jit
    def read(matrices, vectors, others, row):
        outs = []
        for label, matrix in matrices.items():
            if as_stored:
                layer = dataclasses.replace(
                    by_label[label], weights=pz.ParameterValue(value=matrix, label=label))
                outs.append(layer(vectors[label]).data_array)
            else:
                outs.append(matrix @ vectors[label])
        for label, value in others.items():
            if label in table_labels and not tied:
                take = lambda table: jax.lax.dynamic_index_in_dim(table, row, keepdims=False)
                outs.append(pz.nx.nmap(take)(value.untag(axes.VOCABULARY)).data_array)
            else:
                outs.append(jnp.sum(value.data_array))
        return outs

    row = jnp.asarray(1, jnp.int32)
    return Probe(nbytes, _timed_passes(lambda: read(matrices, vectors, others, row), repeats))


def product_floor(model, tokens: int, repeats: int = 5) -> tuple[int, tuple[float, ...]]:
    """FLOPs and seconds of a `tokens`-position forward's matrix products alone.

    Every weight matrix of a `pz.nn.Linear` multiplies a [tokens, in] float
    matrix as a row-major [in, out] copy, and the vocabulary projection (an
    untied head is a Linear; a tied embedding table is multiplied here as
    [width, vocabulary]) likewise: one jitted call, `repeats` timed passes.
    Any implementation of the model computes these products, so their time
    is a floor under its forward pass on this machine (the recurrence and the
    elementwise work come on top).
    """
    linears = pz.select(model).at_instances_of(pz.nn.Linear).get_sequence()
    tied = bool(pz.select(model).at_instances_of(pz.nn.EmbeddingDecode).get_sequence())
    rng = np.random.default_rng(0)
    pairs, flops = [], 0
    for layer in linears:
        value = layer.weights.value
        ins = layer.in_axis_names
        outs = [a for a in value.named_shape if a not in ins]
        size_in = int(np.prod([value.named_shape[a] for a in ins]))
        matrix = jnp.asarray(value.unwrap(*ins, *outs).reshape(size_in, -1))
        pairs.append((matrix, rng.standard_normal((tokens, size_in)).astype(matrix.dtype)))
    if tied:
        table = pz.select(model).at_instances_of(pz.nn.EmbeddingTable).get_sequence()[0].embeddings.value
        matrix = jnp.asarray(table.unwrap(*[a for a in table.named_shape if a != axes.VOCABULARY],
                                          axes.VOCABULARY))
        pairs.append((matrix, rng.standard_normal((tokens, matrix.shape[0])).astype(matrix.dtype)))
    flops = sum(2 * x.shape[0] * m.shape[0] * m.shape[1] for m, x in pairs)
    pairs = [(m, jnp.asarray(x)) for m, x in pairs]
    products = jax.jit(lambda pairs: [x @ m for m, x in pairs])
    return flops, _timed_passes(lambda: products(pairs), repeats)


def torch_probe(matrices, repeats: int = 20) -> Probe:
    """`weight_probe` for a torch runtime: ``x @ W`` for each 2-D weight ``W``
    (as stored by that runtime, contracting its first axis), one float vector
    per matrix."""
    import torch

    matrices = [m for m in matrices if m.ndim == 2]
    vectors = [torch.randn(m.shape[0], dtype=m.dtype) for m in matrices]
    nbytes = sum(m.numel() * m.element_size() for m in matrices)

    def read():
        with torch.no_grad():
            return [v @ m for v, m in zip(vectors, matrices, strict=True)]

    read()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append(time.perf_counter() - start)
    return Probe(nbytes, tuple(times))


def state_bytes(model, batch_size: int = 1) -> int:
    """Bytes of a sampling-mode state for `batch_size` rows."""
    _, _, state, *_ = decode._prepare(model, [[0]] * batch_size, {"max_new_tokens": 1}, 1, None)
    return sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim > 0)


class OurDecode:
    """`generate`'s compiled prefill and decode loop (``recurrent_lm.sampling.decode``),
    greedy, timed apart: the decode loop runs every token on the device."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt, steps: int):
        """The loop's carry after the prompt (its first token chosen); then
        `decode` generates `steps` more."""
        prompts = [list(map(int, row)) for row in np.asarray(prompt)]
        skeleton, params, state, ids, pos, settings, sampling, _ = decode._prepare(
            self.model, prompts, {"max_new_tokens": steps + 1}, 64, None)
        self.call = (skeleton, params, sampling, settings)
        return decode._prefill(skeleton, params, state, ids, pos, jax.random.key(0), sampling, settings, None)

    def decode(self, carry):
        skeleton, params, sampling, settings = self.call
        return decode._decode(skeleton, params, carry, sampling.max_new_tokens, sampling, settings)

    def seconds_per_token(self, prompt, steps: int, repeats: int = 3) -> float:
        """Median over `repeats` runs of the decode loop's seconds per token."""
        jax.block_until_ready(self.decode(self.prefill(prompt, steps)))  # compile
        runs = []
        for _ in range(repeats):
            carry = jax.block_until_ready(self.prefill(prompt, steps))
            start = time.perf_counter()
            out = jax.block_until_ready(self.decode(carry))
            runs.append((time.perf_counter() - start) / steps)
            assert int(out.step) == steps + 1, int(out.step)
        return statistics.median(runs)


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """(probe, decode seconds per token) pairs timed back to back."""

    pairs: tuple[tuple[Probe, float], ...]
    state_bytes: int

    @property
    def fractions(self) -> list[float]:
        return [probe.fraction(seconds, self.state_bytes) for probe, seconds in self.pairs]

    @property
    def fraction(self) -> float:
        """Median of the per-pair fractions of the bound."""
        return statistics.median(self.fractions)

    @property
    def seconds(self) -> float:
        """Median decode seconds per token."""
        return statistics.median(seconds for _, seconds in self.pairs)

    @property
    def probe(self) -> Probe:
        """The probe of the pair whose fraction is the median (its bandwidth and bound)."""
        ranked = sorted(self.pairs, key=lambda pair: pair[0].fraction(pair[1], self.state_bytes))
        return ranked[len(ranked) // 2][0]


def interleaved_fraction(model, prompt, steps: int, pairs: int = 3, probe_runs: int = 20) -> Interleaved:
    """`pairs` x (`weight_probe`, then `OurDecode`'s seconds per token), alternated,
    so that each decode timing is read against the bandwidth of its own moment."""
    decoder, size = OurDecode(model), state_bytes(model)
    timed = []
    for _ in range(pairs):
        probe = weight_probe(model, probe_runs)
        timed.append((probe, decoder.seconds_per_token(prompt, steps)))
    return Interleaved(tuple(timed), size)
