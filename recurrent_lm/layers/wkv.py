"""RWKV-4's time-mix block and its WKV recurrence (arXiv 2305.13048, section 3).

Per channel, with decay ``w = -exp(time_decay) < 0`` and bonus ``u = time_first``::

    wkv_t = (sum_{i<t} e^{(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{(t-1-i) w + k_i}     + e^{u + k_t})

The sums are the state ``S_t = e^w S_{t-1} + e^{k_t} (v_t, 1)``, a linear
recurrence run by `recurrence.scaled_linear_scan` in log-scaled form: keys above
88 overflow ``exp`` in float32, and trained checkpoints have them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import init, recurrence
from recurrent_lm.layers.causal_filter import token_shift
from recurrent_lm.layers.linear import dense

WkvState = recurrence.ScaledState
"""WKV state: mantissas (numerator, denominator) and their shared log-scale
(HF's num, den and max), float32 {..., "wkv"}."""


def wkv(
    time_decay: pz.nx.NamedArray,
    time_first: pz.nx.NamedArray,
    k: pz.nx.NamedArray,
    v: pz.nx.NamedArray,
    context: DocumentContext,
    state: WkvState | None,
    *,
    method: str | None = None,
    state_site: sites.Hook | None = None,
) -> tuple[pz.nx.NamedArray, WkvState]:
    """The WKV recurrence over "seq", continuing from `state`.

    Args:
      time_decay, time_first: raw parameters {"wkv"} (``w = -exp(time_decay)``).
      k, v: keys and values {..., "seq", "wkv"}.
      context: the document context; the state restarts where a document starts.
      state: the state before the first token (None: empty).
      method: scan implementation (`recurrence.SCAN_METHODS`, None = default).
      state_site: the state site (see `TimeMix`): it sees the states after
        every token, packed as {..., "seq", "wkv", "wkv_state": 3}
        (numerator mantissa, denominator mantissa, log-scale), and may
        restart the recurrence from a state of its own at chosen positions.

    Returns:
      ``(y, new_state)``: `y` {..., "seq", "wkv"} in float32 (or wider), the
      state after the last token.
    """
    acc = recurrence.accumulation_dtype(k.dtype, v.dtype, time_decay.dtype)
    exp = pz.nx.nmap(jnp.exp)
    log_decay = -exp(time_decay.astype(acc))
    k, v = k.astype(acc), v.astype(acc)
    reset = context.starts
    ones = pz.nx.ones({axes.SEQ: k.named_shape[axes.SEQ]}, acc)
    scan_v, scan_ones, scan_k, scan_reset = v, ones, k, reset
    if state_site is not None and not isinstance(state_site, sites.StateSite):
        # An intervention sees the scan inputs as the packed state a restart
        # would set: h_t = exp(k_t) (v_t, 1), i.e. mantissas (v_t, 1), scale k_t.
        keep = pz.nx.ones({axes.SEQ: k.named_shape[axes.SEQ]}, acc)
        packed = pz.nx.stack([v, ones + pz.nx.zeros(v.named_shape, acc), k], axes.WKV_STATE)
        keep, packed = state_site.update(keep, packed)
        scan_reset = reset | (keep == 0)
        scan_v, scan_ones, scan_k = (packed[{axes.WKV_STATE: i}] for i in range(3))
    after, last = recurrence.scaled_linear_scan(
        log_decay, (scan_v, scan_ones), scan_k, h0=state, reset=scan_reset, method=method
    )
    if state_site is not None:
        packed_after = pz.nx.stack([*after.mantissas, after.log_scale], axes.WKV_STATE)
        state_site(packed_after)
    if state is None:
        state = recurrence.empty_scaled_state(last.log_scale.named_shape, 2, acc)
    # The output at t reads the state before t: the states shifted by one, empty
    # where a document starts. Empty means zero mantissas and the log-scale
    # sentinel: with log-scale 0 instead, a key below -88 would give 0 / 0.
    num, den = (
        token_shift(x, context, p)[0]
        for x, p in zip(after.mantissas, state.mantissas)
    )
    scale = token_shift(after.log_scale, context, state.log_scale)[0]
    scale = pz.nx.nmap(jnp.where)(
        reset, jnp.asarray(recurrence.NEG_LOG_SCALE, acc), scale
    )
    bonus = time_first.astype(acc) + k
    top = pz.nx.nmap(jnp.maximum)(scale, bonus)
    e_state, e_token = exp(scale - top), exp(bonus - top)
    y = (e_state * num + e_token * v) / (e_state * den + e_token)
    return y, last


def state_values(packed: pz.nx.NamedArray) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """(numerator, denominator) of a captured WKV state {..., "wkv_state": 3}.

    Both are ``mantissa * exp(log_scale)``: beyond float32's range when keys
    exceed ~88 (compare mantissas and log-scales then)."""
    scale = pz.nx.nmap(jnp.exp)(packed[{axes.WKV_STATE: 2}])
    return packed[{axes.WKV_STATE: 0}] * scale, packed[{axes.WKV_STATE: 1}] * scale


def time_decay_init(key, named_shape, dtype, *, layer: int, num_layers: int):
    """``-5 + 8 (h / (A-1))^(0.7 + 1.3 i / (L-1))`` (RWKV-4's per-channel decay speeds)."""
    del key
    (width,) = named_shape.values()
    depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
    h = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
    return pz.nx.wrap((-5 + 8 * h ** (0.7 + 1.3 * depth)).astype(dtype)).tag(
        *named_shape
    )


def time_first_init(key, named_shape, dtype):
    """``log 0.3 + 0.5 (((h + 1) mod 3) - 1)`` (BlinkDL's zigzag bonus)."""
    del key
    (width,) = named_shape.values()
    zigzag = 0.5 * ((jnp.arange(width) + 1) % 3 - 1).astype(jnp.float32)
    return pz.nx.wrap((math.log(0.3) + zigzag).astype(dtype)).tag(*named_shape)


def time_mix_init(key, named_shape, dtype, *, exponent: float, offset: float = 0.0):
    """``(c / C)^exponent + offset`` over the channels c (token-shift mix ratios)."""
    del key
    (width,) = named_shape.values()
    ratio = jnp.arange(width, dtype=jnp.float32) / width
    return pz.nx.wrap((ratio**exponent + offset).astype(dtype)).tag(*named_shape)


def mix(x, shifted, ratio):
    """``x * ratio + shifted * (1 - ratio)``: interpolate with the previous token."""
    ratio = ratio.astype(x.dtype)
    return x * ratio + shifted * (1 - ratio)


def rwkv_dense(name, key, in_axes, out_axes, *, zero: bool, dtype):
    """An RWKV projection: zero (the projections BlinkDL starts at zero) or
    orthogonal with gain ``sqrt(out / in)`` when it widens."""
    if zero:
        initializer = init.zeros
    else:
        fan_in, fan_out = math.prod(in_axes.values()), math.prod(out_axes.values())
        initializer = functools.partial(
            init.orthogonal,
            in_axes=tuple(in_axes),
            scale=math.sqrt(max(fan_out / fan_in, 1.0)),
        )
    return dense(
        name,
        key,
        in_axes,
        out_axes,
        use_bias=False,
        initializer=initializer,
        dtype=dtype,
    )


@pz.pytree_dataclass
class TimeMixState(pz.Struct):
    """State of `TimeMix` between calls.

    Attributes:
      shift: the last normed input {..., "embedding"}, in the input dtype.
      wkv: the WKV state {..., "wkv"}, float32.
    """

    shift: pz.nx.NamedArray
    wkv: WkvState


@pz.pytree_dataclass
class TimeMix(StatefulLayer):
    """RWKV-4 time mixing: token shift, k/v/r projections, WKV, output.

    ``x' = shift(x)``; ``k = W_k mix(x, x', mu_k)`` (likewise v, r);
    ``y = W_o (sigmoid(r) * wkv(k, v))``.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    k, v, r and the recurrence are {..., "seq", "wkv"}.
    Side input: ``context`` (token shift and WKV restart at document starts).
    State: `TimeMixState`.
    Parameters: ``time_mix_{key,value,receptance}`` {"embedding"};
    ``time_decay``, ``time_first`` {"wkv"} (raw, as in the checkpoints);
    ``key``, ``value``, ``receptance`` {"wkv", "embedding"}; ``output``
    {"embedding", "wkv"}.
    Sites: ``receptance_value`` (sigmoid(r)) and ``wkv_output`` (wkv_t), both
    {..., "seq", "wkv"}; the state site ``state``: the WKV state after each
    token, {..., "seq", "wkv", "wkv_state": 3} = (numerator mantissa,
    denominator mantissa, log-scale); numerator = mantissa * exp(log-scale)
    (`state_values`). Replacing it at t restarts the recurrence from the
    given state, which then decays into every later output.
    """

    time_mix_key: pz.nn.ParameterLike[pz.nx.NamedArray]
    time_mix_value: pz.nn.ParameterLike[pz.nx.NamedArray]
    time_mix_receptance: pz.nn.ParameterLike[pz.nx.NamedArray]
    time_decay: pz.nn.ParameterLike[pz.nx.NamedArray]
    time_first: pz.nn.ParameterLike[pz.nx.NamedArray]
    key: pz.nn.Layer
    value: pz.nn.Layer
    receptance: pz.nn.Layer
    output: pz.nn.Layer
    scan_method: str | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    receptance_value: sites.Hook = sites.site_field()
    wkv_output: sites.Hook = sites.site_field()
    state: sites.Hook = dataclasses.field(
        default_factory=lambda: sites.StateSite(scaled=True)
    )

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        width: int,
        wkv_width: int,
        *,
        layer: int,
        num_layers: int,
        scan_method: str | None = None,
        dtype=jnp.float32,
    ) -> TimeMix:
        """RWKV-4's initialisation for block `layer` of `num_layers`."""
        recurrence.check_scan_method(scan_method)
        embed, inner = {axes.EMBEDDING: width}, {axes.WKV: wkv_width}
        depth = layer / (num_layers - 1) if num_layers > 1 else 0.0
        remaining = 1.0 - layer / num_layers
        param = lambda label, initializer, shape, **kw: pz.nn.make_parameter(
            f"{name}.{label}", init_base_rng, initializer, shape, dtype, **kw
        )
        return cls(
            time_mix_key=param(
                "time_mix_key", time_mix_init, embed, exponent=remaining
            ),
            time_mix_value=param(
                "time_mix_value",
                time_mix_init,
                embed,
                exponent=remaining,
                offset=0.3 * depth,
            ),
            time_mix_receptance=param(
                "time_mix_receptance", time_mix_init, embed, exponent=0.5 * remaining
            ),
            time_decay=param(
                "time_decay", time_decay_init, inner, layer=layer, num_layers=num_layers
            ),
            time_first=param("time_first", time_first_init, inner),
            key=rwkv_dense(
                f"{name}.key", init_base_rng, embed, inner, zero=True, dtype=dtype
            ),
            value=rwkv_dense(
                f"{name}.value", init_base_rng, embed, inner, zero=False, dtype=dtype
            ),
            receptance=rwkv_dense(
                f"{name}.receptance",
                init_base_rng,
                embed,
                inner,
                zero=True,
                dtype=dtype,
            ),
            output=rwkv_dense(
                f"{name}.output", init_base_rng, inner, embed, zero=True, dtype=dtype
            ),
            scan_method=scan_method,
        )

    def initial_state(self, batch_size: int, max_length: int | None = None) -> TimeMixState:
        del max_length  # a fixed-size state
        shift = self.time_mix_key.value
        width = self.time_decay.value.named_shape[axes.WKV]
        return TimeMixState(
            shift=pz.nx.zeros({axes.BATCH: batch_size, **shift.named_shape}, shift.dtype),
            wkv=recurrence.empty_scaled_state({axes.BATCH: batch_size, axes.WKV: width}, 2),
        )

    def forward(
        self,
        x: pz.nx.NamedArray,
        context: DocumentContext,
        state: TimeMixState,
    ) -> tuple[pz.nx.NamedArray, TimeMixState]:
        """Time mixing continuing from `state`; returns ``(y, new_state)``."""
        if context.new_streams:
            state = None  # nothing to read
        shifted, last = token_shift(x, context, None if state is None else state.shift)
        k = self.key(mix(x, shifted, self.time_mix_key.value))
        v = self.value(mix(x, shifted, self.time_mix_value.value))
        r = self.receptance_value(pz.nx.nmap(jax.nn.sigmoid)(
            self.receptance(mix(x, shifted, self.time_mix_receptance.value))
        ))
        y, wkv_state = wkv(
            self.time_decay.value,
            self.time_first.value,
            k,
            v,
            context,
            None if state is None else state.wkv,
            method=self.scan_method,
            state_site=self.state,
        )
        y = self.wkv_output(y)
        return self.output(r * y.astype(r.dtype)), TimeMixState(
            shift=last, wkv=wkv_state
        )
