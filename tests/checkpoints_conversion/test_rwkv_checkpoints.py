"""RWKV-4 converters: HF state dicts and directories, BlinkDL .pth, tokenizer."""

import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from rwkv_cases import CASES, case_ids, hf_logits, hf_model, hf_state_dict, our_model

from checkpoints_conversion import rwkv as convert
from recurrent_lm.models import rwkv
from recurrent_lm.params import CheckpointMismatchError, parameter_values

# Original BlinkDL names for a few HF ones (RWKV-LM's model.py / ChatRWKV).
BLINKDL_NAMES = {
    "rwkv.embeddings.weight": "emb.weight",
    "rwkv.blocks.0.pre_ln.weight": "blocks.0.ln0.weight",
    "rwkv.blocks.1.attention.time_mix_key": "blocks.1.att.time_mix_k",
    "rwkv.blocks.1.attention.time_mix_value": "blocks.1.att.time_mix_v",
    "rwkv.blocks.1.attention.time_mix_receptance": "blocks.1.att.time_mix_r",
    "rwkv.blocks.2.attention.time_decay": "blocks.2.att.time_decay",
    "rwkv.blocks.0.feed_forward.value.weight": "blocks.0.ffn.value.weight",
    "rwkv.blocks.2.ln2.bias": "blocks.2.ln2.bias",
    "rwkv.ln_out.weight": "ln_out.weight",
    "head.weight": "head.weight",
}


def assert_same_state_dict(actual, expected):
    assert expected and sorted(actual) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(
            np.asarray(actual[name]), np.asarray(expected[name]), err_msg=name
        )


@pytest.mark.parametrize("case_name", ["odd", "tied"])
def test_hf_state_dict_round_trip_is_exact(case_name):
    case = CASES[case_name]
    state = hf_state_dict(case)
    model = our_model(case)
    expected = dict(state)
    if case.tie:
        expected.pop("head.weight")  # the embeddings, shared
    assert_same_state_dict(convert.to_hf_state_dict(model), expected)
    mix = parameter_values(model)["blocks.1.attention.time_mix_key"]
    assert dict(mix.named_shape) == {"embedding": case.hidden}  # HF's (1, 1, C)


def test_hf_directory_round_trip_and_transformers_reads_ours(tmp_path):
    """save_hf_checkpoint -> load_hf_checkpoint is exact; transformers loads our directory."""
    from transformers import RwkvForCausalLM

    case = CASES["odd"]
    model = our_model(case)
    directory = tmp_path / "hf"
    convert.save_hf_checkpoint(model, directory)
    loaded = convert.load_hf_checkpoint(directory)
    assert loaded.config == model.config
    assert_same_state_dict(convert.to_hf_state_dict(loaded), hf_state_dict(case))
    theirs = RwkvForCausalLM.from_pretrained(directory).train()
    ids = case_ids(case)
    np.testing.assert_array_equal(
        hf_logits(theirs, ids), hf_logits(hf_model(case), ids)
    )
    with pytest.raises(FileExistsError):
        convert.save_hf_checkpoint(model, directory)


def test_sharded_bfloat16_directory(tmp_path):
    """model.safetensors.index.json and its shards; bfloat16 stays bfloat16."""
    from checkpoints_conversion.common import read_weights, write_weights

    case = CASES["odd"]
    model = convert.from_hf_state_dict(hf_state_dict(case), case.config(param_dtype="bfloat16"))
    convert.save_hf_checkpoint(model, tmp_path / "one")
    state = read_weights(tmp_path / "one" / "model.safetensors")
    assert {v.dtype for v in state.values()} == {jnp.dtype(jnp.bfloat16)}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    directory = tmp_path / "sharded"
    directory.mkdir()
    for shard, shard_names in shards.items():
        write_weights({n: state[n] for n in shard_names}, directory / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    loaded = convert.load_hf_checkpoint(directory)
    assert loaded.config == model.config
    assert_same_state_dict(convert.to_hf_state_dict(loaded), convert.to_hf_state_dict(model))


def test_pytorch_model_bin_directory(tmp_path):
    import torch

    case = CASES["narrow"]
    state = hf_state_dict(case)
    torch.save(
        {k: torch.from_numpy(v) for k, v in state.items()},
        tmp_path / "pytorch_model.bin",
    )
    (tmp_path / "config.json").write_text(
        json.dumps(convert.hf_config_dict(case.config()))
    )
    loaded = convert.load_hf_checkpoint(tmp_path)
    assert loaded.config == case.config()
    assert_same_state_dict(convert.to_hf_state_dict(loaded), state)


def test_blinkdl_pth_with_inferred_config(tmp_path):
    import torch

    case = CASES["odd"]
    hf = hf_state_dict(case)
    blinkdl = convert.hf_to_blinkdl_names(hf)
    for hf_name, name in BLINKDL_NAMES.items():
        np.testing.assert_array_equal(blinkdl[name], hf[hf_name])
    assert all(not k.startswith("rwkv.") for k in blinkdl)
    path = tmp_path / "RWKV-4-test.pth"
    torch.save({k: torch.from_numpy(v) for k, v in blinkdl.items()}, path)
    model = convert.load_blinkdl_checkpoint(path)
    # The shapes give everything but the fields the Pile models share.
    expected_config = case.config(context_length=1024, rescale_every=6)
    assert model.config == expected_config
    assert_same_state_dict(convert.to_hf_state_dict(model), hf)
    # Writing it back gives the same file contents.
    out = tmp_path / "back.pth"
    convert.save_blinkdl_checkpoint(model, out)
    back = torch.load(out, weights_only=True)
    assert_same_state_dict({k: v.numpy() for k, v in back.items()}, blinkdl)


def test_blinkdl_bfloat16_loads_in_bfloat16(tmp_path):
    import torch

    case = CASES["tied"]
    blinkdl = convert.hf_to_blinkdl_names(hf_state_dict(case))
    del blinkdl["head.weight"]  # HF's state dict repeats the tied table
    path = tmp_path / "bf16.pth"
    torch.save(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in blinkdl.items()}, path
    )
    model = convert.load_blinkdl_checkpoint(path)
    assert model.config.param_dtype == "bfloat16"
    assert model.config.tie_word_embeddings  # no head.weight in the file
    table = parameter_values(model)["embeddings.embeddings"]
    expected = np.asarray(jnp.asarray(blinkdl["emb.weight"], jnp.bfloat16))
    np.testing.assert_array_equal(
        np.asarray(table.unwrap("vocabulary", "embedding")), expected
    )


def test_mismatch_lists_every_bad_name_with_shapes():
    case = CASES["odd"]
    state = dict(hf_state_dict(case))
    del state["rwkv.blocks.1.attention.time_first"]
    state["rwkv.blocks.1.attention.bonus"] = np.zeros(3, np.float32)
    state["rwkv.blocks.2.feed_forward.key.weight"] = np.zeros((51, 24), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert.from_hf_state_dict(state, case.config())
    message = str(info.value)
    assert (
        "missing     rwkv.blocks.1.attention.time_first: expected shape (40,)"
        in message
    )
    assert "unexpected  rwkv.blocks.1.attention.bonus: found shape (3,)" in message
    assert (
        "mis-shaped  rwkv.blocks.2.feed_forward.key.weight: expected (52, 24), found (51, 24)"
        in message
    )
    with pytest.raises(
        CheckpointMismatchError, match="missing     rwkv.embeddings.weight"
    ):
        convert.infer_config({"emb": np.zeros(3)})


def test_missing_files_and_torch_hint(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "rwkv"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba', not 'rwkv'"):
        convert.load_hf_checkpoint(tmp_path)
    path = tmp_path / "model.pth"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(ImportError, match="pip install torch==2.13.0"):
        convert.load_blinkdl_checkpoint(path)


def test_config_from_hf_ignores_hf_only_keys():
    config = convert.config_from_hf(
        {
            "vocab_size": 50277,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "attention_hidden_size": None,
            "intermediate_size": None,
            "eos_token_id": [0],
            "use_cache": True,
            "torch_dtype": "float32",
            "architectures": ["RwkvForCausalLM"],
        }
    )
    assert config == rwkv.RwkvConfig.from_preset("169m")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A tiny byte-level BPE tokenizer.json, built here (no download), with
    ``<|endoftext|>`` as id 0 as in GPT-NeoX-20B."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(
        ["Hello my name is RWKV.", "the quick brown fox"] * 20, trainer
    )
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_tokenizer_round_trip(tokenizer_file):
    tokenizer = convert.load_tokenizer(tokenizer_file.parent)  # a directory works too
    text = "Hello my name is Jasmine, the fox."
    ids = tokenizer.encode(text)
    assert ids and 0 not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_bos=True, add_eos=True) == [0, *ids, 0]
    assert tokenizer.decode([0]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(FileNotFoundError):
        convert.load_tokenizer(tokenizer_file.parent / "missing.json")
    bad = tokenizer_file.parent / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        convert.load_tokenizer(bad)


def test_cli_convert_then_recurrent_lm_load(tmp_path, capsys):
    import recurrent_lm

    case = CASES["tied"]
    model = our_model(case)
    convert.save_hf_checkpoint(model, tmp_path / "hf")
    assert convert.main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    assert "converted" in capsys.readouterr().out
    loaded = recurrent_lm.load(tmp_path / "ours")
    assert loaded.config == model.config
    assert_same_state_dict(
        convert.to_hf_state_dict(loaded), convert.to_hf_state_dict(model)
    )
