"""HF transformers' GemmaForCausalLM / Gemma2ForCausalLM directories <-> our Gemma.

Oracle: transformers on CPU in float32. Every HF parameter is perturbed after
init (HF starts the norms at zero, which would hide mistakes in them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
from griffin_cases import max_relative_error

import recurrent_lm
from checkpoints_conversion import common
from checkpoints_conversion import gemma as convert
from recurrent_lm.params import CheckpointMismatchError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@dataclasses.dataclass(frozen=True)
class HFCase:
    name: str
    model_type: str  # "gemma" or "gemma2"
    config: dict  # GemmaConfig / Gemma2Config arguments
    seq: int
    seed: int = 0


CASES = {
    # Gemma 1, multi-query, head_dim independent of hidden / heads, its own eps.
    "gemma_mqa": HFCase("gemma_mqa", "gemma", {
        "vocab_size": 53, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 12, "rms_norm_eps": 1e-5}, seq=9),
    # Gemma 1, multi-head, odd widths and head count, the legacy hidden_act "gelu".
    "gemma_mha": HFCase("gemma_mha", "gemma", {
        "vocab_size": 37, "hidden_size": 27, "intermediate_size": 19, "num_hidden_layers": 3,
        "num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 10, "hidden_act": "gelu"},
        seq=7, seed=1),
    # Gemma 2, GQA, window 3 < seq 11, small soft caps, query_pre_attn_scalar neither head_dim
    # nor hidden / heads, 5 layers (sliding, full, sliding, full, sliding).
    "gemma2_gqa": HFCase("gemma2_gqa", "gemma2", {
        "vocab_size": 61, "hidden_size": 40, "intermediate_size": 56, "num_hidden_layers": 5,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 7,
        "sliding_window": 3, "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
        "rms_norm_eps": 1e-5}, seq=11, seed=2),
    # Gemma 2, the 27B's query scale (hidden / heads), caps off, MQA.
    "gemma2_27b_style": HFCase("gemma2_27b_style", "gemma2", {
        "vocab_size": 29, "hidden_size": 24, "intermediate_size": 30, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "query_pre_attn_scalar": 12,
        "sliding_window": 4, "attn_logit_softcapping": None, "final_logit_softcapping": None},
        seq=8, seed=3),
}
_HF = {"gemma": ("GemmaConfig", "GemmaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM")}


def hf_classes(model_type):
    config_class, model_class = _HF[model_type]
    return getattr(transformers, config_class), getattr(transformers, model_class)


def random_hf_model(case: HFCase):
    config_class, model_class = hf_classes(case.model_type)
    config = config_class(**case.config, attn_implementation="eager")
    torch.manual_seed(case.seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # lm_head is tied: perturbed once
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_logits(model, ids, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        return model(torch.as_tensor(ids), attention_mask=mask, use_cache=False).logits.float().numpy()


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.dtype == e.dtype and a.shape == e.shape, name
        np.testing.assert_array_equal(a, e, err_msg=name)


def hf_state(model, dtype=np.float32) -> dict[str, np.ndarray]:
    state = {k: v.float().numpy().astype(dtype) for k, v in model.state_dict().items()}
    state.pop("lm_head.weight")
    return state


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """``get(name) -> (case, HF model, its save_pretrained directory)``, each built once."""
    built = {}

    def get(name):
        if name not in built:
            case = CASES[name]
            model = random_hf_model(case)
            path = tmp_path_factory.mktemp(case.name) / "hf"
            model.save_pretrained(path)
            built[name] = case, model, path
        return built[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_load_matches_transformers(hf_checkpoint, name):
    case, hf, path = hf_checkpoint(name)
    model = convert.load_hf_checkpoint(path)
    assert model.config.param_dtype == "float32"
    assert model.config.use_post_ffw_norm == (case.model_type == "gemma2")
    ids = random_ids(case.config["vocab_size"], 2, case.seq, case.seed)
    expected = hf_logits(hf, ids)
    error = max_relative_error(recurrent_lm.jit_forward(model)(ids), expected)
    print(f"{case.name}: max relative error vs transformers {error:.2e}")
    assert error <= 1e-5
    assert_same_state(convert.to_hf_state_dict(model), hf_state(hf))


def test_window_and_query_scale_are_what_hf_computes(hf_checkpoint):
    """The window and query scale matter in the Gemma 2 case (a wrong value
    moves the logits), and the config says what HF's does."""
    case, hf, path = hf_checkpoint("gemma2_gqa")
    model = convert.load_hf_checkpoint(path)
    assert model.config.use_sliding_window_attention and model.config.sliding_window_size == 3
    assert model.config.query_pre_attn_scalar == 7
    ids = random_ids(case.config["vocab_size"], 2, case.seq, case.seed)
    expected = hf_logits(hf, ids)
    for override in ({"sliding_window_size": 4}, {"query_pre_attn_scalar": None}):
        other = convert.load_hf_checkpoint(path, **override)
        assert max_relative_error(recurrent_lm.jit_forward(other)(ids), expected) > 1e-3, override
    assert convert.load_hf_checkpoint(hf_checkpoint("gemma2_27b_style")[2]).config.query_head_dim_normalize is False


def test_right_padding_is_segment_pos_minus_one(hf_checkpoint):
    case, hf, path = hf_checkpoint("gemma2_gqa")
    model = convert.load_hf_checkpoint(path)
    ids = random_ids(case.config["vocab_size"], 2, case.seq, 5)
    lengths = [case.seq, 6]
    mask = (np.arange(case.seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
    pos = np.where(mask, np.arange(case.seq)[None], -1).astype(np.int32)
    ours = np.asarray(recurrent_lm.jit_forward(model)(ids, pos))
    expected = hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    error = max_relative_error(ours[valid], expected[valid])
    print(f"right-padded: max relative error vs transformers {error:.2e}")
    assert error <= 1e-5


def test_sharded_and_bfloat16_directories(hf_checkpoint, tmp_path):
    _case, hf, _path = hf_checkpoint("gemma2_gqa")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / common.HF_INDEX)
    sharded = convert.load_hf_checkpoint(tmp_path / "sharded")
    assert_same_state(convert.to_hf_state_dict(sharded), hf_state(hf))

    import ml_dtypes

    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path / "bf16")
    bf16 = convert.load_hf_checkpoint(tmp_path / "bf16")
    assert bf16.config.param_dtype == "bfloat16"
    stored = hf_state(hf_bf16, ml_dtypes.bfloat16)
    assert_same_state(convert.to_hf_state_dict(bf16), stored)
    as_f32 = convert.load_hf_checkpoint(tmp_path / "bf16", dtype="float32")
    assert as_f32.config.param_dtype == "float32"
    assert_same_state(
        convert.to_hf_state_dict(as_f32), {k: v.astype(np.float32) for k, v in stored.items()}
    )


# ---------------------------------------------------------------------------
# Saving: transformers reads what we write.
# ---------------------------------------------------------------------------


def random_gemma(case: HFCase, **overrides):
    """Our own random Gemma (not loaded from HF): every parameter perturbed."""
    from recurrent_lm.models import gemma

    config_class, _ = hf_classes(case.model_type)
    config = convert.config_from_hf(config_class(**case.config).to_dict(), **overrides)
    skeleton = gemma.build_model(config, jax.random.key(case.seed))
    rng = np.random.default_rng(case.seed)
    state = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
             for k, v in convert.to_hf_state_dict(skeleton).items()}
    return convert.from_hf_state_dict(state, config)


@pytest.mark.parametrize("name", ["gemma_mha", "gemma2_gqa"])
def test_save_is_read_by_transformers_and_round_trips(tmp_path, name):
    case = CASES[name]
    model = random_gemma(case)
    convert.save_hf_checkpoint(model, tmp_path / "hf")
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["model_type"] == case.model_type
    _, model_class = hf_classes(case.model_type)
    hf = model_class.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = random_ids(case.config["vocab_size"], 2, case.seq, 4)
    error = max_relative_error(recurrent_lm.jit_forward(model)(ids), hf_logits(hf, ids))
    print(f"saved {name}: max relative error transformers vs ours {error:.2e}")
    assert error <= 1e-5
    ours = convert.to_hf_state_dict(model)
    assert_same_state(hf_state(hf), ours)
    again = convert.load_hf_checkpoint(tmp_path / "hf")
    assert again.config == model.config
    assert_same_state(convert.to_hf_state_dict(again), ours)


def test_save_sharded_bfloat16(tmp_path):
    case = CASES["gemma_mqa"]
    model = random_gemma(case, param_dtype="bfloat16")
    convert.save_hf_checkpoint(model, tmp_path / "hf", max_shard_size="4KB")
    with open(tmp_path / "hf" / common.HF_INDEX) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == set(convert.to_hf_state_dict(model))
    assert len(set(weight_map.values())) >= 2
    assert not os.path.exists(tmp_path / "hf" / common.HF_WEIGHTS)
    hf = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    import ml_dtypes

    ours = convert.to_hf_state_dict(model)
    assert_same_state(hf_state(hf, ml_dtypes.bfloat16), ours)
    assert_same_state(convert.to_hf_state_dict(convert.load_hf_checkpoint(tmp_path / "hf")), ours)
    as_f32 = convert.load_hf_checkpoint(tmp_path / "hf", param_dtype="float32")
    assert as_f32.config.param_dtype == "float32"


def test_save_rejects_what_hf_cannot_compute(tmp_path):
    model = random_gemma(CASES["gemma_mqa"], use_post_ffw_norm=True)
    with pytest.raises(ValueError, match="use_post_attention_norm=False, use_post_ffw_norm=True"):
        convert.save_hf_checkpoint(model, tmp_path / "hf")
    assert not os.path.exists(tmp_path / "hf")


# ---------------------------------------------------------------------------
# Bad input, configs, the command line.
# ---------------------------------------------------------------------------


def test_not_hf_or_another_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HF checkpoint"):
        convert.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "recurrent_gemma"}))
    with pytest.raises(ValueError, match="model_type 'recurrent_gemma'"):
        convert.load_hf_checkpoint(tmp_path)


def test_missing_and_misshaped_are_listed_together(hf_checkpoint, tmp_path):
    _case, hf, path = hf_checkpoint("gemma2_gqa")
    from safetensors.numpy import save_file

    state = hf_state(hf)
    del state["model.layers.1.post_feedforward_layernorm.weight"]
    state["model.layers.2.self_attn.k_proj.weight"] = np.zeros((7, 40), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "config.json", bad)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        convert.load_hf_checkpoint(bad)
    message = str(error.value)
    assert "missing     model.layers.1.post_feedforward_layernorm.weight: expected shape (40,)" in message
    assert "mis-shaped  model.layers.2.self_attn.k_proj.weight: expected (32, 40), found (7, 40)" in message


def test_config_keys_we_cannot_compute():
    base = {"model_type": "gemma2", "num_hidden_layers": 3, "hidden_size": 8, "num_attention_heads": 2,
            "head_dim": 4, "intermediate_size": 6}
    assert convert.config_from_hf(base).use_sliding_window_attention  # HF's default pattern
    assert not convert.config_from_hf({**base, "sliding_window": None}).use_sliding_window_attention
    assert not convert.config_from_hf(
        {**base, "layer_types": ["full_attention"] * 3}).use_sliding_window_attention
    with pytest.raises(ValueError, match="attention_bias.*hidden_activation.*rope_theta.*layer_types"):
        convert.config_from_hf({
            **base, "attention_bias": True, "hidden_activation": "relu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 5.0},
            "layer_types": ["full_attention", "sliding_attention", "full_attention"]})


def test_cli_converts_an_hf_directory(hf_checkpoint, tmp_path, capsys):
    _case, hf, path = hf_checkpoint("gemma_mqa")
    assert convert.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert "converted" in capsys.readouterr().out
    model = recurrent_lm.load(tmp_path / "ours")
    assert_same_state(convert.to_hf_state_dict(model), hf_state(hf))
