"""Gemma 1 / 2 against penzai 0.2.5's own Gemma converter, config checks, input errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemma_cases import (
    CASES,
    case_inputs,
    max_relative_error_real,
    official_params,
    penzai_model,
    penzai_reference,
)
from griffin_cases import max_relative_error, named_tokens
from penzai import pz

import recurrent_lm
from checkpoints_conversion import gemma as convert
from recurrent_lm.layers import Attention
from recurrent_lm.models import gemma
from recurrent_lm.params import abstract_parameters


def our_model(case, params=None, **kwargs):
    params = official_params(case) if params is None else params
    return convert.from_official_params(params, **case.overrides(), **kwargs)


def logits_of(model, ids, pos=None):
    if pos is None:
        return model(named_tokens(ids)).unwrap("batch", "seq", "vocabulary")
    tokens, segment_pos = named_tokens(ids, pos)
    return model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_logits_match_penzai_float32(case_name):
    """Plain, packed, left-padded and padded+packed rows: every real token gets
    the logits penzai gives its document run alone."""
    case = CASES[case_name]
    ids, pos = case_inputs(case)
    expected = penzai_reference(case, penzai_model(case), ids, pos)
    logits = logits_of(our_model(case), ids, pos)
    assert logits.shape == (case.batch, case.seq, case.vocab)
    assert max_relative_error_real(logits, expected) <= 1e-5


def test_sliding_layers_alternate_and_window_counts_the_current_token():
    case = CASES["gemma2_gqa"]
    model = our_model(case)
    windows = [a.window_size for a in pz.select(model).at_instances_of(Attention).get_sequence()]
    # sliding_window_size 4 = the current token and 3 before it.
    assert windows == [3, None, 3, None]
    assert [model.config.is_sliding(i) for i in range(4)] == [True, False, True, False]


def test_upcast_runs_bfloat16_weights_in_float32(tmp_path):
    """penzai's upcast_activations_to_float32: bf16 parameters, f32 activations,
    the same logits as f32 parameters holding the same (bf16) values."""
    case = CASES["gemma2_gqa"]
    ids, pos = case_inputs(case)
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), official_params(case))
    upcast = our_model(case, bf16, upcast_activations_to_float32=True)
    assert upcast.config.param_dtype == "bfloat16"
    reference = our_model(case, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), bf16))
    logits = logits_of(upcast, ids, pos)
    assert logits.dtype == jnp.float32
    assert max_relative_error(logits, logits_of(reference, ids, pos)) <= 1e-5
    # The option is part of the config, so a saved model reloads upcast.
    recurrent_lm.save(upcast, tmp_path / "upcast")
    again = recurrent_lm.load(tmp_path / "upcast")
    assert again.config.upcast_activations_to_float32 and again.config == upcast.config
    np.testing.assert_array_equal(logits_of(again, ids, pos), logits)


def test_bfloat16_matches_penzai_bfloat16():
    """bf16 parameters and compute on both sides.

    Two bf16 computations of the same function differ by rounding order alone
    (and penzai rounds ``1 + scale`` of each norm to bf16), so the bound is
    relative to how far penzai's bf16 run is from the float32 run on the same
    (bf16-rounded) weights: ours must be about as close.
    """
    case = CASES["gemma1_mqa"]
    ids, pos = case_inputs(case)
    bf16 = jax.tree.map(lambda x: np.asarray(x, jnp.bfloat16), official_params(case))
    f32 = jax.tree.map(lambda x: np.asarray(x, np.float32), bf16)
    reference = penzai_reference(case, penzai_model(case, f32), ids, pos)
    theirs = penzai_reference(case, penzai_model(case, bf16), ids, pos)
    model = our_model(case, bf16)
    assert model.config.param_dtype == "bfloat16"
    ours = logits_of(model, ids, pos)
    assert ours.dtype == jnp.bfloat16
    penzai_error = max_relative_error_real(theirs, reference)
    assert penzai_error < 0.02
    assert max_relative_error_real(ours, reference) <= 1.5 * penzai_error + 1e-3
    assert max_relative_error_real(ours, theirs) <= 2.5 * penzai_error + 1e-3


def test_padded_row_gives_the_unpadded_logits():
    case = CASES["gemma2_gqa"]
    model = our_model(case)
    ids = np.asarray(jax.random.randint(jax.random.key(3), (1, 10), 0, case.vocab), np.int32)
    alone = logits_of(model, ids)
    padded_ids = np.concatenate([np.zeros((1, 5), np.int32), ids], axis=1)
    padded_pos = np.concatenate([-np.ones((1, 5), np.int32), np.arange(10, dtype=np.int32)[None]], axis=1)
    np.testing.assert_allclose(logits_of(model, padded_ids, padded_pos)[:, 5:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "preset, total, layouts",
    [("gemma-2b", 2_506_434_560, 128), ("gemma-7b", 8_538_074_112, 170),
     ("gemma2-2b", 2_614_636_800, 236), ("gemma2-9b", 9_242_164_736, 380),
     ("gemma2-27b", 27_227_718_144, 416)],
)
def test_presets_have_the_released_sizes(preset, total, layouts):
    """Parameter counts of the Flax releases (Keras' counts + 128 embedding rows)."""
    config = gemma.GemmaConfig.from_preset(preset)
    shapes = abstract_parameters(lambda key: gemma.build_model(config, key))
    assert sum(math.prod(v.named_shape.values()) for v in shapes.values()) == total
    assert len(convert.leaf_layouts(config)) == layouts


def test_tiny_preset_builds_runs_and_checks_inputs():
    config = gemma.GemmaConfig.from_preset("tiny")
    assert config.num_layers <= 4 and config.hidden_dim <= 128
    model = gemma.build_model(config, jax.random.key(0))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    logits = recurrent_lm.jit_forward(model)(ids)
    assert logits.shape == (2, 6, config.vocabulary_size)
    assert np.all(np.isfinite(logits))
    assert np.abs(logits).max() <= config.final_logit_soft_cap
    with pytest.raises(ValueError, match="token id 256 .* outside the vocabulary range \\[0, 256\\)"):
        model(named_tokens(np.array([[1, 256]], np.int32)))
    with pytest.raises(ValueError, match="missing axes \\['seq'\\]"):
        model(pz.nx.wrap(np.zeros((1, 3), np.int32)).tag("batch", "time"))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="gemma-2b.*gemma2-27b.*tiny"):
        gemma.GemmaConfig.from_preset("gemma3-1b")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads 3 does not divide num_query_heads 4"),
        (dict(intermediate_dim=31), "intermediate_dim 31 must be even"),
        (dict(head_dim=7), "head_dim 7 must be even"),
        (dict(hidden_dim=0), "hidden_dim must be a positive integer"),
        (dict(sliding_window_size=0), "sliding_window_size must be a positive integer"),
        (dict(attention_logit_soft_cap=0.0), "attention_logit_soft_cap must be None \\(off\\) or > 0"),
        (dict(final_logit_soft_cap=-30.0), "final_logit_soft_cap must be None"),
        (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon must be > 0"),
        (dict(dropout=0.1), "dropout must be 0"),
        (dict(use_post_ffw_norm="yes"), "use_post_ffw_norm must be a bool"),
        (dict(param_dtype="int8"), "param_dtype must be one of .*got 'int8'"),
        (dict(param_dtype="nonsense"), "param_dtype must be one of .*got 'nonsense'"),
    ],
)
def test_inconsistent_config_fails_at_construction(overrides, message):
    fields = dict(vocabulary_size=11, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                  hidden_dim=16, intermediate_dim=32, head_dim=8)
    with pytest.raises(ValueError, match=message):
        gemma.GemmaConfig(**{**fields, **overrides})


def test_config_dict_round_trip_and_keras_names():
    config = gemma.GemmaConfig.from_preset("gemma2-27b", sliding_window_size=512)
    assert gemma.GemmaConfig.from_dict(config.to_dict()) == config
    assert config.mlp_width == 36_864 and config.query_scale == 144**-0.5
    assert config.vocab_size == config.vocabulary_size
    with pytest.raises(ValueError, match="unknown GemmaConfig fields \\['hidden_size'\\]"):
        gemma.GemmaConfig.from_dict({**config.to_dict(), "hidden_size": 3})


def test_save_and_load_our_format(tmp_path):
    import recurrent_lm

    model = our_model(CASES["gemma2_gqa"])
    recurrent_lm.save(model, tmp_path / "ckpt")
    loaded = recurrent_lm.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    ids, pos = case_inputs(CASES["gemma2_gqa"])
    np.testing.assert_array_equal(logits_of(loaded, ids, pos), logits_of(model, ids, pos))
    assert dataclasses.is_dataclass(loaded.config)
