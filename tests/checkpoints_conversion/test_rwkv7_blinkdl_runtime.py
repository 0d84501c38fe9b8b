"""BlinkDL RWKV-7 (x070) ``.pth`` files against BlinkDL's own runtime (PyPI ``rwkv``).

Random RWKV-7 weights in his layout (`rwkv7_cases.blinkdl_state_dict`: every
tensor perturbed, odd widths and low-rank sizes, head sizes 16 and 8) are saved
with ``torch.save`` and loaded twice: by `load_blinkdl_checkpoint` and by his
x070 runtime (``RWKV_x070(..., "cpu fp32")``, TorchScript, loaded as a private
module: `rwkv7_cases.blinkdl_v7`). Our whole-sequence logits must equal his
sequence mode and his token-by-token mode at every position, chunked state
passing must agree on both sides (states too), and a file written by
`save_blinkdl_checkpoint` must be the one we read and load in his runtime.
His float32 noise against a float64 reimplementation is <= 2.3e-6 relative
(shared/reference/formats.md); measured here: <= 1.3e-6.
"""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from griffin_cases import max_relative_error, named_tokens
from penzai import pz
from rwkv7_cases import (
    CASES,
    blinkdl_state_dict,
    case_ids,
    his_chunk,
    his_runtime,
    his_sequence,
    his_states,
    his_token_by_token,
    save_pth,
)

from checkpoints_conversion import rwkv as convert
from recurrent_lm.core.state import Stateful
from recurrent_lm.layers.rwkv7 import ChannelMix7, TimeMix7
from recurrent_lm.models import rwkv7
from recurrent_lm.params import CheckpointMismatchError
from recurrent_lm.sampling import to_sampling_mode

TOLERANCE = 1e-4

# One compiled program per call shape (eager penzai compiles op by op).
_call = pz.variable_jit(lambda model, tokens: model(tokens))


def our_logits(model, ids):
    return np.asarray(_call(model, named_tokens(ids)).unwrap("batch", "seq", "vocabulary"))


@pytest.fixture(scope="module", params=sorted(CASES))
def loaded(request, tmp_path_factory):
    """(case, .pth path, our model loaded from it, his runtime on it)."""
    case = CASES[request.param]
    path = tmp_path_factory.mktemp(f"blinkdl7_{request.param}") / "RWKV-x070-random.pth"
    save_pth(blinkdl_state_dict(case), path)
    return case, path, convert.load_blinkdl_checkpoint(path), his_runtime(path)


def test_inferred_config(loaded):
    case, path, model, runtime = loaded
    config = model.config
    assert isinstance(config, rwkv7.Rwkv7Config)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.head_size) == (
        case.vocab, case.hidden, case.layers, case.head_size)
    assert config.ranks == case.ranks and config.intermediate_size == case.intermediate
    assert config.first_layer_value_gate == case.first_layer_value_gate
    assert not config.tie_word_embeddings and config.param_dtype == "float32"
    assert (runtime.n_head, runtime.head_size, runtime.n_layer) == (case.heads, case.head_size, case.layers)
    assert convert.is_blinkdl7_checkpoint(path) and not convert.is_blinkdl_checkpoint(path)


def test_full_forward_matches_his_sequence_and_token_by_token_modes(loaded):
    case, _, model, runtime = loaded
    ids = case_ids(case)
    ours = our_logits(model, ids)
    for row in range(case.batch):
        sequence, _ = his_sequence(runtime, ids[row])
        stepped, _ = his_token_by_token(runtime, ids[row])
        assert sequence.shape == stepped.shape == ours[row].shape == (case.seq, case.vocab)
        assert max_relative_error(ours[row], sequence) <= TOLERANCE
        assert max_relative_error(ours[row], stepped) <= TOLERANCE
    # Without full_output his sequence mode returns the last position only.
    last, _ = runtime.forward([int(t) for t in ids[0]], None)
    assert tuple(last.shape) == (case.vocab,)
    assert max_relative_error(ours[0, -1], last.numpy()) <= TOLERANCE


def our_states(sampler):
    """Per block (time-mix shift, matrix [H, value, key], channel-mix shift), row 0."""
    twins = pz.select(sampler).at_instances_of(Stateful).get_sequence()
    time_mix = [t.state.value for t in twins if isinstance(t.layer, TimeMix7)]
    channel_mix = [t.state.value for t in twins if isinstance(t.layer, ChannelMix7)]
    return [
        (
            np.asarray(tm.shift.unwrap("batch", "embedding"))[0],
            np.asarray(tm.matrix.unwrap("batch", "heads", "projection", "state"))[0],
            np.asarray(cm.unwrap("batch", "embedding"))[0],
        )
        for tm, cm in zip(time_mix, channel_mix, strict=True)
    ]


def test_chunked_state_passing_on_both_sides(loaded, lengths=(4, 1)):
    """Uneven chunks (the rest of the sequence last) carrying state in ours and his:
    every chunk's logits equal the whole forward's, and the states agree."""
    case, _, model, runtime = loaded
    ids = case_ids(case)[:1]
    full = our_logits(model, ids)[0]
    bounds = np.cumsum((0, *lengths, case.seq - sum(lengths)))
    sampler = to_sampling_mode(model, batch_size=1)
    tokens = named_tokens(ids)
    state = None
    for lo, hi in itertools.pairwise(bounds):
        ours = np.asarray(_call(sampler, tokens[{"seq": pz.slice[lo:hi]}]).unwrap("batch", "seq", "vocabulary"))[0]
        his, state = his_chunk(runtime, ids[0, lo:hi], state)
        assert max_relative_error(ours, full[lo:hi]) <= TOLERANCE
        assert max_relative_error(his, full[lo:hi]) <= TOLERANCE
        for got, expected in zip(our_states(sampler), his_states(state, case.layers), strict=True):
            for g, e in zip(got, expected, strict=True):
                assert g.shape == e.shape
                assert max_relative_error(g, e) <= TOLERANCE


def test_export_is_the_exact_inverse_and_feeds_his_runtime(loaded, tmp_path):
    """save_blinkdl_checkpoint writes back exactly the tensors read (block 0's
    unused v0/v1/v2 only when the file had them); his runtime reproduces our
    logits from it; a tied model gets an explicit head."""
    case, path, model, _ = loaded
    out = tmp_path / "ours.pth"
    convert.save_blinkdl_checkpoint(model, out)
    original = torch.load(path, weights_only=True)
    written = torch.load(out, weights_only=True)
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert written[name].shape == tensor.shape, name
        assert torch.equal(written[name], tensor), name
    ids = case_ids(case)
    ours = our_logits(model, ids)
    assert max_relative_error(ours[-1], his_chunk(his_runtime(out), ids[-1])[0]) <= TOLERANCE
    if case.name != "narrow":
        return
    tied_config = dataclasses.replace(model.config, tie_word_embeddings=True)
    state = convert.to_blinkdl7_state_dict(model)
    del state["head.weight"]
    tied = convert.from_blinkdl_state_dict(state, tied_config)
    convert.save_blinkdl_checkpoint(tied, tmp_path / "tied.pth")
    written = torch.load(tmp_path / "tied.pth", weights_only=True)
    np.testing.assert_array_equal(written["head.weight"].numpy(), written["emb.weight"].numpy())
    back = convert.load_blinkdl_checkpoint(tmp_path / "tied.pth")
    assert not back.config.tie_word_embeddings  # BlinkDL files always carry a head
    np.testing.assert_array_equal(our_logits(back, ids), our_logits(tied, ids))


def test_mismatches_are_listed_in_one_error():
    case = CASES["odd"]
    state = blinkdl_state_dict(case)
    del state["blocks.1.att.k_a"]
    state["blocks.2.att.bonus"] = np.zeros(3, np.float32)
    state["blocks.2.ffn.key.weight"] = np.zeros((69, case.hidden), np.float32)
    config = convert.infer_rwkv7_config(blinkdl_state_dict(case))
    with pytest.raises(CheckpointMismatchError) as error:
        convert.from_blinkdl_state_dict(state, config)
    message = str(error.value)
    assert "missing     blocks.1.att.k_a: expected shape (1, 1, 48)" in message
    assert "unexpected  blocks.2.att.bonus: found shape (3,)" in message
    assert "mis-shaped  blocks.2.ffn.key.weight: expected (70, 48), found (69, 48)" in message
    with pytest.raises(TypeError, match="holds RWKV-7 weights"):
        convert.from_blinkdl_state_dict(blinkdl_state_dict(case), config=object())
