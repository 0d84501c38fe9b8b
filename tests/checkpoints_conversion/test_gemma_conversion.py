"""Loading official Gemma checkpoints written in the release layout, round trips, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from gemma_cases import (
    CASES,
    case_inputs,
    max_relative_error_real,
    official_params,
    official_shapes,
    penzai_model,
    penzai_reference,
)
from griffin_cases import named_tokens
from test_recurrentgemma import assert_trees_identical

import recurrent_lm
from checkpoints_conversion import gemma as convert
from checkpoints_conversion.common import flatten
from recurrent_lm.models import gemma
from recurrent_lm.params import CheckpointMismatchError, abstract_parameters


def nested(flat_key_params):
    """The official package's nested form of a release's flat-key tree."""
    tree: dict = {}
    for path, leaves in flatten(flat_key_params).items():
        node = tree
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = leaves
    return tree


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
    """A random Gemma 2 saved as the release is: orbax, flat module-path keys."""
    case = CASES["gemma2_gqa"]
    path = tmp_path_factory.mktemp(case.name) / "gemma2"
    ocp.PyTreeCheckpointer().save(str(path), jax.tree.map(jnp.asarray, official_params(case)))
    return case, path


def test_release_layout_loads_and_matches_penzai(release_checkpoint):
    case, path = release_checkpoint
    model = convert.load_official_checkpoint(path, **case.overrides())
    ids, pos = case_inputs(case)
    expected = penzai_reference(case, penzai_model(case), ids, pos)
    tokens, segment_pos = named_tokens(ids, pos)  # the eager path: compiled once per session
    logits = model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    assert max_relative_error_real(logits, expected) <= 1e-5


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_official_round_trip_is_bit_exact(case_name):
    """flat-key release form -> ours -> the same leaves (qkv_einsum, q+kv, transposed gating)."""
    case = CASES[case_name]
    params = official_params(case)
    model = convert.from_official_params(params, **case.overrides())
    back = convert.to_official_params(model, flat_keys=True, gating_transposed=case.gating_transposed)
    assert_trees_identical(back, params)
    again = convert.from_official_params(convert.to_official_params(model), **case.overrides())
    assert_trees_identical(convert.to_official_params(again), convert.to_official_params(model))


def test_nested_and_params_wrapped_trees_load():
    case = CASES["gemma1_mqa"]
    flat_key = official_params(case)
    expected = convert.to_official_params(convert.from_official_params(flat_key))
    assert_trees_identical(convert.to_official_params(convert.from_official_params(nested(flat_key))), expected)
    wrapped = {"params": nested(flat_key)}
    assert_trees_identical(convert.to_official_params(convert.from_official_params(wrapped)), expected)


def test_config_is_inferred_from_shapes():
    case = CASES["gemma2_gqa"]
    config = convert.infer_config(official_params(case))
    assert (config.vocabulary_size, config.hidden_dim, config.num_layers) == (case.vocab, case.width, case.layers)
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (6, 2, 12)
    assert config.intermediate_dim == 2 * case.mlp  # Keras convention: both branches
    # Post norms present: Gemma 2 defaults for what shapes cannot give.
    assert config.use_post_ffw_norm and config.use_sliding_window_attention
    assert (config.attention_logit_soft_cap, config.final_logit_soft_cap) == (50.0, 30.0)
    gemma1 = convert.infer_config(official_params(CASES["gemma1_mha"]))
    assert gemma1.num_key_value_heads == gemma1.num_query_heads == 2
    assert not gemma1.use_sliding_window_attention and gemma1.final_logit_soft_cap is None


@pytest.mark.parametrize("preset", sorted(set(gemma.PRESETS) - {"tiny"}))
def test_release_shapes_give_the_release_config(preset):
    """Shapes alone (no arrays) identify each release, e.g. 27B's query scaling."""
    config = gemma.PRESETS[preset]
    layouts = convert.leaf_layouts(config, gating_transposed=preset in ("gemma2-9b", "gemma2-27b"))
    named = {k: v.named_shape
             for k, v in abstract_parameters(lambda key: gemma.build_model(config, key)).items()}
    tree = {f"transformer/{layout.path}": jax.ShapeDtypeStruct(layout.shape(named[layout.labels[0]]),
                                                                jnp.bfloat16)
            for layout in layouts}
    assert convert.infer_config(tree) == dataclasses.replace(config, param_dtype="bfloat16")


PENZAI_PRESETS = {
    "gemma-2b": "gemma_2b",
    "gemma-7b": "gemma_7b",
    "gemma2-2b": "gemma2_2b",
    "gemma2-9b": "gemma2_9b",
    "gemma2-27b": "gemma2_27b",
}


def penzai_parameters(model) -> dict:
    """``{label: value}`` of a penzai model's parameters."""
    from penzai import pz

    return {p.label: p.value for p in pz.unbind_params(model, freeze=True)[1]}


def named_shapes(values) -> dict[str, dict[str, int]]:
    # Outside `jax.eval_shape`: inside, the ints would come out as scalar structs.
    return {label: dict(value.named_shape) for label, value in values.items()}


@pytest.mark.parametrize("preset", sorted(PENZAI_PRESETS))
def test_release_layout_is_the_one_penzai_reads(preset):
    """Our layout table of each release preset, fed (as shapes: `jax.eval_shape`)
    to penzai's own release converter, gives exactly the parameters penzai's
    Gemma of that release declares: the release's leaves, shapes and gating
    transposition are the ones penzai knows."""
    from penzai.models.transformer.variants import gemma as pz_gemma
    from penzai.models.transformer.variants import llamalike_common

    name = PENZAI_PRESETS[preset]
    config = gemma.PRESETS[preset]
    named = {k: v.named_shape
             for k, v in abstract_parameters(lambda key: gemma.build_model(config, key)).items()}
    layouts = convert.leaf_layouts(config, gating_transposed=pz_gemma._NEEDS_GATING_TRANSPOSE[name])
    release: dict = {}
    for layout in layouts:
        module, leaf = f"transformer/{layout.path}".rsplit("/", 1)
        release.setdefault(module, {})[leaf] = jax.ShapeDtypeStruct(
            layout.shape(named[layout.labels[0]]), jnp.bfloat16
        )
    read = named_shapes(jax.eval_shape(
        lambda tree: penzai_parameters(pz_gemma.gemma_from_pretrained_checkpoint(tree, preset_name=name)),
        release,
    ))
    penzai_config = llamalike_common.LlamalikeTransformerConfig(
        **pz_gemma._GEMMA_PRESETS[name], parameter_dtype=jnp.bfloat16, mlp_variant="geglu_approx",
        rope_wavelength=10_000, tie_embedder_and_logits=True, activation_dtype=jnp.bfloat16,
    )
    declared = named_shapes(jax.eval_shape(
        lambda key: penzai_parameters(
            llamalike_common.build_llamalike_transformer(penzai_config, init_base_rng=key, name="transformer")
        ),
        jax.random.key(0),
    ))
    assert len(declared) == len(read) > 100
    assert read == declared


def test_bfloat16_checkpoint_keeps_its_dtype_and_overrides_cast():
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), official_params(CASES["gemma1_mqa"]))
    model = convert.from_official_params(params)
    assert model.config.param_dtype == "bfloat16"
    assert_trees_identical(convert.to_official_params(model, flat_keys=True), params)
    model32 = convert.from_official_params(params, param_dtype="float32")
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(convert.to_official_params(model32)))


def test_convert_cli(release_checkpoint, tmp_path, capsys):
    case, path = release_checkpoint
    args = ["convert", str(path), str(tmp_path / "out"), "--sliding-window-size", str(case.window),
            "--attention-logit-soft-cap", str(case.attn_cap), "--final-logit-soft-cap", str(case.final_cap),
            "--query-head-dim-normalize", "false"]
    assert convert.main(args) == 0
    assert "converted" in capsys.readouterr().out
    model = recurrent_lm.load(tmp_path / "out")
    assert model.config == convert.infer_config(official_params(case), **case.overrides())


def test_every_mismatch_is_listed_with_shapes():
    case = CASES["gemma2_gqa"]
    params = {k: dict(v) for k, v in official_params(case).items()}
    del params["transformer/layer_1/post_ffw_norm"]
    params["transformer/layer_0/attn/q_einsum"]["b"] = np.zeros(12, np.float32)
    params["transformer/layer_2/attn/kv_einsum"]["w"] = np.zeros((2, 3, 36, 12), np.float32)
    params["transformer/layer_3/mlp/linear"]["w"] = np.zeros((31, 36), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        convert.from_official_params(params, **case.overrides())
    message = str(error.value)
    assert "missing     transformer/layer_1/post_ffw_norm/scale: expected shape (36,)" in message
    assert "unexpected  transformer/layer_0/attn/q_einsum/b: found shape (12,)" in message
    assert "mis-shaped  transformer/layer_2/attn/kv_einsum/w: expected (2, 2, 36, 12), found (2, 3, 36, 12)" in message
    assert "mis-shaped  transformer/layer_3/mlp/linear/w: expected (30, 36), found (31, 36)" in message


def test_structural_problems_are_named():
    params = official_params(CASES["gemma1_mqa"])
    with pytest.raises(CheckpointMismatchError, match="under 'transformer'; found roots \\['model'\\]"):
        convert.from_official_params({k.replace("transformer/", "model/"): v for k, v in params.items()})
    gap = {k.replace("layer_2/", "layer_5/"): v for k, v in params.items()}
    with pytest.raises(ValueError, match=r"not numbered 0..n-1: found layers \[0, 1, 5\]"):
        convert.from_official_params(gap)
    no_attn = {k: v for k, v in params.items() if "layer_0/attn/attn_vec_einsum" not in k}
    with pytest.raises(CheckpointMismatchError, match="missing     transformer/layer_0/attn/attn_vec_einsum"):
        convert.from_official_params(no_attn)
    bad_rank = {**params, "transformer/layer_0/mlp/linear": {"w": np.zeros((40, 48, 1), np.float32)}}
    with pytest.raises(CheckpointMismatchError,
                       match=r"mis-shaped  transformer/layer_0/mlp/linear/w: expected \(F, D\), found \(40, 48, 1\)"):
        convert.from_official_params(bad_rank)
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        convert.from_official_params(params, hidden_dim=-1)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped  transformer/embedder/input_embedding"):
        convert.from_official_params(params, hidden_dim=32)


def test_fused_qkv_needs_as_many_kv_heads_as_query_heads():
    config = convert.infer_config(official_params(CASES["gemma1_mqa"]))
    with pytest.raises(ValueError, match="fused qkv_einsum needs num_key_value_heads == num_query_heads"):
        convert.leaf_layouts(config, qkv_einsum=True)
    assert set(official_shapes(CASES["gemma1_mha"])) == {
        f"transformer/{layout.path}"
        for layout in convert.leaf_layouts(convert.infer_config(official_params(CASES["gemma1_mha"])))
    }


def test_to_official_rejects_other_models():
    class Other:
        config = object()

    with pytest.raises(TypeError, match="expected a Gemma model"):
        convert.to_official_params(Other())
