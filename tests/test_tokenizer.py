"""The SentencePiece wrapper, on a tokenizer trained here with the Gemma special ids."""

import numpy as np
import pytest
from corpora import train_tokenizer

from recurrent_lm import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("sp"), letters="abcdefghij", words=300,
                           max_word_length=7, words_per_line=12, lines=400, vocab_size=120)


def test_special_ids_follow_gemma(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, tokenizer.unk_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == 120


def test_encode_decode_round_trip(tokenizer):
    ids = tokenizer.encode("abc defg hij", add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "abc defg hij"
    assert tokenizer.encode("abc", add_bos=False)[0] != tokenizer.bos_id


def test_reload_from_file(tokenizer, tmp_path_factory):
    path = tokenizer.processor.serialized_model_proto()
    file = tmp_path_factory.mktemp("reload") / "tokenizer.model"
    file.write_bytes(path)
    again = tokenizer_lib.Tokenizer.load(file)
    assert again.encode("abc hij") == tokenizer.encode("abc hij")


def test_bad_inputs(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"outside \[0, 120\)"):
        tokenizer.decode([5, 120])
    with pytest.raises(FileNotFoundError):
        tokenizer_lib.Tokenizer.load(tmp_path / "missing.model")


def _one_long_line(path, characters: int):
    """`characters` of words over ASCII and non-ASCII letters, with no line break."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnoé日本語ß")
    words = ["".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(200)]
    text = ""
    while len(text) < characters:
        text += " ".join(rng.choice(words, 1000)) + " "
    path.write_text(text[:characters], encoding="utf-8")
    return text[:characters]


def test_a_file_that_is_one_long_line_trains_a_tokenizer(tmp_path):
    text = _one_long_line(tmp_path / "one_line.txt", 200_000)
    assert len(text.encode()) > 20 * tokenizer_lib.MAX_SENTENCE_BYTES
    tok = tokenizer_lib.train([tmp_path / "one_line.txt"], tmp_path / "tok", vocab_size=150)
    assert tok.vocab_size == 150
    sample = text[1000:1300].strip()
    assert tok.decode(tok.encode(sample, add_bos=False)) == sample
    assert tok.unk_id not in tok.encode(sample)  # its characters were all seen


def test_cut_line_keeps_every_byte_within_the_limit():
    spaced = "日本語 " * 100 + "word " * 50
    pieces = list(tokenizer_lib.cut_line(spaced, limit=64))
    assert "".join(pieces) == spaced
    assert all(len(p.encode()) <= 64 for p in pieces) and len(pieces) > 5
    assert all(p.startswith(" ") for p in pieces[1:])  # cut before a space
    unspaced = "日本語ß" * 100  # no space: cut between characters
    pieces = list(tokenizer_lib.cut_line(unspaced, limit=10))
    assert "".join(pieces) == unspaced and all(0 < len(p.encode()) <= 10 for p in pieces)
    assert list(tokenizer_lib.cut_line("short", limit=10)) == ["short"]


def test_training_on_bad_text_names_the_problem(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text"):
        tokenizer_lib.train([latin1], tmp_path / "tok", vocab_size=20)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"no text to train a tokenizer on in \[.*blank.txt'\]"):
        tokenizer_lib.train([blank], tmp_path / "tok", vocab_size=20)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab ba\n")
    with pytest.raises(ValueError, match="SentencePiece cannot train this tokenizer: .*Vocabulary size"):
        tokenizer_lib.train([tiny], tmp_path / "tok", vocab_size=500)


def test_command_reports_user_errors_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert tokenizer_lib.main(["train", "--data", str(missing), "--output", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: data path {missing} does not exist.\n"
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("ab ba\n")
    argv = ["train", "--data", str(tiny), "--output", str(tmp_path / "t"), "--vocab-size", "500",
            "--exact-vocab-size"]
    assert tokenizer_lib.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SentencePiece cannot train this tokenizer") and err.count("\n") == 1
