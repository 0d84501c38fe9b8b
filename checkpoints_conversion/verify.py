"""Checks a downloaded checkpoint: our model against the reference implementation
on the same weights.

    python -m checkpoints_conversion.verify SRC [--seq N --batch B --seed S]

SRC's format is detected from its contents (`FORMATS`, tried in order):

=====================  ======================================  =====================================
format                 how it is recognised                    reference (pip package)
=====================  ======================================  =====================================
hf-recurrentgemma      config.json model_type recurrent_gemma  transformers RecurrentGemmaForCausalLM
hf-gemma / hf-gemma2   config.json model_type gemma / gemma2   transformers Gemma(2)ForCausalLM
hf-rwkv                config.json model_type rwkv             transformers RwkvForCausalLM
hf-mamba / hf-mamba2   config.json model_type mamba / mamba2   transformers Mamba(2)ForCausalLM
keras-gemma            config.json GemmaBackbone + .weights.h5 keras-hub GemmaCausalLM (JAX backend)
official-recurrentgemma orbax tree with embedder + blocks.N     recurrentgemma (official package)
official-gemma         orbax tree under transformer/            penzai's Gemma
blinkdl-rwkv           torch file: emb.weight, att.time_decay  rwkv (BlinkDL's runtime, cpu fp32)
blinkdl-rwkv7          torch file: emb.weight, att.r_k (x070)  rwkv (his x070 runtime, RWKV_V7_ON)
h3                     a torch file with backbone.* names       none exists: exit 2
=====================  ======================================  =====================================

Both sides run in float32 (a bfloat16 checkpoint is cast on load) on the same
random tokens; the one printed line is ``max relative logit error`` = max |ours -
reference| / max |reference|, with the reference and the sequence length. HF's
RecurrentGemma attention window differs from the official one beyond the window
(see `checkpoints_conversion.recurrentgemma`): the sequence is cut to the window.
KerasHub 0.32 always scales queries by ``head_dim ** -0.5``, so a preset with
``query_head_dim_normalize=False`` is loaded with it True to match KerasHub's numbers.

Exit status: 0 after printing the line; 2 with one ``error: ...`` line when SRC
is no known format, the reference package is not installed (the message names
it), or no reference exists (H3).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from checkpoints_conversion import common, gemma, h3, mamba, recurrentgemma, rwkv
from recurrent_lm.user_errors import reports_user_errors


class ReferenceUnavailable(ValueError):
    """No reference implementation to compare against (a user error: one line, exit 2)."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format: how to recognise it, load it as ours, and run its reference.

    Attributes:
      name: the format's name in the printed line.
      detect: SRC -> whether it is this format (cheap; never raises).
      load: (SRC, **config overrides) -> our model.
      reference: (SRC, our model, ids [batch, seq]) -> reference logits
        [batch, seq, vocab] as float32 numpy; None: no reference exists
        (`reference_name` then says why).
      reference_name: what is printed as the reference.
      max_seq: (our model) -> the longest sequence the comparison is valid for, or None.
      overrides: (our model) -> config overrides to reload with before comparing
        (a reference quirk), or an empty dict.
    """

    name: str
    detect: Callable[[str], bool]
    load: Callable[..., Any]
    reference: Callable[[str, Any, np.ndarray], np.ndarray] | None
    reference_name: str
    max_seq: Callable[[Any], int | None] = lambda model: None
    overrides: Callable[[Any], dict] = lambda model: {}


def _require(module: str, package: str, what: str):
    """Imports `module` or raises ReferenceUnavailable naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReferenceUnavailable(
            f"the reference for {what} needs `{package}`: pip install {package}"
        ) from None


# ---------------------------------------------------------------------------
# Detectors.
# ---------------------------------------------------------------------------

def _hf(model_type: str) -> Callable[[str], bool]:
    return lambda path: common.is_hf_directory(path, model_type)


def is_keras_gemma_preset(path: str) -> bool:
    """A KerasHub preset directory whose config.json names GemmaBackbone."""
    if not gemma.is_keras_preset(path):
        return False
    try:
        with open(os.path.join(path, gemma.KERAS_CONFIG)) as f:
            values = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and values.get("class_name") == "GemmaBackbone"


def _orbax_leaf_names(path: str) -> list[str] | None:
    """The '/'-joined leaf paths of an orbax PyTree checkpoint, from its
    metadata only; None when `path` is no orbax checkpoint."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, common.HF_CONFIG)):
        return None
    if not any(os.path.exists(os.path.join(path, m)) for m in ("_METADATA", "checkpoint", "manifest.ocdbt")):
        return None
    try:
        import orbax.checkpoint as ocp

        metadata = ocp.PyTreeCheckpointer().metadata(path)
    except Exception:  # noqa: BLE001 -- any unreadable directory is "not this format"
        return None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, dict):
        return None
    return list(common.flatten(tree))


def is_official_recurrentgemma(path: str) -> bool:
    names = _orbax_leaf_names(path)
    return bool(names) and any(
        n.removeprefix("params/").startswith("blocks.") for n in names
    ) and any("embedder/input_embedding" in n for n in names)


def is_official_gemma(path: str) -> bool:
    names = _orbax_leaf_names(path)
    return bool(names) and any(
        n.removeprefix("params/").startswith("transformer") for n in names
    )


# ---------------------------------------------------------------------------
# References.
# ---------------------------------------------------------------------------

def _transformers_reference(class_name: str) -> Callable:
    def run(path: str, model, ids: np.ndarray) -> np.ndarray:
        torch = _require("torch", "torch", class_name)
        transformers = _require("transformers", "transformers", class_name)
        # Eager attention: the only one computing Gemma 2's attention soft cap.
        hf_model = getattr(transformers, class_name).from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager").eval()
        with torch.no_grad():
            out = hf_model(torch.as_tensor(ids, dtype=torch.long), use_cache=False)
        return out.logits.float().numpy()

    return run


def _recurrentgemma_window(model) -> int:
    return model.config.attention_window_size


def _keras_reference(path: str, model, ids: np.ndarray) -> np.ndarray:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras_hub = _require("keras_hub", "keras-hub", "a KerasHub preset")
    backbone = keras_hub.models.GemmaBackbone.from_preset(path, dtype="float32")
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return np.asarray(causal_lm.predict_on_batch(inputs), np.float32)


def _keras_overrides(model) -> dict:
    # KerasHub 0.32's decoder block always scales queries by head_dim ** -0.5.
    return {} if model.config.query_head_dim_normalize else {"query_head_dim_normalize": True}


def _official_recurrentgemma_reference(path: str, model, ids: np.ndarray) -> np.ndarray:
    rg = _require("recurrentgemma.jax", "recurrentgemma", "an official RecurrentGemma checkpoint")
    import jax
    import jax.numpy as jnp
    from recurrentgemma import common as rg_common

    c = model.config
    if c.num_key_value_heads != 1:
        raise ReferenceUnavailable("the official recurrentgemma package has one KV head only.")
    kinds = {"recurrent": rg_common.TemporalBlockType.RECURRENT,
             "attention": rg_common.TemporalBlockType.ATTENTION}
    config = rg.GriffinConfig(
        vocab_size=c.vocab_size, width=c.hidden_size, mlp_expanded_width=c.intermediate_size,
        num_heads=c.num_attention_heads, block_types=tuple(kinds[b] for b in c.block_types),
        embeddings_scale_by_sqrt_dim=c.embeddings_scale_by_sqrt_dim,
        attention_window_size=c.attention_window_size, logits_soft_cap=c.logits_soft_cap,
        lru_width=c.lru_width,
    )
    params = common.restore_orbax_tree(path)
    params = params.get("params", params)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    pos = jnp.tile(jnp.arange(ids.shape[1], dtype=jnp.int32), (ids.shape[0], 1))
    griffin = rg.Griffin(config)
    forward = jax.jit(lambda params, ids, pos: griffin.apply(
        {"params": params}, ids, pos, return_cache=False)[0])  # eager flax runs op by op
    logits = forward(params, jnp.asarray(ids, jnp.int32), pos)
    return np.asarray(logits, np.float32)


def _official_gemma_reference(path: str, model, ids: np.ndarray) -> np.ndarray:
    _require("penzai", "penzai", "an official Gemma checkpoint")
    import jax
    import jax.numpy as jnp
    from penzai import pz
    from penzai.models.transformer.variants import gemma as pz_gemma
    from penzai.models.transformer.variants import llamalike_common as lc

    c = model.config
    preset = {
        "num_decoder_blocks": c.num_layers, "vocab_size": c.vocabulary_size,
        "num_kv_heads": c.num_key_value_heads,
        "query_head_multiplier": c.num_query_heads // c.num_key_value_heads,
        "embedding_dim": c.hidden_dim, "projection_dim": c.head_dim,
        "mlp_hidden_dim": c.intermediate_dim // 2,
    }
    if not c.query_head_dim_normalize:
        preset["query_scaling_factor"] = (c.hidden_dim // c.num_query_heads) ** -0.5
    if c.use_post_ffw_norm or c.use_sliding_window_attention:
        preset.update(
            attention_type=(lc.AttentionTypeSlidingWindowCausal(c.sliding_window_size),
                            lc.AttentionTypeGlobalCausal()),
            use_post_attn_norm=c.use_post_attention_norm, use_post_ffw_norm=c.use_post_ffw_norm,
            final_logit_softcap=c.final_logit_soft_cap, attn_logits_soft_cap=c.attention_logit_soft_cap,
        )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), common.restore_orbax_tree(path))
    params = params.get("params", params)
    flat = gemma.flat_leaves(params)
    name = "verify_checkpoint"
    pz_gemma._GEMMA_PRESETS[name] = preset
    pz_gemma._NEEDS_GATING_TRANSPOSE[name] = gemma._gating_transposed(flat, c, None)
    try:
        reference = pz_gemma.gemma_from_pretrained_checkpoint(params, preset_name=name)
    finally:
        del pz_gemma._GEMMA_PRESETS[name], pz_gemma._NEEDS_GATING_TRANSPOSE[name]
    tokens = pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq")
    pos = pz.nx.wrap(jnp.tile(jnp.arange(ids.shape[1]), (ids.shape[0], 1))).tag("batch", "seq")
    forward = pz.variable_jit(lambda model, tokens, pos: model(tokens, token_positions=pos))
    return np.asarray(forward(reference, tokens, pos).unwrap("batch", "seq", "vocabulary"), np.float32)


def _blinkdl_reference(path: str, model, ids: np.ndarray) -> np.ndarray:
    # BlinkDL's module reads these at import time: pure torch, no JIT, no rescaling.
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ.pop("RWKV_V7_ON", None)
    os.environ.pop("RWKV_RESCALE_LAYER", None)
    _require("torch", "torch", "a BlinkDL checkpoint")
    blinkdl = _require("rwkv.model", "rwkv", "a BlinkDL checkpoint")
    runtime = blinkdl.RWKV(model=path.removesuffix(".pth"), strategy="cpu fp32", verbose=False)
    rows = []
    for row in ids:
        tokens = [int(t) for t in row]
        if runtime.args.n_att == runtime.args.n_embd:  # his sequence mode needs this
            logits, _ = runtime.forward(tokens, None, full_output=True)
            logits = logits.numpy().reshape(len(tokens), -1)
        else:  # his one-token RNN mode
            state, steps = None, []
            for t in tokens:
                out, state = runtime.forward([t], state)
                steps.append(out.numpy())
            logits = np.stack(steps)
        rows.append(logits)
    return np.stack(rows).astype(np.float32)


_X070_SETTINGS = {"RWKV_V7_ON": "1", "RWKV_JIT_ON": "0", "RWKV_CUDA_ON": "0"}


def blinkdl_x070_module():
    """BlinkDL's ``rwkv.model`` for RWKV-7: the module reads ``RWKV_V7_ON`` when
    it is imported, so its file is executed afresh with the x070 settings as a
    private module (``rwkv.model`` itself and the environment are left as they
    were: RWKV-4 files keep working in the same process)."""
    import importlib.util

    _require("torch", "torch", "a BlinkDL checkpoint")
    try:  # find, not import: importing reads the settings
        spec = importlib.util.find_spec("rwkv.model")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ReferenceUnavailable(
            "the reference for a BlinkDL checkpoint needs `rwkv`: pip install rwkv"
        )
    origin = spec.origin
    saved = {name: os.environ.get(name) for name in _X070_SETTINGS}
    os.environ.update(_X070_SETTINGS)
    try:
        private = importlib.util.spec_from_file_location("_blinkdl_rwkv_x070", origin)
        module = importlib.util.module_from_spec(private)
        private.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return module


def _blinkdl7_reference(path: str, model, ids: np.ndarray) -> np.ndarray:
    runtime = blinkdl_x070_module().RWKV_x070(model=path.removesuffix(".pth"), strategy="cpu fp32")
    rows = []
    for row in ids:
        tokens = [int(t) for t in row]
        logits, _ = runtime.forward(tokens, None, full_output=len(tokens) > 1)
        rows.append(logits.numpy().reshape(len(tokens), -1))
    return np.stack(rows).astype(np.float32)


FORMATS: tuple[Format, ...] = (
    Format("hf-recurrentgemma", _hf(recurrentgemma.HF_MODEL_TYPE), recurrentgemma.load_hf_checkpoint,
           _transformers_reference("RecurrentGemmaForCausalLM"),
           "transformers RecurrentGemmaForCausalLM", max_seq=_recurrentgemma_window),
    Format("hf-gemma", _hf("gemma"), gemma.load_hf_checkpoint, _transformers_reference("GemmaForCausalLM"),
           "transformers GemmaForCausalLM"),
    Format("hf-gemma2", _hf("gemma2"), gemma.load_hf_checkpoint, _transformers_reference("Gemma2ForCausalLM"),
           "transformers Gemma2ForCausalLM"),
    Format("hf-rwkv", _hf("rwkv"), rwkv.load_hf_checkpoint, _transformers_reference("RwkvForCausalLM"),
           "transformers RwkvForCausalLM"),
    Format("hf-mamba", _hf("mamba"), mamba.load_hf_checkpoint, _transformers_reference("MambaForCausalLM"),
           "transformers MambaForCausalLM"),
    Format("hf-mamba2", _hf("mamba2"), mamba.load_hf_checkpoint,
           _transformers_reference("Mamba2ForCausalLM"), "transformers Mamba2ForCausalLM"),
    Format("keras-gemma", is_keras_gemma_preset, gemma.load_keras_preset, _keras_reference,
           "keras-hub GemmaCausalLM (jax)", overrides=_keras_overrides),
    Format("official-recurrentgemma", is_official_recurrentgemma,
           recurrentgemma.load_official_checkpoint, _official_recurrentgemma_reference,
           "recurrentgemma (official)"),
    Format("official-gemma", is_official_gemma, gemma.load_official_checkpoint,
           _official_gemma_reference, "penzai Gemma"),
    Format("blinkdl-rwkv", rwkv.is_blinkdl_checkpoint, rwkv.load_blinkdl_checkpoint,
           _blinkdl_reference, "rwkv (BlinkDL runtime, cpu fp32)"),
    Format("blinkdl-rwkv7", rwkv.is_blinkdl7_checkpoint, rwkv.load_blinkdl_checkpoint,
           _blinkdl7_reference, "rwkv (BlinkDL x070 runtime, cpu fp32)"),
    Format("h3", h3.is_original_checkpoint, h3.load_checkpoint, None,
           "no installed reference implementation exists for H3 (the original"
           " HazyResearch/H3 code is not a pip package), so it cannot be verified"),
)


def detect(path: str) -> Format:
    """The first format of `FORMATS` that `path` is; ValueError if none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist.")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    raise ValueError(
        f"{path}: unknown checkpoint format; expected one of "
        + ", ".join(f.name for f in FORMATS) + " (see python -m checkpoints_conversion.verify --help)."
    )


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    from recurrent_lm import jit_forward  # compiled: eager penzai runs op by op

    return np.asarray(jit_forward(model)(ids), np.float32)


def max_relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@dataclasses.dataclass(frozen=True)
class Result:
    format: str
    reference: str
    seq: int
    batch: int
    error: float

    def line(self) -> str:
        return (f"{self.format}: max relative logit error {self.error:.3e} vs {self.reference}"
                f" (batch {self.batch}, seq {self.seq})")


def verify(path: str, *, seq: int = 16, batch: int = 2, seed: int = 0) -> Result:
    """Loads `path` as ours and as its reference; compares logits on random tokens."""
    path = os.fspath(path)
    fmt = detect(path)
    if fmt.reference is None:
        raise ReferenceUnavailable(f"{path} ({fmt.name} format): {fmt.reference_name}.")
    model = fmt.load(path, param_dtype="float32")
    extra = fmt.overrides(model)
    if extra:
        model = fmt.load(path, param_dtype="float32", **extra)
    limit = fmt.max_seq(model)
    if limit is not None and seq > limit:
        print(f"note: {fmt.name}: sequence cut from {seq} to {limit}, the longest the"
              " reference computes as ours does.", file=sys.stderr)
        seq = limit
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    expected = fmt.reference(path, model, ids)
    actual = our_logits(model, ids)
    if actual.shape != expected.shape:
        raise ValueError(f"logits shapes differ: ours {actual.shape}, reference {expected.shape}.")
    return Result(fmt.name, fmt.reference_name, seq, batch, max_relative_error(actual, expected))


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m checkpoints_conversion.verify", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="checkpoint directory or file")
    parser.add_argument("--seq", type=int, default=16, help="sequence length (default 16)")
    parser.add_argument("--batch", type=int, default=2, help="rows (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tokens")
    args = parser.parse_args(argv)
    if args.seq < 1 or args.batch < 1:
        parser.error("--seq and --batch must be positive")
    with contextlib.redirect_stdout(sys.stderr):  # references' chatter off the result line
        result = verify(args.src, seq=args.seq, batch=args.batch, seed=args.seed)
    print(result.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
