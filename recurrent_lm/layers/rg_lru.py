"""The Real-Gated Linear Recurrent Unit of Griffin (arXiv 2402.19427, eq. 1-4)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers import linear, recurrence

# `a = sigma(Lambda)^(c r)` with c = 8 (paper section 2.4).
GATE_EXPONENT = 8.0
# Bound on d sqrt(x)/dx in the input normaliser, to keep bf16 training finite.
SQRT_MAX_GRADIENT = 1000.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_grad(x, max_gradient: float):
    """sqrt(x) whose derivative is evaluated at max(x, 1 / (4 max_gradient^2))."""
    del max_gradient
    return jnp.sqrt(x)


def _sqrt_fwd(x, max_gradient):
    del max_gradient
    return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient, x, g):
    x = jnp.maximum(x, 1 / (4 * max_gradient**2))
    return (g / (2 * jnp.sqrt(x)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def a_param_init(
    key, named_shape, dtype, *, min_rad: float = 0.9, max_rad: float = 0.999
) -> pz.nx.NamedArray:
    """Decay radius ``exp(-softplus(a_param))`` area-uniform on [min_rad, max_rad]."""
    u = jax.random.uniform(key, tuple(named_shape.values()), jnp.float32)
    log_radius = 0.5 * jnp.log(u * (max_rad**2 - min_rad**2) + min_rad**2 + 1e-8)
    # Inverse softplus of -log_radius.
    a_param = jnp.log(jnp.exp(-log_radius) - 1.0)
    return pz.nx.wrap(a_param.astype(dtype)).tag(*named_shape)


@pz.pytree_dataclass
class RGLRU(StatefulLayer):
    """Real-Gated Linear Recurrent Unit.

    ``i_t = sigma(W_i x_t)``, ``r_t = sigma(W_a x_t)`` (block-diagonal gates),
    ``log a_t = -8 r_t softplus(a_param)``, and
    ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)``, restarting
    (``h_t = i_t x_t``) where a document starts. Padding does not reset.

    Named axes: in {..., "seq", "lru"} -> out {..., "seq", "lru"}.
    Side input: ``context`` (document cuts).
    State: ``h`` float32 {"batch", "lru"}.
    Parameters: ``a_param`` {"lru"}; ``input_gate`` and ``a_gate`` are
    `BlockDiagonalLinear` over "lru" with {"heads"} blocks.
    Sites: ``input_gate_value`` (i_t), ``recurrence_gate_value`` (r_t) and the
    state site ``hidden_state`` (h_t, which is also the output), all
    {..., "seq", "lru"}.
    The recurrence accumulates in float32; the output has the input's dtype.
    """

    a_param: pz.nn.ParameterLike[pz.nx.NamedArray]
    input_gate: linear.BlockDiagonalLinear
    a_gate: linear.BlockDiagonalLinear
    scan_method: str | None = dataclasses.field(
        default=None, metadata={"pytree_node": False}
    )
    input_gate_value: sites.Hook = sites.site_field()
    recurrence_gate_value: sites.Hook = sites.site_field()
    hidden_state: sites.Hook = sites.state_site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, num_heads: int, *,
                    scan_method: str | None = None, dtype=jnp.float32) -> RGLRU:
        recurrence.check_scan_method(scan_method)
        return cls(
            a_param=pz.nn.make_parameter(
                f"{name}.a_param", init_base_rng, a_param_init, {axes.LRU: width}, dtype
            ),
            input_gate=linear.BlockDiagonalLinear.from_config(
                f"{name}.input_gate", init_base_rng, width, num_heads, dtype=dtype
            ),
            a_gate=linear.BlockDiagonalLinear.from_config(
                f"{name}.a_gate", init_base_rng, width, num_heads, dtype=dtype
            ),
            scan_method=scan_method,
        )

    def initial_state(self, batch_size: int, max_length: int | None = None) -> pz.nx.NamedArray:
        del max_length  # a fixed-size state
        width = self.a_param.value.named_shape[axes.LRU]
        return pz.nx.zeros({axes.BATCH: batch_size, axes.LRU: width}, jnp.float32)

    def forward(
        self, x: pz.nx.NamedArray, context: DocumentContext, h0: pz.nx.NamedArray
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """The recurrence continuing from `h0` (float32 {..., "lru"}).

        Returns ``(y, h_last)``, ``h_last`` in float32.
        """
        sigmoid = pz.nx.nmap(jax.nn.sigmoid)
        gate_x = self.input_gate_value(sigmoid(self.input_gate(x)))
        gate_a = self.recurrence_gate_value(sigmoid(self.a_gate(x)))
        a_param = self.a_param.value.astype(jnp.result_type(x.dtype, self.a_param.value.dtype))
        log_a = -GATE_EXPONENT * gate_a * pz.nx.nmap(jax.nn.softplus)(a_param)
        # A document start restarts the recurrence: a := 0 there, so h_t is the
        # input alone and its normaliser sqrt(1 - a^2) is exactly 1.
        where_start = lambda value, v: pz.nx.nmap(jnp.where)(context.starts, jnp.asarray(value, v.dtype), v)
        a = where_start(0, pz.nx.nmap(jnp.exp)(log_a))
        a_squared = where_start(0, pz.nx.nmap(jnp.exp)(2 * log_a))
        multiplier = pz.nx.nmap(lambda v: sqrt_bounded_grad(v, SQRT_MAX_GRADIENT))(1 - a_squared)
        normalized_x = (x * gate_x) * multiplier.astype(x.dtype)
        a, normalized_x = self.hidden_state.update(a, normalized_x)
        h, h_last = recurrence.linear_scan(
            a, normalized_x, h0=None if context.new_streams else h0, method=self.scan_method
        )
        return self.hidden_state(h), h_last
