"""python -m recurrent_lm.sample on a saved model and a tokenizer trained here."""

import io

import jax
import pytest
from corpora import train_tokenizer

import recurrent_lm
from recurrent_lm import sample
from recurrent_lm.models import griffin
from recurrent_lm.sampling import generate


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cli")
    tokenizer = train_tokenizer(directory, letters="klmnopqrst", words=150, max_word_length=6,
                                words_per_line=8, lines=200, vocab_size=60)
    config = griffin.GriffinConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_attention_heads=2,
                                   intermediate_size=16, num_hidden_layers=3, attention_window_size=8,
                                   embeddings_scale_by_sqrt_dim=False)
    model = griffin.build_model(config, jax.random.key(1))
    recurrent_lm.save(model, directory / "model")
    return directory, model, tokenizer


def test_cli_streams_the_greedy_continuation(saved):
    directory, model, tokenizer = saved
    out = io.StringIO()
    args = ["--checkpoint", str(directory / "model"), "--tokenizer", str(directory / "tok.model"),
            "--prompt", "klm nop", "--max-new-tokens", "12", "--no-eos", "--steps-per-call", "5"]
    assert sample.main(args, out=out) == 0
    expected = generate(model, [tokenizer.encode("klm nop")], max_new_tokens=12).tokens[0]
    assert out.getvalue() == "klm nop" + tokenizer.decode(expected) + "\n"


def test_cli_several_prompts_and_sampling_options(saved):
    directory, _, _ = saved
    out = io.StringIO()
    args = ["--checkpoint", str(directory / "model"), "--tokenizer", str(directory / "tok.model"),
            "--prompt", "klm", "--prompt", "qrs tk", "--max-new-tokens", "6", "--temperature", "0.9",
            "--top-k", "10", "--top-p", "0.9", "--seed", "2", "--stop", "zz"]
    assert sample.main(args, out=out) == 0
    text = out.getvalue()
    assert "--- 'klm' (" in text and "--- 'qrs tk' (" in text


def test_cli_rejects_bad_options(saved):
    directory, _, _ = saved
    args = ["--checkpoint", str(directory / "model"), "--tokenizer", str(directory / "tok.model"),
            "--prompt", "klm", "--top-p", "2"]
    with pytest.raises(ValueError, match="top_p must be in"):
        sample.main(args, out=io.StringIO())
