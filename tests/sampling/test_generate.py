"""generate(): against the official sampler, ragged batches, strategies, stopping, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from corpora import train_tokenizer
from griffin_cases import OfficialCase, official_params

from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm.sampling import generate, strategies, stream, to_sampling_mode


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("sp"), letters="abcdefghij", words=200,
                           max_word_length=6, words_per_line=10, lines=300, vocab_size=64)


@pytest.fixture(scope="module")
def sampler_case(tokenizer):
    """A random official model over the test tokenizer's vocabulary; window 6."""
    return OfficialCase("sampler", 32, 2, 48, 40, ("recurrent", "attention", "recurrent"), 6, 30.0,
                        False, tokenizer.vocab_size, 8, 2, seed=11)


@pytest.fixture(scope="module")
def model(sampler_case):
    return convert.from_official_params(official_params(sampler_case), **sampler_case.overrides())


def test_greedy_equals_the_official_sampler(tokenizer, sampler_case, model):
    import recurrentgemma.jax as rg

    texts = ["abc de fgh", "jih gfe dc"]
    prompts = [[tokenizer.bos_id] + tokenizer.encode(t, add_bos=False) for t in texts]
    assert len(prompts[0]) == len(prompts[1]), "equal lengths: the official sampler is exact there"
    official = rg.Sampler(rg.Griffin(sampler_case.official_config()), tokenizer.processor,
                          jax.tree.map(jnp.asarray, official_params(sampler_case)))
    steps = 20  # prompt + 20 tokens >> window 6: the ring buffer wraps
    expected = official(texts, total_generation_steps=steps, end_sampling_at_eos_token=False).tokens
    ours = generate(model, prompts, max_new_tokens=steps)
    assert ours.tokens == [list(map(int, row)) for row in expected]
    assert len(set(ours.tokens[0])) > 2, "the test needs a model that does not just repeat itself"


def ragged_prompts(vocab):
    rng = np.random.default_rng(1)
    return [list(rng.integers(3, vocab, size=n)) for n in (3, 11, 1, 7)]


def test_ragged_batch_equals_each_prompt_alone(model):
    prompts = ragged_prompts(model.config.vocab_size)
    batch = generate(model, prompts, max_new_tokens=12, return_logprobs=True)
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], max_new_tokens=12, return_logprobs=True)
        assert alone.tokens[0] == batch.tokens[i]
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], rtol=1e-4, atol=1e-5)


def test_logprobs_are_the_models_log_probabilities(model):
    from penzai import pz

    prompt = ragged_prompts(model.config.vocab_size)[1]
    out = generate(model, [prompt], max_new_tokens=5, return_logprobs=True)
    assert len(out.tokens[0]) == len(out.logprobs[0]) == 5
    ids = jnp.asarray([prompt + out.tokens[0]], jnp.int32)
    logits = model(pz.nx.wrap(ids).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")[0]
    expected = [jax.nn.log_softmax(logits[len(prompt) - 1 + i])[t] for i, t in enumerate(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], expected, rtol=1e-4, atol=1e-5)
    assert all(lp <= 0 for lp in out.logprobs[0])


def test_vocab_limit_generates_only_ids_below_it(model):
    """As the original H3's generate(vocab_size=...) over a padded vocabulary."""
    from penzai import pz

    prompt, limit = ragged_prompts(model.config.vocab_size)[1], 10
    out = generate(model, [prompt], max_new_tokens=6, vocab_limit=limit, return_logprobs=True)
    ids = jnp.asarray([prompt + out.tokens[0]], jnp.int32)
    logits = model(pz.nx.wrap(ids).tag("batch", "seq")).unwrap("batch", "seq", "vocabulary")[0]
    allowed = logits[len(prompt) - 1 : -1, :limit]
    assert int(jnp.argmax(logits[len(prompt) - 1 : -1], -1).max()) >= limit, "the limit must matter"
    np.testing.assert_array_equal(out.tokens[0], jnp.argmax(allowed, -1))
    expected = jax.nn.log_softmax(allowed)[jnp.arange(6), jnp.asarray(out.tokens[0])]
    np.testing.assert_allclose(out.logprobs[0], expected, rtol=1e-4, atol=1e-5)


def test_seed_determinism_and_top_k_one_is_greedy(model):
    prompts = ragged_prompts(model.config.vocab_size)
    sampled = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3)
    assert generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=3).tokens == sampled.tokens
    assert generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=4).tokens != sampled.tokens
    greedy = generate(model, prompts, max_new_tokens=10)
    assert generate(model, prompts, max_new_tokens=10, temperature=0.7, top_k=1, seed=9).tokens == greedy.tokens
    assert generate(model, prompts, max_new_tokens=10, temperature=0.7, top_p=1e-6, seed=9).tokens == greedy.tokens


def test_changing_sampling_settings_compiles_nothing(model):
    """Temperature, top-k, top-p, EOS, seed and max_new_tokens within one bucket are traced."""
    from recurrent_lm.sampling import decode

    prompts = ragged_prompts(model.config.vocab_size)
    generate(model, prompts, max_new_tokens=10)
    compiled = (decode._prefill._cache_size(), decode._decode._cache_size())
    for settings in (dict(temperature=0.7, top_k=3, seed=1), dict(temperature=1.3, top_p=0.5, eos_id=5),
                     dict(temperature=0.5, top_k=2, top_p=0.9, max_new_tokens=decode.NEW_TOKENS_BUCKET)):
        out = generate(model, prompts, **{"max_new_tokens": 7, **settings})
        assert all(len(row) <= settings.get("max_new_tokens", 7) for row in out.tokens)
    assert (decode._prefill._cache_size(), decode._decode._cache_size()) == compiled


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    floor = jnp.finfo(jnp.float32).min
    np.testing.assert_array_equal(strategies.top_k_filter(logits, 2)[0, 2:], [floor, floor])
    kept = lambda p: int(jnp.sum(strategies.top_p_filter(logits, p) > floor))
    assert (kept(0.5), kept(0.51), kept(0.8), kept(0.95), kept(1.0)) == (1, 2, 2, 3, 4)
    samples = jax.vmap(lambda k: strategies.choose_tokens(logits, k, temperature=1.0, top_k=None, top_p=0.8))(
        jax.random.split(jax.random.key(0), 2000))
    counts = np.bincount(np.asarray(samples).ravel(), minlength=4) / 2000
    np.testing.assert_allclose(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.04)


def first_end(tokens, stop) -> int | None:
    """Length of `tokens` up to and including the first occurrence of `stop`."""
    for end in range(len(stop), len(tokens) + 1):
        if tokens[end - len(stop) : end] == stop:
            return end
    return None


def test_eos_and_stop_sequences_end_rows(model):
    """Every row is the greedy continuation cut where it first generates the
    EOS id / the stop sequence, or runs to the length limit."""
    prompts = ragged_prompts(model.config.vocab_size)
    greedy = generate(model, prompts, max_new_tokens=12)
    assert all(len(row) == 12 for row in greedy.tokens)
    for end_on, reason in (([greedy.tokens[0][4]], "eos"), (greedy.tokens[1][5:7], "stop_sequence")):
        if reason == "eos":
            out = generate(model, prompts, max_new_tokens=12, eos_id=end_on[0])
        else:
            out = generate(model, prompts, max_new_tokens=12, stop_sequences=[end_on])
        ends = [first_end(row, end_on) for row in greedy.tokens]
        assert ends[0 if reason == "eos" else 1] is not None
        assert out.finish_reasons == ["length" if end is None else reason for end in ends]
        assert out.tokens == [row[:end] for row, end in zip(greedy.tokens, ends, strict=True)]
    # Both kinds of row occur: some rows end early, some run to the limit.
    assert "length" in out.finish_reasons and "stop_sequence" in out.finish_reasons


def test_stream_yields_the_generated_tokens(model):
    prompts = ragged_prompts(model.config.vocab_size)
    expected = generate(model, prompts, max_new_tokens=11).tokens
    pieces = list(stream(model, prompts, max_new_tokens=11, steps_per_call=4))
    assert len(pieces) > 2
    joined = [sum((piece[row] for piece in pieces), []) for row in range(len(prompts))]
    assert joined == expected


def test_chunked_prefill_and_buckets_do_not_change_results(model):
    prompts = ragged_prompts(model.config.vocab_size)
    expected = generate(model, prompts, max_new_tokens=8).tokens
    assert generate(model, prompts, max_new_tokens=8, prefill_chunk_size=4).tokens == expected
    assert generate(model, prompts, max_new_tokens=8, prompt_bucket=1).tokens == expected


def test_sampling_mode_model_bounds_the_batch(model):
    sampler = to_sampling_mode(model, batch_size=2)
    prompts = ragged_prompts(model.config.vocab_size)
    out = generate(sampler, prompts[:1], max_new_tokens=6)
    assert out.tokens == generate(model, prompts[:1], max_new_tokens=6).tokens
    with pytest.raises(ValueError, match="4 prompts but the sampling-mode model holds batch_size=2"):
        generate(sampler, prompts, max_new_tokens=6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prompts=[[1, 2], []]), ValueError, "prompt 1 is empty"),
        (dict(prompts=[]), ValueError, "non-empty list"),
        (dict(prompts=[[1, 99]]), ValueError, "prompt 0 has token id 99 outside the vocabulary range"),
        (dict(prompts=[[1, -1]]), ValueError, "token id -1"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive integer"),
        (dict(temperature=-0.5), ValueError, "temperature must be a finite number >= 0"),
        (dict(top_p=0.0), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_k=0), ValueError, "top_k must be an integer in \\[1, vocab_size"),
        ({"vocab_limit": 0}, ValueError, "vocab_limit must be an integer in \\[1, vocab_size"),
        ({"vocab_limit": 8, "top_k": 9}, ValueError, "top_k must be an integer in \\[1, vocab_size=8\\]"),
        (dict(eos_id=1000), ValueError, "eos_id has token id 1000"),
        (dict(stop_sequences=[[]]), ValueError, "stop_sequences\\[0\\] is empty"),
        (dict(prompts=["hello"]), TypeError, "integer token ids"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, error, message):
    arguments = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        generate(model, arguments.pop("prompts"), **arguments)


def test_generation_output_is_plain_data(model):
    out = generate(model, [[1, 2]], max_new_tokens=3, return_logprobs=True)
    assert dataclasses.asdict(out)["finish_reasons"] == ["length"]
    assert len(out.tokens[0]) == 3 and all(isinstance(t, int) for t in out.tokens[0])
