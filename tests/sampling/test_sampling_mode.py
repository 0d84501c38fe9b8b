"""Sampling mode reproduces the full forward, chunk by chunk."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import (
    CASES,
    case_inputs,
    max_relative_error,
    named_tokens,
    official_params,
)
from penzai import pz

from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm.core.state import Stateful, StatefulLayer, TemporalLayer
from recurrent_lm.layers import RGLRU, Attention, CausalConv1D
from recurrent_lm.models import griffin
from recurrent_lm.sampling import SamplingLM, functional, to_sampling_mode, to_stateless


def our_model(case):
    return convert.from_official_params(official_params(case), **case.overrides())


def feed_in_chunks(sampler, tokens, segment_pos, chunk):
    seq = tokens.named_shape["seq"]
    pieces = []
    for lo in range(0, seq, chunk):
        piece = {"seq": pz.slice[lo : lo + chunk]}
        pieces.append(sampler(tokens[piece], segment_pos=segment_pos[piece]).unwrap("batch", "seq", "vocabulary"))
    return np.concatenate(pieces, axis=1)


# Token by token, chunks that do and do not divide the length, a chunk longer than
# the window: each on another block pattern (each pair costs two compiles).
@pytest.mark.parametrize(
    "case_name, chunk", [("hybrid", 1), ("hybrid", 7), ("attention_first", 3), ("hawk", 4), ("hawk", 1)]
)
def test_chunks_equal_the_full_forward(case_name, chunk):
    """Plain, packed and left-padded rows; window (5) shorter than the sequence (17)."""
    case = CASES[case_name]
    model = our_model(case)
    tokens, segment_pos = named_tokens(*case_inputs(case))
    full = model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    sampler = to_sampling_mode(model, batch_size=case.batch)
    assert max_relative_error(feed_in_chunks(sampler, tokens, segment_pos, chunk), full) <= 1e-5


def test_default_positions_continue_the_stream():
    case = CASES["hybrid"]
    model = our_model(case)
    ids, _ = case_inputs(case)
    full = model(named_tokens(ids)).unwrap("batch", "seq", "vocabulary")
    sampler = to_sampling_mode(model, batch_size=case.batch)
    first = sampler(named_tokens(ids[:, :6])).unwrap("batch", "seq", "vocabulary")
    rest = sampler(named_tokens(ids[:, 6:])).unwrap("batch", "seq", "vocabulary")
    assert max_relative_error(np.concatenate([first, rest], axis=1), full) <= 1e-5
    np.testing.assert_array_equal(sampler.stream_index.value.unwrap("batch"), [case.seq] * case.batch)


def test_functional_form_under_jit_and_while_loop():
    case = CASES["hybrid"]
    model = our_model(case)
    ids, pos = case_inputs(case)
    tokens, segment_pos = named_tokens(ids, pos)
    full = model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    step, params, state = functional(to_sampling_mode(model, batch_size=case.batch))
    prefill = jax.jit(step)
    logits, state = prefill(params, state, ids[:, :9], pos[:, :9])

    @jax.jit
    def decode(params, state):
        def body(t, carry):
            state, out = carry
            token = jax.lax.dynamic_slice_in_dim(jnp.asarray(ids), t, 1, axis=1)
            p = jax.lax.dynamic_slice_in_dim(jnp.asarray(pos), t, 1, axis=1)
            logits, state = step(params, state, token, p)
            return state, jax.lax.dynamic_update_slice_in_dim(out, logits, t, axis=1)

        out = jnp.zeros_like(jnp.asarray(full))
        return jax.lax.fori_loop(9, case.seq, body, (state, out))

    state, out = decode(params, state)
    combined = np.concatenate([logits, np.asarray(out)[:, 9:]], axis=1)
    assert max_relative_error(combined, full) <= 1e-5

    # new_streams is a command, not a promise: from a used state, the call
    # starts fresh streams and gives the ordinary model's logits.
    again, fresh_state = jax.jit(functools.partial(step, new_streams=True))(params, state, ids, pos)
    assert max_relative_error(again, full) <= 1e-5
    assert all(int(v) == case.seq for v in np.asarray(fresh_state["sampler.stream_index"].data_array))


def test_twins_share_the_parameters_and_swap_back():
    model = our_model(CASES["hybrid"])
    sampler = to_sampling_mode(model, batch_size=2)
    wrappers = pz.select(sampler).at_instances_of(Stateful).get_sequence()
    assert sorted(type(w.layer).__name__ for w in wrappers) == [
        "Attention", "CausalConv1D", "CausalConv1D", "RGLRU", "RGLRU"]
    by_type = lambda cls: [w for w in wrappers if isinstance(w.layer, cls)]
    original = pz.select(model).at_instances_of(RGLRU).get_sequence()[0]
    lru = by_type(RGLRU)[0]
    assert lru.layer.a_param is original.a_param  # the same Parameter object
    assert to_stateless(sampler) == model
    assert lru.state.value.dtype == jnp.float32
    assert lru.state.label == "sampler.blocks.0.temporal_block.rg_lru"  # the site naming scheme
    conv = by_type(CausalConv1D)[0]
    assert dict(conv.state.value.named_shape) == {"batch": 2, "conv_taps": 3, "lru": 64}
    attn = by_type(Attention)[0]
    assert attn.state.value.keys.named_shape["kv_seq"] == 6  # a ring buffer of window + 1


def test_temporal_layer_without_state_protocol_is_refused():
    @pz.pytree_dataclass
    class Stateless(TemporalLayer):
        def __call__(self, x, **_unused_side_inputs):
            return x

    model = pz.select(our_model(CASES["hybrid"])).at_instances_of(RGLRU).apply(lambda _: Stateless())
    with pytest.raises(TypeError, match=r"do not implement the state protocol.*blocks\.0\.temporal_block\.rg_lru \(Stateless\)"):
        to_sampling_mode(model, batch_size=2)
    assert issubclass(RGLRU, StatefulLayer)


def global_attention_model():
    """A Griffin whose attention layers have no window (global attention)."""
    case = CASES["hybrid"]
    return case, pz.select(our_model(case)).at_instances_of(Attention).apply(
        lambda layer: dataclasses.replace(layer, window_size=None))


def test_global_attention_uses_a_full_cache():
    case, model = global_attention_model()
    with pytest.raises(ValueError, match="pass max_length"):
        to_sampling_mode(model, batch_size=case.batch)
    tokens, segment_pos = named_tokens(*case_inputs(case))
    full = model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    sampler = to_sampling_mode(model, batch_size=case.batch, max_length=case.seq)
    assert max_relative_error(feed_in_chunks(sampler, tokens, segment_pos, 4), full) <= 1e-5
    with pytest.raises(ValueError, match="would make the stream 18 tokens long.*hold 17"):
        sampler(tokens[{"seq": pz.slice[:1]}])


def test_state_size_is_constant_from_1k_to_8k_tokens():
    config = griffin.GriffinConfig(vocab_size=32, hidden_size=16, num_attention_heads=2, intermediate_size=16,
                                   num_hidden_layers=3, attention_window_size=64)
    model = griffin.build_model(config, jax.random.key(0))
    step, params, state = functional(to_sampling_mode(model, batch_size=1))
    size = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    shapes = lambda tree: [x.shape for x in jax.tree.leaves(tree)]

    @jax.jit
    def run(params, state, steps):
        def body(t, carry):
            state, token = carry
            logits, state = step(params, state, token)
            return state, jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (state, jnp.ones((1, 1), jnp.int32)))

    after_1k, _ = run(params, state, 1024)
    after_8k, _ = run(params, state, 8192)
    assert shapes(after_1k) == shapes(after_8k) == shapes(state)
    assert size(after_1k) == size(after_8k) == size(state)
    index = [x for x in jax.tree.leaves(after_8k) if x.dtype == jnp.int32 and x.shape == (1,)]
    assert 8192 in [int(x[0]) for x in index]  # the stream really advanced


def test_sampling_mode_bad_inputs():
    model = our_model(CASES["hybrid"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        to_sampling_mode(model, batch_size=0)
    sampler = to_sampling_mode(model, batch_size=2)
    with pytest.raises(TypeError, match="already in sampling mode"):
        to_sampling_mode(sampler, batch_size=2)
    with pytest.raises(ValueError, match="built for batch_size=2"):
        sampler(named_tokens(np.zeros((3, 4), np.int32)))
    with pytest.raises(ValueError, match="outside the vocabulary range"):
        sampler(named_tokens(np.full((2, 1), 99, np.int32)))
    with pytest.raises(ValueError, match="empty 'seq' axis"):
        sampler(named_tokens(np.zeros((2, 0), np.int32)))
    wrapper = pz.select(sampler).at_instances_of(Stateful).get_sequence()[0]
    x = pz.nx.zeros({"batch": 2, "seq": 1, "embedding": 48})
    with pytest.raises(ValueError, match="needs the side input context"):
        wrapper(x, segment_pos=pz.nx.zeros({"batch": 2, "seq": 1}, jnp.int32))
    assert isinstance(sampler, SamplingLM)
