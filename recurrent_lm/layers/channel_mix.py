"""RWKV-4's channel-mix block: a squared-ReLU MLP over token-shifted inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import positions, sites
from recurrent_lm.layers.token_shift import token_shift
from recurrent_lm.layers.wkv import mix, rwkv_dense, time_mix_init


@pz.pytree_dataclass
class ChannelMix(pz.nn.Layer):
    """``sigmoid(W_r mix(x, x', mu_r)) * W_v relu(W_k mix(x, x', mu_k))^2``, x' = shift(x).

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"};
    the hidden layer is {..., "seq", "mlp"}.
    Side input: ``segment_pos`` (the token shift is cut at document starts).
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
    def from_config(
        cls,
        name: str,
        init_base_rng: jax.Array | None,
        width: int,
        hidden_width: int,
        *,
        layer: int,
        num_layers: int,
        dtype=jnp.float32,
    ) -> ChannelMix:
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

    def empty_state(self, batch_shape) -> pz.nx.NamedArray:
        """The token-shift state {**batch_shape, "embedding"} of fresh streams."""
        ratio = self.time_mix_key.value
        return pz.nx.zeros({**batch_shape, **ratio.named_shape}, ratio.dtype)

    def forward(
        self,
        x: pz.nx.NamedArray,
        segment_pos: pz.nx.NamedArray,
        shift: pz.nx.NamedArray | None,
    ) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
        """Channel mixing continuing from the last input `shift` (None: zeros).

        Returns ``(y, new_shift)``.
        """
        shifted, last = token_shift(x, segment_pos, shift)
        hidden = self.hidden(pz.nx.nmap(lambda h: jnp.square(jax.nn.relu(h)))(
            self.key(mix(x, shifted, self.time_mix_key.value))
        ))
        gate_in = mix(x, shifted, self.time_mix_receptance.value)
        gate = self.receptance(gate_in.untag(axes.EMBEDDING).tag(axes.EMBEDDING_IN))
        gate = self.receptance_value(pz.nx.nmap(jax.nn.sigmoid)(gate))
        return gate * self.value(hidden), last

    def __call__(self, x: pz.nx.NamedArray, *, segment_pos=None, **_unused_side_inputs):
        segment_pos = positions.require_segment_pos(segment_pos, "ChannelMix")
        y, _ = self.forward(x, segment_pos, None)
        return y
