"""Gated feed-forward block (GeGLU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.layers import linear


def gelu_tanh(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """GELU, tanh approximation (what Gemma and Griffin use; erf GELU differs)."""
    return pz.nx.nmap(lambda v: jax.nn.gelu(v, approximate=True))(x)


@pz.pytree_dataclass
class GatedMLP(pz.nn.Layer):
    """``down(gelu(gate(x)) * up(x))``.

    Named axes: in {..., "embedding"} -> out {..., "embedding"}.
    Sublayers: ``gate`` and ``up`` {"embedding"} -> {"mlp"}; ``down``
    {"mlp"} -> {"embedding"} (each a penzai Linear or Affine).
    Site: ``hidden`` {..., "mlp"} (the gated product fed to ``down``).
    """

    gate: pz.nn.Layer
    up: pz.nn.Layer
    down: pz.nn.Layer
    hidden: sites.Hook = sites.site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, *, width: int, hidden_width: int,
                    use_bias: bool, down_init_scale: float = 1.0, dtype=jnp.float32) -> GatedMLP:
        embed, hidden = {axes.EMBEDDING: width}, {axes.MLP: hidden_width}
        return cls(
            gate=linear.dense(f"{name}.gate", init_base_rng, embed, hidden, use_bias=use_bias, dtype=dtype),
            up=linear.dense(f"{name}.up", init_base_rng, embed, hidden, use_bias=use_bias, dtype=dtype),
            down=linear.dense(
                f"{name}.down", init_base_rng, hidden, embed,
                use_bias=use_bias, init_scale=down_init_scale, dtype=dtype,
            ),
        )

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        return self.down(self.hidden(gelu_tanh(self.gate(x)) * self.up(x)), **side_inputs)


@pz.pytree_dataclass
class MLP(pz.nn.Layer):
    """``down(gelu_tanh(up(x)))``: the ungated transformer feed-forward block.

    Named axes: in {..., "embedding"} -> out {..., "embedding"}.
    Sublayers: ``up`` {"embedding"} -> {"mlp"}; ``down`` {"mlp"} -> {"embedding"}.
    Site: ``hidden`` {..., "mlp"} (the activation fed to ``down``).
    """

    up: pz.nn.Layer
    down: pz.nn.Layer
    hidden: sites.Hook = sites.site_field()

    @classmethod
    def from_config(cls, name: str, init_base_rng: jax.Array | None, *, width: int, hidden_width: int,
                    use_bias: bool, up_init_scale: float = 1.0, down_init_scale: float = 1.0,
                    dtype=jnp.float32) -> MLP:
        embed, hidden = {axes.EMBEDDING: width}, {axes.MLP: hidden_width}
        return cls(
            up=linear.dense(f"{name}.up", init_base_rng, embed, hidden,
                            use_bias=use_bias, init_scale=up_init_scale, dtype=dtype),
            down=linear.dense(f"{name}.down", init_base_rng, hidden, embed,
                              use_bias=use_bias, init_scale=down_init_scale, dtype=dtype),
        )

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        return self.down(self.hidden(gelu_tanh(self.up(x))), **side_inputs)
