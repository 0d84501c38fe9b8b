"""Device meshes and sharding rules keyed by our named parameter axes.

Sharding rules are data: ``{named axis -> mesh axis or None}`` (MaxText's
``logical_axis_rules``, Levanter's axis mappings). Every architecture names its
parameter axes from one vocabulary (`recurrent_lm.axes`), so one default table
shards all of them; an architecture may register overrides. The same rules
place parameters for training and for loading a large checkpoint sharded
(`load_sharded`).

Meshes have the axes ("data", "fsdp", "model") with *automatic* axis types:
penzai layers fail under explicit-sharding meshes. The runtime is JAX's own
(`jax.distributed`, `jax.sharding.Mesh`, `NamedSharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites
from recurrent_lm.core.model import DecoderLM
from recurrent_lm.layers.residual import ResidualBlock

logger = logging.getLogger(__name__)

DATA, FSDP, MODEL = "data", "fsdp", "model"
MESH_AXES = (DATA, FSDP, MODEL)
BATCH_MESH_AXES = (DATA, FSDP)
"""The batch is split over data and fsdp devices (FSDP is data parallelism
whose parameters and optimizer state are sharded too)."""

Rules = Mapping[str, str | tuple[str, ...] | None]

DEFAULT_RULES: dict[str, str | None] = {
    # FSDP: parameters are sharded along the model width.
    axes.EMBEDDING: FSDP,
    # Tensor parallelism: the wide inner axes.
    axes.MLP: MODEL,
    axes.HEADS: MODEL,
    axes.KV_HEADS: MODEL,
    axes.LRU: MODEL,
    axes.VOCABULARY: MODEL,
    axes.STATE: MODEL,
    axes.PROJECTION: None,
    axes.BLOCK_IN: None,
    axes.BLOCK_OUT: None,
    axes.CONV_TAPS: None,
    # Scanned layer stacks: each scan step reads one slice on every device.
    axes.STACK: None,
}

ARCHITECTURE_RULES: dict[str, dict[str, str | None]] = {}
"""Per-architecture overrides of `DEFAULT_RULES`, by registered model type."""


def register_sharding_rules(model_type: str, overrides: Rules) -> None:
    """Overrides some of `DEFAULT_RULES` for one architecture."""
    ARCHITECTURE_RULES[model_type] = dict(overrides)


def rules_for(model_type: str | None = None, overrides: Rules | None = None) -> dict:
    """The default rules, then the architecture's, then `overrides`."""
    rules = dict(DEFAULT_RULES)
    rules.update(ARCHITECTURE_RULES.get(model_type, {}))
    rules.update(overrides or {})
    return rules


def parse_mesh_shape(text: str | None, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,model=2"`` -> sizes; one size may be -1 (the rest).

    None or "" puts every device on "data".
    """
    sizes = {DATA: -1, FSDP: 1, MODEL: 1} if not text else {DATA: 1, FSDP: 1, MODEL: 1}
    if text:
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in MESH_AXES or not value.strip().lstrip("-").isdigit():
                raise ValueError(
                    f"bad mesh entry {part!r}: expected NAME=SIZE with NAME in {MESH_AXES},"
                    " e.g. 'data=2,fsdp=4,model=1'."
                )
            sizes[name] = int(value)
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(
            f"mesh {sizes}: sizes must be positive, at most one may be -1."
        )
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {sizes}: {fixed} does not divide {num_devices} devices."
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are"
            " available."
        )
    return sizes


def make_mesh(
    shape: Mapping[str, int] | str | None = None, devices=None
) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "model") mesh with automatic axis types."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(shape, Mapping):
        shape = parse_mesh_shape(shape, len(devices))
    sizes = tuple(int(shape[n]) for n in MESH_AXES)
    return jax.make_mesh(
        sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def partition_spec(
    axis_names: Sequence[str],
    shape: Sequence[int],
    mesh: jax.sharding.Mesh,
    rules: Rules,
) -> tuple[PartitionSpec, list[str]]:
    """The PartitionSpec of an array whose dimensions carry `axis_names`.

    A mesh axis is used at most once per array (the first dimension that maps to
    it wins); a dimension that its mesh axes do not divide stays replicated.

    Returns:
      (spec, notes): notes name each dimension left replicated and why.
    """
    used: set[str] = set()
    spec, notes = [], []
    for name, size in zip(axis_names, shape):
        target = rules.get(name)
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
        if not targets:
            spec.append(None)
            continue
        ways = math.prod(mesh.shape[t] for t in targets)
        if used & set(targets):
            notes.append(f"{name!r} replicated: mesh axes {targets} already used")
            spec.append(None)
        elif size % ways:
            notes.append(
                f"{name!r} ({size}) replicated: not divisible by {targets} ({ways})"
            )
            spec.append(None)
        else:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec), notes


def named_sharding(axis_names, shape, mesh, rules, *, what: str = "") -> NamedSharding:
    spec, notes = partition_spec(axis_names, shape, mesh, rules)
    for note in notes:
        logger.info("sharding %s: %s", what, note)
    return NamedSharding(mesh, spec)


def parameter_shardings(
    axes_by_label: Mapping[str, Sequence[str]],
    shapes: Mapping[str, Sequence[int]],
    mesh: jax.sharding.Mesh,
    rules: Rules,
) -> dict[str, NamedSharding]:
    """``{label: NamedSharding}`` for parameters with the given named axes."""
    return {
        label: named_sharding(names, shapes[label], mesh, rules, what=label)
        for label, names in axes_by_label.items()
    }


def batch_sharding(
    mesh: jax.sharding.Mesh, ndim: int, batch_dim: int = 0
) -> NamedSharding:
    """Rows split over ("data", "fsdp"), every other dimension replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_MESH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def sharded_initializer(build_model, config, mesh: jax.sharding.Mesh, rules: Rules):
    """``(init, abstract)`` for the model ``build_model(config, key)``: ``init(key) ->
    {label: array}`` compiled with every output in its sharding (each device computes
    only its shards), and ``{label: abstract NamedArray}`` of its parameters."""
    return _sharded_initializer(build_model, config, mesh, tuple(sorted(rules.items())))


# Cached: a later run of the same model in this process (a resume, a notebook
# re-run, another test) neither retraces nor recompiles its initialiser.
@functools.lru_cache(maxsize=8)
def _sharded_initializer(build_model, config, mesh, rules_items):
    from recurrent_lm import params as params_lib

    build = functools.partial(build_model, config)
    abstract = params_lib.abstract_parameters(build)
    names = {label: tuple(value.named_shape) for label, value in abstract.items()}
    shapes = {label: tuple(value.named_shape.values()) for label, value in abstract.items()}
    shardings = parameter_shardings(names, shapes, mesh, dict(rules_items))

    def init(key):
        values = params_lib.parameter_values(build(key))
        return {label: values[label].unwrap(*names[label]) for label in names}

    return jax.jit(init, out_shardings=shardings), abstract


def init_sharded(build_model, config, key: jax.Array, mesh: jax.sharding.Mesh, rules: Rules):
    """``build_model(config, key)`` (a model builder: a None key gives its skeleton)
    with every parameter created directly in its sharding by one compiled
    initialiser: no parameter is ever whole on one device or host, so a model
    larger than one chip's memory can start."""
    from recurrent_lm import params as params_lib

    init, abstract = sharded_initializer(build_model, config, mesh, rules)
    arrays = init(key)
    values = {
        label: pz.nx.wrap(arrays[label]).tag(*abstract[label].named_shape) for label in abstract
    }
    return params_lib.bind_parameters(
        build_model(config, None), values, abstract, source="initialisation"
    )


def load_sharded(
    path, mesh: jax.sharding.Mesh, rules: Rules | None = None, **build_kwargs
):
    """`recurrent_lm.load` with each parameter placed by the sharding rules.

    Each host reads only its shards (orbax restores into the target shardings),
    so a checkpoint larger than one device's memory loads onto the mesh.
    """
    from recurrent_lm import checkpoint

    model_type = checkpoint.read_metadata(path)["model_type"]
    rules = rules_for(model_type, rules)
    return checkpoint.load(
        path,
        sharding=lambda names, shape: named_sharding(names, shape, mesh, rules),
        **build_kwargs,
    )


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """`jax.distributed.initialize` when a multi-host job is described.

    Flags win over the environment (``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); on TPU pods and SLURM, setting
    ``RECURRENT_LM_DISTRIBUTED=1`` lets JAX discover everything itself.
    """
    coordinator_address = coordinator_address or os.environ.get(
        "JAX_COORDINATOR_ADDRESS"
    )
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator_address or num_processes:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if os.environ.get("RECURRENT_LM_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def global_batch_from_local(
    local_rows: np.ndarray, sharding: NamedSharding, global_shape
):
    """Assembles a global array from this process's rows (multi-host input)."""
    return jax.make_array_from_process_local_data(sharding, local_rows, global_shape)


# ----------------------------------------------------------------------------- activations

ACTIVATION_AXES = (axes.BATCH,)


@pz.pytree_dataclass
class ShardedActivation(sites.Hook):
    """A site that pins the sharding of the activation through it: rows over
    ("data", "fsdp"), axes the rules map to "model" over "model", the rest
    replicated.

    Why: the parameters are FSDP-sharded along "embedding" and the batch along
    the same mesh axis; left alone, the partitioner may keep the weights in place
    and gather the whole batch to every chip instead (each chip then computes on
    every row, and the gradients are all-reduced whole). Pinning the residual
    stream makes it gather each layer's weights, as FSDP means.
    """

    mesh: jax.sharding.Mesh = dataclasses.field(metadata={"pytree_node": False})
    rules: tuple = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, x, /, **_unused_side_inputs):
        names = tuple(x.named_shape)
        spec, _ = partition_spec(names, tuple(x.named_shape.values()), self.mesh, dict(self.rules))
        data = jax.lax.with_sharding_constraint(x.unwrap(*names), NamedSharding(self.mesh, spec))
        return pz.nx.wrap(data).tag(*names)


def activation_rules(rules: Rules) -> dict:
    """Rows over the batch mesh axes; an axis the parameter rules put on "model"
    stays there (tensor parallelism); nothing else is sharded."""
    found = {name: target for name, target in rules.items() if target == MODEL}
    found[axes.BATCH] = BATCH_MESH_AXES
    return found


def shard_residual_stream(model, mesh: jax.sharding.Mesh, rules: Rules):
    """`model` with the residual stream (the embeddings and every block's output
    site) pinned to its sharding (`ShardedActivation`)."""
    hook = ShardedActivation(mesh, tuple(sorted(activation_rules(rules).items())))
    selection = pz.select(model).at_instances_of(ResidualBlock).at(lambda b: b.output)
    model = selection.set(hook)
    return pz.select(model).at_instances_of(DecoderLM).at(lambda m: m.embeddings).set(hook)


def unshard_residual_stream(model):
    """`model` with every `ShardedActivation` back to a plain site."""
    return pz.select(model).at_instances_of(ShardedActivation).apply(lambda _: sites.Site())
