"""python -m recurrent_lm.sample on a saved model and a tokenizer trained here:
each option changes what it should, against the library's `generate`.

One model for every test, and `sample.main` called in-process; each distinct
setting compiles the decode loop, so the tests share settings where they can.
"""

import io
import os
import subprocess
import sys

import jax
import pytest
from corpora import train_tokenizer

import recurrent_lm
from recurrent_lm import sample
from recurrent_lm.models import griffin
from recurrent_lm.sampling import generate

PROMPT = "klm nop"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    tokenizer = train_tokenizer(directory, letters="klmnopqrst", words=150, max_word_length=6,
                                words_per_line=8, lines=200, vocab_size=60)
    config = griffin.GriffinConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_attention_heads=2,
                                   intermediate_size=16, num_hidden_layers=3, attention_window_size=8,
                                   embeddings_scale_by_sqrt_dim=False)
    # Key 0: a greedy continuation of varied tokens (some keys repeat one token).
    model = griffin.build_model(config, jax.random.key(0))
    recurrent_lm.save(model, directory / "model")
    return directory, model, tokenizer


def run(saved, *options: str, prompts=(PROMPT,), new_tokens=NEW_TOKENS) -> str:
    """What the CLI prints (it must succeed)."""
    directory, _, _ = saved
    argv = ["--checkpoint", str(directory / "model"), "--tokenizer", str(directory / "tok.model"),
            "--max-new-tokens", str(new_tokens)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    out = io.StringIO()
    assert sample.main([*argv, *options], out=out) == 0
    return out.getvalue()


def library(saved, prompt=PROMPT, *, add_bos=True, new_tokens=NEW_TOKENS, **options) -> list[int]:
    """The tokens `generate` continues `prompt` with (no EOS unless given)."""
    _, model, tokenizer = saved
    ids = tokenizer.encode(prompt, add_bos=add_bos)
    return generate(model, [ids], max_new_tokens=new_tokens, **options).tokens[0]


def printed(saved, tokens, prompt=PROMPT) -> str:
    """What the single-prompt CLI prints for `tokens`: the prompt, then their text."""
    return prompt + saved[2].decode(tokens) + "\n"


def test_greedy_streams_the_library_greedy_continuation(saved):
    greedy = library(saved)
    assert len(greedy) == NEW_TOKENS
    expected = printed(saved, greedy)
    assert run(saved, "--no-eos") == expected  # --temperature 0 is the default
    assert run(saved, "--no-eos", "--temperature", "0") == expected
    # How the loop is cut into device calls, or the prompt into chunks, changes nothing.
    assert run(saved, "--no-eos", "--steps-per-call", "1") == expected
    assert run(saved, "--no-eos", "--prefill-chunk-size", "2") == expected


# Sampled runs generate fewer tokens: the bound is checked there, with no extra compilation.
SAMPLED_TOKENS = 5


def run_sampled(saved, *options: str) -> str:
    return run(saved, "--no-eos", "--temperature", "1", *options, new_tokens=SAMPLED_TOKENS)


def test_seed_temperature_and_max_new_tokens_change_the_samples(saved):
    def sampled(seed):
        return run_sampled(saved, "--seed", str(seed))

    first, again, other = sampled(0), sampled(0), sampled(1)
    assert first == again != other
    for seed, out in [(0, first), (1, other)]:
        tokens = library(saved, temperature=1.0, seed=seed, new_tokens=SAMPLED_TOKENS)
        assert len(tokens) == SAMPLED_TOKENS and out == printed(saved, tokens)
    assert first != printed(saved, library(saved)[:SAMPLED_TOKENS])  # not greedy


def test_top_k_1_and_a_tiny_top_p_are_greedy(saved):
    greedy = printed(saved, library(saved)[:SAMPLED_TOKENS])
    assert run_sampled(saved, "--seed", "0") != greedy
    assert run_sampled(saved, "--seed", "0", "--top-k", "1") == greedy
    assert run_sampled(saved, "--seed", "0", "--top-p", "1e-6") == greedy


def test_no_bos_encodes_the_prompt_without_it(saved):
    without = library(saved, add_bos=False)
    assert without != library(saved)  # the option is visible in the output
    assert run(saved, "--no-eos", "--no-bos") == printed(saved, without)


def _token_that_encodes_alone(tokenizer, tokens) -> int:
    """The position of a token from the third on whose text encodes to it alone, first seen there."""
    for i in range(2, len(tokens)):
        text = tokenizer.decode([tokens[i]])
        alone = text.strip() and tokenizer.encode(text, add_bos=False) == [tokens[i]]
        if alone and tokens[i] not in tokens[:i]:
            return i
    raise AssertionError(f"no such token in {tokens}")


def test_stop_ends_the_continuation_and_no_eos_overrides_eos_id(saved):
    tokenizer = saved[2]
    greedy = library(saved)
    i = _token_that_encodes_alone(tokenizer, greedy)
    cut = printed(saved, greedy[: i + 1])  # the stop text is kept
    assert run(saved, "--no-eos", "--stop", tokenizer.decode([greedy[i]])) == cut
    assert run(saved, "--no-eos", "--eos-id", str(greedy[i])) == printed(saved, greedy)


def test_several_prompts_print_each_continuation_and_why_it_ended(saved):
    """--eos-id ends a row after that token (kept), --prompt repeats."""
    tokenizer = saved[2]
    prompts = [PROMPT, "qrs tk"]
    greedy = [library(saved, p) for p in prompts]
    i = _token_that_encodes_alone(tokenizer, greedy[0])
    eos = greedy[0][i]
    ends_at_eos = [eos in tokens for tokens in greedy]
    assert ends_at_eos[0]
    out = run(saved, "--eos-id", str(eos), prompts=prompts)
    expected = ""
    for prompt, tokens, at_eos in zip(prompts, greedy, ends_at_eos, strict=True):
        tokens = tokens[: tokens.index(eos) + 1] if at_eos else tokens
        reason = "eos" if at_eos else "length"
        expected += f"--- {prompt!r} ({reason})\n{prompt}{tokenizer.decode(tokens)}\n"
    assert out == expected


def _error(saved, *argv, capsys) -> str:
    """The CLI's exit status must be 2 and its stderr one ``error:`` line: that line."""
    assert sample.main(list(argv), out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_user_errors_are_one_line(saved, tmp_path, capsys):
    directory, _, _ = saved
    model, tok = str(directory / "model"), str(directory / "tok.model")
    err = _error(saved, "--checkpoint", str(tmp_path / "none"), "--tokenizer", tok, "--prompt", "k",
                 capsys=capsys)
    assert str(tmp_path / "none") in err
    err = _error(saved, "--checkpoint", model, "--tokenizer", str(tmp_path / "t.model"), "--prompt", "k",
                 capsys=capsys)
    assert "t.model does not exist" in err
    err = _error(saved, "--checkpoint", model, "--tokenizer", tok, "--prompt", "k", "--top-p", "2",
                 capsys=capsys)
    assert "top_p must be in (0, 1]" in err
    bigger = train_tokenizer(tmp_path, letters="klmnopqrst", words=150, max_word_length=6,
                             words_per_line=8, lines=200, vocab_size=80)
    assert bigger.vocab_size == 80
    err = _error(saved, "--checkpoint", model, "--tokenizer", str(tmp_path / "tok.model"),
                 "--prompt", "k", capsys=capsys)
    assert "they do not belong together" in err


def test_the_module_exits_with_the_status(tmp_path):
    """``python -m recurrent_lm.sample`` itself: status 2, one line, no traceback."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-m", "recurrent_lm.sample", "--checkpoint", str(tmp_path / "none"),
         "--tokenizer", str(tmp_path / "t.model"), "--prompt", "k"],
        capture_output=True, text=True, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
