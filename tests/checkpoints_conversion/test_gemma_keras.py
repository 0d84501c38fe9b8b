"""KerasHub Gemma presets <-> our Gemma, against KerasHub 0.32 on the JAX backend.

A random `GemmaBackbone` (every weight perturbed) is saved with
``save_to_preset``; `load_keras_preset` reads it with h5py only, and our logits
must equal ``GemmaCausalLM(backbone, preprocessor=None)``'s within 1e-5
relative. Gemma 1 style (multi-query, multi-head) and Gemma 2 style (grouped
queries, soft caps, post norms, a sliding window shorter than the sequence).
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from griffin_cases import max_relative_error, named_tokens
from penzai import pz

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported (here or by keras_hub)
import keras_hub

from checkpoints_conversion import gemma as convert
from recurrent_lm.params import CheckpointMismatchError

TOLERANCE = 1e-5
SEQ = 9


@dataclasses.dataclass(frozen=True)
class Case:
    arguments: dict
    seed: int


COMMON = dict(vocabulary_size=37, hidden_dim=24, layer_norm_epsilon=1e-6)
CASES = {
    # Gemma 1, multi-query.
    "gemma1_mqa": Case(dict(COMMON, num_layers=2, num_query_heads=3, num_key_value_heads=1,
                            intermediate_dim=36, head_dim=10), seed=0),
    # Gemma 1, multi-head.
    "gemma1_mha": Case(dict(COMMON, num_layers=2, num_query_heads=2, num_key_value_heads=2,
                            intermediate_dim=28, head_dim=6), seed=1),
    # Gemma 2: grouped queries, soft caps, post norms, window 3 < SEQ, odd layer count.
    "gemma2": Case(dict(COMMON, num_layers=3, num_query_heads=4, num_key_value_heads=2,
                        intermediate_dim=40, head_dim=8, use_post_ffw_norm=True,
                        use_post_attention_norm=True, attention_logit_soft_cap=5.0,
                        final_logit_soft_cap=3.0, use_sliding_window_attention=True,
                        sliding_window_size=3), seed=2),
}

# One compiled program per call shape (eager penzai compiles op by op).
_call = pz.variable_jit(lambda model, tokens: model(tokens))


def our_logits(model, ids):
    return np.asarray(_call(model, named_tokens(ids)).unwrap("batch", "seq", "vocabulary"))


def random_backbone(case: Case):
    """A GemmaBackbone with every weight perturbed (norm scales away from 0)."""
    backbone = keras_hub.models.GemmaBackbone(**case.arguments)
    rng = np.random.default_rng(case.seed)
    backbone.set_weights([
        (0.3 * rng.standard_normal(w.shape)).astype(np.float32) for w in backbone.get_weights()
    ])
    return backbone


def keras_logits(backbone, ids):
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    return np.asarray(causal_lm.predict_on_batch(inputs))


def case_ids(case: Case, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(20 + case.seed)
    return rng.integers(0, case.arguments["vocabulary_size"], (batch, SEQ)).astype(np.int32)


_PRESETS = {}


def saved_preset(name, tmp_path_factory):
    """(case, preset directory, KerasHub's logits on case_ids), built once per case."""
    if name not in _PRESETS:
        case = CASES[name]
        backbone = random_backbone(case)
        path = tmp_path_factory.mktemp(name) / "preset"
        backbone.save_to_preset(str(path))
        _PRESETS[name] = case, path, keras_logits(backbone, case_ids(case))
    return _PRESETS[name]


@pytest.fixture(scope="module", params=sorted(CASES))
def preset(request, tmp_path_factory):
    return saved_preset(request.param, tmp_path_factory)


def test_logits_match_kerashub(preset):
    case, path, expected = preset
    model = convert.load_keras_preset(path)
    for field, value in case.arguments.items():
        assert getattr(model.config, field) == value, field
    assert model.config.param_dtype == "float32"
    assert max_relative_error(our_logits(model, case_ids(case)), expected) <= TOLERANCE


def test_save_keras_preset_round_trip_and_kerashub_loads_it(preset, tmp_path):
    case, path, expected = preset
    model = convert.load_keras_preset(path)
    out = tmp_path / "ours"
    convert.save_keras_preset(model, out)
    with pytest.raises(FileExistsError):
        convert.save_keras_preset(model, out)
    original = convert.read_keras_weights(path / convert.KERAS_WEIGHTS)
    written = convert.read_keras_weights(out / convert.KERAS_WEIGHTS)
    assert sorted(written) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    backbone = keras_hub.models.GemmaBackbone.from_preset(str(out))
    assert max_relative_error(keras_logits(backbone, case_ids(case)), expected) == 0.0


def test_query_scaling_by_hidden_over_heads(tmp_path):
    """``query_head_dim_normalize=False`` (Gemma 2 27B): the loader keeps it (the
    official model's scaling), which KerasHub 0.32's decoder block ignores;
    overriding it to True reproduces KerasHub's own numbers."""
    case = Case(dict(CASES["gemma2"].arguments, query_head_dim_normalize=False,
                     num_layers=2, head_dim=4), seed=3)  # hidden / heads = 6 != 4
    backbone = random_backbone(case)
    backbone.save_to_preset(str(tmp_path / "preset"))
    ids = case_ids(case, batch=1)
    expected = keras_logits(backbone, ids)
    official = convert.load_keras_preset(tmp_path / "preset")
    assert official.config.query_head_dim_normalize is False
    assert max_relative_error(our_logits(official, ids), expected) > 1e-3
    as_keras = convert.load_keras_preset(tmp_path / "preset", query_head_dim_normalize=True)
    assert max_relative_error(our_logits(as_keras, ids), expected) <= TOLERANCE


def test_bad_presets_list_every_problem(tmp_path_factory, tmp_path):
    import h5py

    case, path, _ = saved_preset("gemma2", tmp_path_factory)
    arrays = convert.read_keras_weights(path / convert.KERAS_WEIGHTS)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    with h5py.File(bad / convert.KERAS_WEIGHTS, "w") as f:
        for name, array in arrays.items():
            if name == "layers/gemma_decoder_block_1/post_ffw_norm/vars/0":
                continue
            if name == "layers/gemma_decoder_block_2/attention/key_dense/vars/0":
                array = array[:, :, :-1]
            f.create_dataset(name, data=array)
        f.create_dataset("layers/gemma_decoder_block_3/pre_ffw_norm/vars/0", data=np.zeros(24))
    with pytest.raises(CheckpointMismatchError) as info:
        convert.load_keras_preset(bad)
    message = str(info.value)
    assert "missing     layers/gemma_decoder_block_1/post_ffw_norm/vars/0" in message
    assert "mis-shaped  layers/gemma_decoder_block_2/attention/key_dense/vars/0" in message
    assert "(2, 24, 8), found (2, 24, 7)" in message
    assert "unexpected  layers/gemma_decoder_block_3/pre_ffw_norm/vars/0" in message
    # Another model's config, a missing weights file, a directory that is no preset.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"class_name": "Llama3Backbone", "config": {}}))
    with pytest.raises(ValueError, match="'Llama3Backbone', not a KerasHub GemmaBackbone"):
        convert.load_keras_preset(other)
    (other / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.weights.h5 not found"):
        convert.load_keras_preset(other)
    (other / convert.KERAS_WEIGHTS).write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        convert.load_keras_preset(other)
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert.load_keras_preset(tmp_path / "nothing")


def test_cli_detects_a_keras_preset(tmp_path_factory, tmp_path, capsys):
    import recurrent_lm

    case, path, expected = saved_preset("gemma1_mqa", tmp_path_factory)
    assert convert.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert "converted" in capsys.readouterr().out
    loaded = recurrent_lm.load(tmp_path / "ours")
    assert max_relative_error(our_logits(loaded, case_ids(case)), expected) <= TOLERANCE
