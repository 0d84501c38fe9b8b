"""The SentencePiece wrapper, on a tokenizer trained here with the Gemma special ids."""

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
