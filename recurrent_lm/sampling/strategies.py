"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Every setting may be a traced scalar, so one compiled decode loop serves any
temperature, top-k and top-p: a sweep over them recompiles nothing, and the
filters cost nothing in a step that does not use them (`lax.cond`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mask_below(logits, threshold):
    # A finite floor rather than -inf: no inf arithmetic anywhere downstream.
    return jnp.where(logits < threshold, jnp.finfo(logits.dtype).min, logits)


def _filter_threshold(logits, top_k, top_p):
    """Per row, the smallest logit that top-k and then top-p keep: [..., 1]."""
    sorted_logits = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    kth = jax.lax.dynamic_index_in_dim(sorted_logits, jnp.clip(top_k, 1, vocab) - 1, axis=-1)
    sorted_logits = _mask_below(sorted_logits, kth)  # top-p acts on what top-k kept
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # An associative scan: `jnp.cumsum` lowers to an O(V^2) reduce_window on XLA:CPU (JAX 0.10).
    cumulative = jax.lax.associative_scan(jnp.add, probs, axis=-1)
    # Token i is kept while the tokens before it have not yet reached p; p >= 1
    # keeps all (float32 sums of the tail can round up to 1).
    keep = ((cumulative - probs) < top_p) | (top_p >= 1)
    nucleus = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.maximum(kth, nucleus)


def top_k_filter(logits, k):
    """Keeps the `k` largest logits of each row (ties at the k-th are kept)."""
    return _mask_below(logits, _filter_threshold(logits, k, 1.0))


def top_p_filter(logits, p):
    """Keeps the smallest set of most likely tokens whose probability reaches `p`."""
    return _mask_below(logits, _filter_threshold(logits, logits.shape[-1], p))


def choose_tokens(logits, key, *, temperature, top_k=None, top_p=None):
    """Next token per row of `logits` [..., vocabulary] (computed in float32).

    Greedy (argmax) when ``temperature == 0``; otherwise samples from
    ``softmax(logits / temperature)`` restricted by top-k, then top-p
    (None: no restriction). Each setting may be a Python number or a traced
    scalar.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    top_k = vocab if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p

    def sample(logits):
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
        filtered = jax.lax.cond(
            (top_k < vocab) | (top_p < 1),
            lambda z: _mask_below(z, _filter_threshold(z, top_k, top_p)),
            lambda z: z,
            scaled,
        )
        return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)

    def greedy(logits):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature == 0, greedy, sample, logits)
