"""RWKV-7 "Goose" blocks (arXiv 2503.14456): time mixing, a matrix state per head
with a diagonal-plus-rank-one transition; and its gate-free channel mixing.

Per head, with the state ``S`` {"projection" (value side), "state" (key side)}::

    S_t = S_{t-1} (diag(w_t) - kk_t (kk_t * a_t)^T) + v_t k_t^T,    y_t = S_t r_t

``w_t = exp(-e^-0.5 sigmoid(w0 + tanh(x_w W1) W2))`` is a data-dependent decay
in (e^-0.61, 1), ``kk`` the per-head unit-normalised key, ``a_t`` the
"in-context learning rate" in (0, 1); the rank-one term removes the part of the
state along ``kk`` before the new key-value pair is written (a delta rule). The
recurrence runs through `matrix_recurrence.matrix_scan` (``a = -kk``,
``b = kk * a``), in float32.

Value residual: block 0's values ``v`` reach every later block, which mixes
them into its own (``v + (v_0 - v) sigmoid(v0 + x_v V1 V2)``). They cross the
blocks through a `recurrent_lm.core.model.SideChannel` named
`VALUE_RESIDUAL`: the model creates it afresh in every call (its
``side_channels``), block 0's time mix writes it and the others read it. It
holds only the current call's tokens, so a chunk of a stream in sampling mode
sees the same values as the whole forward.

Token-shift interpolation is ``x + (x_{t-1} - x) * mu`` (``mu`` = BlinkDL's
``x_r`` ...), the reverse of RWKV-4's ``time_mix`` convention.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.model import SideChannel
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import init, matrix_recurrence
from recurrent_lm.layers.causal_filter import token_shift
from recurrent_lm.layers.linear import dense
from recurrent_lm.layers.matrix_recurrence import DEFAULT_CHUNK_SIZE, matrix_scan
from recurrent_lm.layers.norms import LayerNorm

VALUE_RESIDUAL = "value_residual"
"""Name of the side channel carrying block 0's values to the later blocks."""

DECAY_SCALE = math.exp(-0.5)
"""``log w = -DECAY_SCALE * sigmoid(...)``: decays between exp(-e^-0.5) and 1."""

GROUP_NORM_EPS = 64e-5
"""Epsilon of the per-head normalisation of the recurrence output (BlinkDL's
``ln_x``: 1e-5 times his head_size_divisor 8, squared)."""

KEY_NORM_EPS = 1e-12
"""``kk = x / max(|x|, eps)`` (torch's ``F.normalize`` default)."""

KEY, VALUE = axes.STATE, axes.PROJECTION


def shift_lerp(x: pz.nx.NamedArray, delta: pz.nx.NamedArray, mu) -> pz.nx.NamedArray:
    """``x + delta * mu`` with ``delta = x_{t-1} - x``: RWKV-5+'s token-shift mix."""
    return x + delta * mu.astype(x.dtype)


def _normalised(x: pz.nx.NamedArray, axis: str) -> pz.nx.NamedArray:
    def unit(v):
        norm = jnp.sqrt(jnp.sum(jnp.square(v)))
        return v / jnp.maximum(norm, jnp.asarray(KEY_NORM_EPS, v.dtype))

    return pz.nx.nmap(unit)(x.untag(axis)).tag(axis)


# ----------------------------------------------------------------------------- initialisation
# BlinkDL's RWKV-LM (RWKV-v7/train_temp) initialisation, as functions of the
# channel index n of C = H * N channels, block i of L.


def _ratios(layer: int, num_layers: int) -> tuple[float, float]:
    """(i / (L - 1), 1 - i / L): 0 -> 1 and 1 -> almost 0 over the depth."""
    return (layer / (num_layers - 1) if num_layers > 1 else 0.0), 1.0 - layer / num_layers


def _channel_profiles(heads: int, size: int):
    """(linear, zigzag) over the channels: ``n / (C-1) - 1/2`` and a signed
    square of the position within the head, in [-1, 1]."""
    width = heads * size
    n = np.arange(width, dtype=np.float64)
    linear = n / max(width - 1, 1) - 0.5
    half = (size - 1) / 2
    zigzag = ((n % size) - half) / half if size > 1 else np.zeros(width)
    return linear, zigzag * np.abs(zigzag)


def constant(values) -> callable:
    """An initializer returning `values` (numpy, laid out as the named shape)."""

    def initializer(key, named_shape, dtype):
        del key
        array = np.asarray(values, np.float64).reshape(tuple(named_shape.values()))
        return pz.nx.wrap(jnp.asarray(array, dtype)).tag(*named_shape)

    return initializer


def token_shift_mix(width: int, exponent: float) -> np.ndarray:
    """``1 - (c / C)^exponent``: how much of the previous token each channel takes."""
    return 1.0 - (np.arange(width) / width) ** exponent


def low_rank_pair(name_in, name_out, key, width, rank, out_axes, *, dtype):
    """``x W1`` {"embedding" -> "low_rank"} (zeros) and ``W2`` {"low_rank" -> out}
    (orthogonal, gain 0.1, times sqrt(rank / C) when the rank is larger)."""
    embed, inner = {axes.EMBEDDING: width}, {axes.LOW_RANK: rank}
    gain = 0.1 * (math.sqrt(rank / width) if rank > width else 1.0)
    first = dense(name_in, key, embed, inner, use_bias=False, initializer=init.zeros, dtype=dtype)
    second = dense(
        name_out, key, inner, out_axes, use_bias=False, dtype=dtype,
        initializer=lambda k, s, d: init.orthogonal(k, s, d, in_axes=(axes.LOW_RANK,), scale=gain),
    )
    return first, second


def _orthogonal_dense(name, key, in_axes, out_axes, gain, *, dtype):
    initializer = init.zeros if gain == 0 else (
        lambda k, s, d: init.orthogonal(k, s, d, in_axes=tuple(in_axes), scale=gain)
    )
    return dense(name, key, in_axes, out_axes, use_bias=False, initializer=initializer, dtype=dtype)


# ----------------------------------------------------------------------------- the time mix


@pz.pytree_dataclass
class TimeMix7State(pz.Struct):
    """State of `TimeMix7` between calls.

    Attributes:
      shift: the last normed input {..., "embedding"}, in the input dtype.
      matrix: the recurrence state {..., "heads", "projection", "state"},
        float32 (BlinkDL's ``state[3 i + 1]``, [head, value, key]).
    """

    shift: pz.nx.NamedArray
    matrix: pz.nx.NamedArray


@pz.pytree_dataclass
class TimeMix7(StatefulLayer):
    """RWKV-7 time mixing: token shift, r/w/k/v/a/g, matrix recurrence, output.

    See the module docstring for the math. Named axes: in {..., "seq",
    "embedding"} -> out {..., "seq", "embedding"}; r, w, k, a and the key side
    of the state are {..., "heads", "state"}; v, g, the recurrence output and
    the value side of the state {..., "heads", "projection"}.

    Side inputs: ``context`` (token shift cut and state reset at document
    starts); ``value_residual`` (`VALUE_RESIDUAL`, a `SideChannel`): written
    by the first block, read by the others.
    State: `TimeMix7State`.
    Parameters (BlinkDL's names): ``x_r, x_w, x_k, x_v, x_a, x_g``
    {"embedding"}; ``w0, a0, k_k, k_a, r_k`` {"heads", "state"}; ``v0``
    {"heads", "projection"}; low-rank pairs ``w1/w2``, ``a1/a2``, ``v1/v2``,
    ``g1/g2`` through "low_rank"; ``receptance``, ``key`` {"embedding" ->
    "heads", "state"}, ``value`` {"embedding" -> "heads", "projection"},
    ``output`` {"heads", "projection" -> "embedding"}; ``ln_x`` (a LayerNorm
    over "projection" per head: scale, bias {"heads", "projection"}).
    The first block has no value residual: its ``v0``, ``v1``, ``v2`` are
    None, or present and unused (``keeps_unused_value_gate``: BlinkDL's files
    carry them).

    Sites: ``r``, ``log_decay`` (``log w``), ``k`` (the key written to the
    state, after its ``a`` scaling), ``a``, all {..., "seq", "heads",
    "state"}; ``v`` (after the value residual), ``g``, ``wkv_output`` (``S_t
    r_t`` before ``ln_x``), all {..., "seq", "heads", "projection"}; the state
    site ``state``: ``S_t`` after every token, {..., "seq", "heads",
    "projection", "state"} (float32). Capturing or changing it runs the
    recurrence step by step with every state materialised (T x H x N x N
    floats per row: meant for interpretability, not long sequences);
    ``Replace`` / ``Add`` there set / shift ``S_t`` and the change carries on
    through the recurrence, or, with ``propagate=False``, changes only ``y_t``.
    """

    side_inputs = (VALUE_RESIDUAL,)

    x_r: pz.nn.ParameterLike[pz.nx.NamedArray]
    x_w: pz.nn.ParameterLike[pz.nx.NamedArray]
    x_k: pz.nn.ParameterLike[pz.nx.NamedArray]
    x_v: pz.nn.ParameterLike[pz.nx.NamedArray]
    x_a: pz.nn.ParameterLike[pz.nx.NamedArray]
    x_g: pz.nn.ParameterLike[pz.nx.NamedArray]
    w0: pz.nn.ParameterLike[pz.nx.NamedArray]
    w1: pz.nn.Layer
    w2: pz.nn.Layer
    a0: pz.nn.ParameterLike[pz.nx.NamedArray]
    a1: pz.nn.Layer
    a2: pz.nn.Layer
    v0: pz.nn.ParameterLike[pz.nx.NamedArray] | None
    v1: pz.nn.Layer | None
    v2: pz.nn.Layer | None
    g1: pz.nn.Layer
    g2: pz.nn.Layer
    k_k: pz.nn.ParameterLike[pz.nx.NamedArray]
    k_a: pz.nn.ParameterLike[pz.nx.NamedArray]
    r_k: pz.nn.ParameterLike[pz.nx.NamedArray]
    receptance: pz.nn.Layer
    key: pz.nn.Layer
    value: pz.nn.Layer
    output: pz.nn.Layer
    ln_x: pz.nn.Layer
    first: bool = dataclasses.field(default=False, metadata={"pytree_node": False})
    scan_method: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    chunk_size: int = dataclasses.field(default=DEFAULT_CHUNK_SIZE, metadata={"pytree_node": False})
    r: sites.Hook = sites.site_field()
    log_decay: sites.Hook = sites.site_field()
    k: sites.Hook = sites.site_field()
    a: sites.Hook = sites.site_field()
    v: sites.Hook = sites.site_field()
    g: sites.Hook = sites.site_field()
    wkv_output: sites.Hook = sites.site_field()
    state: sites.Hook = sites.state_site_field()

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        width: int,
        head_size: int,
        ranks: tuple[int, int, int, int],
        *,
        layer: int,
        num_layers: int,
        keeps_unused_value_gate: bool = True,
        group_norm_eps: float = GROUP_NORM_EPS,
        scan_method: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        dtype=jnp.float32,
    ) -> TimeMix7:
        """Block `layer` of `num_layers`, initialised as BlinkDL's RWKV-LM does.

        Args:
          width: C (divisible by `head_size`).
          ranks: low-rank widths of the (decay, in-context rate, value
            residual, gate) paths.
          keeps_unused_value_gate: block 0 holds ``v0, v1, v2`` although it
            never uses them (as BlinkDL's files do); False leaves them None.
          scan_method, chunk_size: `matrix_scan`'s form and chunk length.
        """
        if width % head_size:
            raise ValueError(f"width {width} is not divisible by the head size {head_size}.")
        heads = width // head_size
        decay_rank, rate_rank, value_rank, gate_rank = ranks
        embed = {axes.EMBEDDING: width}
        key_side = {axes.HEADS: heads, KEY: head_size}
        value_side = {axes.HEADS: heads, VALUE: head_size}
        depth, remaining = _ratios(layer, num_layers)
        linear, zigzag = _channel_profiles(heads, head_size)
        n = np.arange(width) / max(width - 1, 1)

        def param(label, shape, values):
            return pz.nn.make_parameter(f"{name}.{label}", init_base_rng, constant(values), shape, dtype)

        def mix(label, exponent):
            return param(label, embed, token_shift_mix(width, exponent * remaining))

        w1, w2 = low_rank_pair(f"{name}.w1", f"{name}.w2", init_base_rng, width, decay_rank, key_side, dtype=dtype)
        a1, a2 = low_rank_pair(f"{name}.a1", f"{name}.a2", init_base_rng, width, rate_rank, key_side, dtype=dtype)
        g1, g2 = low_rank_pair(f"{name}.g1", f"{name}.g2", init_base_rng, width, gate_rank, value_side, dtype=dtype)
        v0 = v1 = v2 = None
        if layer > 0 or keeps_unused_value_gate:
            v0 = param("v0", value_side, 0.73 - 0.4 * linear)
            v1, v2 = low_rank_pair(
                f"{name}.v1", f"{name}.v2", init_base_rng, width, value_rank, value_side, dtype=dtype
            )
        ln_scale = ((1 + layer) / num_layers) ** 0.7
        return cls(
            x_r=mix("x_r", 0.2), x_w=mix("x_w", 0.9), x_k=mix("x_k", 0.7),
            x_v=mix("x_v", 0.7), x_a=mix("x_a", 0.9), x_g=mix("x_g", 0.2),
            w0=param("w0", key_side, -6 + 6 * n ** (1 + depth**0.3) + 0.5 + 2.5 * zigzag),
            w1=w1, w2=w2,
            a0=param("a0", key_side, -0.19 + 0.3 * zigzag + 0.4 * linear),
            a1=a1, a2=a2,
            v0=v0, v1=v1, v2=v2,
            g1=g1, g2=g2,
            k_k=param("k_k", key_side, 0.71 - 0.1 * linear),
            k_a=param("k_a", key_side, np.full(width, 1.02)),
            r_k=param("r_k", key_side, np.full(width, -0.04)),
            receptance=_orthogonal_dense(f"{name}.receptance", init_base_rng, embed, key_side, 1.0, dtype=dtype),
            key=_orthogonal_dense(f"{name}.key", init_base_rng, embed, key_side, 0.1, dtype=dtype),
            value=_orthogonal_dense(f"{name}.value", init_base_rng, embed, value_side, 1.0, dtype=dtype),
            output=_orthogonal_dense(f"{name}.output", init_base_rng, value_side, embed, 0.0, dtype=dtype),
            ln_x=LayerNorm(
                scale=param("ln_x.scale", value_side, np.full(width, ln_scale)),
                bias=param("ln_x.bias", value_side, np.zeros(width)),
                axis=VALUE,
                eps=group_norm_eps,
            ),
            first=layer == 0,
            scan_method=scan_method,
            chunk_size=chunk_size,
        )

    def initial_state(self, batch_size: int, max_length: int | None = None) -> TimeMix7State:
        del max_length  # a fixed-size state
        shift = self.x_r.value
        heads, size = (self.r_k.value.named_shape[a] for a in (axes.HEADS, KEY))
        return TimeMix7State(
            shift=pz.nx.zeros({axes.BATCH: batch_size, **shift.named_shape}, shift.dtype),
            matrix=pz.nx.zeros(
                {axes.BATCH: batch_size, axes.HEADS: heads, VALUE: size, KEY: size}, jnp.float32
            ),
        )

    def forward(
        self,
        x: pz.nx.NamedArray,
        context: DocumentContext,
        state: TimeMix7State,
        *,
        value_residual: SideChannel,
    ) -> tuple[pz.nx.NamedArray, TimeMix7State]:
        """Time mixing continuing from `state`; returns ``(y, new_state)``."""
        if context.new_streams:
            state = None  # nothing to read
        shifted, last = token_shift(x, context, None if state is None else state.shift)
        delta = shifted - x
        xr, xw, xk, xv, xa, xg = (
            shift_lerp(x, delta, mu.value) for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )
        sigmoid, tanh = pz.nx.nmap(jax.nn.sigmoid), pz.nx.nmap(jnp.tanh)
        r = self.r(self.receptance(xr))
        w = self.w0.value.astype(x.dtype) + self.w2(tanh(self.w1(xw)))
        log_decay = self.log_decay(-DECAY_SCALE * sigmoid(w.astype(jnp.float32)))
        k = self.key(xk)
        v = self.value(xv)
        a = self.a(sigmoid(self.a0.value.astype(x.dtype) + self.a2(self.a1(xa))))
        g = self.g(self.g2(sigmoid(self.g1(xg))))
        kk = _normalised(k * self.k_k.value.astype(x.dtype), KEY)
        k = self.k(k * (1 + (a - 1) * self.k_a.value.astype(x.dtype)))
        if self.first:
            v = self.v(v)
            value_residual.write(v)
        else:
            gate = sigmoid(self.v0.value.astype(x.dtype) + self.v2(self.v1(xv)))
            v = self.v(v + (value_residual.read() - v) * gate)
        h0 = None if state is None else state.matrix
        y, matrix = self._recurrence(r, log_decay, k, v, -kk, kk * a, h0, context)
        y = self.ln_x(self.wkv_output(y.astype(x.dtype)))
        bonus = pz.nx.nmap(jnp.sum)((r * k * self.r_k.value.astype(x.dtype)).untag(KEY))
        y = y + bonus * v
        return self.output(y * g), TimeMix7State(shift=last, matrix=matrix)

    def _recurrence(self, r, log_decay, k, v, a, b, h0, context):
        """``(y, last state)``: the primitive, or, when the state site is
        captured or changed, the step-by-step scan that materialises every
        state (`materialised_scan`)."""
        if isinstance(self.state, sites.StateSite):
            return matrix_scan(
                r, log_decay, k, v, a, b, axis=axes.SEQ, key_axis=KEY, value_axis=VALUE,
                h0=h0, reset=context.starts, method=self.scan_method, chunk_size=self.chunk_size,
            )
        steps = r.named_shape[axes.SEQ]
        if h0 is None:
            h0 = self.initial_state(r.named_shape[axes.BATCH]).matrix
        # An intervention sees (keep, override) and sets S_t = keep_t step(S_{t-1}) + override_t.
        keep = pz.nx.ones({axes.SEQ: steps}, jnp.float32)
        override = pz.nx.zeros({**v.named_shape, KEY: k.named_shape[KEY]}, jnp.float32)
        keep, override = self.state.update(keep, override)
        states, last = materialised_scan(log_decay, k, v, a, b, h0, context.starts, keep, override)
        states = self.state(states)
        y = pz.nx.nmap(jnp.sum)((states * r.astype(jnp.float32)).untag(KEY))
        return y, last


def materialised_scan(log_decay, k, v, a, b, h0, reset, keep, override):
    """Every state of the recurrence, step by step (float32): the primitive's
    `matrix_recurrence.materialised_scan` on RWKV-7's axes.

    Args:
      log_decay, k, a, b: {..., "seq", "heads", "state"}; v: {..., "seq",
        "heads", "projection"}; h0: {..., "heads", "projection", "state"};
      reset: bool {..., "seq"}; keep: {..., "seq"}; override: like the states.

    Returns:
      ``(states, last)``: {..., "seq", "heads", "projection", "state"} and
      the state after the last step.
    """
    return matrix_recurrence.materialised_scan(
        log_decay, k, v, a, b, h0=h0, reset=reset, keep=keep, override=override,
        axis=axes.SEQ, key_axis=KEY, value_axis=VALUE,
    )


# ----------------------------------------------------------------------------- the channel mix


@pz.pytree_dataclass
class ChannelMix7(StatefulLayer):
    """RWKV-7 channel mixing: ``relu(W_k (x + (x_{t-1} - x) x_k))^2 W_v``, no gate.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    the hidden layer is {..., "seq", "mlp"}.
    Side input: ``context`` (the token shift is cut at document starts).
    State: the last input {"batch", "embedding"}.
    Parameters: ``x_k`` {"embedding"}; ``key`` {"embedding" -> "mlp"};
    ``value`` {"mlp" -> "embedding"}.
    Site: ``hidden`` (the squared-ReLU layer {..., "seq", "mlp"}).
    """

    x_k: pz.nn.ParameterLike[pz.nx.NamedArray]
    key: pz.nn.Layer
    value: pz.nn.Layer
    hidden: sites.Hook = sites.site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, hidden_width: int, *,
                    layer: int, num_layers: int, dtype=jnp.float32) -> ChannelMix7:
        """BlinkDL's initialisation for block `layer` of `num_layers`."""
        embed, hidden = {axes.EMBEDDING: width}, {axes.MLP: hidden_width}
        _, remaining = _ratios(layer, num_layers)
        return cls(
            x_k=pz.nn.make_parameter(
                f"{name}.x_k", init_base_rng, constant(token_shift_mix(width, remaining**4)), embed, dtype
            ),
            key=_orthogonal_dense(f"{name}.key", init_base_rng, embed, hidden, 1.0, dtype=dtype),
            value=_orthogonal_dense(f"{name}.value", init_base_rng, hidden, embed, 0.0, dtype=dtype),
        )

    def initial_state(self, batch_size: int, max_length: int | None = None) -> pz.nx.NamedArray:
        del max_length  # a fixed-size state
        mix = self.x_k.value
        return pz.nx.zeros({axes.BATCH: batch_size, **mix.named_shape}, mix.dtype)

    def forward(
        self,
        x: pz.nx.NamedArray,
        context: DocumentContext,
        shift: pz.nx.NamedArray,
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """Channel mixing continuing from the last input `shift`; ``(y, new_shift)``."""
        shifted, last = token_shift(x, context, None if context.new_streams else shift)
        hidden = self.key(shift_lerp(x, shifted - x, self.x_k.value))
        hidden = self.hidden(pz.nx.nmap(lambda h: jnp.square(jax.nn.relu(h)))(hidden))
        return self.value(hidden), last
