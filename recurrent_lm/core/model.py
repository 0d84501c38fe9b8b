"""The decoder shell every architecture shares, and its input checks.

Call convention (all models)::

    tokens = pz.nx.wrap(ids, "batch", "seq")
    logits = model(tokens)                        # one document per row
    logits = model(tokens, segment_pos=pos)       # packed / padded rows

``pos`` is an int NamedArray {"batch", "seq"}: 0 starts a document, -1 marks
padding (see `recurrent_lm.core.context`). Logits are {"batch", "seq",
"vocabulary"}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import named, sites
from recurrent_lm.core.context import DocumentContext, default_segment_pos


def check_tokens(tokens, vocab_size: int) -> None:
    """Validates model inputs; the range check runs when the ids are concrete.

    Under tracing (the caller's jit / grad) an id outside the vocabulary
    cannot be checked here: the embedding lookup makes that row's logits NaN
    (`recurrent_lm.layers.embeddings.EmbeddingLookup`).
    """
    named.check_named(tokens, axes.TOKEN_AXES, "tokens")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}.")
    if tokens.named_shape[axes.SEQ] == 0:
        raise ValueError("tokens has an empty 'seq' axis: there is nothing to run.")
    ids = tokens.unwrap(*axes.TOKEN_AXES)
    if not any_tracer(tokens) and ids.size:
        ids = np.asarray(ids)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
            raise ValueError(
                f"token id {bad} at (batch, seq) = {where} is outside the vocabulary"
                f" range [0, {vocab_size})."
            )


def check_segment_pos(segment_pos, tokens) -> None:
    named.check_named(segment_pos, axes.TOKEN_AXES, "segment_pos")
    if not jnp.issubdtype(segment_pos.dtype, jnp.integer):
        raise TypeError(f"segment_pos must be integers, got dtype {segment_pos.dtype}.")
    if dict(segment_pos.named_shape) != dict(tokens.named_shape):
        raise ValueError(
            f"segment_pos has named shape {dict(segment_pos.named_shape)} but tokens"
            f" have {dict(tokens.named_shape)}; they must match."
        )


def reject_side_inputs(side_inputs, what: str) -> None:
    """Misspelled side inputs would be silently ignored by every layer: refuse them."""
    if side_inputs:
        raise TypeError(
            f"unknown keyword arguments {sorted(side_inputs)}; {what} takes tokens"
            " and optionally segment_pos."
        )


@pz.pytree_dataclass
class DecoderLM(pz.nn.Layer):
    """A decoder-only language model: embed, residual blocks, norm, head.

    Named axes: tokens {"batch", "seq"} (int) -> logits {"batch", "seq",
    "vocabulary"}. ``segment_pos`` (optional, {"batch", "seq"}) is checked here
    and turned into the `DocumentContext` every layer reads as its side input
    ``context``; unknown keyword arguments are an error rather than silently
    ignored.

    Attributes:
      config: the architecture's config dataclass (static).
      embedder: tokens -> {"batch", "seq", "embedding"}.
      blocks: a `pz.nn.Sequential` of `ResidualBlock`s; select them with
        ``pz.select(model).at_instances_of(ResidualBlock)``.
      final_norm: normalisation of the last residual stream.
      head: {"embedding"} -> {"vocabulary"} (tied decode, soft cap, ...).
      embeddings: site of the embedder's output {"batch", "seq", "embedding"}
        (the residual stream before the first block).
      side_channels: names of the `SideChannel`s a call creates, fresh each
        call, and passes to every layer as side inputs of those names (static;
        RWKV-7's first-layer values). Empty for most architectures.
    """

    config: Any = dataclasses.field(metadata={"pytree_node": False})
    embedder: pz.nn.Layer
    blocks: pz.nn.Sequential
    final_norm: pz.nn.Layer
    head: pz.nn.Layer
    embeddings: sites.Hook = sites.site_field()
    side_channels: tuple[str, ...] = dataclasses.field(default=(), metadata={"pytree_node": False})

    def __call__(self, tokens, /, *, segment_pos=None, **side_inputs):
        reject_side_inputs(side_inputs, "a model")
        check_tokens(tokens, self.config.vocab_size)
        if segment_pos is not None:
            check_segment_pos(segment_pos, tokens)
        return call_forward(self, tokens, segment_pos)

    def forward(self, tokens, segment_pos=None, *, last_position_only: bool = False,
                random_stream: pz.RandomStream | None = None):
        """The computation of ``__call__``, without input checks or auto-jit.

        Args:
          tokens: checked NamedArray {"batch", "seq"}.
          segment_pos: checked NamedArray {"batch", "seq"}, or None (one
            document per row).
          last_position_only: apply the head to the last position only (the
            "seq" axis keeps size 1): what a prefill needs.
          random_stream: randomness for enabled dropout layers (training).
        """
        if segment_pos is None:
            segment_pos = default_segment_pos(tokens)
        return self.run(tokens, DocumentContext.build(segment_pos), last_position_only,
                        random_stream)

    def run(self, tokens, context: DocumentContext, last_position_only: bool = False,
            random_stream: pz.RandomStream | None = None):
        """Embed, blocks, norm, head; every layer reads the side input `context`
        (and ``random_stream`` when given, and the model's fresh side channels)."""
        x = self.final_hidden(tokens, context, random_stream)
        if last_position_only:
            x = x[{axes.SEQ: pz.slice[-1:]}]
            context = context.positions(context.steps - 1, 1)
        return self.head(x, **_side_inputs(context, random_stream))

    def final_hidden(self, tokens, context: DocumentContext,
                     random_stream: pz.RandomStream | None = None):
        """Embed, blocks, norm: what `head` reads, {"batch", "seq", "embedding"}.
        (A loss over a large vocabulary applies the head a chunk at a time.)"""
        side = _side_inputs(context, random_stream)
        side.update({name: SideChannel(name) for name in self.side_channels})
        x = self.embeddings(self.embedder(tokens, **side))
        x = self.blocks(x, **side)
        return self.final_norm(x, **side)


def _side_inputs(context, random_stream) -> dict[str, Any]:
    side = {"context": context}
    if random_stream is not None:
        side["random_stream"] = random_stream
    return side


class SideChannel:
    """A value one layer writes during a model call and later layers read.

    Side inputs flow down the model; a channel carries a value *across* it,
    e.g. RWKV-7's value residual: block 0's time mix writes its values and
    every later time mix mixes them into its own. A `DecoderLM` creates its
    channels (``side_channels``) afresh in every call, inside the trace, so a
    channel is never model state: it holds one call's activations, written
    once, read after. A plain Python object: it lives only while the call is
    traced (or run op by op).
    """

    def __init__(self, name: str, value=None):
        self.name = name
        self._value = value

    def peek(self):
        """The value, or None before any layer wrote it."""
        return self._value

    def write(self, value) -> None:
        if self._value is not None:
            raise ValueError(f"side channel {self.name!r} was already written in this call.")
        self._value = value

    def read(self):
        if self._value is None:
            raise ValueError(
                f"side channel {self.name!r} is read before any layer wrote it: run the"
                " blocks in order through the model (model(tokens), or its sampling mode)."
            )
        return self._value


def sync_config(model, **options):
    """`model` with config fields `options` replaced, when it is a `DecoderLM`
    whose config has them: a layer-level switch (``with_scan_method``, ...)
    keeps the saved config telling the truth, so save / load round-trips it."""
    if not isinstance(model, DecoderLM):
        return model
    names = {f.name for f in dataclasses.fields(model.config)}
    options = {name: value for name, value in options.items() if name in names}
    if not options:
        return model
    return dataclasses.replace(model, config=dataclasses.replace(model.config, **options))


# Eager calls (concrete inputs, e.g. in a notebook) run through one compiled
# function per model structure and input shape instead of op by op: the first
# call compiles once instead of compiling hundreds of tiny kernels, and later
# calls are fast. Variables (parameters, activation-capturing state) are
# unbound, passed in and written back by `pz.variable_jit`, so patched and
# capturing models behave the same. Inside a user's jit/grad, inputs are
# tracers and the model runs inline.
_compiled_forward = pz.variable_jit(lambda layer, *args: layer.forward(*args))
_AUTO_JIT = threading.local()


def call_forward(layer, *args):
    """``layer.forward(*args)``, compiled when the arguments are concrete."""
    arrays = [x for x in args if isinstance(x, pz.nx.NamedArrayBase)]
    if _auto_jit_enabled() and not any_tracer(*arrays):
        return _compiled_forward(layer, *args)
    return layer.forward(*args)


def _auto_jit_enabled() -> bool:
    return getattr(_AUTO_JIT, "enabled", True)


def any_tracer(*named_arrays) -> bool:
    """True under tracing (jit, grad, ...): then inputs have no values to check."""
    return any(isinstance(x.data_array, jax.core.Tracer) for x in named_arrays)


@contextlib.contextmanager
def op_by_op():
    """Within this context, eager model calls run op by op (for debugging:
    breakpoints and prints inside layers see concrete values)."""
    previous = _auto_jit_enabled()
    _AUTO_JIT.enabled = False
    try:
        yield
    finally:
        _AUTO_JIT.enabled = previous
