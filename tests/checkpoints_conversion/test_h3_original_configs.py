"""The original H3's keyword arguments, and configurations no fixture covers.

`h3_reference` is a float64 NumPy H3 written from the original sources; it is
checked here against the fixtures the original code computed, then stands in
for the original on checkpoints it never saw: odd widths and head sizes,
attention first, last and in adjacent layers, no attention at all, partial
rotary of any count, ``softmax_scale``, ZOH, and learned position embeddings
(``max_position_embeddings > 0``).
"""

import functools
import itertools
import json
import os
import warnings

import numpy as np
import pytest
from h3_reference import lm_logits, random_state_dict
from penzai import pz
from safetensors.numpy import load_file

from checkpoints_conversion import h3 as convert
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.layers import EmbeddingLookup, LearnedPositions
from recurrent_lm.models import h3
from recurrent_lm.sampling import to_sampling_mode

DATA = os.path.join(os.path.dirname(__file__), "..", "data")


def rel(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def fixture(name):
    stem = os.path.join(DATA, name, name)
    with open(f"{stem}_config.json") as f:
        config = json.load(f)
    return config, load_file(f"{stem}.safetensors"), load_file(f"{stem}_expected.safetensors")


def tokens(ids):
    return pz.nx.wrap(np.asarray(ids, np.int32)).tag("batch", "seq")


def logits_of(model, ids, pos):
    out = model(tokens(ids), segment_pos=tokens(pos))
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"))


def alone(state_dict, kwargs, ids, pos):
    """The reference on each document of packed rows run alone (positions 0.. each)."""
    out = np.zeros((*ids.shape, state_dict["lm_head.weight"].shape[0]))
    for row in range(ids.shape[0]):
        starts = [*np.flatnonzero(pos[row] == 0), ids.shape[1]]
        for lo, hi in itertools.pairwise(starts):
            out[row, lo:hi] = lm_logits(state_dict, kwargs, ids[row : row + 1, lo:hi])[0]
    return out


# ---------------------------------------------------------------------------
# The reference against the original code's own numbers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["h3_tiny", "h3_tiny_v2", "h3_rotary"])
def test_reference_matches_the_original_code(name):
    config, weights, expected = fixture(name)
    if "attn_cfg" not in config:  # h3_tiny's flat config
        config = {**config, "attn_cfg": {"num_heads": config["num_heads"]}}
    assert rel(lm_logits(weights, config, expected["input_ids"]), expected["logits"]) <= 1e-5
    if "packed_logits" in expected:
        ours = alone(weights, config, expected["packed_input_ids"], expected["packed_position_ids"])
        assert rel(ours, expected["packed_logits"]) <= 1e-5


def conjugated(weights, leaf):
    """`weights` with the imaginary part of every diagonal SSM's `leaf` negated."""
    out = dict(weights)
    for key in [k for k in weights if k.endswith(f"mixer.kernel.kernel.{leaf}")]:
        out[key] = weights[key] * np.array([1, -1], np.float32)
    return out


MISTAKES = {
    "B conjugated": lambda c, w: (c, conjugated(w, "B")),
    "C conjugated": lambda c, w: (c, conjugated(w, "C")),
    "zoh instead of bilinear": lambda c, w: ({**c, "ssm_cfg": {**c["ssm_cfg"], "disc": "zoh"}}, w),
    "rotary dropped": lambda c, w: ({**c, "attn_cfg": {"num_heads": 4}}, w),
    "rotary over the whole head": lambda c, w: (
        {**c, "attn_cfg": {"num_heads": 4, "rotary_emb_dim": 10}}, w),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_rotary_fixture_tells_each_convention_apart(mistake):
    """Each mistake moves the logits far beyond the 1e-4 tolerance of the parity tests."""
    config, weights, expected = fixture("h3_rotary")
    config, weights = MISTAKES[mistake](config, weights)
    assert rel(lm_logits(weights, config, expected["input_ids"]), expected["logits"]) > 0.05


# ---------------------------------------------------------------------------
# Checkpoints of configurations no fixture covers.
# ---------------------------------------------------------------------------

UNSEEN = {
    # Odd width and head size (33 = 3 x 11), attention first and last with
    # rotary on 6 of 11 features and a softmax_scale, an MLP that is not 4x.
    "odd_width_attention_first_and_last": {
        "d_model": 33, "n_layer": 4, "d_inner": 70, "vocab_size": 47,
        "ssm_cfg": {"mode": "diag", "measure": "diag-lin", "d_state": 8},
        "attn_layer_idx": [0, 3],
        "attn_cfg": {"num_heads": 3, "rotary_emb_dim": 6, "softmax_scale": 0.25},
    },
    # Adjacent attention layers, one head of 44 rotating 30 features (no exact
    # float fraction), ZOH, learned positions, padded vocabulary.
    "positions_adjacent_attention_zoh": {
        "d_model": 44, "n_layer": 3, "d_inner": None, "vocab_size": 50,
        "pad_vocab_size_multiple": 8, "max_position_embeddings": 32,
        "ssm_cfg": {"d_state": 16, "disc": "zoh"}, "attn_layer_idx": [1, 2],
        "attn_cfg": {"num_heads": 1, "rotary_emb_dim": 30}, "layer_norm_epsilon": 1e-6,
    },
    # No attention at all, keywords that change nothing in a loaded model.
    "no_attention": {
        "d_model": 20, "n_layer": 2, "d_inner": 48, "vocab_size": 30, "ssm_cfg": {"d_state": 4},
        "resid_dropout": 0.1, "embed_dropout": 0.2, "fused_mlp": True, "residual_in_fp32": True,
        "initializer_cfg": {"initializer_range": 0.05},
    },
}
IDS = np.random.default_rng(7).integers(0, 30, (2, 40))  # below every UNSEEN vocab_size
# Packed rows; every document fits the 32 learned positions.
PACKED = np.stack([np.r_[np.arange(17), np.arange(23)], np.r_[np.arange(32), np.arange(8)]])
ONE_DOCUMENT = np.broadcast_to(np.arange(40), (2, 40))


@functools.cache
def unseen(name):
    """The keywords, a random original-format state dict, our model of it
    (built once: its compiled forward is shared by the tests)."""
    kwargs = UNSEEN[name]
    state_dict = random_state_dict(kwargs, seed=len(name))
    return kwargs, state_dict, convert.from_state_dict(state_dict, kwargs)


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen_configuration_matches_the_reference(name):
    kwargs, state_dict, model = unseen(name)
    pos = PACKED if kwargs.get("max_position_embeddings") else ONE_DOCUMENT
    reference = alone(state_dict, kwargs, IDS, pos)
    assert rel(logits_of(model, IDS, pos), reference) <= 1e-4
    exported = convert.to_original_state_dict(model)
    assert sorted(exported) == sorted(state_dict)
    for key, value in state_dict.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_learned_positions_continue_in_sampling_mode_and_end_in_nan():
    kwargs, state_dict, model = unseen("positions_adjacent_attention_zoh")
    assert model.config.max_position_embeddings == 32 and model.config.vocab_size == 56
    sampler = to_sampling_mode(model, batch_size=2, max_length=40)
    chunks = [sampler(tokens(IDS[:, lo : lo + 8])) for lo in range(0, 32, 8)]
    ours = np.concatenate([c.unwrap("batch", "seq", "vocabulary") for c in chunks], axis=1)
    assert rel(ours, lm_logits(state_dict, kwargs, IDS[:, :32])) <= 1e-4
    # 40 positions in a 32-row table: NaN, where a gather would silently clamp.
    past = logits_of(model, IDS, ONE_DOCUMENT)
    assert np.isnan(past[:, 32:]).all()


def test_position_embeddings_are_added_as_gpt2_does():
    """The embedder's output is word + position embedding rows (independent NumPy)."""
    _, state_dict, model = unseen("positions_adjacent_attention_zoh")
    embedder = model.embedder
    assert [type(layer) for layer in embedder.sublayers][:2] == [EmbeddingLookup,
                                                                 LearnedPositions]
    got = embedder(tokens(IDS), context=DocumentContext.build(tokens(PACKED)))
    words = state_dict["backbone.embeddings.word_embeddings.weight"][IDS]
    positions = state_dict["backbone.embeddings.position_embeddings.weight"][PACKED]
    np.testing.assert_allclose(got.unwrap("batch", "seq", "embedding"), words + positions,
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# Keywords.
# ---------------------------------------------------------------------------

# Every keyword of SSMLMHeadModel.__init__ (and SSMModel's), at its default.
ALL_TOP_LEVEL_DEFAULTS = {
    "d_model": 16, "n_layer": 2, "d_inner": None, "vocab_size": 61, "ssm_cfg": None,
    "attn_layer_idx": None, "attn_cfg": None, "max_position_embeddings": 0,
    "resid_dropout": 0.0, "embed_dropout": 0.1, "dropout_cls": "torch.nn.Dropout",
    "layer_norm_epsilon": 1e-5, "initializer_cfg": None, "fused_mlp": False,
    "fused_dropout_add_ln": False, "residual_in_fp32": False, "pad_vocab_size_multiple": 1,
}


def test_every_keyword_of_the_original_at_its_default():
    config = convert.resolve_config(ALL_TOP_LEVEL_DEFAULTS)
    assert config == h3.H3Config(
        vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=1,
        attn_layer_idx=(), residual_in_fp32=False,
    )
    assert config.n_inner == 64  # d_inner None: 4 d_model


def test_nested_keywords_are_mapped():
    config = convert.resolve_config({
        **ALL_TOP_LEVEL_DEFAULTS, "attn_layer_idx": [1], "pad_vocab_size_multiple": 8,
        "ssm_cfg": {"d_state": 32, "mode": "diag", "measure": "diag-inv", "disc": "zoh",
                    "head_dim": 1, "l_max": None, "use_fast_fftconv": True, "dt_min": 0.01,
                    "lr": {"dt": 0.0}, "real_type": "exp"},
        "attn_cfg": {"num_heads": 2, "rotary_emb_dim": 4, "softmax_scale": 0.5, "causal": True,
                     "use_flash_attn": True, "fused_bias_fc": True, "dropout": 0.0},
        "initializer_cfg": {"initializer_range": 0.01, "rescale_prenorm_residual": False},
    })
    assert (config.vocab_size, config.d_state, config.ssm_measure, config.discretisation) == (
        64, 32, "diag-inv", "zoh")
    assert (config.num_attention_heads, config.rotary_emb_dim, config.attention_softmax_scale) == (
        2, 4, 0.5)
    assert (config.initializer_range, config.rescale_prenorm_residual) == (0.01, False)


def test_unsupported_values_are_one_error_naming_each():
    bad = {
        **ALL_TOP_LEVEL_DEFAULTS, "attn_layer_idx": [0],
        "ssm_cfg": {"l_max": 2048, "real_type": "relu", "n_ssm": 1},
        "attn_cfg": {"num_heads": 2, "causal": False, "rotary_emb_scale_base": 512,
                     "dropout": 0.1, "dwconv": True},
    }
    with pytest.raises(ValueError) as info:
        convert.resolve_config(bad)
    message = str(info.value)
    assert "\n" not in message
    for name in ("ssm_cfg['l_max']=2048", "ssm_cfg['real_type']='relu'", "ssm_cfg['n_ssm']=1",
                 "attn_cfg['causal']=False", "attn_cfg['rotary_emb_scale_base']=512",
                 "attn_cfg['dropout']=0.1", "attn_cfg['dwconv']=True"):
        assert name in message, name


@pytest.mark.parametrize("change, message", [
    ({"ssm_cfg": {"d_sate": 8}}, r"ssm_cfg\['d_sate'\] is not a keyword the original accepts"),
    ({"attn_cfg": {"num_heads": 2, "heads": 2}}, r"attn_cfg\['heads'\] is not a keyword"),
    ({"ssm_cfg": {"mode": "nplr"}}, r"ssm_mode must be one of \('diag',\), got 'nplr'"),
    ({"ssm_cfg": {"disc": "dss"}}, r"discretisation must be one of"),
    ({"ssm_cfg": {"head_dim": 2}}, r"head_dim must be 1"),
    ({"d_state": 8, "ssm_cfg": {"d_state": 16}}, r"d_state=8 contradicts ssm_cfg\['d_state'\]=16"),
    ({"padded_vocab_size": 72, "pad_vocab_size_multiple": 8}, r"padded_vocab_size=72 but"),
    ({"position_embeddings": True}, r"position_embeddings=True contradicts"),
    ({"tie_embeddings": False}, r"tie_embeddings'\]=False is not supported"),
    ({"rotary_emb_base": 500}, r"always uses base 10000"),
    ({"attn_layer_idx": [0]}, r"attn_cfg\['num_heads'\] is missing"),
])
def test_bad_original_configs(change, message):
    with pytest.raises(ValueError, match=message):
        convert.resolve_config({**ALL_TOP_LEVEL_DEFAULTS, **change})


def test_required_keywords():
    config = {k: v for k, v in ALL_TOP_LEVEL_DEFAULTS.items() if k not in ("d_model", "n_layer")}
    with pytest.raises(ValueError, match=r"missing \['d_model', 'n_layer'\]"):
        convert.resolve_config(config)


def test_unknown_keys_are_ignored_with_a_warning_as_the_original_does():
    with pytest.warns(UserWarning, match=r"ignoring keys \['d_modle'\]"):
        config = convert.resolve_config({**ALL_TOP_LEVEL_DEFAULTS, "d_modle": 3})
    assert config.hidden_size == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # metadata keys ("_name_", ...) pass silently
        convert.resolve_config({**ALL_TOP_LEVEL_DEFAULTS, "_name_": "h3", "_fixture": {}})


def test_flat_keys_of_older_configs():
    config, _, _ = fixture("h3_tiny")  # flat: num_heads, padded_vocab_size, d_state, disc ...
    assert "attn_cfg" not in config
    resolved = convert.resolve_config(config)
    assert (resolved.num_attention_heads, resolved.vocab_size, resolved.d_state) == (4, 64, 64)
    nested = {k: v for k, v in config.items() if k not in ("num_heads", "padded_vocab_size")}
    resolved = convert.resolve_config({**nested, "attn_cfg": {"num_heads": 4},
                                       "pad_vocab_size_multiple": 8})
    assert resolved.num_attention_heads == 4 and resolved.vocab_size == 64  # 61 padded to 8
