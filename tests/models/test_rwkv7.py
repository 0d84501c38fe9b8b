"""RWKV-7: packed rows, sampling mode, generation, both scan forms, init and config.

Parity with BlinkDL's own runtime is in
tests/checkpoints_conversion/test_rwkv7_blinkdl_runtime.py; the models here
are the same random BlinkDL-layout weights (`rwkv7_cases`).
"""


import dataclasses

import jax
import numpy as np
import pytest
from griffin_cases import (
    documents,
    max_relative_error,
    named_tokens,
    on_device,
    segment_layout,
)
from penzai import pz
from rwkv7_cases import CASES, case_ids, our_model

from recurrent_lm import interp
from recurrent_lm.core import registry
from recurrent_lm.core.context import DocumentContext
from recurrent_lm.layers.rwkv7 import TimeMix7
from recurrent_lm.models import rwkv7
from recurrent_lm.params import abstract_parameters, parameter_values
from recurrent_lm.sampling import generate, to_sampling_mode

_call = pz.variable_jit(lambda model, tokens, pos: model(tokens, segment_pos=pos))


def logits_of(model, ids, pos=None):
    if pos is None:
        pos = np.tile(np.arange(ids.shape[1], dtype=np.int32), (ids.shape[0], 1))
    tokens, segment_pos = named_tokens(ids, pos)
    return np.asarray(_call(model, tokens, segment_pos).unwrap("batch", "seq", "vocabulary"))


def test_packed_and_padded_rows_equal_each_document_alone():
    """Rows packing several documents, left-padded rows: each document's
    logits equal a run on that document alone (each at the start of a row of
    its own, in one call; causal: what follows it in that row is never seen)."""
    case = CASES["odd"]
    model = our_model(case)
    batch, seq = 4, case.seq
    ids = np.random.default_rng(3).integers(0, case.vocab, (batch, seq)).astype(np.int32)
    pos = segment_layout(batch, seq)
    ours = logits_of(model, ids, pos)
    docs = documents(pos)
    alone_ids = np.zeros((len(docs), seq), np.int32)
    for k, (row, lo, hi) in enumerate(docs):
        alone_ids[k, : hi - lo] = ids[row, lo:hi]
    alone = logits_of(model, alone_ids)
    for k, (row, lo, hi) in enumerate(docs):
        assert max_relative_error(ours[row, lo:hi], alone[k, : hi - lo]) <= 1e-5, (row, lo)
    assert sum(hi - lo for _, lo, hi in docs) == (pos >= 0).sum()  # every real position


def test_sampling_chunks_equal_the_full_forward():
    """Packed and left-padded rows, fed in chunks of 4 and 1 (batched single-token decoding)."""
    case = CASES["odd"]
    model = our_model(case)
    batch = 4
    ids = np.random.default_rng(4).integers(0, case.vocab, (batch, case.seq)).astype(np.int32)
    pos = segment_layout(batch, case.seq)
    full = logits_of(model, ids, pos)
    sampler = to_sampling_mode(model, batch_size=batch)
    tokens, segment_pos = named_tokens(ids, pos)
    pieces, lo = [], 0
    for length in (4, 1, 1, 4, 1):
        piece = {"seq": pz.slice[lo : lo + length]}
        out = _call(sampler, tokens[piece], segment_pos[piece])
        pieces.append(np.asarray(out.unwrap("batch", "seq", "vocabulary")))
        lo += length
    assert lo == case.seq
    assert max_relative_error(np.concatenate(pieces, axis=1), full) <= 1e-5


def test_generate_greedy_follows_the_full_forward():
    case = CASES["narrow"]
    model = our_model(case)
    prompts = [[1, 5, 7, 2, 9], [3, 4]]
    out = generate(model, prompts, max_new_tokens=4)
    assert [len(tokens) for tokens in out.tokens] == [4, 4]
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        sequence = np.asarray([prompt + tokens], np.int32)
        logits = logits_of(model, sequence)[0]
        for j, token in enumerate(tokens):
            assert int(np.argmax(logits[len(prompt) + j - 1])) == token


def test_both_scan_methods_give_the_same_logits():
    """matrix_scan's sequential and chunked forms (chunks shorter than the
    documents of a packed row, and not dividing the sequence)."""
    case = CASES["odd"]
    ids = case_ids(case, seed=9)
    pos = segment_layout(2, case.seq)
    sequential = logits_of(our_model(case, "sequential"), ids, pos)
    chunked = our_model(case, "chunked", 4)
    assert (chunked.config.scan_method, chunked.config.scan_chunk_size) == ("chunked", 4)
    assert max_relative_error(logits_of(chunked, ids, pos), sequential) <= 1e-5


def test_the_value_residual_side_channel():
    """Block 0 writes its values, later blocks read them: a time mix called
    alone names the side input it lacks; the model's calls create it."""
    model = our_model(CASES["narrow"])
    assert model.side_channels == ("value_residual",)
    later = pz.select(model).at_instances_of(TimeMix7).get_sequence()[1]
    assert not later.first and later.v0 is not None
    first = pz.select(model).at_instances_of(TimeMix7).get_sequence()[0]
    assert first.first and first.v0 is None  # this file has no unused block-0 gate
    x = pz.nx.zeros({"batch": 1, "seq": 2, "embedding": 40})
    context = DocumentContext.for_tokens(pz.nx.zeros({"batch": 1, "seq": 2}, np.int32))
    with pytest.raises(ValueError, match=r"needs the side input\(s\) \['value_residual'\]"):
        later(x, context=context)


def test_state_site_materialised_path_agrees_with_the_primitive():
    """Capturing the matrix state runs the step-by-step scan: same logits as
    the primitive, its last state is the sampling state, and an ``Add`` with
    ``propagate=False`` changes the layer's output at its position only (no
    later state sees it)."""
    case = CASES["narrow"]
    model = our_model(case)
    ids = case_ids(case)
    plain = logits_of(model, ids)
    site = "blocks.1.temporal_block.state"
    logits, cache = interp.run_with_cache(model, named_tokens(ids), names=site)
    states = cache[site]
    assert dict(states.named_shape) == {"batch": 2, "seq": case.seq, "heads": 5, "projection": 8, "state": 8}
    assert max_relative_error(logits.unwrap("batch", "seq", "vocabulary"), plain) <= 1e-5
    sampler = to_sampling_mode(model, batch_size=2)
    _call(sampler, *named_tokens(ids, np.tile(np.arange(case.seq, dtype=np.int32), (2, 1))))
    twins = [t for t in pz.select(sampler).at_instances_of(pz.StateVariable).get_sequence()
             if hasattr(t.value, "matrix")]
    last = np.asarray(twins[1].value.matrix.unwrap("batch", "heads", "projection", "state"))
    captured = np.asarray(states[{"seq": -1}].unwrap("batch", "heads", "projection", "state"))
    assert max_relative_error(captured, last) <= 1e-5
    # Not constant over "projection": ln_x would remove a constant shift.
    delta = pz.nx.wrap(np.linspace(-1.0, 1.0, 8, dtype=np.float32), "projection")
    patched = interp.patch(model, {site: interp.Add(delta, positions=[4])}, propagate=False)
    delta = np.abs(logits_of(patched, ids) - plain).max(axis=(0, 2))
    # Block 1 (the last) changes its output at 4 only; its channel mix's token
    # shift carries that to 5; nothing recurs further.
    assert delta[4] > 1e-3 and delta[:4].max() < 1e-5 and delta[6:].max() < 1e-5, delta


@pytest.fixture(scope="module")
def fresh_model():
    config = rwkv7.Rwkv7Config(
        vocab_size=11, hidden_size=16, num_hidden_layers=3, head_size=4, decay_low_rank=3,
        rate_low_rank=3, value_low_rank=2, gate_low_rank=5, intermediate_size=24,
    )
    return rwkv7.build_model(config, jax.random.key(1))


def test_build_model_uses_blinkdl_initialisation(fresh_model):
    values = {k: np.asarray(v.unwrap(*v.named_shape)) for k, v in parameter_values(fresh_model).items()}
    c = np.arange(16) / 16
    np.testing.assert_allclose(values["blocks.0.att.x_r"], 1 - c**0.2, rtol=1e-6)
    np.testing.assert_allclose(values["blocks.1.att.x_w"], 1 - c ** (0.9 * 2 / 3), rtol=1e-6)
    np.testing.assert_allclose(values["blocks.2.ffn.x_k"], 1 - c ** ((1 / 3) ** 4), rtol=1e-6)
    np.testing.assert_allclose(values["blocks.0.att.k_a"], 1.02, rtol=1e-6)
    np.testing.assert_allclose(values["blocks.0.att.r_k"], -0.04, rtol=1e-6)
    np.testing.assert_allclose(values["blocks.1.att.ln_x.scale"], (2 / 3) ** 0.7, rtol=1e-6)
    # w0: rising over the channels; decays log w = -e^-0.5 sigmoid(w0) in (-0.61, 0).
    w0 = values["blocks.0.att.w0"].reshape(-1)
    assert w0[0] < -5 and w0[-1] > -1
    for zero in ("att.output", "ffn.value", "att.w1", "att.a1", "att.v1", "att.g1"):
        assert not values[f"blocks.1.{zero}.weights"].any(), zero
    value = values["blocks.1.att.value.weights"].reshape(16, 16)  # [embedding, (heads, projection)]
    np.testing.assert_allclose(value @ value.T, np.eye(16), atol=1e-5)
    assert "blocks.0.att.v0" in values  # block 0's unused gate, as in BlinkDL's files
    assert np.abs(values["embeddings.embeddings"]).max() <= rwkv7.EMBEDDING_INIT
    logits = logits_of(fresh_model, np.array([[1, 2, 3, 4]], np.int32))
    assert np.isfinite(logits).all()


def test_presets_have_the_released_sizes():
    expected = {  # (C, L, decay, rate, value, gate) of RWKV-x070-World-*
        "0.1b": (768, 12, 64, 64, 32, 128),
        "0.4b": (1024, 24, 64, 64, 32, 128),
        "1.5b": (2048, 24, 96, 96, 64, 256),
        "2.9b": (2560, 32, 96, 96, 64, 320),
    }
    for name, (width, layers, *ranks) in expected.items():
        config = rwkv7.Rwkv7Config.from_preset(name)
        assert (config.hidden_size, config.num_hidden_layers) == (width, layers)
        assert config.ranks == tuple(ranks), name
        assert (config.vocab_size, config.head_size, config.intermediate_size) == (65536, 64, 4 * width)
    config = rwkv7.PRESETS["0.1b"]
    params = abstract_parameters(lambda key: rwkv7.build_model(config, key))
    count = sum(int(np.prod(list(v.named_shape.values()))) for v in params.values())
    assert round(count / 1e6, 1) == 191.1  # the 0.1B World model's 191 M
    assert "tiny" in rwkv7.PRESETS
    assert registry.get("rwkv7").config_class is rwkv7.Rwkv7Config
    small = rwkv7.Rwkv7Config.from_preset("tiny", hidden_size=64)
    assert rwkv7.Rwkv7Config.from_dict(small.to_dict()) == small


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 50}, "hidden_size 50 is not divisible by head_size 64"),
        ({"gate_low_rank": 0}, "gate_low_rank must be a positive integer"),
        ({"group_norm_epsilon": 0.0}, "group_norm_epsilon must be > 0"),
        ({"scan_method": "parallel"}, "scan_method must be one of"),
        ({"eos_token_id": 70000}, "eos_token_id 70000 is outside the vocabulary"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        rwkv7.Rwkv7Config(**overrides)


def test_a_group_that_writes_a_side_channel_is_not_scanned():
    """Blocks 1.. scan as one group; block 0 writes the value residual they read,
    so it stays outside the scan (under remat its write leaves the checkpoint as
    an output: tests/models/test_scanned_layers.py checks logits and gradients)."""
    from recurrent_lm.core import stack

    config = rwkv7.Rwkv7Config.from_preset("tiny", vocab_size=64, num_hidden_layers=4)
    model = rwkv7.build_model(config, jax.random.key(0))
    for remat in stack.REMAT_POLICIES:
        kinds = [type(b).__name__ for b in stack.scan_layers(model, remat).blocks.sublayers]
        assert kinds == [("ResidualBlock" if remat == "none" else "Remat"), "ScannedBlocks"]
    # A group whose blocks write the channel cannot scan: one clear error.
    first = model.blocks.sublayers[0]
    copy = pz.select(first).at_instances_of(pz.Parameter).apply(
        lambda p: pz.Parameter(label="copy." + p.label, value=p.value)
    )
    writers = dataclasses.replace(model, blocks=pz.nn.Sequential([first, copy]))
    tokens = pz.nx.wrap(on_device(np.zeros((1, 3), np.int32))).tag("batch", "seq")
    with pytest.raises(ValueError, match="scanned group of blocks wrote the side channels"):
        stack.scan_layers(writers)(tokens)


