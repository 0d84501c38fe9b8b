"""The document-aware causal filter: Griffin's conv, H3's shift SSM, RWKV's token shift.

``y_t = sum_l kernel[l] x_{t-l}``, each term dropped when ``x_{t-l}`` lies
before a document start in ``(t-l, t]``. The state is the last inputs of the
stream (``history``, oldest first), zeroed where a document starts after them,
so a call that continues a stream applies the same cuts as one call over all of
it. The cuts come from ``context.since_start`` (computed once per model call):
the lag-l term at t is live iff ``l <= since_start[t]``.

The token shift is the one-tap delay ``x_{t-1}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core.context import NO_START_IN_CALL, DocumentContext

# Filters up to this many taps are unrolled (Griffin's 4-tap conv); longer ones
# (H3's shift SSM, N taps) loop, so compile time stays flat in N.
MAX_UNROLLED_TAPS = 8


def _delayed(extended, since_start, lag, steps: int):
    """``x_{t-lag}`` for t < steps (0 where it crosses a document start).

    ``extended`` is [history (H), x (T)]; ``lag`` <= H may be traced.
    """
    size = extended.shape[0] - steps
    if isinstance(lag, int):  # a static slice (cheaper to differentiate)
        window = extended[size - lag : size - lag + steps]
    else:
        window = jax.lax.dynamic_slice_in_dim(extended, size - lag, steps)
    return jnp.where(lag <= since_start, window, jnp.zeros((), window.dtype))


def _next_history(extended, since_start, steps: int):
    """The last H inputs, zeroed where they precede the call's last document start."""
    size = extended.shape[0] - steps
    tail = extended[steps:]
    last_since = since_start[-1]
    last_start = steps - 1 - last_since
    index = steps - size + jnp.arange(size)  # index in x of each kept input
    cut = (last_since < NO_START_IN_CALL) & (index < last_start)
    return jnp.where(cut, jnp.zeros((), tail.dtype), tail)


def filter_row(x, since_start, kernel, history):
    """One channel of the filter, positional.

    Args:
      x: [T] inputs; since_start: [T] int (`DocumentContext.since_start`).
      kernel: [K], tap l multiplies ``x_{t-l}``.
      history: [H >= K-1] the inputs before `x`, oldest first, already cut.

    Returns:
      ``(y [T], new_history [H])``, the history in its own dtype.
    """
    steps, taps = x.shape[0], kernel.shape[0]
    extended = jnp.concatenate([history.astype(x.dtype), x])
    term = lambda lag: _delayed(extended, since_start, lag, steps) * kernel[lag]
    if taps <= MAX_UNROLLED_TAPS:
        y = x * kernel[0]
        for lag in range(1, taps):
            y = y + term(lag)
    else:
        y = jax.lax.fori_loop(0, taps, lambda lag, y: y + term(lag), jnp.zeros_like(x))
    return y, _next_history(extended, since_start, steps).astype(history.dtype)


def causal_filter(
    x: pz.nx.NamedArray,
    context: DocumentContext,
    kernel: pz.nx.NamedArray,
    history: pz.nx.NamedArray,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """Depthwise causal filter over "seq", cut at document starts.

    Args:
      x: {..., "seq", channels...}.
      context: the call's document context.
      kernel: {channels..., "conv_taps": K}, tap l multiplies ``x_{t-l}``.
      history: {..., "conv_taps": H, channels...} with H >= K - 1.

    Returns:
      ``(y, new_history)``: y like `x`; new_history like `history`.
    """
    y, new_history = pz.nx.nmap(filter_row)(
        x.untag(axes.SEQ),
        context.since_start.untag(axes.SEQ),
        kernel.untag(axes.CONV_TAPS),
        history.untag(axes.CONV_TAPS),
    )
    return y.tag(axes.SEQ), new_history.tag(axes.CONV_TAPS)


def _shift_row(x, since_start, previous):
    steps = x.shape[0]
    extended = jnp.concatenate([previous.astype(x.dtype)[None], x])
    return _delayed(extended, since_start, 1, steps), x[-1]


def token_shift(
    x: pz.nx.NamedArray,
    context: DocumentContext,
    previous: pz.nx.NamedArray | None,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """``shifted[t] = x[t - 1]``, continuing from `previous`, 0 at document starts.

    Args:
      x: {..., "seq", features}.
      context: the call's document context.
      previous: {..., features}, the last input of the previous call (None:
        zeros, a fresh stream).

    Returns:
      ``(shifted, last)``: `shifted` like `x`; `last` = ``x[-1]``, the
      `previous` of a call that continues the stream.
    """
    if previous is None:
        previous = pz.nx.zeros(dict(x[{axes.SEQ: -1}].named_shape), x.dtype)
    shifted, last = pz.nx.nmap(_shift_row)(
        x.untag(axes.SEQ), context.since_start.untag(axes.SEQ), previous
    )
    return shifted.tag(axes.SEQ), last
