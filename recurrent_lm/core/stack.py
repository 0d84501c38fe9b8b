"""Scanned layer stacks: repeating groups of blocks under `jax.lax.scan`, with remat.

    scanned = scan_layers(model, remat="block")   # same logits and gradients
    model = unscan_layers(scanned)                 # the per-layer model, exactly

`scan_layers` splits a `DecoderLM`'s blocks into segments: a group of ``p``
consecutive blocks that repeats ``R >= 2`` times becomes one `ScannedBlocks`
(its parameters stacked along the named axis "stack", the group traced and
compiled once), and a block that repeats nothing stays as it is. Griffin's 26
layers become 8 x (recurrent, recurrent, attention) and 1 x (recurrent) x 2;
Gemma 2's become 13 x (local, global); an H3 with attention at layer 6 of 12
becomes 6 x (H3), the attention block, 5 x (H3). Two blocks are alike when they
are equal once their parameters are removed (same layer classes and static
fields, e.g. an attention window) and their parameters have the same named
shapes and dtypes. At each position the period covering the most layers wins
(the smallest on ties).

Parameter labels: the stacked parameter of group position ``k`` in segment
``j`` is labelled ``stack{j}.{k}.{rest}``, ``rest`` being the per-layer label
without its layer prefix (``blocks.4.recurrent_block.linear_x.weights`` ->
``stack0.1.recurrent_block.linear_x.weights``, {"stack": 8, ...}). Each
`ScannedBlocks` records the per-layer labels of every slice, so
`unscan_layers` restores the per-layer model exactly (labels, values,
structure). The edges see per-layer labels only: `recurrent_lm.save` unscans
before writing, `recurrent_lm.load` and the converters build unrolled models,
and sampling mode and `recurrent_lm.interp` unscan the model they are given
(their sites and state labels read ``blocks.3....`` as usual). A scanned model
is for training and plain forward passes.

Remat (`REMAT_POLICIES`): what the backward pass keeps of each group, as a
`jax.checkpoint` policy around the group (blocks outside a scan get the same
policy one by one, through `Remat`):

* ``"none"``: everything (no recomputation; the most memory);
* ``"block"``: only each group's input (the residual stream); the group's
  forward pass runs again in the backward pass (the least memory);
* ``"dots"``: the outputs of matrix products without batch dimensions (the
  dense projections); element-wise work, attention scores and recurrences
  are recomputed.

Dropout under a scan or remat: each repeat draws its keys from a stream of
its own (split from one key of the caller's ``random_stream``), so the masks
differ from the unrolled model's (same distribution).

Side channels (RWKV-7's value residual, written by block 0 and read by the
others) cross a remat boundary as explicit inputs and outputs, so a block may
write one under `jax.checkpoint`; a scanned group may read them but not write
them (the writer is structurally unlike the readers, so it stays outside).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import functional
from recurrent_lm.core.model import DecoderLM, SideChannel

REMAT_POLICIES = ("none", "block", "dots")
"""Remat policy names; see the module docstring."""

_PARAMS = (pz.Parameter, pz.ParameterValue)


def checkpoint_policy(remat: str) -> Callable | None:
    """The `jax.checkpoint` policy of a remat name (None: no remat)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {REMAT_POLICIES}.")
    return {
        "none": None,
        "block": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[remat]


def _rematted(fn: Callable, remat: str) -> Callable:
    policy = checkpoint_policy(remat)
    if policy is None:
        return fn
    # prevent_cse only matters outside scan / loops; XLA cannot CSE across scan steps.
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def _unique_params(layer) -> dict[str, Any]:
    """``{label: Parameter or ParameterValue}``, first occurrence of each label."""
    found = {}
    for p in pz.select(layer).at_instances_of(_PARAMS).get_sequence():
        found.setdefault(p.label, p)
    return found


def _with_values(layer, values: dict[str, pz.nx.NamedArray]):
    """`layer` with each parameter frozen to ``values[label]``."""
    return pz.select(layer).at_instances_of(_PARAMS).apply(
        lambda p: pz.ParameterValue(label=p.label, value=values[p.label])
    )


def _refuse_state(layer, what: str) -> None:
    if pz.select(layer).at_instances_of(pz.StateVariable).count():
        raise TypeError(
            f"{what} holds state variables (sampling mode, activation captures): state"
            " cannot be carried through a scan or remat; call"
            " recurrent_lm.unscan_layers(model) first."
        )


def _channel_values(side_inputs: dict) -> dict[str, Any]:
    """``{name: value or None}`` of the `SideChannel`s among `side_inputs`."""
    return {k: v.peek() for k, v in side_inputs.items() if isinstance(v, SideChannel)}


def _with_channels(side_inputs: dict, values: dict[str, Any]) -> dict:
    """`side_inputs` with each side channel replaced by a fresh one holding `values`."""
    return {**side_inputs, **{k: SideChannel(k, v) for k, v in values.items()}}


def _write_new(side_inputs: dict, before: dict[str, Any], after: dict[str, Any]) -> None:
    """Writes to the channels of `side_inputs` what a call wrote to its own copies."""
    for name, value in after.items():
        if before[name] is None and value is not None:
            side_inputs[name].write(value)


def _own_random_stream(side_inputs: dict, key) -> dict:
    if key is None:
        return side_inputs
    return {**side_inputs, "random_stream": pz.RandomStream.from_base_key(key)}


def _split_random_stream(side_inputs: dict, count: int | None):
    """(side inputs without the stream, a key per repeat or one key, or None)."""
    side_inputs = dict(side_inputs)
    stream = side_inputs.pop("random_stream", None)
    if stream is None:
        return side_inputs, None
    key = stream.next_key()
    return side_inputs, (key if count is None else jax.random.split(key, count))


def _canonical(x: pz.nx.NamedArray, names: tuple[str, ...]) -> pz.nx.NamedArray:
    """`x` as a NamedArray in axis order `names` (one carry type for the scan)."""
    return pz.nx.wrap(x.unwrap(*names)).tag(*names)


@pz.pytree_dataclass
class ScannedBlocks(pz.nn.Layer):
    """A group of blocks repeated `repeats` times, run by `jax.lax.scan`.

    Named axes: in {..., "embedding"} -> out, the same axes (the residual
    stream, as each block). Every parameter of `group` carries the extra axis
    "stack" (size `repeats`); step ``r`` of the scan runs `group` with slice
    ``r``. Side inputs are the same for every repeat (``random_stream``
    excepted: see the module docstring).

    Attributes:
      group: a `pz.nn.Sequential` of the group's blocks, parameters stacked.
      repeats: number of repeats (static).
      labels: ``((stacked label, (per-layer label of repeat 0, 1, ...)), ...)``
        (static): what `unscan_layers` restores.
      remat: the remat policy of each repeat (`REMAT_POLICIES`, static).
    """

    group: pz.nn.Sequential
    repeats: int = dataclasses.field(metadata={"pytree_node": False})
    labels: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
        metadata={"pytree_node": False}
    )
    remat: str = dataclasses.field(default="none", metadata={"pytree_node": False})

    def __call__(self, x, **side_inputs):
        _refuse_state(self.group, "a scanned group of blocks")
        side_inputs, keys = _split_random_stream(side_inputs, self.repeats)
        stacked = {label: p.value for label, p in _unique_params(self.group).items()}
        names = {
            label: tuple(n for n in v.named_shape if n != axes.STACK)
            for label, v in stacked.items()
        }
        slices = {label: v.unwrap(axes.STACK, *names[label]) for label, v in stacked.items()}
        stream_axes = tuple(x.named_shape)
        # Repeats read side channels written before the scan; a write inside it
        # would happen once per repeat and leave the scan's trace: refused.
        before = _channel_values(side_inputs)

        def body(carry, step):
            values, key = step
            group = _with_values(
                self.group,
                {label: pz.nx.wrap(a).tag(*names[label]) for label, a in values.items()},
            )
            inner = _with_channels(side_inputs, before)
            out = group(carry, **_own_random_stream(inner, key))
            if any(v is not before[k] for k, v in _channel_values(inner).items()):
                raise ValueError(
                    f"a scanned group of blocks wrote the side channels {sorted(before)}:"
                    " only blocks outside a scan may write them."
                )
            return _canonical(out, stream_axes), None

        out, _ = jax.lax.scan(
            _rematted(body, self.remat), _canonical(x, stream_axes), (slices, keys)
        )
        return out


@pz.pytree_dataclass
class Remat(pz.nn.Layer):
    """`layer` under a `jax.checkpoint` policy (a block outside any scan).

    Named axes and side inputs: those of `layer`. Site names read through it.
    """

    layer: pz.nn.Layer
    remat: str = dataclasses.field(metadata={"pytree_node": False})

    transparent_fields = ("layer",)

    def __call__(self, x, **side_inputs):
        _refuse_state(self.layer, "a remat block")
        side_inputs, key = _split_random_stream(side_inputs, None)
        values = {label: p.value for label, p in _unique_params(self.layer).items()}
        # Side channels cross the checkpoint as explicit inputs and outputs: a value
        # the block writes (RWKV-7's value residual) leaves as an output, never as a
        # tracer of the checkpoint's trace.
        before = _channel_values(side_inputs)

        def run(values, key, x, channels):
            inner = _with_channels(side_inputs, channels)
            layer = _with_values(self.layer, values)
            return layer(x, **_own_random_stream(inner, key)), _channel_values(inner)

        out, after = _rematted(run, self.remat)(values, key, x, before)
        _write_new(side_inputs, before, after)
        return out


# ----------------------------------------------------------------------------- grouping


@dataclasses.dataclass(frozen=True)
class _ParamShape:
    """What must match for two parameters to stack (stands in for one in a key)."""

    kind: type
    named_shape: tuple
    dtype: str
    metadata: str


class _Unique:
    """A key equal to nothing else (a block that cannot be compared)."""


def _leaf_key(leaf):
    if isinstance(leaf, _ParamShape) or leaf is None or isinstance(leaf, (bool, int, float, str)):
        return leaf
    if isinstance(leaf, jax.core.Tracer):
        return _Unique()
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(leaf)
        return ("array", value.shape, str(value.dtype), value.tobytes())
    return _Unique()


def _structure_key(block, shared: set[str]):
    """Equal for blocks that can share one scanned template (see the module docstring)."""
    params = pz.select(block).at_instances_of(_PARAMS).get_sequence()
    if any(p.label in shared for p in params) or pz.select(block).at_instances_of(
        pz.ParameterSlot | pz.StateVariable
    ).count():
        return _Unique()
    first = {}
    ties = tuple(first.setdefault(p.label, i) for i, p in enumerate(params))
    stripped = pz.select(block).at_instances_of(_PARAMS).apply(
        lambda p: _ParamShape(
            type(p), tuple(p.value.named_shape.items()), str(p.value.dtype),
            repr(sorted(getattr(p, "metadata", {}).items())),
        )
    )
    leaves, treedef = jax.tree_util.tree_flatten(
        stripped, is_leaf=lambda x: isinstance(x, _ParamShape)
    )
    return (treedef, ties, tuple(_leaf_key(leaf) for leaf in leaves))


def _segments(kinds: Sequence[int]) -> list[tuple[int, int, int]]:
    """``[(start, period, repeats)]`` covering `kinds` (one id per block): at each
    position, the period whose group repeats over the most blocks (the smallest
    on ties); a block in no repeating group is ``(start, 1, 1)``."""
    out, i, n = [], 0, len(kinds)
    while i < n:
        best_period, best_repeats = 1, 1
        for period in range(1, (n - i) // 2 + 1):
            group = list(kinds[i:i + period])
            repeats = 1
            while kinds[i + repeats * period:i + (repeats + 1) * period] == group:
                repeats += 1
            if repeats >= 2 and period * repeats > best_period * best_repeats:
                best_period, best_repeats = period, repeats
        out.append((i, best_period, best_repeats))
        i += best_period * best_repeats
    return out


def _layer_prefix(labels: Sequence[str]) -> str:
    """The dotted prefix common to a block's labels (``blocks.3``), never a whole label."""
    parts = [label.split(".") for label in labels]
    if not parts:
        return ""
    limit = min(len(p) for p in parts) - 1
    common = 0
    while common < limit and all(p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(parts[0][:common])


def _stack_values(values: Sequence[pz.nx.NamedArray]) -> pz.nx.NamedArray:
    names = tuple(values[0].named_shape)
    return pz.nx.wrap(jnp.stack([v.unwrap(*names) for v in values])).tag(axes.STACK, *names)


def _scanned_segment(blocks, index: int, remat: str) -> ScannedBlocks:
    """Blocks [repeat][position] -> one `ScannedBlocks` labelled ``stack{index}...``."""
    repeats, period = len(blocks), len(blocks[0])
    group, labels = [], []
    for k in range(period):
        per_repeat = [list(_unique_params(blocks[r][k]).values()) for r in range(repeats)]
        prefix = _layer_prefix([p.label for p in per_repeat[0]])
        replacement = {}
        for m, first in enumerate(per_repeat[0]):
            rest = first.label[len(prefix) + 1:] if prefix else first.label
            label = f"stack{index}.{k}.{rest}"
            value = _stack_values([per_repeat[r][m].value for r in range(repeats)])
            if isinstance(first, pz.Parameter):
                new = pz.Parameter(label=label, value=value, metadata=dict(first.metadata))
            else:
                new = pz.ParameterValue(label=label, value=value)
            replacement[first.label] = new
            labels.append((label, tuple(per_repeat[r][m].label for r in range(repeats))))
        group.append(
            pz.select(blocks[0][k]).at_instances_of(_PARAMS).apply(
                lambda p, replacement=replacement: replacement[p.label]
            )
        )
    return ScannedBlocks(
        group=pz.nn.Sequential(group), repeats=repeats, labels=tuple(labels), remat=remat
    )


def _check_model(model, what: str) -> None:
    if not isinstance(model, DecoderLM):
        raise TypeError(f"{what} takes a recurrent_lm DecoderLM, got {type(model).__name__}.")


def scan_layers(model: DecoderLM, remat: str = "none") -> DecoderLM:
    """`model` with its repeating groups of blocks under `jax.lax.scan`.

    Same logits and gradients as `model` (up to float rounding); see the module
    docstring for the grouping, the stacked labels and `remat`. A scanned
    model is unscanned first (so this also changes the remat policy).

    Args:
      model: a `DecoderLM` with bound parameters (not a sampling-mode or
        capturing model).
      remat: one of `REMAT_POLICIES`, applied to every group and to every
        block outside a scan.
    """
    _check_model(model, "scan_layers")
    checkpoint_policy(remat)
    model = unscan_layers(model)
    _refuse_state(model, "the model")
    blocks = list(model.blocks.sublayers)
    outside = pz.select(dataclasses.replace(model, blocks=pz.nn.Sequential([])))
    # A label used by two blocks, or by a block and the embedder / head (tied),
    # cannot be stacked: such blocks stay unrolled.
    seen = {p.label for p in outside.at_instances_of(_PARAMS).get_sequence()}
    shared: set[str] = set()
    for block in blocks:
        own = set(_unique_params(block))
        shared |= own & seen
        seen |= own
    ids: dict[Any, int] = {}
    kinds = [ids.setdefault(_structure_key(block, shared), len(ids)) for block in blocks]
    segments, scanned = [], 0
    for start, period, repeats in _segments(kinds):
        if repeats == 1:
            block = blocks[start]
            segments.append(block if remat == "none" else Remat(block, remat))
            continue
        grouped = [blocks[start + r * period:start + (r + 1) * period] for r in range(repeats)]
        segments.append(_scanned_segment(grouped, scanned, remat))
        scanned += 1
    clash = {label for s in segments if isinstance(s, ScannedBlocks) for label, _ in s.labels}
    clash &= seen
    if clash:
        raise ValueError(
            f"scan_layers: stacked labels {sorted(clash)[:3]} are already parameter labels of"
            " the model; rename those parameters."
        )
    return dataclasses.replace(model, blocks=pz.nn.Sequential(segments))


def remat_layers(model: DecoderLM, remat: str) -> DecoderLM:
    """`model` with every block under the remat policy `remat`, unscanned
    (``"none"``: the unrolled model itself)."""
    _check_model(model, "remat_layers")
    checkpoint_policy(remat)
    model = unscan_layers(model)
    if remat == "none":
        return model
    blocks = [Remat(block, remat) for block in model.blocks.sublayers]
    return dataclasses.replace(model, blocks=pz.nn.Sequential(blocks))


def prepared(model: DecoderLM, *, scan: bool, remat: str) -> DecoderLM:
    """`scan_layers` (`scan`) or `remat_layers` of `model`: what a training run steps."""
    return scan_layers(model, remat) if scan else remat_layers(model, remat)


def abstract_prepared(build: Callable[[jax.Array], DecoderLM], *, scan: bool, remat: str):
    """``(skeleton, {label: abstract NamedArray})`` of ``prepared(build(key), ...)``,
    materialising no weights (`jax.eval_shape`): what compiling a large
    model's steps needs. The skeleton has empty parameter slots."""
    found = {}

    def init(key):
        skeleton, params, _ = functional.split(prepared(build(key), scan=scan, remat=remat))
        found["skeleton"] = skeleton
        return params

    abstract = jax.eval_shape(init, jax.random.key(0))
    skeleton = found["skeleton"]
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(skeleton)):
        raise ValueError("the model holds arrays that are not parameters: build it, then"
                         " prepare it eagerly.")
    return skeleton, abstract


def _unstacked(value: pz.nx.NamedArray, repeat: int) -> pz.nx.NamedArray:
    names = tuple(n for n in value.named_shape if n != axes.STACK)
    return pz.nx.wrap(value.unwrap(axes.STACK, *names)[repeat]).tag(*names)


def _unscanned_segment(segment: ScannedBlocks) -> list:
    per_layer = dict(segment.labels)
    blocks = []
    for r in range(segment.repeats):
        def unstack(p, r=r):
            label, value = per_layer[p.label][r], _unstacked(p.value, r)
            if isinstance(p, pz.Parameter):
                return pz.Parameter(label=label, value=value, metadata=dict(p.metadata))
            return pz.ParameterValue(label=label, value=value)

        # One new parameter per stacked one, so tied uses stay tied.
        found = _unique_params(segment.group)
        replacement = {label: unstack(p) for label, p in found.items()}
        group = pz.select(segment.group).at_instances_of(_PARAMS).apply(
            lambda p, replacement=replacement: replacement[p.label]
        )
        blocks.extend(group.sublayers)
    return blocks


def is_scanned(model) -> bool:
    """Whether `model` holds scanned groups or remat blocks."""
    return bool(pz.select(model).at_instances_of(ScannedBlocks | Remat).count())


def unscan_layers(model):
    """The per-layer (unrolled, remat-free) model of a `scan_layers` result;
    any other model as it is."""
    if not isinstance(model, DecoderLM) or not is_scanned(model.blocks):
        return model
    blocks = []
    for segment in model.blocks.sublayers:
        if isinstance(segment, ScannedBlocks):
            blocks.extend(_unscanned_segment(segment))
        elif isinstance(segment, Remat):
            blocks.append(segment.layer)
        else:
            blocks.append(segment)
    return dataclasses.replace(model, blocks=pz.nn.Sequential(blocks))
