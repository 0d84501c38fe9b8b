"""Capture, patch and ablate activations, including recurrent states.

Every layer that exposes an activation holds a site (`recurrent_lm.core.sites`),
named by its path in the model::

    >>> interp.site_names(model)
    ['embeddings', 'blocks.0.temporal_block.conv_1d.output',
     'blocks.0.temporal_block.rg_lru.input_gate_value', ...,
     'blocks.0.temporal_block.rg_lru.hidden_state', ..., 'blocks.0.output', ...]

Capture (like TransformerLens ``run_with_cache``; glob patterns select sites)::

    logits, cache = interp.run_with_cache(model, tokens, names="blocks.*.rg_lru.hidden_state")
    cache["blocks.0.temporal_block.rg_lru.hidden_state"]     # {"batch", "seq", "lru"}

Intervene: `patch` swaps sites for interventions and returns an ordinary model
(call it, jit it, sample from it)::

    patched = interp.patch(model, {
        "blocks.0.temporal_block.rg_lru.hidden_state": interp.Replace(value, positions=[5]),
        "blocks.2.temporal_block.pattern": interp.Replace(0.0, heads=[1]),   # zero-ablate a head
        "blocks.1.output": interp.Add(steering_vector),
    })

On a recurrent state site, `Replace` and `Add` act on the recurrence itself
(``h_t := value`` at the chosen positions, then ``h_{t+1} = a h_t + b`` as
usual), so the change propagates to every later position; pass
``propagate=False`` to `patch` to change only what the layer outputs.

A custom intervention is any `sites.Hook` subclass: it receives the activation
in ``__call__`` (and, at state sites, the recurrence inputs in ``update``).
Place it with penzai selectors, e.g. clip the RG-LRU input gate of block 0::

    @pz.pytree_dataclass
    class Clip(sites.Hook):
        limit: float
        def __call__(self, x, /, **_):
            return pz.nx.nmap(jnp.minimum)(x, self.limit)

    clipped = (pz.select(model).at(lambda m: m.blocks.sublayers[0].temporal_block
                                   .rg_lru.input_gate_value).set(Clip(0.5)))

Everything works eagerly (compiled once per structure) and inside `jax.jit`
(frozen parameters: ``pz.freeze_params(model)``). A scanned model
(`recurrent_lm.scan_layers`) is unscanned first: sites are per layer, and
`patch` returns the unrolled model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from recurrent_lm import axes
from recurrent_lm.core import sites, stack
from recurrent_lm.core.context import DocumentContext, default_segment_pos

# Position index that matches no position (activation-patching sweeps).
_NO_POSITION = 2**30


# ----------------------------------------------------------------------------- site names


def _site_paths(model) -> dict[str, Any]:
    """{site name: keypath} in the order the forward pass reaches them."""
    selection = pz.select(model).at_instances_of(sites.Hook)
    paths = {sites.path_name(model, path): path for path in selection.selected_by_path}
    # The embeddings site is the model's last field but its first activation.
    return dict(sorted(paths.items(), key=lambda item: item[0] != "embeddings"))


def site_names(model) -> list[str]:
    """Names of every site of `model`, in model order."""
    return list(_site_paths(stack.unscan_layers(model)))


def _glob(pattern: str) -> re.Pattern:
    """``*`` matches within one dotted part, ``**`` across parts."""
    parts = (re.escape(p).replace(r"\*", "[^.]*") for p in pattern.split("**"))
    return re.compile(".*".join(parts) + r"\Z")


def _match(model, names: str | Sequence[str] | None) -> dict[str, Any]:
    """Sites whose names match any pattern in `names` (None: all). In a
    pattern, ``*`` matches within one dotted part and ``**`` across parts:
    ``"blocks.*.output"`` is the residual stream, ``"**.hidden_state"`` every
    RG-LRU state."""
    paths = _site_paths(model)
    if names is None:
        return paths
    patterns = [names] if isinstance(names, str) else list(names)
    chosen = {}
    for pattern in patterns:
        regex = _glob(pattern)
        hits = [n for n in paths if regex.match(n)]
        if not hits:
            raise ValueError(
                f"no site matches {pattern!r}; sites look like {list(paths)[:6]} ..."
                " (see interp.site_names(model))."
            )
        chosen.update((n, paths[n]) for n in hits)
    return {n: p for n, p in paths.items() if n in chosen}


# ----------------------------------------------------------------------------- capture


@pz.pytree_dataclass
class Capture(sites.Hook):
    """Records what a site (or the intervention placed there) outputs: the
    activation, or the states at a state site."""

    inner: sites.Hook
    saved: pz.StateVariable = dataclasses.field(
        default_factory=lambda: pz.StateVariable(None)
    )

    def __call__(self, x, /, **side_inputs):
        x = self.inner(x, **side_inputs)
        self.saved.value = x
        return x

    def update(self, a, b, /, **side_inputs):
        return self.inner.update(a, b, **side_inputs)


def run_with_cache(
    model, tokens, *, segment_pos=None, names: str | Sequence[str] | None = None
) -> tuple[pz.nx.NamedArray, dict[str, pz.nx.NamedArray]]:
    """Runs `model` and returns ``(logits, {site name: activation})``.

    Args:
      model: any recurrent_lm model (also a patched one, or a sampling-mode one).
      tokens, segment_pos: as for ``model(...)``.
      names: glob pattern(s) of the sites to capture (default: all).
    """
    model = stack.unscan_layers(model)
    chosen = _match(model, names)
    names_by_path = {path: name for name, path in chosen.items()}
    captures = {}

    def capture(path, hook):
        captures[names_by_path[path]] = Capture(hook)
        return captures[names_by_path[path]]

    capturing = pz.select(model).at_keypaths(list(names_by_path)).apply(
        capture, with_keypath=True
    )
    logits = capturing(tokens, segment_pos=segment_pos)
    return logits, {name: captures[name].saved.value for name in chosen}


def residual_stream(model, tokens, *, segment_pos=None, include_embeddings: bool = False):
    """``(logits, stream)``: the residual stream after every block, stacked
    along "layers" ({"layers", "batch", "seq", "embedding"}); with
    `include_embeddings`, the embedder's output comes first."""
    names = (["embeddings"] if include_embeddings else []) + ["blocks.*.output"]
    logits, cache = run_with_cache(model, tokens, segment_pos=segment_pos, names=names)
    stream = [cache.pop("embeddings")] if include_embeddings else []
    return logits, pz.nx.stack(stream + list(cache.values()), axes.LAYERS)


def logit_lens(model, tokens, *, segment_pos=None) -> pz.nx.NamedArray:
    """The model's final norm and head applied to the residual stream after the
    embeddings and after every block: {"layers", "batch", "seq", "vocabulary"}
    ("layers" = num blocks + 1; the last entry equals the model's logits)."""
    _, stream = residual_stream(model, tokens, segment_pos=segment_pos, include_embeddings=True)
    context = DocumentContext.build(
        default_segment_pos(tokens) if segment_pos is None else segment_pos
    )
    return model.head(model.final_norm(stream, context=context), context=context)


# ----------------------------------------------------------------------------- interventions


def _as_named(value) -> pz.nx.NamedArray:
    if isinstance(value, pz.nx.NamedArrayBase):
        return value
    return pz.nx.wrap(jnp.asarray(value))


def _as_indices(values) -> jax.Array | None:
    if values is None:
        return None
    return jnp.atleast_1d(jnp.asarray(values, jnp.int32))


class Intervention(sites.Hook):
    """Base of the built-in interventions: where they act.

    Subclasses have the fields
      positions: int [P] "seq" indices (negative counts from the end), or None
        for every position. Indices are those of each call (a chunk, in
        sampling mode).
      heads: int [H'] indices along "heads", or None for every head.
      site: the site name (set by `patch`; used in error messages).
    """

    positions: jax.Array | None
    heads: jax.Array | None
    site: str

    def selected(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray | None:
        """Bool mask over x's "seq" / "heads" axes (None = everywhere)."""
        mask = None
        for axis, chosen in ((axes.SEQ, self.positions), (axes.HEADS, self.heads)):
            if chosen is None:
                continue
            if axis not in x.named_shape:
                raise ValueError(
                    f"site {self.site!r}: cannot select {axis!r} indices in an activation"
                    f" with axes {dict(x.named_shape)}."
                )
            size = x.named_shape[axis]
            index = pz.nx.arange(axis, size)
            wrapped = jnp.where(chosen < 0, chosen + size, chosen)
            hit = pz.nx.nmap(lambda i, w=wrapped: jnp.any(i == w))(index)
            mask = hit if mask is None else mask & hit
        return mask

    def fitted(self, value, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
        """`value` checked to broadcast against `x` and cast to its dtype."""
        value = _as_named(value)
        extra = {n: s for n, s in value.named_shape.items() if x.named_shape.get(n) != s}
        if extra or value.positional_shape:
            raise ValueError(
                f"site {self.site!r}: intervention value with axes {dict(value.named_shape)}"
                f" (positional {value.positional_shape}) does not fit the activation"
                f" {dict(x.named_shape)}."
            )
        return value.astype(x.dtype)

    def where(self, x, new):
        """``new`` where selected, else ``x`` (axis order of ``x``)."""
        mask = self.selected(x)
        out = new if mask is None else pz.nx.nmap(jnp.where)(mask, new, x)
        out = out + pz.nx.zeros(x.named_shape, x.dtype)  # broadcast to every axis of x
        return pz.nx.order_like(out, x)


@pz.pytree_dataclass
class Replace(Intervention):
    """Sets the activation to `value` (broadcast over missing axes) where
    selected. ``Replace(0.0)`` is a zero ablation; see `mean_ablation`."""

    value: Any = 0.0
    positions: jax.Array | None = None
    heads: jax.Array | None = None
    site: str = dataclasses.field(default="", metadata={"pytree_node": False})

    def __call__(self, x, /, **_unused_side_inputs):
        return self.where(x, self.fitted(self.value, x))


@pz.pytree_dataclass
class Add(Intervention):
    """Adds `delta` (e.g. a steering vector) where selected."""

    delta: Any = 0.0
    positions: jax.Array | None = None
    heads: jax.Array | None = None
    site: str = dataclasses.field(default="", metadata={"pytree_node": False})

    def __call__(self, x, /, **_unused_side_inputs):
        return self.where(x, x + self.fitted(self.delta, x))


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class ReplaceState(Replace):
    """`Replace` on a recurrence: ``h_t := value`` at the selected positions,
    then the recurrence carries it forward (``a_t := 0, b_t := value``)."""

    def __call__(self, x, /, **_unused_side_inputs):
        return x

    def update(self, a, b, /, **_unused_side_inputs):
        value = self.fitted(self.value, b)
        # `a` may be constant in time (an SSM's decay): give it b's time axis.
        a = a + pz.nx.zeros({axes.SEQ: b.named_shape[axes.SEQ]}, a.dtype)
        return self.where(a, pz.nx.zeros(a.named_shape, a.dtype)), self.where(b, value)


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class AddState(Add):
    """`Add` on a recurrence: ``h_t += delta`` at the selected positions, and
    the recurrence carries the change forward (``b_t += delta``)."""

    def __call__(self, x, /, **_unused_side_inputs):
        return x

    def update(self, a, b, /, **_unused_side_inputs):
        return a, self.where(b, b + self.fitted(self.delta, b))


_ON_STATE = {Replace: ReplaceState, Add: AddState}


def mean_ablation(reference: pz.nx.NamedArray, *, positions=None, heads=None) -> Replace:
    """Replaces a site by its mean over "batch" and "seq" of `reference` (an
    activation captured with `run_with_cache`, e.g. over a reference text)."""
    over = [a for a in (axes.BATCH, axes.SEQ) if a in reference.named_shape]
    mean = pz.nx.nmap(jnp.mean)(reference.untag(*over)) if over else reference
    return Replace(value=mean, positions=_as_indices(positions), heads=_as_indices(heads))


def patch(model, interventions: Mapping[str, sites.Hook], *, propagate: bool = True):
    """A copy of `model` with the sites matching each pattern replaced.

    Args:
      model: any recurrent_lm model.
      interventions: {site name or glob pattern: intervention}. Built-in
        interventions (`Replace`, `Add`) take ``positions`` / ``heads`` lists;
        any other `sites.Hook` is placed as given.
      propagate: at recurrent state sites, act on the recurrence (the change
        carries forward through later states); False changes only the layer's
        output at the selected positions.
    """
    model = stack.unscan_layers(model)
    placed: dict[Any, sites.Hook] = {}
    for pattern, intervention in interventions.items():
        if not isinstance(intervention, sites.Hook):
            raise TypeError(f"interventions[{pattern!r}] is not an interp intervention (a sites.Hook).")
        for name, path in _match(model, pattern).items():
            placed[path] = _placed(intervention, name, model, path, propagate)
    return pz.select(model).at_keypaths(list(placed)).apply(
        lambda path, _site: placed[path], with_keypath=True
    )


def _placed(intervention, name, model, path, propagate):
    if not isinstance(intervention, Intervention):
        return intervention
    fields = {f.name: getattr(intervention, f.name) for f in dataclasses.fields(intervention)}
    fields.update(
        site=name,
        positions=_as_indices(fields["positions"]),
        heads=_as_indices(fields["heads"]),
    )
    kind = type(intervention)
    site = pz.select(model).at_keypaths([path]).get()
    if isinstance(site, sites.StateSite) and site.scaled and (kind is not Replace or not propagate):
        raise ValueError(
            f"site {name!r} holds a scaled state that the layer reads only through its"
            " recurrence: it can be restarted from a given state (Replace, propagating),"
            " not added to or changed in the output alone."
        )
    if isinstance(site, sites.StateSite) and propagate and kind in _ON_STATE:
        if fields["heads"] is not None:
            raise ValueError(f"site {name!r} is a recurrent state: it has no heads to select.")
        kind = _ON_STATE[kind]
    return kind(**fields)


# ----------------------------------------------------------------------------- activation patching


@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """What `activation_patching` measured.

    Attributes:
      patched: metric of the corrupted run with one site at one position set
        to its clean value: {"layers", "seq"} (one "layers" entry per site).
      clean, corrupted: metric of the unpatched clean and corrupted runs.
      sites: the patched site names, in "layers" order.
    """

    patched: pz.nx.NamedArray
    clean: float
    corrupted: float
    sites: tuple[str, ...]

    def normalized(self) -> pz.nx.NamedArray:
        """0 = no effect, 1 = restores the clean metric."""
        return (self.patched - self.corrupted) / (self.clean - self.corrupted)


def logit_difference(correct: int, incorrect: int, position: int = -1) -> Callable:
    """Metric: mean over rows of ``logit[correct] - logit[incorrect]`` at `position`."""

    def metric(logits: pz.nx.NamedArray) -> jax.Array:
        last = logits[{axes.SEQ: position}]
        diff = last[{axes.VOCABULARY: correct}] - last[{axes.VOCABULARY: incorrect}]
        return jnp.mean(diff.unwrap(*diff.named_shape))

    return metric


def activation_patching(
    model,
    clean_tokens: pz.nx.NamedArray,
    corrupted_tokens: pz.nx.NamedArray,
    metric: Callable[[pz.nx.NamedArray], jax.Array],
    *,
    names: str | Sequence[str] = "blocks.*.output",
    segment_pos=None,
    batch_size: int | None = None,
) -> PatchingResult:
    """For every matched site and position, runs the corrupted input with that
    one activation set to its clean value and records ``metric(logits)``.

    One compiled function runs all ``sites x positions`` patched forwards
    (`jax.lax.map`, `batch_size` at a time; default: one site's positions).
    At recurrent state sites the clean state is written into the recurrence.
    """
    if dict(clean_tokens.named_shape) != dict(corrupted_tokens.named_shape):
        raise ValueError(
            f"clean {dict(clean_tokens.named_shape)} and corrupted"
            f" {dict(corrupted_tokens.named_shape)} tokens must have the same shape."
        )
    clean_logits, cache = run_with_cache(model, clean_tokens, segment_pos=segment_pos, names=names)
    corrupted_logits = model(corrupted_tokens, segment_pos=segment_pos)
    site_list = tuple(cache)
    seq_len = clean_tokens.named_shape[axes.SEQ]
    patched = patch(
        model,
        {name: Replace(cache[name], positions=[_NO_POSITION]) for name in site_list},
    )
    index = {name: i for i, name in enumerate(site_list)}
    if segment_pos is None:
        segment_pos = default_segment_pos(clean_tokens)

    def run_all(frozen, tokens, segment_pos):
        def one(pair):
            site, position = pair

            def aim(intervention):
                hit = index[intervention.site] == site
                chosen = jnp.where(hit, position, _NO_POSITION)[None]
                return dataclasses.replace(intervention, positions=chosen)

            aimed = pz.select(frozen).at_instances_of(Intervention).apply(aim)
            return metric(aimed.forward(tokens, segment_pos))

        sites_index, positions_index = np.meshgrid(
            np.arange(len(site_list)), np.arange(seq_len), indexing="ij"
        )
        pairs = (jnp.asarray(sites_index.ravel()), jnp.asarray(positions_index.ravel()))
        return jax.lax.map(one, pairs, batch_size=batch_size or seq_len)

    values = jax.jit(run_all)(pz.freeze_params(patched), corrupted_tokens, segment_pos)
    table = pz.nx.wrap(values.reshape(len(site_list), seq_len), axes.LAYERS, axes.SEQ)
    return PatchingResult(
        patched=table,
        clean=float(metric(clean_logits)),
        corrupted=float(metric(corrupted_logits)),
        sites=site_list,
    )
