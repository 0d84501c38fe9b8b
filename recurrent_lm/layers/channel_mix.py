"""RWKV-4's channel-mix block: a squared-ReLU MLP over token-shifted inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import StatefulLayer
from recurrent_lm.layers.causal_filter import token_shift
from recurrent_lm.layers.wkv import mix, rwkv_dense, time_mix_init


@pz.pytree_dataclass
class ChannelMix(StatefulLayer):
    """``sigmoid(W_r mix(x, x', mu_r)) * W_v relu(W_k mix(x, x', mu_k))^2``, x' = shift(x).

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    the hidden layer is {..., "seq", "mlp"}.
    Side input: ``context`` (the token shift is cut at document starts).
    State: the last input {"batch", "embedding"} (the token shift's).
    Parameters: ``time_mix_{key,receptance}`` {"embedding"}; ``key``
    {"mlp", "embedding"}; ``receptance`` {"embedding", "embedding_in"};
    ``value`` {"embedding", "mlp"}.
    Sites: ``hidden`` (the squared-ReLU layer {..., "seq", "mlp"}) and
    ``receptance_value`` (the sigmoid gate {..., "seq", "embedding"}).
    """

    time_mix_key: pz.nn.ParameterLike[pz.nx.NamedArray]
    time_mix_receptance: pz.nn.ParameterLike[pz.nx.NamedArray]
    key: pz.nn.Layer
    receptance: pz.nn.Layer
    value: pz.nn.Layer

    hidden: sites.Hook = sites.site_field()
    receptance_value: sites.Hook = sites.site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, width: int, hidden_width: int, *,
                    layer: int, num_layers: int, dtype=jnp.float32) -> ChannelMix:
        """RWKV-4's initialisation for block `layer` of `num_layers`."""
        embed, hidden = {axes.EMBEDDING: width}, {axes.MLP: hidden_width}
        remaining = 1.0 - layer / num_layers
        ratio = lambda label: pz.nn.make_parameter(
            f"{name}.{label}",
            init_base_rng,
            time_mix_init,
            embed,
            dtype,
            exponent=remaining,
        )
        return cls(
            time_mix_key=ratio("time_mix_key"),
            time_mix_receptance=ratio("time_mix_receptance"),
            key=rwkv_dense(
                f"{name}.key", init_base_rng, embed, hidden, zero=False, dtype=dtype
            ),
            receptance=rwkv_dense(
                f"{name}.receptance",
                init_base_rng,
                {axes.EMBEDDING_IN: width},
                embed,
                zero=True,
                dtype=dtype,
            ),
            value=rwkv_dense(
                f"{name}.value", init_base_rng, hidden, embed, zero=True, dtype=dtype
            ),
        )

    def initial_state(self, batch_size: int, max_length: int | None = None) -> pz.nx.NamedArray:
        del max_length  # a fixed-size state
        ratio = self.time_mix_key.value
        return pz.nx.zeros({axes.BATCH: batch_size, **ratio.named_shape}, ratio.dtype)

    def forward(
        self,
        x: pz.nx.NamedArray,
        context: DocumentContext,
        shift: pz.nx.NamedArray,
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """Channel mixing continuing from the last input `shift`; ``(y, new_shift)``."""
        shifted, last = token_shift(x, context, None if context.new_streams else shift)
        hidden = self.hidden(pz.nx.nmap(lambda h: jnp.square(jax.nn.relu(h)))(
            self.key(mix(x, shifted, self.time_mix_key.value))
        ))
        gate_in = mix(x, shifted, self.time_mix_receptance.value)
        gate = self.receptance(gate_in.untag(axes.EMBEDDING).tag(axes.EMBEDDING_IN))
        gate = self.receptance_value(pz.nx.nmap(jax.nn.sigmoid)(gate))
        return gate * self.value(hidden), last
