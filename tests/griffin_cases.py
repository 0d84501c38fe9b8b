"""Shared test helpers: random official Griffin models and segment layouts.

Parity tests compare against the official `recurrentgemma` package on random
weights. Every official leaf is perturbed after init (norm scales and biases
start at zero, which would hide mistakes in them).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

R, A = "recurrent", "attention"


@dataclasses.dataclass(frozen=True)
class OfficialCase:
    """A random official Griffin and inputs with plain, packed and padded rows."""

    name: str
    width: int
    heads: int
    lru_width: int
    mlp: int
    blocks: tuple[str, ...]
    window: int
    soft_cap: float
    scale_sqrt: bool
    vocab: int
    seq: int
    batch: int
    seed: int = 0

    def official_config(self, scan_type=None):
        import recurrentgemma.jax as rg
        from recurrentgemma import common

        kinds = {R: common.TemporalBlockType.RECURRENT, A: common.TemporalBlockType.ATTENTION}
        return rg.GriffinConfig(
            vocab_size=self.vocab,
            width=self.width,
            mlp_expanded_width=self.mlp,
            num_heads=self.heads,
            block_types=tuple(kinds[b] for b in self.blocks),
            embeddings_scale_by_sqrt_dim=self.scale_sqrt,
            attention_window_size=self.window,
            logits_soft_cap=self.soft_cap,
            lru_width=self.lru_width,
            scan_type=scan_type or common.ScanType.ASSOCIATIVE_NATIVE,
        )

    def overrides(self) -> dict:
        """The config fields the shapes cannot give."""
        return dict(
            attention_window_size=self.window,
            logits_soft_cap=self.soft_cap,
            embeddings_scale_by_sqrt_dim=self.scale_sqrt,
        )


CASES = {
    # lru_width != width, window < seq, all three row kinds.
    "hybrid": OfficialCase("hybrid", 48, 4, 64, 72, (R, A, R), 5, 30.0, True, 61, 17, 4),
    # attention first, no soft cap, no sqrt scaling, window > seq.
    "attention_first": OfficialCase("attention_first", 40, 2, 40, 24, (A, R, R, A), 32, 0.0, False, 37, 12, 4, 1),
    # Hawk: recurrent only, odd head count.
    "hawk": OfficialCase("hawk", 24, 3, 36, 30, (R, R), 8, 30.0, True, 29, 23, 3, 2),
    # attention only, the smallest window.
    "attention_only": OfficialCase("attention_only", 32, 2, 32, 16, (A, A), 1, 10.0, True, 50, 9, 3, 3),
    # a sequence shorter than the convolution, odd widths.
    "short": OfficialCase("short", 36, 3, 36, 20, (R, A), 2, 30.0, True, 13, 3, 3, 4),
}


def segment_layout(batch: int, seq: int) -> np.ndarray:
    """Row 0 plain; row 1 packed (3 documents); row 2 left-padded; row 3 padded + packed."""
    pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
    if batch > 1:
        a, b = seq // 3, (2 * seq) // 3 + 1
        pos[1, a:b] = np.arange(b - a)
        pos[1, b:] = np.arange(seq - b)
    if batch > 2:
        pad = seq // 4 + 1
        pos[2, :pad] = -1
        pos[2, pad:] = np.arange(seq - pad)
    if batch > 3:
        pad = 2
        mid = seq // 2
        pos[3, :pad] = -1
        pos[3, pad:mid] = np.arange(mid - pad)
        pos[3, mid:] = np.arange(seq - mid)
    return pos


def documents(pos: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document in a segment layout (pads excluded)."""
    docs = []
    for row in range(pos.shape[0]):
        starts = list(np.flatnonzero(pos[row] == 0)) + [pos.shape[1]]
        docs += [(row, a, b) for a, b in itertools.pairwise(starts)]
    return docs


def perturb(params, seed: int, scale: float = 0.1):
    # NumPy noise: eager jax.random compiles once per leaf shape (seconds per model on CPU).
    rng = np.random.default_rng(1000 + seed)
    return jax.tree.map(
        lambda leaf: (leaf + scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
        jax.device_get(params),
    )


# The official init compiles a whole forward (seconds per case); the xdist workers
# and test files share one result per case through this directory.
_PARAMS_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "official_griffin"


@functools.cache
def official_params(case: OfficialCase):
    import recurrentgemma
    import recurrentgemma.jax as rg
    from flax import traverse_util

    key = hashlib.sha256(repr((case, recurrentgemma.__version__, jax.__version__)).encode()).hexdigest()[:16]
    path = _PARAMS_CACHE / f"{case.name}-{key}.npz"
    if path.exists():
        with np.load(path) as stored:
            return traverse_util.unflatten_dict({tuple(k.split("/")): stored[k] for k in stored.files})
    ids = jnp.zeros((1, 2), jnp.int32)
    pos = jnp.arange(2)[None]
    # Under jit: flax's eager init dispatches op by op (about 10x slower on CPU).
    init = jax.jit(lambda key: rg.Griffin(case.official_config()).init(key, ids, pos)["params"])
    params = perturb(init(jax.random.key(case.seed)), case.seed)
    _PARAMS_CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.npz")
    np.savez(partial, **{"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()})
    os.replace(partial, path)  # atomic: another worker reads a whole file or none
    return params


@functools.cache
def official_apply(case: OfficialCase):
    """Compiled official forward (params, ids, pos) -> logits, cached per case."""
    import recurrentgemma.jax as rg

    model = rg.Griffin(case.official_config())
    return jax.jit(
        lambda params, ids, pos: model.apply({"params": params}, ids, pos, return_cache=False)[0]
    )


def case_inputs(case: OfficialCase):
    ids = np.asarray(
        jax.random.randint(jax.random.key(7 + case.seed), (case.batch, case.seq), 0, case.vocab),
        np.int32,
    )
    return ids, segment_layout(case.batch, case.seq)


def named_tokens(ids, pos=None):
    tokens = pz.nx.wrap(on_device(ids)).tag("batch", "seq")
    if pos is None:
        return tokens
    return tokens, pz.nx.wrap(on_device(pos)).tag("batch", "seq")


def on_device(array) -> jax.Array:
    """`array` as a JAX array. Not `jnp.asarray`: in JAX 0.10 that compiles an
    identity kernel per shape and dtype (~20 ms each; `device_put` ~0.2 ms)."""
    if isinstance(array, jax.Array):  # also a tracer (helpers called under jit)
        return array
    return jax.device_put(np.asarray(array))


def max_relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
