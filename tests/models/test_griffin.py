"""Griffin against the official `recurrentgemma` package, config checks, input errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import (
    CASES,
    case_inputs,
    max_relative_error,
    named_tokens,
    official_apply,
    official_params,
)
from penzai import pz

import recurrent_lm
from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm import interp
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.layers import RGLRU, recurrence
from recurrent_lm.models import griffin
from recurrent_lm.params import abstract_parameters, cast_parameters


def our_model(case, **kwargs):
    return convert.from_official_params(official_params(case), **case.overrides(), **kwargs)


def test_logits_match_official_float32(official_case):
    """Plain, packed and left-padded rows; every position, pads included."""
    ids, pos = case_inputs(official_case)
    expected = official_apply(official_case)(official_params(official_case), ids, pos)
    model = our_model(official_case)
    tokens, segment_pos = named_tokens(ids, pos)
    logits = model(tokens, segment_pos=segment_pos)
    assert dict(logits.named_shape) == {
        "batch": official_case.batch, "seq": official_case.seq, "vocabulary": official_case.vocab,
    }
    assert max_relative_error(logits.unwrap("batch", "seq", "vocabulary"), expected) <= 1e-5


@pytest.mark.parametrize("method", recurrence.SCAN_METHODS)
def test_every_scan_method_matches_official_under_jit(method):
    case = CASES["hybrid"]
    ids, pos = case_inputs(case)
    expected = official_apply(case)(official_params(case), ids, pos)
    forward = recurrent_lm.jit_forward(our_model(case, scan_method=method))
    assert max_relative_error(forward(ids, pos), expected) <= 1e-5


def test_bfloat16_matches_official_bfloat16():
    """bf16 parameters and compute on both sides.

    Two bf16 computations of the same function differ by rounding order alone,
    so the bound is relative to how far the official bf16 run itself is from the
    float32 run on the same (bf16-rounded) weights: ours must be no further.
    """
    case = CASES["hybrid"]
    ids, pos = case_inputs(case)
    params_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), official_params(case))
    params_f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params_bf16)
    reference = official_apply(case)(params_f32, ids, pos)
    official_bf16 = official_apply(case)(params_bf16, ids, pos)
    assert official_bf16.dtype == jnp.bfloat16
    model = convert.from_official_params(params_bf16, **case.overrides())
    assert model.config.param_dtype == "bfloat16"
    ours = recurrent_lm.jit_forward(model)(ids, pos)
    assert ours.dtype == jnp.bfloat16
    official_error = max_relative_error(official_bf16, reference)
    our_error = max_relative_error(ours, reference)
    assert official_error < 0.05
    assert our_error <= 1.5 * official_error + 1e-3
    assert max_relative_error(ours, official_bf16) <= 2 * official_error + 1e-3


def test_cast_parameters_matches_official_compute_dtype():
    """Official Griffin(dtype=bf16) on float32 weights == ours with weights cast to bf16."""
    import recurrentgemma.jax as rg

    case = CASES["hybrid"]
    ids, pos = case_inputs(case)
    official = rg.Griffin(case.official_config(), dtype=jnp.bfloat16)
    expected, _ = jax.jit(lambda p, i, s: official.apply({"params": p}, i, s, return_cache=False))(
        official_params(case), ids, pos)
    model = cast_parameters(our_model(case), jnp.bfloat16)
    assert model.config.param_dtype == "bfloat16"
    ours = recurrent_lm.jit_forward(model)(ids, pos)
    assert ours.dtype == expected.dtype == jnp.bfloat16
    # Same bf16 arithmetic; only rounding order may differ (see the bf16 test for the scale).
    assert max_relative_error(ours, expected) <= 2e-2
    labels = [p.label for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence()]
    assert labels.count("embedder.embeddings") == 2  # still one tied table, used twice


def test_default_segment_pos_is_one_document_per_row():
    case = CASES["hybrid"]
    ids, _ = case_inputs(case)
    model = our_model(case)
    tokens = named_tokens(ids)
    plain = np.broadcast_to(np.arange(case.seq, dtype=np.int32), ids.shape)
    np.testing.assert_array_equal(
        model(tokens).unwrap("batch", "seq", "vocabulary"),
        model(tokens, segment_pos=named_tokens(plain)).unwrap("batch", "seq", "vocabulary"),
    )


def test_padded_row_gives_the_unpadded_logits():
    case = CASES["hybrid"]
    model = our_model(case)
    ids = np.asarray(jax.random.randint(jax.random.key(3), (1, 10), 0, case.vocab), np.int32)
    alone = model(named_tokens(ids)).unwrap("batch", "seq", "vocabulary")
    padded_ids = np.concatenate([np.zeros((1, 4), np.int32), ids], axis=1)
    padded_pos = np.concatenate([-np.ones((1, 4), np.int32), np.arange(10, dtype=np.int32)[None]], axis=1)
    tokens, segment_pos = named_tokens(padded_ids, padded_pos)
    padded = model(tokens, segment_pos=segment_pos)
    np.testing.assert_allclose(padded.unwrap("batch", "seq", "vocabulary")[:, 4:], alone, rtol=1e-5, atol=1e-5)


def test_packed_documents_do_not_interact():
    case = CASES["hybrid"]
    model = our_model(case)
    a = np.asarray(jax.random.randint(jax.random.key(4), (1, 7), 0, case.vocab), np.int32)
    b = np.asarray(jax.random.randint(jax.random.key(5), (1, 9), 0, case.vocab), np.int32)
    packed = np.concatenate([a, b], axis=1)
    pos = np.concatenate([np.arange(7), np.arange(9)]).astype(np.int32)[None]
    logits = model(named_tokens(packed), segment_pos=named_tokens(pos)).unwrap("batch", "seq", "vocabulary")
    for doc, sl in ((a, slice(0, 7)), (b, slice(7, 16))):
        alone = model(named_tokens(doc)).unwrap("batch", "seq", "vocabulary")
        np.testing.assert_allclose(logits[:, sl], alone, rtol=1e-5, atol=1e-5)


def test_residual_stream_after_every_block():
    case = CASES["hybrid"]
    model = our_model(case)
    ids, pos = case_inputs(case)
    tokens, segment_pos = named_tokens(ids, pos)
    logits, stream = interp.residual_stream(model, tokens, segment_pos=segment_pos, include_embeddings=True)
    assert dict(stream.named_shape) == {
        "layers": len(case.blocks) + 1, "batch": case.batch, "seq": case.seq, "embedding": case.width,
    }
    x = model.embedder(tokens)
    np.testing.assert_array_equal(stream[{"layers": 0}].unwrap("batch", "seq", "embedding"),
                                  x.unwrap("batch", "seq", "embedding"))
    # Each block compiled (op by op, a block compiles hundreds of tiny kernels).
    run_block = pz.variable_jit(lambda block, x, pos: block(x, context=DocumentContext.build(pos)))
    for i, block in enumerate(model.blocks.sublayers):
        x = run_block(block, x, segment_pos)
        np.testing.assert_allclose(stream[{"layers": i + 1}].unwrap("batch", "seq", "embedding"),
                                   x.unwrap("batch", "seq", "embedding"), rtol=1e-5, atol=1e-5)
    final = model.head(model.final_norm(stream[{"layers": -1}]))
    np.testing.assert_allclose(final.unwrap("batch", "seq", "vocabulary"),
                               logits.unwrap("batch", "seq", "vocabulary"), rtol=1e-5, atol=1e-5)


def test_with_scan_method_sets_every_recurrent_layer():
    model = griffin.build_model(
        griffin.GriffinConfig(vocab_size=11, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                              num_hidden_layers=3),
        jax.random.key(0),
    )
    chunked = recurrence.with_scan_method(model, "chunked")
    methods = [l.scan_method for l in pz.select(chunked).at_instances_of(RGLRU).get_sequence()]
    assert methods == ["chunked", "chunked"]
    assert chunked.config.scan_method == "chunked"  # what recurrent_lm.save writes
    tokens = named_tokens(np.arange(6, dtype=np.int32)[None])
    np.testing.assert_allclose(chunked(tokens).unwrap("batch", "seq", "vocabulary"),
                               model(tokens).unwrap("batch", "seq", "vocabulary"), rtol=1e-5, atol=1e-6)


def test_forward_has_no_quadratic_cumulative_ops():
    """cumsum / cumlogsumexp lower to O(T^2) reduce_window on XLA:CPU (JAX 0.10)."""
    case = CASES["hybrid"]
    skeleton, frozen = pz.unbind_params(our_model(case), freeze=True)
    ids, pos = case_inputs(case)
    for method in recurrence.SCAN_METHODS:
        model = recurrence.with_scan_method(skeleton, method)

        def forward(values, ids, pos):
            tokens, segment_pos = named_tokens(ids, pos)
            return model.bind_variables(values)(tokens, segment_pos=segment_pos).unwrap(
                "batch", "seq", "vocabulary")

        text = str(jax.make_jaxpr(forward)(frozen, ids, pos))
        for op in ("cumsum", "cumlogsumexp", "cumprod", "cummax", "reduce_window"):
            assert op not in text, f"{op} in the {method} forward"


def test_init_matches_official_statistics():
    """build_model draws every parameter from the official initialiser's distribution."""
    config = griffin.GriffinConfig(vocab_size=512, hidden_size=256, lru_width=256, num_attention_heads=4,
                                   intermediate_size=384, num_hidden_layers=3, attention_window_size=8)
    from recurrent_lm.params import parameter_values

    values = {k: np.asarray(v.unwrap(*v.named_shape)) for k, v in
              parameter_values(griffin.build_model(config, jax.random.key(0))).items()}
    std = lambda label: values[label].std()
    assert std("embedder.embeddings") == pytest.approx(256**-0.5, rel=0.05)
    assert std("blocks.0.recurrent_block.linear_x.weights") == pytest.approx(256**-0.5, rel=0.05)
    assert std("blocks.0.recurrent_block.linear_out.weights") == pytest.approx((2 / 3 / 256) ** 0.5, rel=0.05)
    assert std("blocks.0.mlp_block.down.weights") == pytest.approx((2 / 3 / 384) ** 0.5, rel=0.05)
    assert std("blocks.0.recurrent_block.conv_1d.weights") == pytest.approx((0.01 / 4) ** 0.5, rel=0.1)
    assert std("blocks.0.recurrent_block.rg_lru.a_gate.weights") == pytest.approx(64**-0.5, rel=0.05)
    radius = np.exp(-np.log1p(np.exp(values["blocks.0.recurrent_block.rg_lru.a_param"])))
    assert 0.9 <= radius.min() and radius.max() <= 0.999
    assert np.all(values["blocks.0.temporal_pre_norm.scale"] == 0)
    assert np.all(values["blocks.2.attention_block.output.bias"] == 0)


@pytest.mark.parametrize(
    "preset, total, embedding, leaves",
    [("recurrentgemma-2b", 2_682_862_080, 655_360_000, 432),
     ("recurrentgemma-9b", 8_579_977_216, 1_048_576_000, 628)],
)
def test_presets_have_the_released_sizes(preset, total, embedding, leaves):
    config = griffin.GriffinConfig.from_preset(preset)
    shapes = abstract_parameters(lambda key: griffin.build_model(config, key))
    assert sum(math.prod(v.named_shape.values()) for v in shapes.values()) == total
    assert math.prod(shapes["embedder.embeddings"].named_shape.values()) == embedding
    assert len(convert.leaf_layouts(config)) == leaves


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="recurrentgemma-2b.*recurrentgemma-9b"):
        griffin.GriffinConfig.from_preset("recurrentgemma-7b")


def test_preset_depth_override_rederives_block_pattern():
    config = griffin.GriffinConfig.from_preset("recurrentgemma-2b", num_hidden_layers=4)
    assert config.block_types == ("recurrent", "recurrent", "attention", "recurrent")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=3), "num_attention_heads 3 does not divide hidden_size 16"),
        (dict(lru_width=21), "does not divide lru_width 21"),
        (dict(block_types=("recurrent", "attention")), "len\\(block_types\\) = 2 but num_hidden_layers = 3"),
        (dict(block_types=("recurrent", "mamba", "attention")), "'mamba'"),
        (dict(num_key_value_heads=3), "num_key_value_heads 3 does not divide"),
        (dict(partial_rotary_factor=0.125), "must be an even integer"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap must be >= 0"),
        (dict(param_dtype="int8"), "param_dtype must be one of .*got 'int8'"),
    ],
)
def test_inconsistent_config_fails_at_construction(overrides, message):
    fields = dict(vocab_size=11, hidden_size=16, num_attention_heads=2, intermediate_size=8, num_hidden_layers=3)
    with pytest.raises(ValueError, match=message):
        griffin.GriffinConfig(**{**fields, **overrides})


def test_config_dict_round_trip():
    config = griffin.GriffinConfig.from_preset("recurrentgemma-9b", attention_window_size=512)
    assert griffin.GriffinConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GriffinConfig fields \\['width'\\]"):
        griffin.GriffinConfig.from_dict({**config.to_dict(), "width": 3})


@pytest.fixture(scope="module")
def small_model():
    config = griffin.GriffinConfig(vocab_size=11, hidden_size=8, num_attention_heads=2, intermediate_size=8,
                                   num_hidden_layers=2, block_types=("recurrent", "attention"))
    return griffin.build_model(config, jax.random.key(0))


def test_token_ids_out_of_range_are_rejected(small_model):
    with pytest.raises(ValueError, match=r"token id 11 at \(batch, seq\) = \(0, 2\) is outside the vocabulary range \[0, 11\)"):
        small_model(named_tokens(np.array([[1, 2, 11, 3]], np.int32)))
    with pytest.raises(ValueError, match="token id -1"):
        small_model(named_tokens(np.array([[1, -1]], np.int32)))
    with pytest.raises(ValueError, match="outside the vocabulary range"):
        recurrent_lm.jit_forward(small_model)(np.array([[1, 40]], np.int32))


def test_wrong_axes_are_rejected(small_model):
    ids = np.zeros((1, 3), np.int32)
    with pytest.raises(ValueError, match=r"tokens must have named axes \['batch', 'seq'\].*missing axes \['seq'\].*unexpected axes \['time'\]"):
        small_model(pz.nx.wrap(ids).tag("batch", "time"))
    with pytest.raises(TypeError, match="must be a penzai NamedArray"):
        small_model(ids)
    with pytest.raises(ValueError, match="unnamed positional axes"):
        small_model(pz.nx.wrap(ids).tag_prefix("batch"))
    with pytest.raises(TypeError, match="integer token ids"):
        small_model(pz.nx.wrap(ids.astype(np.float32)).tag("batch", "seq"))
    with pytest.raises(ValueError, match="segment_pos has named shape"):
        small_model(named_tokens(ids), segment_pos=named_tokens(np.zeros((1, 4), np.int32)))
    with pytest.raises(TypeError, match=r"unknown keyword arguments \['segment_positions'\]"):
        small_model(named_tokens(ids), segment_positions=named_tokens(ids))
    with pytest.raises(ValueError, match="empty 'seq' axis"):
        small_model(named_tokens(np.zeros((1, 0), np.int32)))


def test_config_is_static_metadata(small_model):
    # The config rides along as pytree metadata: jit and tree maps keep it.
    skeleton, frozen = pz.unbind_params(small_model, freeze=True)
    assert jax.tree.map(lambda x: x, skeleton).config == small_model.config
    assert dataclasses.is_dataclass(small_model.config)
