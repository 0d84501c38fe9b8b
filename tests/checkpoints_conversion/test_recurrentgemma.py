"""Loading official RecurrentGemma checkpoints written in the release layout."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from griffin_cases import (
    CASES,
    case_inputs,
    max_relative_error,
    named_tokens,
    official_apply,
    official_params,
)

import recurrent_lm
from checkpoints_conversion import recurrentgemma as convert
from checkpoints_conversion.common import flatten, unflatten
from recurrent_lm.models import griffin
from recurrent_lm.params import (
    CheckpointMismatchError,
    abstract_parameters,
    parameter_values,
)


def assert_trees_identical(actual, expected):
    actual, expected = flatten(actual), flatten(expected)
    assert expected and sorted(actual) == sorted(expected)
    for path in expected:
        a, e = np.asarray(actual[path]), np.asarray(expected[path])
        assert a.dtype == e.dtype and a.shape == e.shape, path
        np.testing.assert_array_equal(a, e, err_msg=path)


@pytest.fixture(scope="module", params=["hybrid", "attention_first"])
def release_checkpoint(request, tmp_path_factory):
    """A random official model saved as the release is: orbax, bare tree."""
    case = CASES[request.param]
    path = tmp_path_factory.mktemp(case.name) / "2b"
    ocp.PyTreeCheckpointer().save(str(path), jax.tree.map(jnp.asarray, official_params(case)))
    return case, path


def test_release_layout_loads_and_matches_official(release_checkpoint):
    case, path = release_checkpoint
    model = convert.load_official_checkpoint(path, **case.overrides())
    ids, pos = case_inputs(case)
    expected = official_apply(case)(official_params(case), ids, pos)
    assert max_relative_error(recurrent_lm.jit_forward(model)(ids, pos), expected) <= 1e-5


def test_params_root_also_loads(tmp_path):
    """The official package's own save_parameters writes {"params": tree}."""
    import recurrentgemma.jax as rg

    case = CASES["hawk"]
    rg.utils.save_parameters(str(tmp_path / "ckpt"), jax.tree.map(jnp.asarray, official_params(case)))
    model = convert.load_official_checkpoint(tmp_path / "ckpt", **case.overrides())
    assert_trees_identical(convert.to_official_params(model), official_params(case))


def test_official_round_trip_is_bit_exact(official_case):
    params = official_params(official_case)
    model = convert.from_official_params(params, **official_case.overrides())
    assert_trees_identical(convert.to_official_params(model), params)


@pytest.mark.parametrize(
    "preset, official",
    [("recurrentgemma-2b", "RECURRENT_GEMMA_2B_V1"), ("recurrentgemma-9b", "RECURRENT_GEMMA_9B_V1")],
)
def test_release_presets_have_the_shapes_of_the_official_init(preset, official):
    """Our layout table for each release preset lists exactly the leaves, and
    shapes, that recurrentgemma's own `init` of that release creates
    (`jax.eval_shape`: no arrays)."""
    import recurrentgemma.jax as rg
    from recurrentgemma import common

    config = griffin.PRESETS[preset]
    official_config = rg.GriffinConfig.from_preset(
        common.Preset[official], vocab_size=config.vocab_size
    )
    ids, pos = jnp.zeros((1, 2), jnp.int32), jnp.arange(2)[None]
    tree = jax.eval_shape(
        lambda key: rg.Griffin(official_config).init(key, ids, pos)["params"], jax.random.key(0)
    )
    expected = {path: tuple(leaf.shape) for path, leaf in flatten(tree).items()}
    named = {
        label: value.named_shape
        for label, value in abstract_parameters(lambda key: griffin.build_model(config, key)).items()
    }
    ours = {
        layout.path: layout.shape(named[layout.labels[0]])
        for layout in convert.leaf_layouts(config)
    }
    assert len(expected) > 400
    assert ours == expected


def test_bfloat16_checkpoint_keeps_its_dtype():
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), official_params(CASES["hybrid"]))
    model = convert.from_official_params(params, attention_window_size=5)
    assert {v.dtype for v in parameter_values(model).values()} == {jnp.dtype(jnp.bfloat16)}
    assert_trees_identical(convert.to_official_params(model), params)


def test_param_dtype_override_casts():
    model = convert.from_official_params(official_params(CASES["hawk"]), param_dtype="bfloat16")
    assert {v.dtype for v in parameter_values(model).values()} == {jnp.dtype(jnp.bfloat16)}


def test_config_is_inferred_from_shapes():
    case = CASES["hybrid"]
    config = convert.infer_config(official_params(case))
    assert (config.vocab_size, config.hidden_size, config.lru_width, config.intermediate_size) == (61, 48, 64, 72)
    assert config.num_attention_heads == 4 and config.num_hidden_layers == 3
    assert config.block_types == ("recurrent", "attention", "recurrent")
    assert config.attention_window_size == 2048 and config.logits_soft_cap == 30.0  # release defaults
    only_attention = convert.infer_config(official_params(CASES["attention_only"]))
    assert only_attention.num_attention_heads == 2 and only_attention.head_dim == 16


def test_save_and_load_our_format_is_bit_exact(tmp_path):
    case = CASES["hybrid"]
    model = convert.from_official_params(official_params(case), **case.overrides())
    recurrent_lm.save(model, tmp_path / "ours")
    loaded = recurrent_lm.load(tmp_path / "ours")
    assert loaded.config == model.config
    before, after = parameter_values(model), parameter_values(loaded)
    assert before.keys() == after.keys()
    for label, value in before.items():
        assert dict(after[label].named_shape) == dict(value.named_shape)
        np.testing.assert_array_equal(after[label].unwrap(*value.named_shape), value.unwrap(*value.named_shape))
    ids, pos = case_inputs(case)
    tokens, segment_pos = named_tokens(ids, pos)
    np.testing.assert_array_equal(
        loaded(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary"),
        model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary"),
    )
    with pytest.raises(FileExistsError):
        recurrent_lm.save(model, tmp_path / "ours")


def test_load_rejects_a_directory_that_is_not_ours(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a recurrent_lm checkpoint"):
        recurrent_lm.load(tmp_path)


def test_convert_cli(release_checkpoint, tmp_path, capsys):
    case, path = release_checkpoint
    args = ["convert", str(path), str(tmp_path / "out"), "--attention-window-size", str(case.window),
            "--logits-soft-cap", str(case.soft_cap)]
    if not case.scale_sqrt:
        args.append("--no-embeddings-scale")
    assert convert.main(args) == 0
    assert "converted" in capsys.readouterr().out
    model = recurrent_lm.load(tmp_path / "out")
    assert model.config.attention_window_size == case.window
    ids, pos = case_inputs(case)
    expected = official_apply(case)(official_params(case), ids, pos)
    assert max_relative_error(recurrent_lm.jit_forward(model)(ids, pos), expected) <= 1e-5


def test_every_mismatch_is_listed_with_shapes():
    flat = flatten(official_params(CASES["hybrid"]))
    del flat["blocks.0/recurrent_block/rg_lru/a_param"]
    flat["blocks.1/attention_block/proj_q/bias"] = np.zeros(48, np.float32)
    flat["blocks.2/recurrent_block/conv_1d/w"] = np.zeros((3, 64), np.float32)
    with pytest.raises(CheckpointMismatchError) as error:
        convert.from_official_params(unflatten(flat))
    message = str(error.value)
    assert "missing     blocks.0/recurrent_block/rg_lru/a_param: expected shape (64,)" in message
    assert "unexpected  blocks.1/attention_block/proj_q/bias: found shape (48,)" in message
    assert "mis-shaped  blocks.2/recurrent_block/conv_1d/w: expected (4, 64), found (3, 64)" in message
    assert set(error.value.missing) == {"blocks.0/recurrent_block/rg_lru/a_param"}


def test_override_that_contradicts_the_shapes_is_a_mismatch():
    with pytest.raises(CheckpointMismatchError, match="mis-shaped  embedder/input_embedding: expected \\(61, 32\\)"):
        convert.from_official_params(official_params(CASES["hybrid"]), hidden_size=32, num_attention_heads=4,
                                     lru_width=64)


def test_structural_problems_are_named():
    flat = flatten(official_params(CASES["hybrid"]))
    gap = {k.replace("blocks.2/", "blocks.5/"): v for k, v in flat.items()}
    with pytest.raises(ValueError, match=r"not numbered 0..n-1: found blocks \[0, 1, 5\]"):
        convert.from_official_params(unflatten(gap))
    odd = {k: v for k, v in flat.items() if not k.startswith("blocks.1/attention_block")}
    with pytest.raises(ValueError, match="cannot tell the type of blocks.1"):
        convert.from_official_params(unflatten(odd))
    with pytest.raises(CheckpointMismatchError, match="missing     embedder/input_embedding"):
        convert.from_official_params({"final_norm": {"scale": np.zeros(4)}})


def test_to_official_rejects_other_models():
    class Other:
        config = object()

    with pytest.raises(TypeError, match="expected a Griffin model"):
        convert.to_official_params(Other())
