"""RWKV-4 against HF transformers' RwkvForCausalLM, sampling mode, config checks."""

import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import max_relative_error, named_tokens, segment_layout
from penzai import pz
from rwkv_cases import CASES, case_ids, hf_logits, hf_model, our_model

import recurrent_lm
from checkpoints_conversion import rwkv as convert
from recurrent_lm.core import registry
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import Stateful
from recurrent_lm.layers.channel_mix import ChannelMix
from recurrent_lm.layers.wkv import TimeMix
from recurrent_lm.models import rwkv
from recurrent_lm.params import abstract_parameters, parameter_values
from recurrent_lm.sampling import generate, to_sampling_mode

FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "fixtures", "rwkv_tiny"
)


def logits_of(model, ids, pos=None):
    if pos is None:
        return np.asarray(model(named_tokens(ids)).unwrap("batch", "seq", "vocabulary"))
    tokens, segment_pos = named_tokens(ids, pos)
    return np.asarray(
        model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    )


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_logits_match_hf_training_mode(case_name):
    """HF in training mode (no rescaling); odd widths, attention_hidden_size != hidden_size."""
    case = CASES[case_name]
    ids = case_ids(case)
    expected = hf_logits(hf_model(case, train=True), ids)
    logits = our_model(case)(named_tokens(ids))
    assert dict(logits.named_shape) == {
        "batch": case.batch,
        "seq": case.seq,
        "vocabulary": case.vocab,
    }
    assert (
        max_relative_error(logits.unwrap("batch", "seq", "vocabulary"), expected)
        <= 1e-5
    )


def test_eval_mode_rescaling_changes_only_the_norm_epsilon():
    """HF eval halves the residual every `rescale_every` blocks; through the
    LayerNorms that only moves the epsilon, so ours (never rescaled) stays close."""
    case = CASES["square"]  # rescale_every=1: the largest effect
    ids = case_ids(case)
    model = hf_model(case, train=False)
    evaluated = hf_logits(model, ids)
    assert model.rwkv.layers_are_rescaled
    trained = hf_logits(hf_model(case, train=True), ids)
    ours = logits_of(our_model(case), ids)
    assert max_relative_error(evaluated, trained) > 1e-6  # rescaling did happen
    assert max_relative_error(ours, evaluated) <= 2e-3


def test_packed_and_padded_rows_match_hf_per_document():
    """Each document of a packed / left-padded row equals HF on that document alone."""
    case = dataclasses.replace(CASES["odd"], batch=4)
    ids = (
        np.random.default_rng(3)
        .integers(0, case.vocab, (case.batch, case.seq))
        .astype(np.int32)
    )
    pos = segment_layout(case.batch, case.seq)
    ours = logits_of(our_model(CASES["odd"]), ids, pos)
    reference = hf_model(CASES["odd"])
    compared = 0
    for row in range(case.batch):
        starts = [t for t in range(case.seq) if pos[row, t] == 0] + [case.seq]
        for lo, hi in itertools.pairwise(starts):
            expected = hf_logits(reference, ids[row : row + 1, lo:hi])
            assert max_relative_error(ours[row : row + 1, lo:hi], expected) <= 1e-5, (
                row,
                lo,
            )
            compared += hi - lo
    assert compared == (pos >= 0).sum()  # every real position


@pytest.fixture(scope="module")
def fixture_model():
    from safetensors.numpy import load_file

    with open(os.path.join(FIXTURE, "rwkv_tiny_config.json")) as f:
        config = convert.config_from_hf(json.load(f))
    weights = load_file(os.path.join(FIXTURE, "rwkv_tiny.safetensors"))
    expected = load_file(os.path.join(FIXTURE, "rwkv_tiny_expected.safetensors"))
    return convert.from_hf_state_dict(weights, config), expected


def test_shared_fixture_logits_and_hidden_states(fixture_model):
    """Outputs HF transformers produced (tests/fixtures/rwkv_tiny)."""
    model, expected = fixture_model
    ids = expected["input_ids"].astype(np.int32)
    tokens = named_tokens(ids)
    segment_pos = pz.nx.wrap(jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)).tag(
        "batch", "seq"
    )

    @pz.variable_jit
    def residuals(model, tokens, segment_pos):
        context = DocumentContext.build(segment_pos)
        x = model.embedder(tokens, context=context)
        streams = []
        for block in model.blocks.sublayers:
            x = block(x, context=context)
            streams.append(x.unwrap("batch", "seq", "embedding"))
        final = model.final_norm(x)
        logits = model.head(final).unwrap("batch", "seq", "vocabulary")
        return streams, final.unwrap("batch", "seq", "embedding"), logits

    streams, final, logits = residuals(model, tokens, segment_pos)
    assert len(streams) == model.config.num_hidden_layers
    assert max_relative_error(logits, expected["logits_norescale"]) <= 1e-5
    assert max_relative_error(logits, expected["logits"]) <= 2e-3  # HF eval (rescaled)
    for i, got in enumerate(streams):
        assert max_relative_error(got, expected[f"hidden_norescale_{i}"]) <= 1e-5, i
    assert max_relative_error(final, expected["final_ln_out_norescale"]) <= 1e-5


def test_sampling_state_matches_hf_state(fixture_model):
    """The twins' state after the fixture's tokens is HF's five-tensor state."""
    model, expected = fixture_model
    ids = expected["input_ids"].astype(np.int32)
    sampler = to_sampling_mode(model, batch_size=ids.shape[0])
    sampler(named_tokens(ids))
    twins = pz.select(sampler).at_instances_of(Stateful).get_sequence()
    time_mix = [t.state for t in twins if isinstance(t.layer, TimeMix)]
    channel_mix = [t.state for t in twins if isinstance(t.layer, ChannelMix)]
    assert len(time_mix) == len(channel_mix) == 4
    # HF: (batch, hidden, layer); states 2/3 compared as real values num * e^max.
    layer_stack = lambda xs: np.stack(xs, axis=-1)
    shift_ffn = layer_stack([v.value.unwrap("batch", "embedding") for v in channel_mix])
    shift_att = layer_stack(
        [v.value.shift.unwrap("batch", "embedding") for v in time_mix]
    )
    num = layer_stack(
        [v.value.wkv.real_values()[0].unwrap("batch", "wkv") for v in time_mix]
    )
    den = layer_stack(
        [v.value.wkv.real_values()[1].unwrap("batch", "wkv") for v in time_mix]
    )
    scale = np.exp(expected["state_4"].astype(np.float64))
    # The fixture's state comes from an eval (rescaled) run: LN outputs move by ~eps.
    assert max_relative_error(shift_ffn, expected["state_0"]) <= 2e-3
    assert max_relative_error(shift_att, expected["state_1"]) <= 2e-3
    assert max_relative_error(num, expected["state_2"] * scale) <= 2e-3
    assert max_relative_error(den, expected["state_3"] * scale) <= 2e-3


def test_sampling_chunks_equal_the_full_forward():
    """Packed and left-padded rows, fed in chunks of 4 and 1 (batched single-token decoding)."""
    case = CASES["odd"]
    model = our_model(case)
    ids = case_ids(case)
    pos = segment_layout(case.batch, case.seq)
    full = logits_of(model, ids, pos)
    sampler = to_sampling_mode(model, batch_size=case.batch)
    tokens, segment_pos = named_tokens(ids, pos)
    pieces, lo = [], 0
    for length in (4, 1, 1, 4, 1, 1, 1):
        piece = {"seq": pz.slice[lo : lo + length]}
        out = sampler(tokens[piece], segment_pos=segment_pos[piece])
        pieces.append(out.unwrap("batch", "seq", "vocabulary"))
        lo += length
    assert lo == case.seq
    assert max_relative_error(np.concatenate(pieces, axis=1), full) <= 1e-5


def test_generate_greedy_follows_the_full_forward():
    case = CASES["odd"]
    model = our_model(case)
    prompts = [[1, 5, 7, 2, 9], [3, 4]]
    out = generate(model, prompts, max_new_tokens=4)
    assert [len(tokens) for tokens in out.tokens] == [4, 4]
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        sequence = np.asarray([prompt + tokens], np.int32)
        logits = logits_of(model, sequence)[0]
        for j, token in enumerate(tokens):
            assert int(np.argmax(logits[len(prompt) + j - 1])) == token


@pytest.fixture(scope="module")
def fresh_model():
    """A model as `build_model` initialises it (several layers, A != C)."""
    config = rwkv.RwkvConfig(
        vocab_size=11,
        hidden_size=12,
        num_hidden_layers=3,
        attention_hidden_size=10,
        intermediate_size=16,
    )
    return rwkv.build_model(config, jax.random.key(1))


def test_build_model_uses_rwkv_initialisation(fresh_model):
    values = {
        k: np.asarray(v.unwrap(*v.named_shape))
        for k, v in parameter_values(fresh_model).items()
    }
    decay = values["blocks.2.attention.time_decay"]
    np.testing.assert_allclose(decay[[0, -1]], [-5.0, 3.0], rtol=1e-6)
    first = values["blocks.0.attention.time_first"]
    np.testing.assert_allclose(
        first[:3], np.log(0.3) + np.array([0.0, 0.5, -0.5]), rtol=1e-6
    )
    np.testing.assert_allclose(
        values["blocks.0.attention.time_mix_key"], np.arange(12) / 12, rtol=1e-6
    )
    np.testing.assert_allclose(
        values["blocks.2.attention.time_mix_value"],
        (np.arange(12) / 12) ** (1 / 3) + 0.3,
        rtol=1e-6,
    )
    for zero in (
        "attention.key",
        "attention.receptance",
        "attention.output",
        "feed_forward.value",
        "feed_forward.receptance",
    ):
        assert not values[f"blocks.1.{zero}.weights"].any(), zero
    value = values["blocks.1.attention.value.weights"]  # [A=10, C=12]: orthonormal rows
    np.testing.assert_allclose(value @ value.T, np.eye(10), atol=1e-5)
    assert np.abs(values["embeddings.embeddings"]).max() <= rwkv.EMBEDDING_INIT
    np.testing.assert_array_equal(values["ln_out.scale"], 1.0)


@pytest.mark.slow
def test_100k_tokens_with_large_keys_stay_finite(fresh_model):
    """Keys far beyond 88 (exp overflows float32) over a 100k-token sequence."""
    noise = jax.random.normal(jax.random.key(2), (10, 12))

    changed = []

    def large_keys(param):
        if not param.label.endswith("attention.key.weights"):
            return param
        changed.append(param.label)
        value = pz.nx.wrap(40.0 * noise).tag("wkv", "embedding")  # |k| up to ~500
        return pz.Parameter(label=param.label, value=value.order_like(param.value))

    model = pz.select(fresh_model).at_instances_of(pz.Parameter).apply(large_keys)
    assert len(changed) == fresh_model.config.num_hidden_layers
    ids = np.random.default_rng(0).integers(0, 11, (1, 100_000)).astype(np.int32)
    logits = np.asarray(recurrent_lm.jit_forward(model)(ids))
    assert np.isfinite(logits).all()


def test_presets_have_the_released_sizes():
    counts = {}
    for name in ("169m",):
        config = rwkv.RwkvConfig.from_preset(name)
        params = abstract_parameters(lambda key, c=config: rwkv.build_model(c, key))
        counts[name] = sum(
            int(np.prod(list(v.named_shape.values()))) for v in params.values()
        )
    assert round(counts["169m"] / 1e6, 1) == 169.3
    assert rwkv.RwkvConfig.from_preset("14b").hidden_size == 5120
    small = rwkv.RwkvConfig.from_preset("169m", hidden_size=64)
    assert (small.attention_hidden_size, small.intermediate_size) == (64, 256)
    assert "tiny" in rwkv.PRESETS
    assert registry.get("rwkv").config_class is rwkv.RwkvConfig
    assert rwkv.RwkvConfig.from_dict(small.to_dict()) == small


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        (
            {"attention_hidden_size": -3},
            "attention_hidden_size must be a positive integer",
        ),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon must be > 0"),
        ({"eos_token_id": 600}, "eos_token_id 600 is outside the vocabulary"),
        ({"param_dtype": "int8"}, "param_dtype must be one of .*got 'int8'"),
        ({"rescale_every": 1.5}, "rescale_every must be an integer"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        rwkv.RwkvConfig(vocab_size=512, **overrides)


def test_bad_inputs():
    model = our_model(CASES["odd"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(named_tokens(np.array([[1, 37]], np.int32)))
    with pytest.raises(ValueError, match="unknown RwkvConfig fields"):
        rwkv.RwkvConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(ValueError, match="unknown RwkvConfig preset"):
        rwkv.RwkvConfig.from_preset("170m")
    with pytest.raises(ValueError, match="segment_pos"):
        time_mix = pz.select(model).at_instances_of(TimeMix).get_sequence()[0]
        time_mix(pz.nx.zeros({"batch": 1, "seq": 2, "embedding": 24}))
    assert pz.select(model).at_instances_of(ChannelMix).count() == 3
