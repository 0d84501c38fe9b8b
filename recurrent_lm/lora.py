"""LoRA (Hu et al. 2021, arXiv 2106.09685) for any recurrent_lm model.

`enable_lora` replaces chosen `pz.nn.Linear` layers (selected by parameter
label, so it works for every architecture) with `LoRALinear`, a penzai
`LowRankAdapter` (``penzai.toolshed.lora``): the original layer in its
"Pretrained" branch, its weights frozen (`pz.ParameterValue`), plus an
"Update" branch ``scale * (x A) B`` with ``A`` {in axes..., "lora_rank"}
(fan-in normal) and ``B`` {"lora_rank", out axes...} (zeros), so the adapted
model starts equal to the original. Only the adapters remain `pz.Parameter`s:
a training loop that differentiates the model's parameters
(`recurrent_lm.train`) trains the adapters alone.

What penzai's layer lacks and this module adds: a scale ``alpha / rank``,
labels derived from the adapted weight's (``{weight label}.lora_a``), `merge_lora`
(fold ``W + scale * A B`` back into plain `Linear` layers, same labels as the
original weights) and `save_adapters` / `load_adapters` (the adapters alone).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from penzai import pz
from penzai.toolshed.lora import LowRankAdapter

from recurrent_lm import axes, integrity
from recurrent_lm.layers import init
from recurrent_lm.params import CheckpointMismatchError, named_shape_str

ADAPTERS_FILE = "lora.json"


@pz.pytree_dataclass
class LowRankUpdate(pz.nn.Layer):
    """``scale * (x A) B``: the "Update" branch of a `LoRALinear`.

    Attributes:
      lora_a: {*in axes, *parallel axes, "lora_rank"} (the base layer's).
      lora_b: {"lora_rank", *out axes, *parallel axes}.
      in_axis_names: the base layer's input axes (contracted with ``A``).
      scale: ``alpha / rank``.
    """

    lora_a: pz.nn.ParameterLike[pz.nx.NamedArray]
    lora_b: pz.nn.ParameterLike[pz.nx.NamedArray]
    in_axis_names: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    scale: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, **_unused_side_inputs):
        low = pz.nn.contract(self.in_axis_names, x, self.lora_a.value)
        update = pz.nn.contract(axes.LORA_RANK, low, self.lora_b.value)
        return update * jnp.asarray(self.scale, x.dtype)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class LoRALinear(LowRankAdapter):
    """penzai's `LowRankAdapter`: ``Pretrained(x) + Update(x)``, named axes as the base `Linear`.

    The structure is penzai's (a `pz.nn.BranchAndAddTogether` of the
    "Pretrained" and "Update" `pz.nn.NamedGroup`s), but the Update group holds
    one `LowRankUpdate` where ``LowRankAdapter.from_linear`` puts two
    `pz.nn.Linear` layers (``A``, ``B``). Two reasons:

    * an adapted projection must still hold exactly one `pz.nn.Linear`: code
      finds a projection's layer with ``at_instances_of(pz.nn.Linear).get()``
      (`Attention.key_spec`, which sizes the KV cache of sampling mode), and
      with three Linears an adapted key projection could not be sampled from;
    * ``from_linear`` has no scale (``alpha / rank``), fixes the labels to
      ``{name}/LoRA_A.weights`` and initialises ``A`` Xavier-uniform: the
      labels here stay ``{weight label}.lora_a`` / ``.lora_b`` (saved
      adapters and checkpoints keep their names) and ``A`` stays fan-in
      normal, as before.

    Adapters have the base layer's parallel axes (as penzai's), so an update
    of a layer applied per slice is per slice too, and merges into it.
    """

    @classmethod
    def around(cls, base: pz.nn.Linear, update: LowRankUpdate) -> LoRALinear:
        return cls([
            pz.nn.BranchAndAddTogether([
                pz.nn.NamedGroup("Pretrained", [base]),
                pz.nn.NamedGroup("Update", [update]),
            ])
        ])

    @property
    def base(self) -> pz.nn.Linear:
        """The adapted layer (its weights frozen by `enable_lora`)."""
        return self.sublayers[0].branches[0].sublayers[0]

    @property
    def update(self) -> LowRankUpdate:
        return self.sublayers[0].branches[1].sublayers[0]

    def merged(self) -> pz.nn.Linear:
        """The plain `Linear` with ``W + scale * A B`` (the base weight's label)."""
        w, update = self.base.weights, self.update
        delta = pz.nn.contract(axes.LORA_RANK, update.lora_a.value, update.lora_b.value)
        value = (w.value + delta.astype(w.value.dtype) * update.scale).order_like(w.value)
        return dataclasses.replace(
            self.base, weights=pz.Parameter(label=w.label, value=value)
        )


def _targets_matcher(targets) -> Callable[[str], bool]:
    if targets is None:
        return lambda label: True
    if callable(targets):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    patterns = [re.compile(t) for t in targets]
    return lambda label: any(p.search(label) for p in patterns)


def _adapter(linear: pz.nn.Linear, rank: int, scale: float, key, dtype) -> LoRALinear:
    """`linear` with a new adapter of `rank` (``B = 0``)."""
    w = linear.weights
    kind = w.value.dtype if dtype is None else dtype
    in_shape = {n: w.value.named_shape[n] for n in linear.in_axis_names}
    out_shape = {n: w.value.named_shape[n] for n in linear.out_axis_names}
    parallel = linear.parallel_axes
    lora_a = pz.nn.make_parameter(
        f"{w.label}.lora_a",
        key,
        init.fan_in_normal,
        {**in_shape, **parallel, axes.LORA_RANK: rank},
        kind,
        fan_in_axes=tuple(in_shape),
    )
    lora_b = pz.nn.make_parameter(
        f"{w.label}.lora_b", key, init.zeros, {axes.LORA_RANK: rank, **out_shape, **parallel}, kind
    )
    update = LowRankUpdate(lora_a, lora_b, in_axis_names=linear.in_axis_names, scale=scale)
    return LoRALinear.around(linear, update)


def _adapt(model, rank: int, targets, scale: float, key, dtype):
    """`enable_lora` with the scale given (`load_adapters` restores it as saved)."""
    if pz.select(model).at_instances_of(LoRALinear).count():
        raise ValueError("the model already has LoRA adapters; merge_lora first.")
    match = _targets_matcher(targets)
    linears = pz.select(model).at_instances_of(pz.nn.Linear)
    labels = [lin.weights.label for lin in linears.get_sequence()]
    if not any(match(label) for label in labels):
        raise ValueError(
            f"no Linear layer matches LoRA targets {targets!r}; labels: {labels}."
        )
    key = jax.random.key(0) if key is None else key
    return (
        pz.select(pz.freeze_params(model))
        .at_instances_of(pz.nn.Linear)
        .where(lambda linear: match(linear.weights.label))
        .apply(lambda linear: _adapter(linear, rank, scale, key, dtype))
    )


def enable_lora(
    model,
    rank: int,
    *,
    targets: str | list[str] | Callable[[str], bool] | None = None,
    alpha: float | None = None,
    key: jax.Array | None = None,
    dtype=None,
):
    """Adds LoRA adapters to the `pz.nn.Linear` layers whose weight label matches.

    Args:
      model: any recurrent_lm model (bound parameters).
      rank: adapter rank r.
      targets: regular expression(s) searched in each Linear's weight label
        (e.g. ``r"mlp_block|linear_x"``), or a predicate on the label; None
        adapts every Linear. The embedding (tied head) is not a Linear.
      alpha: scale numerator (``scale = alpha / rank``); None gives scale 1.
      key: PRNG key for ``A``; the default is ``jax.random.key(0)``.
      dtype: adapter dtype (default: the base weight's).

    Returns:
      The model with every parameter frozen except the new adapters, labelled
      ``{weight label}.lora_a`` / ``.lora_b``.

    Raises:
      ValueError: rank < 1, or no Linear matched `targets` (the message lists
        the available labels).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    scale = 1.0 if alpha is None else float(alpha) / rank
    return _adapt(model, rank, targets, scale, key, dtype)


def merge_lora(model):
    """Folds every adapter into its base weight; every parameter trainable again."""
    merged = (
        pz.select(model).at_instances_of(LoRALinear).apply(lambda layer: layer.merged())
    )
    frozen = pz.select(merged).at_instances_of(pz.ParameterValue).get_sequence()
    # One Parameter per label, so tied weights (one label) stay one parameter.
    thawed = {p.label: pz.Parameter(label=p.label, value=p.value) for p in frozen}
    return (
        pz.select(merged)
        .at_instances_of(pz.ParameterValue)
        .apply(lambda p: thawed[p.label])
    )


def _adapters(model) -> list[LoRALinear]:
    layers = pz.select(model).at_instances_of(LoRALinear).get_sequence()
    if not layers:
        raise ValueError("the model has no LoRA adapters (use enable_lora).")
    return layers


def adapter_values(model) -> dict[str, pz.nx.NamedArray]:
    """``{label: value}`` of every adapter parameter."""
    values = {}
    for layer in pz.select(model).at_instances_of(LoRALinear).get_sequence():
        for p in (layer.update.lora_a, layer.update.lora_b):
            values[p.label] = p.value
    return values


def save_adapters(model, path: str | os.PathLike) -> None:
    """Writes the adapters alone (orbax arrays + ``lora.json``) to a new directory."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    layers = _adapters(model)
    values = adapter_values(model)
    settings = {
        "rank": layers[0].update.lora_a.value.named_shape[axes.LORA_RANK],
        "scale": layers[0].update.scale,
        "targets": [layer.base.weights.label for layer in layers],
        "parameters": {
            label: {
                "axes": list(v.named_shape),
                "shape": list(v.named_shape.values()),
                "dtype": str(v.dtype),
            }
            for label, v in values.items()
        },
    }
    with integrity.atomic_directory(path) as partial:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(
                os.path.join(partial, "adapters"),
                {label: v.unwrap(*v.named_shape) for label, v in values.items()},
            )
        with open(os.path.join(partial, ADAPTERS_FILE), "w") as f:
            json.dump(settings, f, indent=1)


def _check_stored(path: str, expected: dict, stored: dict) -> None:
    """Raises `CheckpointMismatchError` listing every adapter that does not fit."""
    stored_shape = {k: dict(zip(v["axes"], v["shape"])) for k, v in stored.items()}
    error = CheckpointMismatchError(
        f"LoRA adapters {path}",
        missing={k: named_shape_str(v) for k, v in expected.items() if k not in stored},
        unexpected={k: str(s) for k, s in stored_shape.items() if k not in expected},
        misshaped={
            k: (named_shape_str(expected[k]), str(s))
            for k, s in stored_shape.items()
            if k in expected and s != dict(expected[k].named_shape)
        },
    )
    if error.has_problems:
        raise error


def load_adapters(model, path: str | os.PathLike):
    """`model` (without adapters) with the adapters saved at `path` attached.

    Raises:
      CheckpointMismatchError: an adapter's target is missing from the model or
        its shape differs (every problem listed).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    file = os.path.join(path, ADAPTERS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found: {path} holds no LoRA adapters.")
    integrity.verify(path, fix="Save the adapters again.")
    with open(file) as f:
        settings = json.load(f)
    targets = set(settings["targets"])
    adapted = _adapt(
        model, settings["rank"], targets.__contains__, settings["scale"], None, None
    )
    stored = settings["parameters"]
    _check_stored(path, adapter_values(adapted), stored)
    target = {
        label: jax.ShapeDtypeStruct(tuple(info["shape"]), info["dtype"])
        for label, info in stored.items()
    }
    with ocp.StandardCheckpointer() as checkpointer:
        arrays = checkpointer.restore(os.path.join(path, "adapters"), target)
    values = {
        label: pz.nx.wrap(arrays[label]).tag(*info["axes"])
        for label, info in stored.items()
    }
    return (
        pz.select(adapted)
        .at_instances_of(LowRankUpdate)
        .at_instances_of(pz.Parameter)
        .apply(lambda p: pz.Parameter(label=p.label, value=values[p.label]))
    )
