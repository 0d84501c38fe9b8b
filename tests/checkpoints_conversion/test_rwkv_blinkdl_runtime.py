"""BlinkDL RWKV-4 ``.pth`` files against BlinkDL's own runtime (PyPI ``rwkv``).

Random RWKV-4 weights in his layout (``emb.weight``, ``blocks.N.att.time_decay``
stored raw, ``time_mix_*`` as (1, 1, C), ``blocks.0.ln0`` ...), every tensor
perturbed, are saved with ``torch.save`` and loaded twice: by
`load_blinkdl_checkpoint` and by ``rwkv.model.RWKV(..., "cpu fp32")`` (pure
torch: ``RWKV_JIT_ON=0``, ``RWKV_CUDA_ON=0``). Our whole-sequence logits must
equal his at every position (his sequence mode with ``full_output=True`` and
his token-by-token RNN mode), chunked state passing must agree on both sides,
and a file written by `save_blinkdl_checkpoint` must load in his runtime.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch
from griffin_cases import max_relative_error, named_tokens
from penzai import pz
from rwkv7_cases import his_token_by_token, save_pth  # the same for both runtimes
from rwkv_cases import HFCase as Case

from checkpoints_conversion import rwkv as convert
from recurrent_lm.core.state import Stateful
from recurrent_lm.layers.channel_mix import ChannelMix
from recurrent_lm.layers.wkv import TimeMix
from recurrent_lm.sampling import to_sampling_mode

# His module reads these at import time; fp32 on CPU means no rescaling.
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"
os.environ.pop("RWKV_V7_ON", None)
os.environ.pop("RWKV_RESCALE_LAYER", None)
import rwkv.model as blinkdl

TOLERANCE = 1e-5


CASES = {
    # odd widths, three blocks.
    "odd": Case("odd", vocab=37, hidden=23, layers=3, attention=23, intermediate=51, seq=11, batch=2, seed=0),
    # narrower WKV than the residual stream (his sequence mode cannot run it), two blocks.
    "narrow": Case("narrow", vocab=50, hidden=32, layers=2, attention=18, intermediate=72, seq=9, batch=2, seed=1),
}


def blinkdl_state_dict(case: Case) -> dict[str, np.ndarray]:
    """Random float32 weights in BlinkDL's layout and naming, none left at a
    structured value (LayerNorm scales around 1, mixes around 0.5)."""
    rng = np.random.default_rng(case.seed)
    C, A, F, V = case.hidden, case.attention, case.intermediate, case.vocab
    normal = lambda *shape, scale=0.3: (scale * rng.standard_normal(shape)).astype(np.float32)
    around = lambda centre, *shape: (centre + normal(*shape, scale=0.2)).astype(np.float32)
    state = {
        "emb.weight": normal(V, C, scale=1.0),
        "blocks.0.ln0.weight": around(1.0, C),
        "blocks.0.ln0.bias": normal(C),
    }
    for i in range(case.layers):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            state[b + f"{ln}.weight"] = around(1.0, C)
            state[b + f"{ln}.bias"] = normal(C)
        # Raw: the runtime uses -exp(time_decay); a spread of fast and slow channels.
        state[b + "att.time_decay"] = (np.linspace(-4, 2, A) + normal(A, scale=0.5)).astype(np.float32)
        state[b + "att.time_first"] = normal(A, scale=1.0)
        for mix in ("k", "v", "r"):
            state[b + f"att.time_mix_{mix}"] = around(0.5, 1, 1, C)
        for name in ("key", "value", "receptance"):
            state[b + f"att.{name}.weight"] = normal(A, C)
        state[b + "att.output.weight"] = normal(C, A)
        for mix in ("k", "r"):
            state[b + f"ffn.time_mix_{mix}"] = around(0.5, 1, 1, C)
        state[b + "ffn.key.weight"] = normal(F, C)
        state[b + "ffn.receptance.weight"] = normal(C, C)
        state[b + "ffn.value.weight"] = normal(C, F)
    state["ln_out.weight"] = around(1.0, C)
    state["ln_out.bias"] = normal(C)
    state["head.weight"] = normal(V, C)
    return state


def his_runtime(path):
    """BlinkDL's RWKV on `path` (a ``.pth``; he takes the name without the extension)."""
    name = os.fspath(path).removesuffix(".pth")
    return blinkdl.RWKV(model=name, strategy="cpu fp32", verbose=False)


def has_sequence_mode(runtime) -> bool:
    """His sequence mode writes the WKV output into the (T, C) token-shift
    buffer: it runs only when attention_hidden_size == hidden_size (true of
    every released RWKV-4); otherwise only his one-token RNN mode works."""
    return runtime.args.n_att == runtime.args.n_embd


def his_sequence(runtime, ids, state=None):
    """(logits at every position [T, V], state) in his sequence mode."""
    logits, state = runtime.forward([int(t) for t in ids], state, full_output=True)
    logits = logits.numpy()
    return (logits[None] if logits.ndim == 1 else logits), state


def his_chunk(runtime, ids, state=None):
    """Sequence mode where his runtime has it, else one token at a time."""
    run = his_sequence if has_sequence_mode(runtime) else his_token_by_token
    return run(runtime, ids, state)


# One compiled program per call shape (eager penzai compiles op by op).
_call = pz.variable_jit(lambda model, tokens: model(tokens))


def our_logits(model, ids):
    return np.asarray(_call(model, named_tokens(ids)).unwrap("batch", "seq", "vocabulary"))


def case_ids(case: Case) -> np.ndarray:
    rng = np.random.default_rng(50 + case.seed)
    return rng.integers(0, case.vocab, (case.batch, case.seq)).astype(np.int32)


@pytest.fixture(scope="module", params=sorted(CASES))
def loaded(request, tmp_path_factory):
    """(case, .pth path, our model loaded from it, his runtime on it)."""
    case = CASES[request.param]
    path = tmp_path_factory.mktemp(f"blinkdl_{request.param}") / "RWKV-4-random.pth"
    save_pth(blinkdl_state_dict(case), path)
    return case, path, convert.load_blinkdl_checkpoint(path), his_runtime(path)


def test_inferred_config(loaded):
    case, _, model, runtime = loaded
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (
        case.vocab, case.hidden, case.layers)
    assert (config.attention_hidden_size, config.intermediate_size) == (case.attention, case.intermediate)
    assert not config.tie_word_embeddings and config.param_dtype == "float32"
    assert runtime.version == 4 and runtime.args.n_layer == case.layers


def test_full_forward_matches_his_sequence_and_token_by_token_modes(loaded):
    case, _, model, runtime = loaded
    ids = case_ids(case)
    ours = our_logits(model, ids)
    for row in range(case.batch):
        stepped, _ = his_token_by_token(runtime, ids[row])
        assert stepped.shape == ours[row].shape == (case.seq, case.vocab)
        assert max_relative_error(ours[row], stepped) <= TOLERANCE
        if has_sequence_mode(runtime):
            sequence, _ = his_sequence(runtime, ids[row])
            assert max_relative_error(ours[row], sequence) <= TOLERANCE
    if not has_sequence_mode(runtime):
        return
    # Without full_output his sequence mode returns the last position only.
    last, _ = runtime.forward([int(t) for t in ids[0]], None)
    assert tuple(last.shape) == (case.vocab,)
    assert max_relative_error(ours[0, -1], last.numpy()) <= TOLERANCE


def our_states(sampler):
    """Per block (att shift, num real value, den real value, ffn shift), batch row 0."""
    twins = pz.select(sampler).at_instances_of(Stateful).get_sequence()
    time_mix = [t.state.value for t in twins if isinstance(t.layer, TimeMix)]
    channel_mix = [t.state.value for t in twins if isinstance(t.layer, ChannelMix)]
    out = []
    for tm, cm in zip(time_mix, channel_mix, strict=True):
        num, den = tm.wkv.real_values()
        out.append((
            np.asarray(tm.shift.unwrap("batch", "embedding"))[0],
            np.asarray(num.unwrap("batch", "wkv"))[0],
            np.asarray(den.unwrap("batch", "wkv"))[0],
            np.asarray(cm.unwrap("batch", "embedding"))[0],
        ))
    return out


def his_states(state, layers):
    """His flat list (5 per block: att shift, aa, bb, pp, ffn shift) as ours."""
    out = []
    for i in range(layers):
        shift, aa, bb, pp, ffn = (state[5 * i + j].double().numpy() for j in range(5))
        out.append((shift, aa * np.exp(pp), bb * np.exp(pp), ffn))
    return out


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
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo == hi:
            continue
        ours = np.asarray(_call(sampler, tokens[{"seq": pz.slice[lo:hi]}]).unwrap("batch", "seq", "vocabulary"))[0]
        his, state = his_chunk(runtime, ids[0, lo:hi], state)
        assert max_relative_error(ours, full[lo:hi]) <= TOLERANCE
        assert max_relative_error(his, full[lo:hi]) <= TOLERANCE
        for got, expected in zip(our_states(sampler), his_states(state, case.layers), strict=True):
            for g, e in zip(got, expected, strict=True):
                assert max_relative_error(g, e) <= TOLERANCE


def test_our_writer_feeds_his_runtime(loaded, tmp_path):
    """save_blinkdl_checkpoint -> his runtime loads it and reproduces our logits;
    a tied model gets an explicit head (his runtime needs head.weight)."""
    case, _, model, _ = loaded
    ids = case_ids(case)
    path = tmp_path / "ours.pth"
    convert.save_blinkdl_checkpoint(model, path)
    runtime = his_runtime(path)
    ours = our_logits(model, ids)
    assert max_relative_error(ours[-1], his_chunk(runtime, ids[-1])[0]) <= TOLERANCE
    if case.layers != 2:
        return
    tied_config = dataclasses.replace(model.config, tie_word_embeddings=True)
    state = convert.to_hf_state_dict(model)
    del state["head.weight"]
    tied = convert.from_hf_state_dict(state, tied_config)
    convert.save_blinkdl_checkpoint(tied, tmp_path / "tied.pth")
    written = torch.load(tmp_path / "tied.pth", weights_only=True)
    np.testing.assert_array_equal(written["head.weight"].numpy(), written["emb.weight"].numpy())
    ours = our_logits(tied, ids)
    runtime = his_runtime(tmp_path / "tied.pth")
    assert max_relative_error(ours[0], his_chunk(runtime, ids[0])[0]) <= TOLERANCE
    back = convert.load_blinkdl_checkpoint(tmp_path / "tied.pth")
    assert not back.config.tie_word_embeddings  # BlinkDL files always carry a head
    np.testing.assert_array_equal(our_logits(back, ids), ours)
