"""HF transformers' MambaForCausalLM / Mamba2ForCausalLM directories <-> ours.

Round trips are exact (every tensor, bit for bit); transformers reads what we
write (its logits are ours); bfloat16 and sharded directories; errors that
name every missing, unexpected or mis-shaped tensor; the command line.
Logit parity on every scan form is in tests/models/test_mamba.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from griffin_cases import max_relative_error
from mamba_cases import (
    CASES,
    case_ids,
    hf_directory,
    hf_logits,
    hf_model,
    hf_state,
    our_model,
)
from safetensors.numpy import load_file, save_file

import recurrent_lm
from checkpoints_conversion import common
from checkpoints_conversion import mamba as convert
from recurrent_lm.params import CheckpointMismatchError

HF_CLASSES = {"mamba": transformers.MambaForCausalLM, "mamba2": transformers.Mamba2ForCausalLM}


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = np.asarray(actual[name]), np.asarray(expected[name])
        assert a.dtype == e.dtype and a.shape == e.shape, name
        np.testing.assert_array_equal(a, e, err_msg=name)


def torch_state(model, dtype=np.float32) -> dict[str, np.ndarray]:
    state = {k: v.float().numpy().astype(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_save_our_load_our_save_is_exact(name, tmp_path):
    """HF's save_pretrained -> ours -> our save: the same tensors as HF's file,
    bit for bit; the family and config come back from config.json."""
    case = CASES[name]
    model = our_model(case)
    assert model.config.model_type == case.family and model.config.param_dtype == "float32"
    for key, value in case.kwargs.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(model.config, key) == expected, key
    hf_file = load_file(os.path.join(hf_directory(case), common.HF_WEIGHTS))
    assert_same_state(convert.to_hf_state_dict(model), hf_state(case))
    assert_same_state(hf_file, hf_state(case))
    convert.save_hf_checkpoint(model, tmp_path / "ours")
    assert_same_state(load_file(tmp_path / "ours" / common.HF_WEIGHTS), hf_file)
    again = convert.load_hf_checkpoint(tmp_path / "ours")
    assert again.config == model.config
    convert.save_hf_checkpoint(again, tmp_path / "again")
    assert (tmp_path / "ours" / common.HF_WEIGHTS).read_bytes() == (
        tmp_path / "again" / common.HF_WEIGHTS).read_bytes()


@pytest.mark.parametrize("name", ["m1_untied", "m2_groups"])
def test_transformers_reads_what_we_write(name, tmp_path):
    case = CASES[name]
    model = our_model(case)
    convert.save_hf_checkpoint(model, tmp_path / "hf")
    hf = HF_CLASSES[case.family].from_pretrained(tmp_path / "hf").eval()
    assert_same_state(torch_state(hf), convert.to_hf_state_dict(model))
    ids = case_ids(case, seed=5)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long), use_cache=False).logits.numpy()
    error = max_relative_error(recurrent_lm.jit_forward(model)(ids), theirs)
    print(f"{name}: transformers on our directory vs ours {error:.2e}")
    assert error <= 1e-5
    assert max_relative_error(theirs, hf_logits(case, ids)) <= 1e-6  # the same model as the case's


def test_bfloat16_and_sharded_directories(tmp_path):
    case = CASES["m2_tied"]
    hf_bf16 = copy.deepcopy(hf_model(case)).to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path / "bf16", max_shard_size="2KB")
    assert os.path.isfile(tmp_path / "bf16" / common.HF_INDEX)
    model = convert.load_hf_checkpoint(tmp_path / "bf16")
    assert model.config.param_dtype == "bfloat16"
    stored = torch_state(hf_bf16, ml_dtypes.bfloat16)
    assert_same_state(convert.to_hf_state_dict(model), stored)
    assert np.isfinite(np.asarray(recurrent_lm.jit_forward(model)(case_ids(case)), np.float32)).all()
    as_f32 = convert.load_hf_checkpoint(tmp_path / "bf16", dtype="float32")
    assert as_f32.config.param_dtype == "float32"
    assert_same_state(convert.to_hf_state_dict(as_f32), {k: v.astype(np.float32) for k, v in stored.items()})
    convert.save_hf_checkpoint(model, tmp_path / "ours", max_shard_size="2KB")
    assert len([f for f in os.listdir(tmp_path / "ours") if f.endswith(".safetensors")]) > 2
    back = HF_CLASSES[case.family].from_pretrained(tmp_path / "ours")
    assert back.dtype == torch.bfloat16
    assert_same_state(torch_state(back, ml_dtypes.bfloat16), stored)


def rewritten(case, tmp_path, change, config_change=None):
    """The case's directory with its tensors (and config.json) changed."""
    path = tmp_path / "changed"
    shutil.copytree(hf_directory(case), path)
    state = hf_state(case)
    change(state)
    save_file(state, str(path / common.HF_WEIGHTS), metadata={"format": "pt"})
    if config_change:
        values = json.loads((path / common.HF_CONFIG).read_text())
        (path / common.HF_CONFIG).write_text(json.dumps({**values, **config_change}))
    return path


def test_missing_unexpected_and_misshaped_are_listed_together(tmp_path):
    case = CASES["m1_odd"]

    def change(state):
        del state["backbone.layers.1.mixer.A_log"]
        state["backbone.layers.0.mixer.x_proj.weight"] = np.zeros((9, 36), np.float32)
        state["backbone.layers.0.mixer.dt_bias"] = np.zeros(36, np.float32)

    with pytest.raises(CheckpointMismatchError) as error:
        convert.load_hf_checkpoint(rewritten(case, tmp_path, change))
    message = str(error.value)
    assert "missing     backbone.layers.1.mixer.A_log: expected shape (36, 5)" in message
    assert "mis-shaped  backbone.layers.0.mixer.x_proj.weight: expected (12, 36), found (9, 36)" in message
    assert "unexpected  backbone.layers.0.mixer.dt_bias: found shape (36,)" in message


def test_a_config_that_disagrees_with_the_tensors(tmp_path):
    """n_groups 1 in config.json, tensors of 2 groups: the conv and in_proj
    shapes name it; an HF key we cannot compute names itself."""
    case = CASES["m2_groups"]
    path = rewritten(case, tmp_path, lambda state: None, {"n_groups": 1})
    with pytest.raises(CheckpointMismatchError, match="mixer.conv1d.weight: expected \\(34, 1, 3\\), found \\(44, 1, 3\\)"):
        convert.load_hf_checkpoint(path)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        convert.config_from_hf({"model_type": "mamba", "hidden_act": "gelu"})


def test_old_embedding_name_and_a_stored_tied_head(tmp_path):
    """``backbone.embedding.weight`` (HF's load hook renames it) loads; a tied
    model's stored ``lm_head.weight`` is the embeddings and is dropped."""
    case = CASES["m1_odd"]

    def change(state):
        state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
        state["lm_head.weight"] = state["backbone.embedding.weight"]

    model = convert.load_hf_checkpoint(rewritten(case, tmp_path, change))
    assert_same_state(convert.to_hf_state_dict(model), hf_state(case))


def test_not_hf_or_another_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HF checkpoint"):
        convert.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    with pytest.raises(ValueError, match="model_type 'rwkv', not 'mamba' or 'mamba2'"):
        convert.load_hf_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="expected a Mamba or Mamba-2 model"):
        convert.to_hf_state_dict(recurrent_lm.DecoderLM.__new__(recurrent_lm.DecoderLM))


def test_cli_converts_an_hf_directory(tmp_path, capsys):
    case = CASES["m2_groups"]  # time_step_limit (0, inf): infinity through both config files
    assert convert.main(["convert", hf_directory(case), str(tmp_path / "ours")]) == 0
    assert "converted" in capsys.readouterr().out
    model = recurrent_lm.load(tmp_path / "ours")
    assert model.config == our_model(case).config and model.config.time_step_limit[1] == float("inf")
    assert_same_state(convert.to_hf_state_dict(model), hf_state(case))
    assert convert.main(["convert", hf_directory(case), str(tmp_path / "ours")]) == 2
    assert "already exists" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# The original package's directories (state-spaces/mamba-130m, mamba2-130m ...).
# ---------------------------------------------------------------------------

MAMBA_SSM_CONFIGS = {  # what mamba_ssm's config.json says for each case (37 and 31: padded vocabularies)
    "m1_odd": {"d_model": 18, "n_layer": 2, "vocab_size": 30, "pad_vocab_size_multiple": 37,
               "ssm_cfg": {"d_state": 5, "d_conv": 3, "expand": 2, "bias": True}},
    "m2_tied": {"d_model": 10, "n_layer": 2, "vocab_size": 29, "pad_vocab_size_multiple": 31,
                "ssm_cfg": {"layer": "Mamba2", "d_state": 6, "d_conv": 4, "expand": 2, "headdim": 4,
                            "ngroups": 1, "chunk_size": 5, "conv_bias": False, "bias": True,
                            "dt_limit": [0.05, 0.5], "use_mem_eff_path": True}},
}


def mamba_ssm_directory(name, path, **changes):
    """The case's model as mamba_ssm publishes it: its config.json, and
    ``pytorch_model.bin`` with ``backbone.embedding`` and the tied head stored."""
    path.mkdir()
    values = {"d_intermediate": 0, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "tie_embeddings": True,
              **MAMBA_SSM_CONFIGS[name], **changes}
    (path / "config.json").write_text(json.dumps(values))
    state = hf_state(CASES[name])
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize("name", sorted(MAMBA_SSM_CONFIGS))
def test_mamba_ssm_directories_load(name, tmp_path, capsys):
    case = CASES[name]
    path = mamba_ssm_directory(name, tmp_path / "original")
    # mamba_ssm's norms take eps 1e-5; this case's HF model has its own.
    eps = {"layer_norm_epsilon": case.kwargs["layer_norm_epsilon"]} if "layer_norm_epsilon" in case.kwargs else {}
    model = convert.load_mamba_ssm_checkpoint(path, **eps)
    special = {k: 0 for k in ("pad_token_id", "bos_token_id", "eos_token_id")}  # the NeoX tokenizer's
    assert model.config == dataclasses.replace(our_model(case).config, **special)
    assert_same_state(convert.to_hf_state_dict(model), hf_state(case))
    ids = case_ids(case, seed=7)
    assert max_relative_error(recurrent_lm.jit_forward(model)(ids), hf_logits(case, ids)) <= 1e-5
    assert convert.main(["convert", str(path), str(tmp_path / "ours"), "--param-dtype", "float32"]) == 0
    capsys.readouterr()
    assert recurrent_lm.load(tmp_path / "ours").config.model_type == case.family


def test_mamba_ssm_variants_we_do_not_compute_are_named(tmp_path):
    path = mamba_ssm_directory("m2_tied", tmp_path / "original", attn_layer_idx=[1], d_intermediate=8)
    values = json.loads((path / "config.json").read_text())
    values["ssm_cfg"]["D_has_hdim"] = True
    (path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"d_intermediate 8 \(we compute 0\); attn_layer_idx \[1\] .*"
                                         r"D_has_hdim True \(we compute False\)"):
        convert.load_checkpoint(path)
