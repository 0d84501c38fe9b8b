"""Gemma in sampling mode: ring buffers for sliding layers, full caches for global ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gemma_cases import CASES, case_inputs, official_params
from griffin_cases import max_relative_error, named_tokens
from penzai import pz
from test_sampling_mode import feed_in_chunks

import recurrent_lm
from checkpoints_conversion import gemma as convert
from recurrent_lm.core.state import Stateful
from recurrent_lm.layers import Attention
from recurrent_lm.models import gemma
from recurrent_lm.sampling import generate, to_sampling_mode


def our_model(case, params=None, **kwargs):
    params = official_params(case) if params is None else params
    return convert.from_official_params(params, **case.overrides(), **kwargs)


def test_token_by_token_equals_the_full_forward():
    """Plain, packed, left-padded rows, one token per call (decoding through ring
    buffers that wrap: the window, 4, is shorter than the sequence, 17). Chunks
    of several tokens are in the upcast test."""
    case, chunk = CASES["gemma2_gqa"], 1
    model = our_model(case)
    tokens, segment_pos = named_tokens(*case_inputs(case))
    full = model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    sampler = to_sampling_mode(model, batch_size=case.batch, max_length=case.seq)
    assert max_relative_error(feed_in_chunks(sampler, tokens, segment_pos, chunk), full) <= 1e-5


def test_cache_sizes_follow_the_layer_kind():
    case = CASES["gemma2_gqa"]
    sampler = to_sampling_mode(our_model(case), batch_size=2, max_length=40)
    caches = [w.state.value for w in pz.select(sampler).at_instances_of(Stateful).get_sequence()
              if isinstance(w.layer, Attention)]
    # Sliding layers: the window (4 keys, the current one included); global: max_length.
    assert [c.slots for c in caches] == [4, 40, 4, 40]
    assert sampler.stream_capacity == 40
    with pytest.raises(ValueError, match="pass max_length to to_sampling_mode"):
        to_sampling_mode(our_model(case), batch_size=2)


def test_upcast_model_caches_float32():
    """bf16 parameters with float32 activations: the KV cache keeps float32, so
    sampling equals the full forward."""
    case = CASES["gemma2_gqa"]
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), official_params(case))
    model = our_model(case, bf16, upcast_activations_to_float32=True)
    sampler = to_sampling_mode(model, batch_size=case.batch, max_length=case.seq)
    wrappers = pz.select(sampler).at_instances_of(Stateful).get_sequence()
    assert {w.state.value.keys.dtype for w in wrappers} == {jnp.dtype(jnp.float32)}
    tokens, segment_pos = named_tokens(*case_inputs(case))
    full = model(tokens, segment_pos=segment_pos).unwrap("batch", "seq", "vocabulary")
    assert max_relative_error(feed_in_chunks(sampler, tokens, segment_pos, 6), full) <= 1e-5


def test_generate_is_greedy_over_the_full_forward():
    """Ragged prompts; each generated token is the argmax of the full forward on
    the prompt and the tokens before it."""
    config = gemma.GemmaConfig.from_preset("tiny", num_layers=2, sliding_window_size=5,
                                           vocabulary_size=64)
    model = gemma.build_model(config, jax.random.key(3))
    prompts = [[2, 17, 5, 9, 33, 8, 1], [2, 40]]
    out = generate(model, prompts, max_new_tokens=8, prompt_bucket=4)
    assert out.finish_reasons == ["length", "length"]
    forward = recurrent_lm.jit_forward(model)
    for prompt, generated in zip(prompts, out.tokens, strict=True):
        assert len(generated) == 8
        ids = np.asarray([prompt + generated], np.int32)
        predicted = np.argmax(forward(ids)[0, len(prompt) - 1 : -1], axis=-1)
        np.testing.assert_array_equal(predicted, generated)
