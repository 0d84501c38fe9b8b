"""``python -m checkpoints_conversion.verify SRC``: format detection and our logits
against each installed reference, on tiny random checkpoints written in the real
formats (HF ``save_pretrained``, BlinkDL ``.pth``, official orbax, KerasHub preset).
"""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import rwkv7_cases
from gemma_cases import CASES as GEMMA_CASES
from gemma_cases import official_params as gemma_official_params

from checkpoints_conversion import gemma, recurrentgemma, rwkv, verify

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LINE = re.compile(r"^(\S+): max relative logit error (\S+) vs (.+) \(batch (\d+), seq (\d+)\)$")


def perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{format name: path}, each a tiny random checkpoint in that format."""
    root = tmp_path_factory.mktemp("verify")
    paths = {}
    rg_config = transformers.RecurrentGemmaConfig(
        vocab_size=41, hidden_size=32, num_attention_heads=2, lru_width=32, intermediate_size=48,
        num_hidden_layers=3, block_types=["recurrent", "recurrent", "attention"],
        attention_window_size=12, num_key_value_heads=1)
    perturbed(transformers.RecurrentGemmaForCausalLM(rg_config), 0).save_pretrained(root / "hf_rg")
    paths["hf-recurrentgemma"] = root / "hf_rg"
    rwkv_config = transformers.RwkvConfig(vocab_size=37, hidden_size=16, num_hidden_layers=2,
                                          attention_hidden_size=16, intermediate_size=48,
                                          context_length=64)
    perturbed(transformers.RwkvForCausalLM(rwkv_config), 1).save_pretrained(root / "hf_rwkv")
    paths["hf-rwkv"] = root / "hf_rwkv"
    gemma_config = transformers.GemmaConfig(
        vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=12, attn_implementation="eager")
    perturbed(transformers.GemmaForCausalLM(gemma_config), 2).save_pretrained(root / "hf_gemma")
    paths["hf-gemma"] = root / "hf_gemma"
    # Gemma 2: GQA, sliding window 3 < seq, soft caps, query_pre_attn_scalar of its own.
    gemma2_config = transformers.Gemma2Config(
        vocab_size=61, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=7, sliding_window=3,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attn_implementation="eager")
    perturbed(transformers.Gemma2ForCausalLM(gemma2_config), 3).save_pretrained(root / "hf_gemma2")
    paths["hf-gemma2"] = root / "hf_gemma2"
    mamba_config = transformers.MambaConfig(vocab_size=43, hidden_size=16, state_size=4, num_hidden_layers=2)
    perturbed(transformers.MambaForCausalLM(mamba_config), 4).save_pretrained(root / "hf_mamba")
    paths["hf-mamba"] = root / "hf_mamba"
    # Mamba-2: two groups, SSD chunks of 4 < seq.
    mamba2_config = transformers.Mamba2Config(
        vocab_size=47, hidden_size=16, num_heads=4, head_dim=8, state_size=4, n_groups=2,
        num_hidden_layers=2, chunk_size=4)
    perturbed(transformers.Mamba2ForCausalLM(mamba2_config), 5).save_pretrained(root / "hf_mamba2")
    paths["hf-mamba2"] = root / "hf_mamba2"
    # Through our converters' save paths: BlinkDL .pth, official RecurrentGemma orbax.
    rwkv.save_blinkdl_checkpoint(rwkv.load_hf_checkpoint(root / "hf_rwkv"), root / "blinkdl.pth")
    paths["blinkdl-rwkv"] = root / "blinkdl.pth"
    rwkv7_cases.save_pth(rwkv7_cases.blinkdl_state_dict(rwkv7_cases.CASES["narrow"]), root / "x070.pth")
    paths["blinkdl-rwkv7"] = root / "x070.pth"
    griffin = recurrentgemma.load_hf_checkpoint(root / "hf_rg")
    official = jax.tree.map(jnp.asarray, recurrentgemma.to_official_params(griffin))
    ocp.PyTreeCheckpointer().save(str(root / "official_rg"), official)
    paths["official-recurrentgemma"] = root / "official_rg"
    case = GEMMA_CASES["gemma1_mqa"]
    params = gemma_official_params(case)
    ocp.PyTreeCheckpointer().save(str(root / "official_gemma"), jax.tree.map(jnp.asarray, params))
    paths["official-gemma"] = root / "official_gemma"
    # Gemma 2: GQA, soft caps, sliding window 4 < seq, the transposed gating layout.
    ocp.PyTreeCheckpointer().save(str(root / "official_gemma2"),
                                  jax.tree.map(jnp.asarray, gemma_official_params(GEMMA_CASES["gemma2_gqa"])))
    paths["official-gemma2"] = root / "official_gemma2"
    gemma.save_keras_preset(gemma.from_official_params(params), root / "keras")
    paths["keras-gemma"] = root / "keras"
    torch.save({"backbone.embeddings.word_embeddings.weight": torch.zeros(8, 4)}, root / "h3.pt")
    paths["h3"] = root / "h3.pt"
    return {name: str(path) for name, path in paths.items()}


def run(capsys, *argv):
    status = verify.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_detects_every_format(checkpoints):
    for name, path in checkpoints.items():
        assert verify.detect(path).name == name.replace("official-gemma2", "official-gemma"), path


@pytest.mark.parametrize("name", [
    "hf-recurrentgemma", "hf-gemma", "hf-gemma2", "hf-rwkv", "hf-mamba", "hf-mamba2", "blinkdl-rwkv",
    "blinkdl-rwkv7", "official-recurrentgemma",
    "official-gemma2", "keras-gemma",  # official-gemma (Gemma 1): detection only, same reference
])
def test_logits_match_the_reference(checkpoints, capsys, name):
    status, out, err = run(capsys, checkpoints[name], "--seq", 13, "--batch", 2)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    match = LINE.match(lines[0])
    assert match and match.group(1) == name.replace("official-gemma2", "official-gemma"), lines[0]
    assert float(match.group(2)) < 1e-5, lines[0]
    # HF RecurrentGemma: cut to its attention window (12), where HF is right.
    assert (match.group(4), match.group(5)) == ("2", "12" if name == "hf-recurrentgemma" else "13")


def test_h3_has_no_reference(checkpoints, capsys):
    status, out, err = run(capsys, checkpoints["h3"])
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and "no installed reference" in err and "H3" in err


def test_unknown_directory_and_other_model_type(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for path in (tmp_path / "empty", other, tmp_path / "missing"):
        status, out, err = run(capsys, path)
        assert status == 2 and out == "", err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "unknown checkpoint format" in err or "does not exist" in err


def test_missing_reference_package_names_it(checkpoints, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rwkv", None)  # import rwkv.model -> ImportError
    monkeypatch.setitem(sys.modules, "rwkv.model", None)
    status, out, err = run(capsys, checkpoints["blinkdl-rwkv"])
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "pip install rwkv" in err


def test_hf_gemma_directories_are_detected_by_model_type(tmp_path):
    for model_type in ("gemma", "gemma2"):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert verify.detect(str(tmp_path / model_type)).name == f"hf-{model_type}"


def test_every_format_is_in_the_table():
    names = [f.name for f in verify.FORMATS]
    assert len(names) == len(set(names))
    assert {"hf-gemma", "hf-gemma2", "hf-recurrentgemma", "hf-rwkv", "hf-mamba", "hf-mamba2", "keras-gemma",
            "official-recurrentgemma", "official-gemma", "blinkdl-rwkv", "blinkdl-rwkv7", "h3"} == set(names)
