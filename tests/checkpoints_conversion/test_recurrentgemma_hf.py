"""HF transformers' RecurrentGemmaForCausalLM directories <-> our Griffin.

Oracles: transformers on CPU in float32 (sequences no longer than the window,
where HF and the official model agree), and the official `recurrentgemma`
package beyond the window. Every HF parameter is perturbed after init (HF
starts norms and biases at zero, which would hide mistakes in them).
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
import torch
import transformers
from griffin_cases import OfficialCase, max_relative_error, official_apply

import recurrent_lm
from checkpoints_conversion import common
from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm.params import CheckpointMismatchError

R, A = "recurrent", "attention"


@dataclasses.dataclass(frozen=True)
class HFCase:
    name: str
    config: dict  # RecurrentGemmaConfig arguments
    seq: int  # <= attention_window_size
    seed: int = 0


CASES = {
    # GQA, lru_width != hidden, a RoPE base and eps of its own, window == seq.
    "hybrid": HFCase("hybrid", {
        "vocab_size": 61, "hidden_size": 48, "num_attention_heads": 4, "lru_width": 64, "intermediate_size": 72,
        "num_hidden_layers": 3, "block_types": [R, R, A], "attention_window_size": 12, "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
        "rms_norm_eps": 1e-5, "logits_soft_cap": 30.0}, seq=12),
    # attention first, pattern cycled over 5 layers, MHA by HF's default, odd head count,
    # conv width 3, a small soft cap.
    "attention_first": HFCase("attention_first", {
        "vocab_size": 37, "hidden_size": 36, "num_attention_heads": 3, "intermediate_size": 44,
        "num_hidden_layers": 5, "block_types": [A, R], "attention_window_size": 10, "conv1d_width": 3,
        "logits_soft_cap": 10.0}, seq=9, seed=1),
    # Hawk: recurrent only, odd widths.
    "hawk": HFCase("hawk", {
        "vocab_size": 29, "hidden_size": 30, "num_attention_heads": 3, "lru_width": 21, "intermediate_size": 26,
        "num_hidden_layers": 2, "block_types": [R], "attention_window_size": 8}, seq=11, seed=2),
}


def random_hf_model(case: HFCase):
    config = transformers.RecurrentGemmaConfig(**case.config)
    torch.manual_seed(case.seed)
    model = transformers.RecurrentGemmaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # lm_head is tied: perturbed once
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids), use_cache=False).logits.float().numpy()


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
    ids = random_ids(case.config["vocab_size"], 2, case.seq, case.seed)
    expected = hf_logits(hf, ids)
    error = max_relative_error(recurrent_lm.jit_forward(model)(ids), expected)
    print(f"{case.name}: max relative error vs transformers {error:.2e}")
    assert error <= 1e-5
    assert_same_state(convert.to_hf_state_dict(model), hf_state(hf))


def test_sharded_and_bfloat16_directories(hf_checkpoint, tmp_path):
    _case, hf, _path = hf_checkpoint("hybrid")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / common.HF_INDEX)
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    sharded = convert.load_hf_checkpoint(tmp_path / "sharded")
    assert_same_state(convert.to_hf_state_dict(sharded), hf_state(hf))

    import ml_dtypes

    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)  # the fixture's model stays float32
    hf_bf16.save_pretrained(tmp_path / "bf16")
    bf16 = convert.load_hf_checkpoint(tmp_path / "bf16")
    assert bf16.config.param_dtype == "bfloat16"
    stored = hf_state(hf_bf16, ml_dtypes.bfloat16)
    assert_same_state(convert.to_hf_state_dict(bf16), stored)
    as_f32 = convert.load_hf_checkpoint(tmp_path / "bf16", param_dtype="float32")
    assert as_f32.config.param_dtype == "float32"
    assert convert.load_hf_checkpoint(tmp_path / "bf16", dtype="float32").config.param_dtype == "float32"
    assert_same_state(
        convert.to_hf_state_dict(as_f32), {k: v.astype(np.float32) for k, v in stored.items()}
    )


# ---------------------------------------------------------------------------
# Beyond the window: official semantics (W + 1 keys), not HF's (W keys).
# ---------------------------------------------------------------------------

# MQA and the official RoPE / eps (the official package fixes them); window 4 < seq 11.
LONG = OfficialCase("hf_long", 32, 2, 40, 24, (R, A, R, A), 4, 30.0, True, 43, 11, 2, 5)


def test_beyond_the_window_matches_official_not_hf(tmp_path):
    case = LONG
    hf = random_hf_model(HFCase(case.name, {
        "vocab_size": case.vocab, "hidden_size": case.width, "num_attention_heads": case.heads,
        "lru_width": case.lru_width, "intermediate_size": 2 * case.mlp,
        "num_hidden_layers": len(case.blocks), "block_types": list(case.blocks),
        "attention_window_size": case.window, "num_key_value_heads": 1}, seq=case.seq, seed=case.seed))
    hf.save_pretrained(tmp_path / "hf")
    model = convert.load_hf_checkpoint(tmp_path / "hf")
    ids = random_ids(case.vocab, case.batch, case.seq, 3)
    pos = np.tile(np.arange(case.seq, dtype=np.int32), (case.batch, 1))
    ours = recurrent_lm.jit_forward(model)(ids, pos)
    official = official_apply(case)(convert.to_official_params(model), ids, pos)
    error = max_relative_error(ours, official)
    print(f"beyond the window: max relative error vs official {error:.2e}")
    assert error <= 1e-5
    # HF attends to one key fewer: our model with window W - 1 is HF's.
    assert max_relative_error(ours, hf_logits(hf, ids)) > 1e-3
    narrower = convert.load_hf_checkpoint(tmp_path / "hf", attention_window_size=case.window - 1)
    assert max_relative_error(recurrent_lm.jit_forward(narrower)(ids, pos), hf_logits(hf, ids)) <= 1e-5


# ---------------------------------------------------------------------------
# Saving: transformers reads what we write.
# ---------------------------------------------------------------------------


def random_griffin(case: HFCase, **overrides):
    """Our own random Griffin (not loaded from HF): every parameter perturbed."""
    from recurrent_lm.models import griffin

    config = convert.config_from_hf(
        transformers.RecurrentGemmaConfig(**case.config).to_dict(), **overrides
    )
    skeleton = griffin.build_model(config, jax.random.key(case.seed))
    rng = np.random.default_rng(case.seed)
    state = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(v.dtype)
             for k, v in convert.to_hf_state_dict(skeleton).items()}
    return convert.from_hf_state_dict(state, config)


def test_save_is_read_by_transformers_and_round_trips(tmp_path):
    case = CASES["attention_first"]
    model = random_griffin(case)
    convert.save_hf_checkpoint(model, tmp_path / "hf")
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_hidden_layers == 5
    ids = random_ids(case.config["vocab_size"], 2, case.seq, 4)
    error = max_relative_error(recurrent_lm.jit_forward(model)(ids), hf_logits(hf, ids))
    print(f"saved: max relative error transformers vs ours {error:.2e}")
    assert error <= 1e-5
    ours = convert.to_hf_state_dict(model)
    assert_same_state(hf_state(hf), ours)
    assert_same_state(convert.to_hf_state_dict(convert.load_hf_checkpoint(tmp_path / "hf")), ours)


def test_save_sharded_bfloat16(tmp_path):
    case = CASES["hawk"]
    model = random_griffin(case, param_dtype="bfloat16")
    convert.save_hf_checkpoint(model, tmp_path / "hf", max_shard_size="10KB")
    with open(tmp_path / "hf" / common.HF_INDEX) as f:
        weight_map = json.load(f)["weight_map"]
    assert set(weight_map) == set(convert.to_hf_state_dict(model))
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 2 and not os.path.exists(tmp_path / "hf" / common.HF_WEIGHTS)
    for shard in shards:
        tensors = common.open_safetensors(tmp_path / "hf" / shard)
        assert len(tensors) == 1 or sum(t.size * 2 for t in tensors.values()) <= 10_000, shard
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.dtype == torch.bfloat16
    import ml_dtypes

    ours = convert.to_hf_state_dict(model)
    assert_same_state(hf_state(hf, ml_dtypes.bfloat16), ours)
    assert_same_state(convert.to_hf_state_dict(convert.load_hf_checkpoint(tmp_path / "hf")), ours)
    with pytest.raises(FileExistsError):
        convert.save_hf_checkpoint(model, tmp_path / "hf")


def test_save_rejects_what_hf_cannot_compute(tmp_path):
    model = random_griffin(CASES["hawk"], logits_soft_cap=0.0, embeddings_scale_by_sqrt_dim=False)
    with pytest.raises(ValueError, match="embeddings_scale_by_sqrt_dim.*logits_soft_cap"):
        convert.save_hf_checkpoint(model, tmp_path / "hf")
    assert not os.path.exists(tmp_path / "hf")


# ---------------------------------------------------------------------------
# Bad input, the 4.x config layout, the command line.
# ---------------------------------------------------------------------------


def test_not_hf_or_another_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HF checkpoint"):
        convert.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma"}))
    with pytest.raises(ValueError, match="model_type 'gemma', not 'recurrent_gemma'"):
        convert.load_hf_checkpoint(tmp_path)


def test_missing_and_misshaped_are_listed_together(hf_checkpoint, tmp_path):
    _case, hf, path = hf_checkpoint("hybrid")
    from safetensors.numpy import save_file

    state = hf_state(hf)
    del state["model.layers.0.temporal_block.rg_lru.recurrent_param"]
    state["model.layers.2.temporal_block.k_proj.weight"] = np.zeros((7, 48), np.float32)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "config.json", bad)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        convert.load_hf_checkpoint(bad)
    message = str(error.value)
    assert "missing     model.layers.0.temporal_block.rg_lru.recurrent_param: expected shape (64,)" in message
    assert "mis-shaped  model.layers.2.temporal_block.k_proj.weight: expected (24, 48), found (7, 48)" in message


def test_tensors_are_read_lazily_once_each(hf_checkpoint, tmp_path, monkeypatch):
    """Shapes are checked from the headers before any read; each tensor is then
    read once (a conversion holds one source tensor at a time)."""
    _, _hf, path = hf_checkpoint("hybrid")
    reads = []
    read = common.LazyTensor.__array__
    monkeypatch.setattr(common.LazyTensor, "__array__",
                        lambda self, *a, **k: reads.append(self.offset) or read(self, *a, **k))
    model = convert.load_hf_checkpoint(path)
    assert sorted(reads) == sorted(t.offset for t in common.read_hf_weights(path).values())
    reads.clear()
    shutil.copytree(path, tmp_path / "bad")
    with open(tmp_path / "bad" / "config.json") as f:
        config = json.load(f)
    with open(tmp_path / "bad" / "config.json", "w") as f:
        json.dump({**config, "lru_width": 32}, f)
    with pytest.raises(CheckpointMismatchError, match="rg_lru.recurrent_param: expected \\(32,\\)"):
        convert.load_hf_checkpoint(tmp_path / "bad")
    assert not reads
    assert model.config.lru_width == 64


def test_truncated_file(hf_checkpoint, tmp_path):
    _, _, path = hf_checkpoint("hybrid")
    shutil.copytree(path, tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match="truncated"):
        convert.load_hf_checkpoint(tmp_path / "cut")
    with open(weights, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ValueError, match="truncated"):
        convert.load_hf_checkpoint(tmp_path / "cut")


def test_config_4x_layout_and_unsupported_keys():
    old = {
        "model_type": "recurrent_gemma", "vocab_size": 11, "hidden_size": 8, "num_attention_heads": 2,
        "intermediate_size": 24, "num_hidden_layers": 4, "_block_types": [R, R, A], "rope_theta": 77.0,
        "partial_rotary_factor": 0.5, "num_key_value_heads": 1, "attention_window_size": 5,
    }
    config = convert.config_from_hf(old)
    assert config.block_types == (R, R, A, R)
    assert (config.rope_theta, config.intermediate_size, config.num_key_value_heads) == (77.0, 12, 1)
    with pytest.raises(ValueError, match="attention_bias.*hidden_activation.*intermediate_size 25"):
        convert.config_from_hf({**old, "attention_bias": True, "hidden_activation": "relu",
                                "intermediate_size": 25})


def test_cli_converts_an_hf_directory(hf_checkpoint, tmp_path, capsys):
    _case, hf, path = hf_checkpoint("hawk")
    assert convert.main(["convert", str(path), str(tmp_path / "ours")]) == 0
    assert "converted" in capsys.readouterr().out
    model = recurrent_lm.load(tmp_path / "ours")
    assert_same_state(convert.to_hf_state_dict(model), hf_state(hf))
