"""LoRA (Hu et al. 2021, arXiv 2106.09685) for any recurrent_lm model.

`enable_lora` replaces chosen `pz.nn.Linear` layers (selected by parameter
label, so it works for every architecture) with `LoRALinear`: the original
layer, its weights frozen (`pz.ParameterValue`), plus ``scale * (x A) B`` with
``A`` {in axes..., "lora_rank"} (fan-in normal) and ``B`` {"lora_rank", out
axes...} (zeros), so the adapted model starts equal to the original. Only the
adapters remain `pz.Parameter`s: a training loop that differentiates the
model's parameters (`recurrent_lm.train`) trains the adapters alone.

`merge_lora` folds ``W + scale * A B`` back into plain `Linear` layers (same
labels as the original weights); `save_adapters` / `load_adapters` store the
adapters alone.
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

from recurrent_lm import axes
from recurrent_lm.layers import init
from recurrent_lm.params import CheckpointMismatchError, named_shape_str

ADAPTERS_FILE = "lora.json"


@pz.pytree_dataclass
class LoRALinear(pz.nn.Layer):
    """``base(x) + scale * B(A(x))``; named axes as the base `pz.nn.Linear`.

    Attributes:
      base: the original layer (its weights frozen by `enable_lora`).
      lora_a: {*base.in_axis_names, "lora_rank"}.
      lora_b: {"lora_rank", *base.out_axis_names}.
      scale: ``alpha / rank``.
    """

    base: pz.nn.Linear
    lora_a: pz.nn.ParameterLike[pz.nx.NamedArray]
    lora_b: pz.nn.ParameterLike[pz.nx.NamedArray]
    scale: float = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, **_unused_side_inputs):
        low = pz.nx.nmap(jnp.tensordot)(
            x.untag(*self.base.in_axis_names),
            self.lora_a.value.untag(*self.base.in_axis_names),
            axes=len(self.base.in_axis_names),
        )
        update = pz.nx.nmap(jnp.tensordot)(
            low.untag(axes.LORA_RANK), self.lora_b.value.untag(axes.LORA_RANK), axes=1
        )
        return self.base(x) + update * jnp.asarray(self.scale, x.dtype)

    def merged(self) -> pz.nn.Linear:
        """The plain `Linear` with ``W + scale * A B`` (the base weight's label)."""
        w = self.base.weights
        delta = pz.nx.nmap(jnp.tensordot)(
            self.lora_a.value.untag(axes.LORA_RANK),
            self.lora_b.value.untag(axes.LORA_RANK),
            axes=1,
        )
        value = (w.value + delta.astype(w.value.dtype) * self.scale).order_like(w.value)
        return dataclasses.replace(
            self.base, weights=pz.Parameter(label=w.label, value=value)
        )


def _weight_label(linear: pz.nn.Linear) -> str:
    return linear.weights.label


def _targets_matcher(targets) -> Callable[[str], bool]:
    if targets is None:
        return lambda label: True
    if callable(targets):
        return targets
    if isinstance(targets, str):
        targets = [targets]
    patterns = [re.compile(t) for t in targets]
    return lambda label: any(p.search(label) for p in patterns)


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
    if pz.select(model).at_instances_of(LoRALinear).count():
        raise ValueError("the model already has LoRA adapters; merge_lora first.")
    match = _targets_matcher(targets)
    linears = pz.select(model).at_instances_of(pz.nn.Linear)
    labels = [_weight_label(lin) for lin in linears.get_sequence()]
    chosen = [label for label in labels if match(label)]
    if not chosen:
        raise ValueError(
            f"no Linear layer matches LoRA targets {targets!r}; labels: {labels}."
        )
    key = jax.random.key(0) if key is None else key
    scale = 1.0 if alpha is None else float(alpha) / rank
    model = pz.freeze_params(model)

    def adapt(linear: pz.nn.Linear):
        label = _weight_label(linear)
        if not match(label):
            return linear
        w = linear.weights.value
        in_shape = {n: w.named_shape[n] for n in linear.in_axis_names}
        out_shape = {n: w.named_shape[n] for n in linear.out_axis_names}
        kind = w.dtype if dtype is None else dtype
        lora_a = pz.nn.make_parameter(
            f"{label}.lora_a",
            key,
            init.fan_in_normal,
            {**in_shape, axes.LORA_RANK: rank},
            kind,
            fan_in_axes=tuple(in_shape),
        )
        lora_b = pz.nn.make_parameter(
            f"{label}.lora_b",
            key,
            init.zeros,
            {axes.LORA_RANK: rank, **out_shape},
            kind,
        )
        return LoRALinear(base=linear, lora_a=lora_a, lora_b=lora_b, scale=scale)

    return pz.select(model).at_instances_of(pz.nn.Linear).apply(adapt)


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


def adapter_values(model) -> dict[str, pz.nx.NamedArray]:
    """``{label: value}`` of every adapter parameter."""
    values = {}
    for layer in pz.select(model).at_instances_of(LoRALinear).get_sequence():
        for p in (layer.lora_a, layer.lora_b):
            values[p.label] = p.value
    return values


def _adapter_settings(model) -> dict:
    layers = pz.select(model).at_instances_of(LoRALinear).get_sequence()
    if not layers:
        raise ValueError("the model has no LoRA adapters (use enable_lora).")
    return {
        "rank": layers[0].lora_a.value.named_shape[axes.LORA_RANK],
        "scale": layers[0].scale,
        "targets": [_weight_label(layer.base) for layer in layers],
    }


def save_adapters(model, path: str | os.PathLike) -> None:
    """Writes the adapters alone (orbax arrays + ``lora.json``) to a new directory."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new directory.")
    values = adapter_values(model)
    settings = _adapter_settings(model)
    settings["parameters"] = {
        label: {
            "axes": list(v.named_shape),
            "shape": list(v.named_shape.values()),
            "dtype": str(v.dtype),
        }
        for label, v in values.items()
    }
    os.makedirs(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(
            os.path.join(path, "adapters"),
            {label: v.unwrap(*v.named_shape) for label, v in values.items()},
        )
    with open(os.path.join(path, ADAPTERS_FILE), "w") as f:
        json.dump(settings, f, indent=1)


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
    with open(file) as f:
        settings = json.load(f)
    targets = set(settings["targets"])
    adapted = enable_lora(
        model,
        settings["rank"],
        targets=lambda label: label in targets,
        alpha=None,
        key=jax.random.key(0),
    )
    adapted = (
        pz.select(adapted)
        .at_instances_of(LoRALinear)
        .apply(lambda layer: dataclasses.replace(layer, scale=settings["scale"]))
    )
    expected = adapter_values(adapted)
    stored = settings["parameters"]
    missing = {k: named_shape_str(v) for k, v in expected.items() if k not in stored}
    unexpected = {
        k: str(dict(zip(v["axes"], v["shape"])))
        for k, v in stored.items()
        if k not in expected
    }
    misshaped = {
        k: (named_shape_str(expected[k]), str(dict(zip(v["axes"], v["shape"]))))
        for k, v in stored.items()
        if k in expected
        and dict(zip(v["axes"], v["shape"])) != dict(expected[k].named_shape)
    }
    error = CheckpointMismatchError(
        f"LoRA adapters {path}",
        missing=missing,
        unexpected=unexpected,
        misshaped=misshaped,
    )
    if error.has_problems:
        raise error
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

    def fill(layer: LoRALinear) -> LoRALinear:
        a, b = layer.lora_a, layer.lora_b
        return dataclasses.replace(
            layer,
            lora_a=pz.Parameter(label=a.label, value=values[a.label]),
            lora_b=pz.Parameter(label=b.label, value=values[b.label]),
        )

    return pz.select(adapted).at_instances_of(LoRALinear).apply(fill)
