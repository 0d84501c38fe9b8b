"""Mamba-2's mixer (arXiv 2405.21060): SSD, a scalar decay per head and step.

Per head h (of "heads", each {"projection": P} wide) the state is a matrix
``S`` {"projection", "state"} and::

    S_t = exp(dt_t[h] A[h]) S_{t-1} + (dt_t[h] x_t[h]) B_t[g]^T,    y_t = S_t C_t[g] + D[h] x_t[h]

with ``g = h // (heads / groups)``: groups of heads share one B and one C.
The in-projection's output splits into the gate ``z``, ``xBC`` (x, B and C
end to end) and ``dt``; a causal depthwise convolution (then SiLU) runs over
``xBC``; ``dt = clip(softplus(dt + dt_bias), *time_step_limit)``, ``A =
-exp(A_log)``. The output is ``out_proj(norm(y * silu(z)))`` with an RMS norm
per group of heads (`layers.norms.ScaledRMSNorm`). The recurrence is
`matrix_recurrence.matrix_scan`'s scalar-decay case (``log_decay = dt A``
without a key axis, ``k = B``, ``v = dt x``, ``r = C``), in float32
(float64 for float64 parameters); it restarts where a document starts, and
the conv is cut there.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import init
from recurrent_lm.layers.conv import CausalConv1D
from recurrent_lm.layers.linear import dense, fused_parts
from recurrent_lm.layers.mamba import TimeStepInit, a_log_init, dt_bias_init, ones_init
from recurrent_lm.layers.matrix_recurrence import (
    DEFAULT_CHUNK_SIZE,
    check_matrix_scan_method,
    materialised_scan,
    matrix_scan,
)
from recurrent_lm.layers.norms import ScaledRMSNorm
from recurrent_lm.layers.recurrence import accumulation_dtype

HEADS, VALUE, KEY, GROUPS = axes.HEADS, axes.PROJECTION, axes.STATE, axes.GROUPS
GROUP_HEADS = "group_heads"  # inside `Mamba2Mixer._recurrence` only: a head's index in its group


@pz.pytree_dataclass
class Mamba2State(pz.Struct):
    """State of `Mamba2Mixer` between calls.

    Attributes:
      conv: the convolution's last inputs {..., "conv_taps": K-1, "fused"}
        (x, B, C end to end), in the parameter dtype.
      ssm: the recurrence state {..., "heads", "projection", "state"}, float32
        (or wider: `recurrence.accumulation_dtype` of the parameters).
    """

    conv: pz.nx.NamedArray
    ssm: pz.nx.NamedArray


def per_head(x: pz.nx.NamedArray, heads: int) -> pz.nx.NamedArray:
    """{..., "groups": G, ...} -> {..., "heads": H, ...}: head h reads group h // (H / G)."""
    groups = x.named_shape[GROUPS]
    repeat = lambda v: jnp.repeat(v, heads // groups, axis=0)
    return pz.nx.nmap(repeat)(x.untag(GROUPS)).tag(HEADS)


@pz.pytree_dataclass
class Mamba2Mixer(StatefulLayer):
    """Mamba-2's mixer: in-projection, conv over x/B/C, SSD, gated norm, out-projection.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    inside, x, z and y are {..., "seq", "heads", "projection"}; B, C {...,
    "seq", "groups", "state"}; dt {..., "seq", "heads"}; the state {...,
    "heads", "projection", "state"}.
    Side input: ``context`` (the conv is cut and the state restarts at
    document starts).
    State: `Mamba2State`.
    Parameters (HF's names): ``in_proj`` {"embedding" -> "fused": z, xBC,
    dt}; ``conv1d`` (`CausalConv1D` over "fused", the xBC channels, with or
    without bias); ``dt_bias``, ``A_log``, ``D`` {"heads"}; ``norm`` (a
    `ScaledRMSNorm` over {"heads", "projection"} per group); ``out_proj``
    {"heads", "projection" -> "embedding"}.
    Static: ``time_step_limit`` (dt's clip), ``scan_method`` and
    ``chunk_size`` (`matrix_scan`'s form and chunk length).

    Sites: ``z`` (the gate, before SiLU), ``x``, ``ssm_output`` (``S_t C_t +
    D x_t``, before the gate), all {..., "seq", "heads", "projection"};
    ``xbc`` (the conv's input) and ``conv1d.output`` (the conv, before SiLU)
    {..., "seq", "fused"}; ``dt`` (after softplus and clip) {..., "seq",
    "heads"}; ``B``, ``C`` {..., "seq", "groups", "state"}; the state site
    ``state``: ``S_t`` {..., "seq", "heads", "projection", "state"} (float32 or wider).
    Capturing or changing it runs the recurrence step by step with every
    state materialised (`matrix_recurrence.materialised_scan`); ``Replace`` /
    ``Add`` there set / shift ``S_t`` and the change carries on, or, with
    ``propagate=False``, changes only ``y_t``. The out-projection is the
    enclosing block's ``temporal_output`` site.
    """

    in_proj: pz.nn.Layer
    conv1d: CausalConv1D
    dt_bias: pz.nn.ParameterLike[pz.nx.NamedArray]
    A_log: pz.nn.ParameterLike[pz.nx.NamedArray]
    D: pz.nn.ParameterLike[pz.nx.NamedArray]
    norm: ScaledRMSNorm
    out_proj: pz.nn.Layer
    groups: int = dataclasses.field(default=1, metadata={"pytree_node": False})
    time_step_limit: tuple[float, float] = dataclasses.field(
        default=(0.0, math.inf), metadata={"pytree_node": False}
    )
    scan_method: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    chunk_size: int = dataclasses.field(default=DEFAULT_CHUNK_SIZE, metadata={"pytree_node": False})
    z: sites.Hook = sites.site_field()
    xbc: sites.Hook = sites.site_field()
    dt: sites.Hook = sites.site_field()
    x: sites.Hook = sites.site_field()
    B: sites.Hook = sites.site_field()
    C: sites.Hook = sites.site_field()
    state: sites.Hook = sites.state_site_field()
    ssm_output: sites.Hook = sites.site_field()

    @classmethod
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        width: int,
        heads: int,
        head_dim: int,
        state_size: int,
        groups: int,
        conv_kernel: int,
        *,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.1,
        time_step: TimeStepInit = TimeStepInit(),
        time_step_limit: tuple[float, float] = (0.0, math.inf),
        out_scale: float = 1.0,
        scan_method: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        dtype=jnp.float32,
    ) -> Mamba2Mixer:
        """A mixer initialised as transformers' ``Mamba2PreTrainedModel`` does:
        in-projection normal with std `initializer_range`; conv and
        out-projection torch's default uniform (the latter times
        `out_scale`); ``dt_bias`` per `time_step`; ``A_log = log(1..heads)``,
        ``D = 1``, norm scale 1; biases zero.

        Args:
          width: the model width; heads x head_dim: the expanded width.
          state_size: N; groups: heads sharing B and C (divides `heads`).
          conv_kernel: the conv's taps.
          time_step_limit: ``(low, high)`` clip of dt after the softplus.
          scan_method, chunk_size: `matrix_scan`'s form and chunk length.
        """
        check_matrix_scan_method(scan_method, chunk_size)
        if heads % groups:
            raise ValueError(f"{groups} groups do not divide {heads} heads.")
        inner = heads * head_dim
        conv_dim = inner + 2 * groups * state_size
        embed, value_side = {axes.EMBEDDING: width}, {HEADS: heads, VALUE: head_dim}
        param = lambda label, initializer, shape, **kw: pz.nn.make_parameter(
            f"{name}.{label}", init_base_rng, initializer, shape, dtype, **kw
        )
        out_bound = out_scale / math.sqrt(inner)
        return cls(
            in_proj=dense(
                f"{name}.in_proj", init_base_rng, embed, {axes.FUSED: inner + conv_dim + heads},
                use_bias=use_bias, dtype=dtype,
                initializer=lambda key, shape, dtype: init.normal(key, shape, dtype, std=initializer_range),
            ),
            conv1d=CausalConv1D.from_config(
                f"{name}.conv1d", init_base_rng, conv_dim, conv_kernel, axis=axes.FUSED,
                use_bias=use_conv_bias, dtype=dtype,
                initializer=lambda key, shape, dtype: init.uniform(
                    key, shape, dtype, bound=1 / math.sqrt(conv_kernel)),
            ),
            dt_bias=param("dt_bias", dt_bias_init, {HEADS: heads}, time_step=time_step),
            A_log=param("A_log", a_log_init, {HEADS: heads}, along=HEADS),
            D=param("D", ones_init, {HEADS: heads}),
            norm=ScaledRMSNorm.from_config(
                f"{name}.norm", init_base_rng, value_side, groups=groups, eps=norm_eps, dtype=dtype
            ),
            out_proj=dense(
                f"{name}.out_proj", init_base_rng, value_side, embed, use_bias=use_bias, dtype=dtype,
                initializer=lambda key, shape, dtype: init.uniform(key, shape, dtype, bound=out_bound),
            ),
            groups=groups,
            time_step_limit=tuple(time_step_limit),
            scan_method=scan_method,
            chunk_size=chunk_size,
        )

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(heads, head_dim, state_size)."""
        heads, head_dim = (self.norm.scale.value.named_shape[a] for a in (HEADS, VALUE))
        conv_dim = self.conv1d.weights.value.named_shape[axes.FUSED]
        return heads, head_dim, (conv_dim - heads * head_dim) // (2 * self.groups)

    def initial_state(self, batch_size: int, max_length: int | None = None) -> Mamba2State:
        del max_length  # a fixed-size state
        heads, head_dim, state_size = self.sizes
        return Mamba2State(
            conv=self.conv1d.initial_state(batch_size),
            ssm=pz.nx.zeros(
                {axes.BATCH: batch_size, HEADS: heads, VALUE: head_dim, KEY: state_size},
                accumulation_dtype(self.A_log.value.dtype),
            ),
        )

    def forward(
        self, x: pz.nx.NamedArray, context: DocumentContext, state: Mamba2State
    ) -> tuple[pz.nx.NamedArray, Mamba2State]:
        """The mixer continuing from `state`; returns ``(y, new_state)``."""
        heads, head_dim, state_size = self.sizes
        value_side, group_side = {HEADS: heads, VALUE: head_dim}, {GROUPS: self.groups, KEY: state_size}
        conv_dim = self.conv1d.weights.value.named_shape[axes.FUSED]
        z, xbc, dt = fused_parts(self.in_proj(x), [value_side, {axes.FUSED: conv_dim}, {HEADS: heads}])
        z, xbc = self.z(z), self.xbc(xbc)
        wide = lambda v: v.astype(accumulation_dtype(x.dtype, self.A_log.value.dtype))
        low, high = self.time_step_limit
        dt = pz.nx.nmap(jax.nn.softplus)(wide(dt) + wide(self.dt_bias.value))
        dt = self.dt(pz.nx.nmap(lambda v: jnp.clip(v, low, high))(dt))
        conv, conv_state = self.conv1d.forward(xbc, context, state.conv)
        silu = pz.nx.nmap(jax.nn.silu)
        xs, b, c = fused_parts(silu(conv), [value_side, group_side, group_side])
        xs, b, c = self.x(xs), self.B(b), self.C(c)
        log_decay = dt * -pz.nx.nmap(jnp.exp)(wide(self.A_log.value))  # {..., seq, heads}
        h0 = None if context.new_streams else state.ssm
        y, h_last = self._recurrence(wide(c), log_decay, wide(b), wide(xs) * dt, h0, context)
        y = self.ssm_output(y.astype(x.dtype) + self.D.value.astype(x.dtype) * xs)
        return self.out_proj(self.norm(y * silu(z))), Mamba2State(conv=conv_state, ssm=h_last)

    def _recurrence(self, r, log_decay, k, v, h0, context):
        """``(y, last state)`` from r = C and k = B per group {..., "seq",
        "groups", "state"}: the primitive, or, when the state site is
        captured or changed, the step-by-step scan that materialises every
        state (`materialised_scan`).

        The primitive sees the heads as {"groups", "group_heads"} (head h is
        head h % (H / G) of group h // (H / G)), so that C and B, which lack
        "group_heads", are broadcast by the scan's step, not repeated per head.
        """
        heads = v.named_shape[HEADS]
        if isinstance(self.state, sites.StateSite) and v.named_shape[axes.SEQ] == 1:
            # One step (decoding): C and B per head are one row each; the
            # state keeps the heads' layout (no split and merge in the loop).
            return matrix_scan(
                per_head(r, heads), log_decay, per_head(k, heads), v, axis=axes.SEQ, key_axis=KEY,
                value_axis=VALUE, h0=h0, reset=context.starts, method=self.scan_method,
                chunk_size=self.chunk_size,
            )
        if isinstance(self.state, sites.StateSite):
            groups = r.named_shape[GROUPS]
            split = lambda x: pz.nx.nmap(lambda u: u.reshape(groups, heads // groups, *u.shape[1:]))(
                x.untag(HEADS)).tag(GROUPS, GROUP_HEADS)
            merge = lambda x: pz.nx.nmap(lambda u: u.reshape(heads, *u.shape[2:]))(
                x.untag(GROUPS, GROUP_HEADS)).tag(HEADS)
            y, h_last = matrix_scan(
                r, split(log_decay), k, split(v), axis=axes.SEQ, key_axis=KEY, value_axis=VALUE,
                h0=None if h0 is None else split(h0), reset=context.starts, method=self.scan_method,
                chunk_size=self.chunk_size,
            )
            return merge(y), merge(h_last)
        r, k = per_head(r, heads), per_head(k, heads)
        if h0 is None:
            h0 = self.initial_state(r.named_shape[axes.BATCH]).ssm
        # An intervention sees (keep, override) and sets S_t = keep_t step(S_{t-1}) + override_t.
        keep = pz.nx.ones({axes.SEQ: r.named_shape[axes.SEQ]}, v.dtype)
        override = pz.nx.zeros({**v.named_shape, KEY: k.named_shape[KEY]}, v.dtype)
        keep, override = self.state.update(keep, override)
        states, last = materialised_scan(
            log_decay, k, v, h0=h0, reset=context.starts, keep=keep, override=override,
            axis=axes.SEQ, key_axis=KEY, value_axis=VALUE,
        )
        states = self.state(states)
        y = pz.nx.nmap(jnp.sum)((states * r).untag(KEY))
        return y, last
