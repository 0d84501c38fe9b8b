"""The pre-norm residual block shared by every architecture."""

from __future__ import annotations

from penzai import pz

from recurrent_lm.core import sites


@pz.pytree_dataclass
class ResidualBlock(pz.nn.Layer):
    """``r = x + temporal(norm(x)); out = r + channel(norm(r))``.

    The temporal block mixes along "seq" (recurrence, attention, convolution);
    the channel block mixes features per token (MLP). Optional post-norms are
    applied to each branch before the residual add (Gemma 2); they are None
    elsewhere. A block of one branch (Mamba: ``x + mixer(norm(x))``) has no
    channel branch: `temporal_only` builds it, with ``channel_pre_norm``,
    ``mlp_block`` and the ``mlp_output`` site None.

    Named axes: in {..., "seq", "embedding"} -> out {..., "seq", "embedding"}.
    Side inputs are forwarded to every sublayer.
    Sites, all {..., "seq", "embedding"}: ``temporal_output`` and
    ``mlp_output`` (each branch as it is added to the stream) and ``output``
    (the residual stream after the block).
    """

    temporal_pre_norm: pz.nn.Layer
    temporal_block: pz.nn.Layer
    channel_pre_norm: pz.nn.Layer | None
    mlp_block: pz.nn.Layer | None
    temporal_post_norm: pz.nn.Layer | None = None
    channel_post_norm: pz.nn.Layer | None = None
    temporal_output: sites.Hook = sites.site_field()
    mlp_output: sites.Hook | None = sites.site_field()
    output: sites.Hook = sites.site_field()

    @classmethod
    def temporal_only(cls, temporal_pre_norm: pz.nn.Layer, temporal_block: pz.nn.Layer) -> ResidualBlock:
        """``out = x + temporal(norm(x))``: a block without a channel branch."""
        return cls(temporal_pre_norm=temporal_pre_norm, temporal_block=temporal_block,
                   channel_pre_norm=None, mlp_block=None, mlp_output=None)

    def __call__(self, x, **side_inputs):
        branch = self.temporal_block(self.temporal_pre_norm(x, **side_inputs), **side_inputs)
        if self.temporal_post_norm is not None:
            branch = self.temporal_post_norm(branch, **side_inputs)
        residual = self.temporal_output(branch) + x
        if self.mlp_block is None:
            return self.output(residual)
        branch = self.mlp_block(self.channel_pre_norm(residual, **side_inputs), **side_inputs)
        if self.channel_post_norm is not None:
            branch = self.channel_post_norm(branch, **side_inputs)
        return self.output(self.mlp_output(branch) + residual)
