"""PLACEHOLDER until branch `mscan` lands: a plain sequential matrix-state scan.

Same signature as the real primitive (``matrix_scan``); replaced on merge.
Per head: ``S_t = S_{t-1} (diag(exp(log_decay_t)) + a_t b_t^T) + v_t k_t^T``,
``y_t = S_t r_t``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

MATRIX_SCAN_METHODS = ("sequential",)


def matrix_scan(r, log_decay, k, v, a=None, b=None, *, axis="seq", key_axis="state",
                value_axis="projection", h0=None, reset=None, method=None, chunk_size=64):
    del method, chunk_size
    acc = jnp.float32
    if reset is None:
        reset = pz.nx.zeros({axis: r.named_shape[axis]}, jnp.bool_)

    def row(r, w, k, v, a, b, reset, h0):
        def step(s, inputs):
            r_t, w_t, k_t, v_t, a_t, b_t, reset_t = inputs
            s = jnp.where(reset_t, jnp.zeros_like(s), s)
            s = s * jnp.exp(w_t)[None, :] + (s @ a_t)[:, None] * b_t[None, :] + v_t[:, None] * k_t[None, :]
            return s, s @ r_t

        last, y = jax.lax.scan(step, h0, (r, w, k, v, a, b, reset))
        return y, last

    zeros_k = pz.nx.zeros(k.named_shape, acc)
    a = zeros_k if a is None else a
    b = zeros_k if b is None else b
    if h0 is None:
        shape = {n: s for n, s in v.named_shape.items() if n != axis}
        h0 = pz.nx.zeros({**shape, key_axis: k.named_shape[key_axis]}, acc)
    f = lambda x: x.astype(acc).untag(axis, key_axis)
    y, last = pz.nx.nmap(row)(
        f(r), f(log_decay), f(k), v.astype(acc).untag(axis, value_axis), f(a), f(b),
        reset.untag(axis), h0.astype(acc).untag(value_axis, key_axis),
    )
    return y.tag(axis, value_axis), last.tag(value_axis, key_axis)
