"""H3 against the original implementation (HazyResearch/H3, CPU, float32).

`tests/data/h3_tiny/` holds a 3-layer hybrid H3 (layer 1 is attention) with
the released checkpoints' parameter names, its original config, and tensors
the original code produced from it: logits of the convolution path and of the
step-by-step generation path, layer 0's SSM kernels, layer 0's mixer input
and output, and the SSM states after a 40-token prompt.
"""

import json
import os

import jax
import numpy as np
import pytest
from penzai import pz
from safetensors.numpy import load_file

from checkpoints_conversion import h3 as convert
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.core.state import Stateful
from recurrent_lm.layers import ssm
from recurrent_lm.models import h3
from recurrent_lm.params import CheckpointMismatchError
from recurrent_lm.sampling import to_sampling_mode

DATA = os.path.join(os.path.dirname(__file__), "..", "data", "h3_tiny")
WEIGHTS = os.path.join(DATA, "h3_tiny.safetensors")
PROMPT = 40  # the fixture's states are after this many tokens


def rel(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def config_dict():
    with open(os.path.join(DATA, "h3_tiny_config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(DATA, "h3_tiny_expected.safetensors"))


@pytest.fixture(scope="module")
def weights():
    return load_file(WEIGHTS)


@pytest.fixture(scope="module")
def model(config_dict):
    return convert.load_checkpoint(WEIGHTS, config_dict)


def tokens(ids):
    return pz.nx.wrap(np.asarray(ids)).tag("batch", "seq")


def logits_of(model, ids):
    return model(tokens(ids)).unwrap("batch", "seq", "vocabulary")


def test_config_from_the_original_dict(model):
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.attn_layer_idx) == (
        32,
        3,
        (1,),
    )
    assert (config.vocab_size, config.num_attention_heads, config.n_inner) == (
        64,
        4,
        128,
    )
    assert config.discretisation == "bilinear" and config.d_state == 64


@pytest.mark.parametrize("method", ["fft", "scan"])
def test_logits_match_the_original(model, expected, method):
    ours = logits_of(ssm.with_ssm_method(model, method), expected["input_ids"])
    assert ours.shape == expected["logits"].shape
    assert rel(ours, expected["logits"]) <= 1e-4
    assert rel(ours, expected["logits_recurrent"]) <= 1e-4


def test_stepwise_logits_through_sampling_mode(model, expected):
    ids = expected["input_ids"]
    sampler = to_sampling_mode(model, batch_size=ids.shape[0], max_length=ids.shape[1])
    prompt = sampler(tokens(ids[:, :PROMPT])).unwrap("batch", "seq", "vocabulary")
    steps = [
        sampler(tokens(ids[:, t : t + 1])).unwrap("batch", "seq", "vocabulary")
        for t in range(PROMPT, ids.shape[1])
    ]
    ours = np.concatenate([prompt, *steps], axis=1)
    assert rel(ours, expected["logits_recurrent"]) <= 1e-4


def test_layer0_kernels(model, expected):
    mixer = h3.mixer(model, 0)
    length = expected["kernel_diag_layer0"].shape[1]
    diag, shift = jax.jit(
        lambda: (
            mixer.kernel.kernel(length).unwrap("heads", "seq"),
            mixer.ssm_k.kernel().unwrap("heads", "conv_taps"),
        )
    )()
    assert rel(diag, expected["kernel_diag_layer0"]) <= 1e-5
    shift = np.pad(
        shift, ((0, 0), (0, length - shift.shape[1]))
    )  # the original pads with zeros
    assert rel(shift, expected["kernel_shift_layer0"]) <= 1e-5


def test_layer0_mixer(model, expected):
    x = pz.nx.wrap(expected["layer0_mixer_in"]).tag("batch", "seq", "embedding")
    pos = pz.nx.wrap(
        np.broadcast_to(np.arange(x.named_shape["seq"]), x.data_array.shape[:2])
    ).tag("batch", "seq")
    out = jax.jit(lambda x, pos: h3.mixer(model, 0)(x, context=DocumentContext.build(pos)))(x, pos)
    out = out.unwrap("batch", "seq", "embedding")
    assert rel(out, expected["layer0_mixer_out"]) <= 1e-5


def test_prompt_states(model, expected):
    ids = expected["input_ids"]
    sampler = to_sampling_mode(model, batch_size=ids.shape[0], max_length=ids.shape[1])
    sampler(tokens(ids[:, :PROMPT]))
    wrappers = pz.select(sampler).at_instances_of(Stateful).get_sequence()
    diag = [w for w in wrappers if isinstance(w.layer, ssm.DiagonalSSM)]
    shift = [w for w in wrappers if isinstance(w.layer, ssm.ShiftSSM)]
    assert len(diag) == len(shift) == 2  # layers 0 and 2 (layer 1 is attention)
    for twin_diag, twin_shift, layer in zip(diag, shift, (0, 2), strict=True):
        h = twin_diag.state.value.unwrap("batch", "heads", "state")
        assert rel(h.real, expected[f"prompt_state_diag_layer{layer}_real"]) <= 1e-5
        assert rel(h.imag, expected[f"prompt_state_diag_layer{layer}_imag"]) <= 1e-5
        register = twin_shift.layer.register(twin_shift.state.value)
        assert (
            rel(
                register.unwrap("batch", "heads", "state"),
                expected[f"prompt_state_shift_layer{layer}"],
            )
            <= 1e-5
        )


def test_export_round_trip_is_exact(model, weights):
    exported = convert.to_original_state_dict(model)
    assert sorted(exported) == sorted(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_safetensors_save_and_reload(model, config_dict, expected, tmp_path):
    path = str(tmp_path / "h3.safetensors")
    convert.save_checkpoint(model, path)
    again = convert.load_checkpoint(path, model.config)
    ids = expected["input_ids"]  # the shape of the parity test: compiled once
    np.testing.assert_array_equal(logits_of(again, ids), logits_of(model, ids))


def _torch_state(weights):
    torch = pytest.importorskip("torch")
    return torch, {k: torch.from_numpy(v.copy()) for k, v in weights.items()}


def test_lightning_checkpoint_with_model_prefix(
    model, weights, config_dict, expected, tmp_path
):
    torch, state = _torch_state(weights)
    path = str(tmp_path / "lightning.ckpt")
    torch.save(
        {
            "pytorch-lightning_version": "1.6.5",
            "epoch": 3,
            "state_dict": {f"model.{k}": v for k, v in state.items()},
        },
        path,
    )
    loaded = convert.load_checkpoint(path, config_dict)
    ids = expected["input_ids"]  # the shape of the parity test: compiled once
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(model, ids))


def test_legacy_names_and_post_norm_layout(
    model, weights, config_dict, expected, tmp_path
):
    """Old checkpoints: s4seq.encoder./embedding. names, norms after each sublayer."""
    torch, state = _torch_state(weights)
    layers = config_dict["n_layer"]
    old = {k: v for k, v in state.items() if ".norm" not in k and "ln_f" not in k}
    for part in ("weight", "bias"):
        old[f"backbone.norm.{part}"] = state[f"backbone.layers.0.norm1.{part}"]
        for layer in range(layers):
            old[f"backbone.layers.{layer}.norm1.{part}"] = state[
                f"backbone.layers.{layer}.norm2.{part}"
            ]
            new = (
                f"backbone.layers.{layer + 1}.norm1.{part}"
                if layer + 1 < layers
                else f"backbone.ln_f.{part}"
            )
            old[f"backbone.layers.{layer}.norm2.{part}"] = state[new]
    legacy = {}
    for key, value in old.items():
        if key.startswith("backbone.embeddings.word_embeddings."):
            key = "embedding." + key[len("backbone.embeddings.word_embeddings.") :]
        elif key.startswith("backbone."):
            key = "s4seq.encoder." + key[len("backbone.") :]
        legacy[key] = value
    path = str(tmp_path / "legacy.pt")
    torch.save(legacy, path)
    loaded = convert.load_checkpoint(path, config_dict)
    ids = expected["input_ids"]  # the shape of the parity test: compiled once
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(model, ids))


def test_mismatched_checkpoint_lists_every_problem(weights, config_dict):
    state = dict(weights)
    del state["backbone.layers.0.mixer.kernel.kernel.log_dt"]
    state["backbone.layers.2.mixer.extra"] = np.zeros(3, np.float32)
    state["backbone.layers.1.mixer.Wqkv.weight"] = np.zeros((90, 32), np.float32)
    state["backbone.layers.2.mixer.kernel.kernel.C"] = np.zeros((1, 32, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert.from_state_dict(state, config_dict)
    message = str(info.value)
    assert (
        "missing     backbone.layers.0.mixer.kernel.kernel.log_dt: expected shape (32,)"
        in message
    )
    assert "unexpected  backbone.layers.2.mixer.extra: found shape (3,)" in message
    assert (
        "backbone.layers.1.mixer.Wqkv.weight: expected (96, 32), found (90, 32)"
        in message
    )
    assert (
        "backbone.layers.2.mixer.kernel.kernel.C: expected (1, 32, 32, 2), found (1, 32, 32)"
        in message
    )


def test_wrong_config_for_the_weights(weights):
    """125M-like layer pattern on the tiny weights: attention/H3 leaves swap."""
    config = h3.H3Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        attn_layer_idx=(2,),
    )
    with pytest.raises(
        CheckpointMismatchError, match="backbone.layers.1.mixer.Wqkv.weight"
    ):
        convert.from_state_dict(weights, config)


def test_untied_head_is_refused(weights, config_dict):
    state = dict(weights)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        convert.from_state_dict(state, config_dict)


def test_untied_head_is_listed_with_the_other_problems(weights, config_dict):
    state = dict(weights)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    del state["backbone.ln_f.bias"]
    with pytest.raises(CheckpointMismatchError) as info:
        convert.from_state_dict(state, config_dict)
    message = str(info.value)
    assert "missing     backbone.ln_f.bias" in message
    assert "mis-shaped  lm_head.weight: expected the tied embedding" in message


def test_bad_original_configs(config_dict):
    with pytest.raises(ValueError, match="unknown keys \\['d_modle'\\]"):
        convert.resolve_config({**config_dict, "d_modle": 3})
    with pytest.raises(ValueError, match="tied embeddings"):
        convert.resolve_config({**config_dict, "tie_embeddings": False})
    with pytest.raises(ValueError, match="discretisation"):
        convert.resolve_config({**config_dict, "disc": "euler"})
    nested = {
        k: v
        for k, v in config_dict.items()
        if k not in ("num_heads", "padded_vocab_size")
    }
    nested["attn_cfg"] = {"num_heads": 4}
    config = convert.resolve_config(nested)
    assert config.num_attention_heads == 4 and config.vocab_size == 64  # 61 padded to 8


def test_unknown_file_type_and_missing_file(tmp_path, config_dict):
    with pytest.raises(FileNotFoundError):
        convert.load_checkpoint(tmp_path / "absent.pt", config_dict)
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        convert.load_checkpoint(path, config_dict)


def test_pt_without_torch_gives_an_install_hint(tmp_path, config_dict, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        convert.load_checkpoint(path, config_dict)
