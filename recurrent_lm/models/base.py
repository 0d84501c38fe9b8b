"""What every architecture shares: the decoder LM struct, input checks, registry.

Call convention (all models)::

    tokens = pz.nx.wrap(ids, "batch", "seq")
    logits = model(tokens)                        # one document per row
    logits = model(tokens, segment_pos=pos)       # packed / padded rows

``pos`` is an int NamedArray {"batch", "seq"}: 0 starts a document, -1 marks
padding (see `recurrent_lm.layers.positions`). Logits are {"batch", "seq",
"vocabulary"}.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.layers import named, positions, sites


def check_tokens(tokens, vocab_size: int) -> None:
    """Validates model inputs; the range check runs when the ids are concrete."""
    named.check_named(tokens, axes.TOKEN_AXES, "tokens")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {tokens.dtype}.")
    if tokens.named_shape[axes.SEQ] == 0:
        raise ValueError("tokens has an empty 'seq' axis: there is nothing to run.")
    ids = tokens.unwrap(*axes.TOKEN_AXES)
    if not _any_tracer(tokens) and ids.size:
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


class ConfigDict:
    """``to_dict`` / ``from_dict`` for an architecture's config dataclass (what
    `recurrent_lm.save` writes as JSON); unknown fields are refused by name."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}.")
        return cls(**values)


@pz.pytree_dataclass
class DecoderLM(pz.nn.Layer):
    """A decoder-only language model: embed, residual blocks, norm, head.

    Named axes: tokens {"batch", "seq"} (int) -> logits {"batch", "seq",
    "vocabulary"}. ``segment_pos`` (optional, {"batch", "seq"}) is checked here
    and passed to every block as a side input; unknown keyword arguments are
    an error rather than silently ignored.

    Attributes:
      config: the architecture's config dataclass (static).
      embedder: tokens -> {"batch", "seq", "embedding"}.
      blocks: a `pz.nn.Sequential` of `ResidualBlock`s; select them with
        ``pz.select(model).at_instances_of(ResidualBlock)``.
      final_norm: normalisation of the last residual stream.
      head: {"embedding"} -> {"vocabulary"} (tied decode, soft cap, ...).
      embeddings: site of the embedder's output {"batch", "seq", "embedding"}
        (the residual stream before the first block).
    """

    config: Any = dataclasses.field(metadata={"pytree_node": False})
    embedder: pz.nn.Layer
    blocks: pz.nn.Sequential
    final_norm: pz.nn.Layer
    head: pz.nn.Layer
    embeddings: sites.Hook = sites.site_field()

    def __call__(self, tokens, /, *, segment_pos=None, **side_inputs):
        if side_inputs:
            raise TypeError(
                f"unknown keyword arguments {sorted(side_inputs)}; a model takes"
                " tokens and optionally segment_pos."
            )
        check_tokens(tokens, self.config.vocab_size)
        if segment_pos is None:
            segment_pos = positions.default_segment_pos(tokens)
        else:
            check_segment_pos(segment_pos, tokens)
        return call_forward(self, tokens, segment_pos)

    def forward(self, tokens, segment_pos, *, last_position_only: bool = False, **side_inputs):
        """The computation of ``__call__``, without input checks or auto-jit.

        Args:
          tokens, segment_pos: checked NamedArrays {"batch", "seq"}.
          last_position_only: apply the head to the last position only (the
            "seq" axis keeps size 1): what a prefill needs.
          **side_inputs: extra side inputs for every layer (the sampling
            wrapper passes stream indices and document ids this way).
        """
        side_inputs = dict(side_inputs, segment_pos=segment_pos)
        x = self.embeddings(self.embedder(tokens, **side_inputs))
        x = self.blocks(x, **side_inputs)
        if last_position_only:
            x = x[{axes.SEQ: pz.slice[-1:]}]
        return self.head(self.final_norm(x, **side_inputs), **side_inputs)


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
    if _auto_jit_enabled() and not _any_tracer(*arrays):
        return _compiled_forward(layer, *args)
    return layer.forward(*args)


def _auto_jit_enabled() -> bool:
    return getattr(_AUTO_JIT, "enabled", True)


def _any_tracer(*named_arrays) -> bool:
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


# ---------------------------------------------------------------------------
# Registry of architectures, used by `recurrent_lm.save` / `recurrent_lm.load`.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelType:
    name: str
    config_class: type
    build_model: Callable[..., DecoderLM]


MODEL_TYPES: dict[str, ModelType] = {}


def register_model_type(name: str, config_class: type, build_model: Callable) -> None:
    MODEL_TYPES[name] = ModelType(name, config_class, build_model)


def model_type_of(config) -> ModelType:
    for model_type in MODEL_TYPES.values():
        if isinstance(config, model_type.config_class):
            return model_type
    raise ValueError(f"no registered architecture uses config type {type(config).__name__}.")


def get_model_type(name: str) -> ModelType:
    if name not in MODEL_TYPES:
        raise ValueError(f"unknown model type {name!r}; known: {sorted(MODEL_TYPES)}.")
    return MODEL_TYPES[name]


def jit_forward(model: DecoderLM) -> Callable[..., jax.Array]:
    """A compiled ``f(ids, segment_pos=None) -> logits`` on raw arrays.

    ``ids`` and ``segment_pos`` are int arrays [batch, seq]; the result is
    [batch, seq, vocabulary]. The parameters are passed to the compiled function
    as arguments (not baked in as constants), and the Struct tree is rebuilt
    inside the trace, so a call costs no pytree flattening of the model. Token
    ids are range-checked on the host before each call.
    """
    skeleton, frozen = pz.unbind_params(model, freeze=True)
    values = {p.label: p.value for p in frozen}
    vocab_size = model.config.vocab_size

    @jax.jit
    def run(values, ids, segment_pos):
        bound = skeleton.bind_variables(
            [pz.ParameterValue(label=label, value=v) for label, v in values.items()]
        )
        tokens = pz.nx.wrap(ids).tag(*axes.TOKEN_AXES)
        pos = None if segment_pos is None else pz.nx.wrap(segment_pos).tag(*axes.TOKEN_AXES)
        if pos is None:
            pos = positions.default_segment_pos(tokens)
        logits = bound.forward(tokens, pos)
        return logits.unwrap(*axes.TOKEN_AXES, axes.VOCABULARY)

    def compiled(ids, segment_pos=None):
        ids = jnp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, seq], got shape {ids.shape}.")
        check_tokens(pz.nx.wrap(ids).tag(*axes.TOKEN_AXES), vocab_size)
        if segment_pos is not None:
            segment_pos = jnp.asarray(segment_pos)
            if segment_pos.shape != ids.shape:
                raise ValueError(
                    f"segment_pos has shape {segment_pos.shape}, ids {ids.shape}; they must match."
                )
        return run(values, ids, segment_pos)

    return compiled
