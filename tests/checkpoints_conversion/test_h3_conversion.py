"""H3 against the original implementation (HazyResearch/H3 @5c4d06b with its
flash-attention v0.2.8; CPU, float32).

Fixtures in `tests/data/` (each computed by the original code; the v2 ones
say how in their PROVENANCE.md):

* ``h3_tiny``: 3 layers (layer 1 attention), random init, so the diagonal
  SSM's B is exactly 1+0j: it cannot tell B's imaginary part or the B/C
  complex conventions apart.
* ``h3_tiny_v2``: 4 layers (layer 1 attention, 4 heads of 10), EVERY
  parameter perturbed (max |Im B| about 2).
* ``h3_rotary``: the same with rotary attention on 6 of the 10 features of
  each head, as the rotary 2.7B (64 of 128).

Each holds the original's full-forward logits, its generation path (a
40-token prompt, then 30 single-token steps) with the SSM states and KV cache
after the prompt; the v2 fixtures add the states after all 70 tokens,
greedy generation, and packed rows (concatenated documents, each run alone).
We match all of it through the loader, the model, the sampling mode and
`generate`, relative error ``max|ours - theirs| / max|theirs|`` at most 1e-4
(float32; measured values are 1e-7 to 1e-5).
"""

import dataclasses
import functools
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
from recurrent_lm.layers import Attention, ssm
from recurrent_lm.models import h3
from recurrent_lm.params import CheckpointMismatchError
from recurrent_lm.sampling import generate, to_sampling_mode

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
FIXTURES = ("h3_tiny", "h3_tiny_v2", "h3_rotary")
V2 = ("h3_tiny_v2", "h3_rotary")  # with final states, greedy generation and packed rows
PROMPT = 40  # the fixtures' generation path: 40 prompt tokens, then steps
TOLERANCE = 1e-4


def rel(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: dict  # the original's SSMLMHeadModel keywords (+ flat compat keys)
    weights_path: str
    weights: dict
    expected: dict
    model: object


@functools.cache
def load_case(name: str) -> Case:
    """One fixture, loaded once per test session (its compiled calls are shared)."""
    stem = os.path.join(DATA, name, name)
    with open(f"{stem}_config.json") as f:
        config = json.load(f)
    model = convert.load_checkpoint(f"{stem}.safetensors", config)
    return Case(name, config, f"{stem}.safetensors", load_file(f"{stem}.safetensors"),
                load_file(f"{stem}_expected.safetensors"), model)


@pytest.fixture(params=FIXTURES)
def case(request) -> Case:
    return load_case(request.param)


@pytest.fixture(params=V2)
def case_v2(request) -> Case:
    return load_case(request.param)


def tokens(ids):
    return pz.nx.wrap(np.asarray(ids, np.int32)).tag("batch", "seq")


def logits_of(model, ids, pos=None):
    """Logits with explicit segment positions (default: one document per row),
    so plain and packed rows share one compiled forward."""
    ids = np.asarray(ids, np.int32)
    if pos is None:
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    out = model(tokens(ids), segment_pos=tokens(pos))
    return np.asarray(out.unwrap("batch", "seq", "vocabulary"))


# ---------------------------------------------------------------------------
# Config and full forward.
# ---------------------------------------------------------------------------


def test_config_from_the_original_keywords():
    tiny, rotary = load_case("h3_tiny").model.config, load_case("h3_rotary").model.config
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.attn_layer_idx) == (32, 3, (1,))
    assert (tiny.vocab_size, tiny.num_attention_heads, tiny.n_inner) == (64, 4, 128)
    assert tiny.discretisation == "bilinear" and tiny.d_state == 64
    assert (rotary.hidden_size, rotary.num_hidden_layers, rotary.n_inner) == (40, 4, 160)
    assert (rotary.vocab_size, rotary.rotary_emb_dim, rotary.max_position_embeddings) == (64, 6, 0)
    assert rotary.embedding_dropout == 0.1 and rotary.residual_in_fp32 is False


def test_fixture_configs_load_without_warnings(recwarn):
    for name in FIXTURES:
        with open(os.path.join(DATA, name, f"{name}_config.json")) as f:
            convert.resolve_config(json.load(f))
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_logits_match_the_original(case):
    ours = logits_of(case.model, case.expected["input_ids"])
    assert ours.shape == case.expected["logits"].shape
    assert rel(ours, case.expected["logits"]) <= TOLERANCE
    assert rel(ours, case.expected["logits_recurrent"]) <= TOLERANCE


def test_scan_route_matches_the_original():
    case = load_case("h3_tiny")
    ours = logits_of(ssm.with_ssm_method(case.model, "scan"), case.expected["input_ids"])
    assert rel(ours, case.expected["logits"]) <= TOLERANCE


def test_layer0_kernels(case):
    mixer = h3.mixer(case.model, 0)
    length = case.expected["kernel_diag_layer0"].shape[1]
    diag, shift = jax.jit(
        lambda: (
            mixer.kernel.kernel(length).unwrap("heads", "seq"),
            mixer.ssm_k.kernel().unwrap("heads", "conv_taps"),
        )
    )()
    assert rel(diag, case.expected["kernel_diag_layer0"]) <= 1e-5
    shift = np.pad(shift, ((0, 0), (0, length - shift.shape[1])))  # the original pads with zeros
    assert rel(shift, case.expected["kernel_shift_layer0"]) <= 1e-5


def test_layer0_mixer(case):
    x = pz.nx.wrap(case.expected["layer0_mixer_in"]).tag("batch", "seq", "embedding")
    pos = pz.nx.wrap(
        np.broadcast_to(np.arange(x.named_shape["seq"]), x.data_array.shape[:2])
    ).tag("batch", "seq")
    mixer = h3.mixer(case.model, 0)
    out = jax.jit(lambda x, pos: mixer(x, context=DocumentContext.build(pos)))(x, pos)
    assert rel(out.unwrap("batch", "seq", "embedding"), case.expected["layer0_mixer_out"]) <= 1e-5


# ---------------------------------------------------------------------------
# The generation path: prompt, then one token at a time, through sampling mode.
# ---------------------------------------------------------------------------


def original_states(sampler, prefix: str) -> dict[str, np.ndarray]:
    """Our sampling-mode state in the original's layout and names: per H3 layer
    i the shift register ``{prefix}_state_shift_layer{i}`` [B, H, N] (B-weighted,
    rebuilt from our last N inputs), the diagonal SSM state
    ``{prefix}_state_diag_layer{i}_{real,imag}`` [B, H, N/2]; per attention
    layer the KV cache ``{prefix}_kv_layer{i}`` [B, T, 2, heads, head_dim]
    (keys after RoPE)."""
    states = {}
    for i, block in enumerate(sampler.model.blocks.sublayers):
        for wrapper in pz.select(block).at_instances_of(Stateful).get_sequence():
            layer, value = wrapper.layer, wrapper.state.value
            if isinstance(layer, ssm.ShiftSSM):
                register = layer.register(value).unwrap("batch", "heads", "state")
                states[f"{prefix}_state_shift_layer{i}"] = np.asarray(register)
            elif isinstance(layer, ssm.DiagonalSSM):
                h = np.asarray(value.unwrap("batch", "heads", "state"))
                states[f"{prefix}_state_diag_layer{i}_real"] = h.real
                states[f"{prefix}_state_diag_layer{i}_imag"] = h.imag
            elif isinstance(layer, Attention):
                states[f"{prefix}_kv_layer{i}"] = kv_in_original_layout(value)
    return states


def kv_in_original_layout(cache) -> np.ndarray:
    """Our KV ring buffer -> the original's cache [B, T, 2, heads, head_dim]."""
    index = np.asarray(cache.index.unwrap("batch", "kv_seq"))
    filled = int((index[0] >= 0).sum())
    # With max_length slots, slot t holds token t: the first `filled` slots.
    np.testing.assert_array_equal(index[:, :filled], np.arange(filled)[None].repeat(len(index), 0))
    get = lambda t: np.asarray(t.unwrap("batch", "kv_seq", "kv_heads", "projection"))[:, :filled]
    return np.stack([get(cache.keys), get(cache.values)], axis=2)


@functools.cache
def generation_path(name: str) -> dict[str, np.ndarray]:
    """The fixture's generation path through our sampling mode, teacher-forced:
    logits of the prompt and of each step, states after the prompt and at the end."""
    case = load_case(name)
    ids = case.expected["input_ids"]
    sampler = to_sampling_mode(case.model, batch_size=ids.shape[0], max_length=ids.shape[1])
    run = lambda piece: np.asarray(sampler(tokens(piece)).unwrap("batch", "seq", "vocabulary"))
    pieces = [run(ids[:, :PROMPT])]
    out = original_states(sampler, "prompt")
    pieces += [run(ids[:, t : t + 1]) for t in range(PROMPT, ids.shape[1])]
    out.update(original_states(sampler, "final"))
    out["logits_recurrent"] = np.concatenate(pieces, axis=1)
    return out


def test_stepwise_logits_through_sampling_mode(case):
    ours = generation_path(case.name)["logits_recurrent"]
    assert ours.shape == case.expected["logits_recurrent"].shape
    assert rel(ours, case.expected["logits_recurrent"]) <= TOLERANCE


# (fixture, states after the prompt or after all tokens, how many tensors):
# per H3 layer the shift register and the diagonal state's real and imaginary
# parts, plus the KV cache of the attention layer after the prompt.
STATES = [("h3_tiny", "prompt", 2 * 3), ("h3_tiny_v2", "prompt", 3 * 3 + 1),
          ("h3_tiny_v2", "final", 3 * 3), ("h3_rotary", "prompt", 3 * 3 + 1),
          ("h3_rotary", "final", 3 * 3)]


@pytest.mark.parametrize("name, when, count", STATES)
def test_states_match_the_original(name, when, count):
    expected, ours = load_case(name).expected, generation_path(name)
    theirs = sorted(k for k in expected if k.startswith(f"{when}_"))
    assert len(theirs) == count and set(theirs) <= set(ours)
    for key in theirs:
        assert ours[key].shape == expected[key].shape, key
        assert rel(ours[key], expected[key]) <= TOLERANCE, key


# ---------------------------------------------------------------------------
# Greedy generation and packed rows (v2 fixtures).
# ---------------------------------------------------------------------------


def comparable_steps(scores, tolerance) -> np.ndarray:
    """Per row, how many leading greedy steps are decided by more than our
    error: the top-2 margin of the original's scores exceeds twice it (after
    a step that is not, the rows may part ways)."""
    top2 = -np.sort(-scores, axis=-1)[..., :2]
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tolerance
    return np.where(clear.all(1), clear.shape[1], np.argmin(clear, axis=1))


def test_greedy_generation_through_generate(case_v2):
    e = case_v2.expected
    scores, sequences = e["greedy_scores"], e["greedy_sequences"]
    vocab = scores.shape[-1]  # the original's generate(vocab_size=61): no padded ids
    out = generate(case_v2.model, e["input_ids"][:, :PROMPT].tolist(),
                   max_new_tokens=scores.shape[1], vocab_limit=vocab, return_logprobs=True)
    steps = comparable_steps(scores, TOLERANCE * np.abs(scores).max())
    assert steps.min() >= 20  # most of the 30 steps: the comparison cannot be vacuous
    shifted = scores - scores.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    for row, n in enumerate(steps):
        chosen = sequences[row, PROMPT : PROMPT + n]
        np.testing.assert_array_equal(out.tokens[row][:n], chosen)
        np.testing.assert_allclose(out.logprobs[row][:n], log_probs[row, np.arange(n), chosen],
                                   atol=2e-4)


def test_greedy_scores_are_the_forward_logits(case_v2):
    e = case_v2.expected
    scores, sequences = e["greedy_scores"], e["greedy_sequences"]
    # Teacher-forced on the original's own sequence: step j scores the logits
    # after token PROMPT - 1 + j, over the 61 real ids.
    ours = logits_of(case_v2.model, sequences)[:, PROMPT - 1 : -1, : scores.shape[-1]]
    assert rel(ours, scores) <= TOLERANCE


def test_packed_rows_equal_each_document_run_alone(case_v2):
    e = case_v2.expected
    lengths, pos = e["packed_segment_lengths"], e["packed_position_ids"]
    for row, row_lengths in enumerate(lengths):  # positions restart at each document
        expected_pos = np.concatenate([np.arange(n) for n in row_lengths])
        np.testing.assert_array_equal(pos[row], expected_pos)
        np.testing.assert_array_equal(e["packed_segment_ids"][row],
                                      np.repeat(np.arange(len(row_lengths)), row_lengths))
    ours = logits_of(case_v2.model, e["packed_input_ids"], pos)
    assert rel(ours, e["packed_logits"]) <= TOLERANCE


# ---------------------------------------------------------------------------
# Export, other checkpoint forms, errors.
# ---------------------------------------------------------------------------


def test_export_round_trip_is_exact(case):
    exported = convert.to_original_state_dict(case.model)
    assert sorted(exported) == sorted(case.weights)
    for name, value in case.weights.items():
        np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_safetensors_save_and_reload(tmp_path):
    case = load_case("h3_tiny")
    path = str(tmp_path / "h3.safetensors")
    convert.save_checkpoint(case.model, path)
    again = convert.load_checkpoint(path, case.model.config)
    ids = case.expected["input_ids"]  # the shape of the parity test: compiled once
    np.testing.assert_array_equal(logits_of(again, ids), logits_of(case.model, ids))


def _torch_state(weights):
    torch = pytest.importorskip("torch")
    return torch, {k: torch.from_numpy(v.copy()) for k, v in weights.items()}


def test_lightning_checkpoint_with_model_prefix(tmp_path):
    case = load_case("h3_tiny")
    torch, state = _torch_state(case.weights)
    path = str(tmp_path / "lightning.ckpt")
    torch.save(
        {
            "pytorch-lightning_version": "1.6.5",
            "epoch": 3,
            "state_dict": {f"model.{k}": v for k, v in state.items()},
        },
        path,
    )
    loaded = convert.load_checkpoint(path, case.config)
    ids = case.expected["input_ids"]
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(case.model, ids))


def test_legacy_names_and_post_norm_layout(tmp_path):
    """Old checkpoints: s4seq.encoder./embedding. names, norms after each sublayer."""
    case = load_case("h3_tiny")
    torch, state = _torch_state(case.weights)
    layers = case.config["n_layer"]
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
    loaded = convert.load_checkpoint(path, case.config)
    ids = case.expected["input_ids"]
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(case.model, ids))


def test_mismatched_checkpoint_lists_every_problem():
    case = load_case("h3_tiny")
    state = dict(case.weights)
    del state["backbone.layers.0.mixer.kernel.kernel.log_dt"]
    state["backbone.layers.2.mixer.extra"] = np.zeros(3, np.float32)
    state["backbone.layers.1.mixer.Wqkv.weight"] = np.zeros((90, 32), np.float32)
    state["backbone.layers.2.mixer.kernel.kernel.C"] = np.zeros((1, 32, 32), np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        convert.from_state_dict(state, case.config)
    message = str(info.value)
    assert "missing     backbone.layers.0.mixer.kernel.kernel.log_dt: expected shape (32,)" in message
    assert "unexpected  backbone.layers.2.mixer.extra: found shape (3,)" in message
    assert "backbone.layers.1.mixer.Wqkv.weight: expected (96, 32), found (90, 32)" in message
    assert (
        "backbone.layers.2.mixer.kernel.kernel.C: expected (1, 32, 32, 2), found (1, 32, 32)"
        in message
    )


def test_rotary_buffers_must_fit_the_config():
    case = load_case("h3_rotary")
    name = "backbone.layers.1.mixer.rotary_emb.inv_freq"
    wrong = {**case.weights, name: case.weights[name] * 2}
    with pytest.raises(CheckpointMismatchError, match=f"mis-shaped  {name}: expected 1/10000"):
        convert.from_state_dict(wrong, case.config)
    without_rotary = {**case.config, "attn_cfg": {"num_heads": 4}, "rotary_emb_dim": 0}
    with pytest.raises(CheckpointMismatchError, match=f"unexpected  {name}"):
        convert.from_state_dict(case.weights, without_rotary)


def test_wrong_config_for_the_weights():
    """125M-like layer pattern on the tiny weights: attention/H3 leaves swap."""
    config = h3.H3Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        attn_layer_idx=(2,),
    )
    with pytest.raises(CheckpointMismatchError, match="backbone.layers.1.mixer.Wqkv.weight"):
        convert.from_state_dict(load_case("h3_tiny").weights, config)


def test_untied_head_is_refused():
    case = load_case("h3_tiny")
    state = dict(case.weights)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        convert.from_state_dict(state, case.config)


def test_untied_head_is_listed_with_the_other_problems():
    case = load_case("h3_tiny")
    state = dict(case.weights)
    state["lm_head.weight"] = state["lm_head.weight"] + 1.0
    del state["backbone.ln_f.bias"]
    with pytest.raises(CheckpointMismatchError) as info:
        convert.from_state_dict(state, case.config)
    message = str(info.value)
    assert "missing     backbone.ln_f.bias" in message
    assert "mis-shaped  lm_head.weight: expected the tied embedding" in message


def test_unknown_file_type_and_missing_file(tmp_path):
    config = load_case("h3_tiny").config
    with pytest.raises(FileNotFoundError):
        convert.load_checkpoint(tmp_path / "absent.pt", config)
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        convert.load_checkpoint(path, config)


def test_pt_without_torch_gives_an_install_hint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        convert.load_checkpoint(path, load_case("h3_tiny").config)
