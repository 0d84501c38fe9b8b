"""Mamba-1's mixer (arXiv 2312.00752): a selective state-space model per channel.

Per channel d of the expanded width ("inner") and state index n ("state")::

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]

where ``u = silu(conv(x))`` is the in-projection's x half after a causal
depthwise convolution, ``A = -exp(A_log)``, and the input-dependent ``dt``
(``softplus(dt_proj(dt_low))``), ``B`` and ``C`` come from ``x_proj(u)``.
The output ``out_proj(y * silu(z))`` is gated by the in-projection's z half.
The recurrence runs in float32 (float64 for float64 parameters); it
restarts where a document starts, and the conv is cut there. With the
sequential form (the CPU default) and the state site untouched it is
`selective_scan`: the decay ``exp(dt A)`` and the input ``dt B u`` are
formed inside the step and the step emits ``C . h`` directly, so only the
{"inner", "state"} state lives across steps (no [T, inner, N] tensors: at
the 130m shape, T = 1024, that is ~300 MB less per layer and ~5-20x faster
on CPU, ``benchmarks/mamba.py``). The other forms, and a captured or changed
state site, go through `recurrence.linear_scan` on the materialised decays
and inputs (every state exists, for the site).

Also here what Mamba-2's mixer (`layers.mamba2`) shares: the time-step
initialisation (`TimeStepInit`) and HF's ``A_log`` / ``D`` initialisers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import named, sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import init, recurrence
from recurrent_lm.layers.conv import CausalConv1D
from recurrent_lm.layers.linear import dense, fused_parts

INNER, STATE = axes.INNER, axes.STATE

# Channels per block of `selective_scan`: each block's loop over time runs on
# a {state, block} slab. Measured on 2 shared CPU cores (Mamba-1 130m: 1536
# channels x N = 16, T = 1024): one loop over all channels took 167 ms (XLA
# splits each step's small fusion across threads, and the per-step hand-off
# dominates), blocks of 32 / 64 / 96 / 192 channels 43 / 44 / 33 / 43 ms, the
# materialised scan 624 ms.
SELECTIVE_SCAN_BLOCK = 96


class TimeStepInit(NamedTuple):
    """How ``dt``'s parameters start (HF's ``time_step_*`` config fields).

    ``dt = softplus(bias)`` starts log-uniform in [`min`, `max`], at least
    `floor`; Mamba-1's ``dt_proj`` weights start uniform in ``+-scale /
    sqrt(rank)`` (`scheme` "random") or at that constant ("constant").
    """

    min: float = 0.001
    max: float = 0.1
    floor: float = 1e-4
    scale: float = 1.0
    scheme: str = "random"


def dt_bias_init(key, named_shape, dtype, *, time_step: TimeStepInit) -> pz.nx.NamedArray:
    """``softplus^-1(dt)`` with ``dt`` log-uniform in [min, max], floored."""
    u = jax.random.uniform(key, tuple(named_shape.values()), jnp.float32)
    low, high = math.log(time_step.min), math.log(time_step.max)
    dt = jnp.maximum(jnp.exp(u * (high - low) + low), time_step.floor)
    inverse = dt + jnp.log(-jnp.expm1(-dt))
    return pz.nx.wrap(inverse.astype(dtype)).tag(*named_shape)


def a_log_init(key, named_shape, dtype, *, along: str) -> pz.nx.NamedArray:
    """``A_log = log(1, 2, ..., n)`` along the axis `along`, the same elsewhere
    (S4D-real: ``A = -(1, 2, ..., n)``)."""
    del key
    ramp = np.log(np.arange(1, named_shape[along] + 1, dtype=np.float64))
    values = pz.nx.wrap(jnp.asarray(ramp, jnp.float32)).tag(along)
    return (values + pz.nx.zeros(dict(named_shape), jnp.float32)).order_as(*named_shape).astype(dtype)


def ones_init(key, named_shape, dtype) -> pz.nx.NamedArray:
    del key
    return pz.nx.ones(dict(named_shape), dtype)


@functools.partial(jax.jit, static_argnames=("block",))
def _positional_selective_scan(u, dt, a, b, c, reset, h0, *, block):
    """u, dt [G, T, D]; a [D, N]; b, c [G, T, N]; reset [G, T] (bool) or None;
    h0 [G, D, N]. Returns (y [G, T, D], h_last [G, D, N])."""
    rows, steps, channels = u.shape
    size = a.shape[1]
    if reset is None:
        reset = jnp.zeros((rows, steps), bool)
    if steps == 1:  # one step (decoding): no loop
        w = jnp.where(reset[:, 0, None, None], 0.0, jnp.exp(dt[:, 0, :, None] * a))
        h = w * h0 + (dt[:, 0] * u[:, 0])[..., None] * b[:, 0, None, :]
        return jnp.sum(h * c[:, 0, None, :], -1)[:, None], h
    # Channels in blocks (padded with dt = u = 0: those states stay as they
    # are), every block of every row one slab {state, block} scanned over time.
    count = -(-channels // block)
    pad = count * block - channels
    if pad:
        u, dt = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (u, dt))
        a = jnp.pad(a, ((0, pad), (0, 0)))
        h0 = jnp.pad(h0, ((0, 0), (0, pad), (0, 0)))
    slabs = lambda x: x.reshape(rows, steps, count, block).transpose(0, 2, 1, 3).reshape(
        rows * count, steps, block)
    per_block = lambda x: jnp.broadcast_to(x[:, None], (rows, count, *x.shape[1:])).reshape(
        rows * count, *x.shape[1:])
    a_t = jnp.broadcast_to(a.reshape(count, block, size).transpose(0, 2, 1)[None],
                           (rows, count, size, block)).reshape(rows * count, size, block)
    h0 = h0.reshape(rows, count, block, size).transpose(0, 1, 3, 2).reshape(rows * count, size, block)

    def slab(inputs):
        u, dt, a, b, c, reset, h = inputs

        def step(h, xs):
            u_t, dt_t, b_t, c_t, reset_t = xs
            w = jnp.where(reset_t, 0.0, jnp.exp(dt_t * a))  # {state, block}
            h = w * h + (dt_t * u_t) * b_t[:, None]
            return h, jnp.sum(h * c_t[:, None], 0)

        h, y = jax.lax.scan(step, h, (u, dt, b, c, reset))
        return y, h

    y, h = jax.lax.map(slab, (slabs(u), slabs(dt), a_t, per_block(b), per_block(c),
                              per_block(reset), h0))
    y = y.reshape(rows, count, steps, block).transpose(0, 2, 1, 3).reshape(rows, steps, -1)
    h = h.reshape(rows, count, size, block).transpose(0, 1, 3, 2).reshape(rows, -1, size)
    return y[..., :channels], h[:, :channels]


def selective_scan(
    u: pz.nx.NamedArray,
    dt: pz.nx.NamedArray,
    a: pz.nx.NamedArray,
    b: pz.nx.NamedArray,
    c: pz.nx.NamedArray,
    *,
    h0: pz.nx.NamedArray | None = None,
    reset: pz.nx.NamedArray | None = None,
    axis: str = axes.SEQ,
    block: int = SELECTIVE_SCAN_BLOCK,
) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """Mamba-1's selective scan, fused: ``y_t = sum_n C_t[n] h_t[:, n]`` with
    ``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` (per "inner" channel, state
    index "state"), without materialising any [T, inner, state] tensor.

    The same recurrence as `recurrence.linear_scan` on ``(exp(dt A), dt u
    B)`` followed by ``sum_n C h`` (and the same arithmetic per step), but
    the step forms its decay and input and emits ``y_t``: only the state
    crosses steps. Sequential over `axis`, the channels in blocks of `block`
    (`SELECTIVE_SCAN_BLOCK`) scanned one after another.

    Args:
      u, dt: {..., axis, "inner"}; a: {"inner", "state"} (A, <= 0);
      b, c: {..., axis, "state"}; every input in the accumulation dtype.
      h0: optional initial state {..., "inner", "state"} (zeros if None).
      reset: optional boolean {..., axis}: where True the state restarts
        (``h_t = dt_t u_t B_t``).

    Returns:
      ``(y, h_last)``: y {..., axis, "inner"}; h_last {..., "inner", "state"}.
    """
    shape = named.union_named_shape(u, dt, a, b, c, reset, h0)
    batch = {n: s for n, s in shape.items() if n not in (axis, INNER, STATE)}
    rows = math.prod(batch.values())
    steps, channels, size = shape[axis], shape[INNER], shape[STATE]
    dtype = recurrence.accumulation_dtype(u.dtype, dt.dtype, a.dtype, b.dtype, c.dtype)
    flat = lambda x, layout, tail: named.to_positional(x.astype(dtype) if x.dtype != bool else x,
                                                      {**batch, **layout}).reshape(rows, *tail)
    timed = lambda x, name, n: flat(x, {axis: steps, name: n}, (steps, n))
    if h0 is None:
        h0_raw = jnp.zeros((rows, channels, size), dtype)
    else:
        h0_raw = flat(h0, {INNER: channels, STATE: size}, (channels, size))
    y, h = _positional_selective_scan(
        timed(u, INNER, channels), timed(dt, INNER, channels),
        named.to_positional(a.astype(dtype), {INNER: channels, STATE: size}),
        timed(b, STATE, size), timed(c, STATE, size),
        None if reset is None else flat(reset, {axis: steps}, (steps,)), h0_raw, block=block,
    )
    names = tuple(batch)
    y = pz.nx.wrap(y.reshape(*batch.values(), steps, channels)).tag(*names, axis, INNER)
    h = pz.nx.wrap(h.reshape(*batch.values(), channels, size)).tag(*names, INNER, STATE)
    return y, h


@pz.pytree_dataclass
class MambaState(pz.Struct):
    """State of `MambaMixer` between calls.

    Attributes:
      conv: the convolution's last inputs {..., "conv_taps": K-1, "inner"},
        in the parameter dtype.
      ssm: the recurrence state {..., "inner", "state"}, float32 (or wider:
        `recurrence.accumulation_dtype` of the parameters).
    """

    conv: pz.nx.NamedArray
    ssm: pz.nx.NamedArray


@pz.pytree_dataclass
class MambaMixer(StatefulLayer):
    """Mamba-1's mixer: in-projection, conv, selective scan, gate, out-projection.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    inside, {..., "seq", "inner"}, the state {..., "inner", "state"}.
    Side input: ``context`` (the conv is cut and the state restarts at
    document starts).
    State: `MambaState`.
    Parameters (HF's names): ``in_proj`` {"embedding" -> "fused": 2 inner
    (x, then z)}; ``conv1d`` (`CausalConv1D` over "inner", with or without
    bias); ``x_proj`` {"inner" -> "fused": R + 2N (dt_low, B, C)}; ``dt_proj``
    {"low_rank": R -> "inner"} with bias; ``A_log`` {"inner", "state"};
    ``D`` {"inner"}; ``out_proj`` {"inner" -> "embedding"}.

    Sites: ``x``, ``z`` (the in-projection's halves), ``conv1d.output`` (the
    conv, before SiLU), ``ssm_input`` (u, after SiLU), ``dt`` (after the
    softplus), ``ssm_output`` (``C . h + D u``, before the gate), all {...,
    "seq", "inner"}; ``B``, ``C`` {..., "seq", "state"}; the state site
    ``state``: ``h_t`` {..., "seq", "inner", "state"} (float32 or wider), where
    ``Replace`` / ``Add`` act on the recurrence (they carry forward) or,
    with ``propagate=False``, on what the layer reads out only. The
    out-projection is the enclosing block's ``temporal_output`` site.
    """

    in_proj: pz.nn.Layer
    conv1d: CausalConv1D
    x_proj: pz.nn.Layer
    dt_proj: pz.nn.Layer
    A_log: pz.nn.ParameterLike[pz.nx.NamedArray]
    D: pz.nn.ParameterLike[pz.nx.NamedArray]
    out_proj: pz.nn.Layer
    scan_method: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})
    chunk_size: int = dataclasses.field(
        default=recurrence.DEFAULT_CHUNK_SIZE, metadata={"pytree_node": False}
    )
    x: sites.Hook = sites.site_field()
    z: sites.Hook = sites.site_field()
    ssm_input: sites.Hook = sites.site_field()
    dt: sites.Hook = sites.site_field()
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
        inner: int,
        state_size: int,
        dt_rank: int,
        conv_kernel: int,
        *,
        use_bias: bool = False,
        use_conv_bias: bool = True,
        initializer_range: float = 0.1,
        time_step: TimeStepInit = TimeStepInit(),
        out_scale: float = 1.0,
        scan_method: str | None = None,
        chunk_size: int = recurrence.DEFAULT_CHUNK_SIZE,
        dtype=jnp.float32,
    ) -> MambaMixer:
        """A mixer initialised as transformers' ``MambaPreTrainedModel`` does:
        in / x projections normal with std `initializer_range`; conv and
        out-projection torch's default uniform (the latter times
        `out_scale`); ``dt_proj`` per `time_step`; ``A_log = log(1..N)``,
        ``D = 1``; biases zero.

        Args:
          width: the model width ("embedding"); inner: the expanded width.
          state_size: N; dt_rank: R, the width of ``dt``'s low-rank path.
          conv_kernel: the conv's taps.
          scan_method, chunk_size: `linear_scan`'s form and chunk length.
        """
        recurrence.check_scan_method(scan_method)
        embed, channels = {axes.EMBEDDING: width}, {INNER: inner}
        normal = lambda key, shape, dtype: init.normal(key, shape, dtype, std=initializer_range)
        param = lambda label, initializer, shape, **kw: pz.nn.make_parameter(
            f"{name}.{label}", init_base_rng, initializer, shape, dtype, **kw
        )
        dt_std = time_step.scale / math.sqrt(dt_rank)
        if time_step.scheme == "constant":
            dt_weights = lambda key, shape, dtype: pz.nx.full(dict(shape), dt_std, dtype)
        elif time_step.scheme == "random":
            dt_weights = lambda key, shape, dtype: init.uniform(key, shape, dtype, bound=dt_std)
        else:
            raise ValueError(f"unknown time-step init scheme {time_step.scheme!r}; use 'random' or 'constant'.")
        dt_proj = pz.nn.Affine(sublayers=[
            pz.nn.Linear(
                weights=param("dt_proj.weights", dt_weights, {**channels, axes.LOW_RANK: dt_rank}),
                in_axis_names=(axes.LOW_RANK,),
                out_axis_names=(INNER,),
            ),
            pz.nn.AddBias(
                bias=param("dt_proj.bias", dt_bias_init, channels, time_step=time_step),
                new_axis_names=(),
            ),
        ])
        out_bound = out_scale / math.sqrt(inner)
        return cls(
            in_proj=dense(f"{name}.in_proj", init_base_rng, embed, {axes.FUSED: 2 * inner},
                          use_bias=use_bias, initializer=normal, dtype=dtype),
            conv1d=CausalConv1D.from_config(
                f"{name}.conv1d", init_base_rng, inner, conv_kernel, axis=INNER,
                use_bias=use_conv_bias, dtype=dtype,
                initializer=lambda key, shape, dtype: init.uniform(
                    key, shape, dtype, bound=1 / math.sqrt(conv_kernel)),
            ),
            x_proj=dense(f"{name}.x_proj", init_base_rng, channels,
                         {axes.FUSED: dt_rank + 2 * state_size}, use_bias=False,
                         initializer=normal, dtype=dtype),
            dt_proj=dt_proj,
            A_log=param("A_log", a_log_init, {**channels, STATE: state_size}, along=STATE),
            D=param("D", ones_init, channels),
            out_proj=dense(
                f"{name}.out_proj", init_base_rng, channels, embed, use_bias=use_bias, dtype=dtype,
                initializer=lambda key, shape, dtype: init.uniform(key, shape, dtype, bound=out_bound),
            ),
            scan_method=scan_method,
            chunk_size=chunk_size,
        )

    @property
    def sizes(self) -> tuple[int, int]:
        """(inner, state_size)."""
        return tuple(self.A_log.value.named_shape[a] for a in (INNER, STATE))

    def initial_state(self, batch_size: int, max_length: int | None = None) -> MambaState:
        del max_length  # a fixed-size state
        inner, state_size = self.sizes
        return MambaState(
            conv=self.conv1d.initial_state(batch_size),
            ssm=pz.nx.zeros({axes.BATCH: batch_size, INNER: inner, STATE: state_size},
                            recurrence.accumulation_dtype(self.A_log.value.dtype)),
        )

    def forward(
        self, x: pz.nx.NamedArray, context: DocumentContext, state: MambaState
    ) -> tuple[pz.nx.NamedArray, MambaState]:
        """The mixer continuing from `state`; returns ``(y, new_state)``."""
        inner, state_size = self.sizes
        channels = {INNER: inner}
        xs, z = fused_parts(self.in_proj(x), [channels, channels])
        xs, z = self.x(xs), self.z(z)
        conv, conv_state = self.conv1d.forward(xs, context, state.conv)
        silu = pz.nx.nmap(jax.nn.silu)
        u = self.ssm_input(silu(conv))
        projected = self.x_proj(u)
        dt_rank = projected.named_shape[axes.FUSED] - 2 * state_size
        dt_low, b, c = fused_parts(
            projected, [{axes.LOW_RANK: dt_rank}, {STATE: state_size}, {STATE: state_size}]
        )
        wide = lambda v: v.astype(recurrence.accumulation_dtype(x.dtype, self.A_log.value.dtype))
        dt = self.dt(pz.nx.nmap(jax.nn.softplus)(wide(self.dt_proj(dt_low))))
        b, c = self.B(wide(b)), self.C(wide(c))
        a_matrix = -pz.nx.nmap(jnp.exp)(wide(self.A_log.value))  # {inner, state}
        h0 = None if context.new_streams else state.ssm
        method = self.scan_method or recurrence.default_scan_method()
        if isinstance(self.state, sites.StateSite) and method == "sequential":
            y, h_last = selective_scan(wide(u), dt, a_matrix, b, c, h0=h0, reset=context.starts)
            return self._output(x, y, u, z), MambaState(conv=conv_state, ssm=h_last)
        decay = pz.nx.nmap(jnp.exp)(dt * a_matrix)
        drive = (dt * wide(u)) * b  # {..., seq, inner, state}
        decay, drive = self.state.update(decay, drive)
        h, h_last = recurrence.linear_scan(
            decay, drive, h0=h0, reset=context.starts,
            method=self.scan_method, chunk_size=self.chunk_size,
        )
        h = self.state(h)
        y = pz.nx.nmap(jnp.sum)((h * c).untag(STATE))
        return self._output(x, y, u, z), MambaState(conv=conv_state, ssm=h_last)

    def _output(self, x, y, u, z):
        """``out_proj((y + D u) * silu(z))`` from the scan's ``y = C . h``."""
        y = y.astype(x.dtype) + self.D.value.astype(x.dtype) * u
        y = self.ssm_output(y)
        return self.out_proj(y * pz.nx.nmap(jax.nn.silu)(z))
