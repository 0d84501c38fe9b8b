"""Choosing the next token from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mask_below(logits, threshold):
    # A finite floor rather than -inf: no inf arithmetic anywhere downstream.
    return jnp.where(logits < threshold, jnp.finfo(logits.dtype).min, logits)


def top_k_filter(logits, k: int):
    """Keeps the `k` largest logits of each row (ties at the k-th are kept)."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return _mask_below(logits, kth)


def top_p_filter(logits, p: float):
    """Keeps the smallest set of most likely tokens whose probability reaches `p`.

    The cumulative sum over the sorted vocabulary is an associative scan:
    `jnp.cumsum` lowers to an O(V^2) reduce_window on XLA:CPU (JAX 0.10).
    """
    sorted_logits = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cumulative = jax.lax.associative_scan(jnp.add, probs, axis=-1)
    # Token i is kept if the tokens before it have not yet reached p.
    keep = (cumulative - probs) < p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return _mask_below(logits, threshold)


def choose_tokens(logits, key, *, temperature: float, top_k: int | None, top_p: float | None):
    """Next token per row of `logits` [..., vocabulary] (float32 recommended).

    Greedy (argmax) when ``temperature == 0``; otherwise samples from
    ``softmax(logits / temperature)`` restricted by top-k, then top-p.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
