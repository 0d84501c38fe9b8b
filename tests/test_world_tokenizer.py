"""The RWKV World tokenizer against BlinkDL's own (PyPI `rwkv`'s TRIE_TOKENIZER,
the one its PIPELINE uses for "rwkv_vocab_v20230424"), on the vocabulary file
that package ships."""

import importlib.resources
import pathlib
import random

import numpy as np
import pytest
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.train import data
from recurrent_lm.world_tokenizer import WorldTokenizer, WorldVocabError


@pytest.fixture(scope="module")
def vocab_file() -> pathlib.Path:
    path = pathlib.Path(
        str(importlib.resources.files("rwkv") / "rwkv_vocab_v20230424.txt")
    )
    assert path.is_file(), f"the rwkv package no longer ships {path.name}"
    return path


@pytest.fixture(scope="module")
def world(vocab_file) -> WorldTokenizer:
    return tokenizer_lib.load(vocab_file)


@pytest.fixture(scope="module")
def reference(vocab_file) -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(str(vocab_file))


TEXTS = {
    "empty": "",
    "prose": "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; isn't it?\n\n"
    "Mr. O'Neil said: \"Well—that's that.\" (Cost: $1,234.56, or 1.2e3 euros.)",
    "code": 'def f(x: int) -> dict[str, int]:\n    """Doc."""\n    return {"a": x ** 2}  # hi\n'
    "\tif (a && b) { return a->b[0] >> 3; }\r\n#include <stdio.h>\n",
    "whitespace": " " * 300
    + "\n" * 7
    + "\t\t \t"
    + " \n" * 40
    + "\r\n\r\n"
    + "x"
    + " " * 129,
    "cjk": "日本語のテキストです。中文文本，繁體中文。한국어 텍스트입니다. 鬱龘齉𠀋𪚥",
    "emoji": "I ❤️ 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵🇫🇷 😀😃😄 🧑🏿‍🚀 #️⃣ ☺︎",
    "combining": "e\u0301 n\u0303 a\u0308\u0304 Z\u0351\u036b\u0343\u036a\u0302 "
    "\u0915\u094d\u0937 \u0e01\u0e34\u0e4a \u05e9\u05c1\u05b8",
    "mixed": "Ωmega ß ﬁ Ⅻ ½ µ ℃ ＡＢＣ ｶﾀｶﾅ \u200b\u200d\ufeff \x00\x01\x7f \U0010fffd",
}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_encoding_matches_blinkdl(world, reference, name):
    text = TEXTS[name]
    ids = world.encode(text)
    assert ids == reference.encode(text)
    assert world.decode(ids) == text == reference.decode(ids)


def test_every_token_sampled_and_concatenated(world, reference):
    sample = random.Random(0).sample(range(1, 65530), 3000)
    tokens = [world.id_to_bytes(i) for i in sample]
    assert all(tokens)
    assert [world.encode_bytes(t) for t in tokens] == [
        [i] for i in sample
    ]  # alone: itself
    data_bytes = b"".join(tokens)
    ids = world.encode_bytes(data_bytes)
    assert ids == reference.encodeBytes(data_bytes)
    assert world.decode_bytes(ids) == data_bytes


def _random_text(rng: random.Random, length: int) -> str:
    ranges = [
        (0x20, 0x7E),
        (0x00, 0xFF),
        (0x370, 0x52F),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0x1F300, 0x1FAFF),
        (0x0, 0xD7FF),
        (0xE000, 0x10FFFF),
    ]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


def test_random_unicode(world, reference):
    rng = random.Random(1)
    texts = [_random_text(rng, rng.randint(0, 60)) for _ in range(300)]
    for text in texts:
        ids = world.encode(text)
        assert ids == reference.encode(text), text
        assert world.decode(ids) == text
    assert world.encode_batch(texts) == [world.encode(t) for t in texts]


def _split_character(world) -> tuple[str, list[int]]:
    """A character that the vocabulary has no whole token for, and its ids."""
    for code in range(0x4E00, 0xA000):
        ids = world.encode(chr(code))
        if len(ids) > 1:
            return chr(code), ids
    raise AssertionError("every CJK character is one token")


def test_invalid_utf8_at_token_boundaries(world, reference):
    char, ids = _split_character(world)
    head, tail = ids[:1], ids[1:]
    prefix = world.encode("abc ")
    assert world.decode_bytes(prefix + head) == b"abc " + world.id_to_bytes(head[0])
    assert char.encode().startswith(world.id_to_bytes(head[0]))
    # One U+FFFD per invalid sequence, the rest of the text kept ...
    assert world.decode(prefix + head) == "abc \ufffd"
    assert (
        world.decode(tail + prefix) == "\ufffd" * len(world.decode_bytes(tail)) + "abc "
    )
    assert world.decode(prefix + head + tail) == "abc " + char
    # ... where BlinkDL's decode gives one U+FFFD for the whole text.
    assert reference.decode(prefix + head) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        world.decode(prefix + head, errors="strict")
    assert "\\x" in world.id_to_piece(head[0])


def test_special_ids_and_interface(world, vocab_file):
    assert isinstance(world, WorldTokenizer)
    assert (
        world.vocab_size,
        world.eos_id,
        world.bos_id,
        world.pad_id,
        world.unk_id,
    ) == (65536, 0, 0, 0, -1)
    assert world.encode("hi", add_bos=True, add_eos=True) == [0, *world.encode("hi"), 0]
    assert (
        world.decode([0, *world.encode("hi"), 65535, 0]) == "hi"
    )  # no text for 0, unused ids
    assert world.id_to_piece(world.encode(" hello")[0]) == " hello"
    with pytest.raises(ValueError, match=r"outside \[0, 65536\)"):
        world.decode([1, 65536])
    assert tokenizer_lib.file_name(vocab_file) == "tokenizer.txt"
    assert tokenizer_lib.file_name("sp.model") == "tokenizer.model"
    docs = data.encode_documents(world, ["a b", "c"])
    assert [d.tolist() for d in docs] == [
        [0, *world.encode("a b"), 0],
        [0, *world.encode("c"), 0],
    ]
    assert all(d.dtype == np.int32 for d in docs)


# --- small vocabularies of our own -----------------------------------------------------------


def _bytes_lines() -> list[str]:
    return [f"{b + 1} {bytes([b])!r} 1" for b in range(256)]


def _write(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_longest_match_backs_off_to_the_deepest_token(tmp_path, world):
    extra = ["ab", "abc", "abcde", "bcd", "é", "éé", "x y", "'q'", '"q"', "\\q"]
    lines = _bytes_lines() + [
        f"{300 + i} {t!r} {len(t.encode())}" for i, t in enumerate(extra)
    ]
    path = _write(tmp_path / "small.txt", lines)
    small = WorldTokenizer.load(path)
    reference = TRIE_TOKENIZER(str(path))
    ab, abc, abcde, bcd = 300, 301, 302, 303
    assert small.encode("abcdx") == [
        abc,
        ord("d") + 1,
        ord("x") + 1,
    ]  # abcd is no token
    assert small.encode("abcde") == [abcde]
    assert small.encode("abxbcd") == [ab, ord("x") + 1, bcd]
    for text in ["abcdx", "éééx y'q'\"\\abcab", "aabcdeabcdbcd", ""]:
        assert small.encode(text) == reference.encode(text)
        assert small.decode(small.encode(text)) == text
    assert small.vocab_size == 65536


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "300 'ab'",
            r"bad.txt:257: malformed line \"300 'ab'\" \(not three fields\); expected",
        ),
        (
            "300 ab 2",
            r"bad.txt:257: malformed line .*'ab' is not a str or bytes literal",
        ),
        ("x3 'ab' 2", r"bad.txt:257: malformed line .*id 'x3' is not a number"),
        ("300 'ab' two", r"bad.txt:257: .*byte length 'two' is not a number"),
        ("300 '' 0", r"bad.txt:257: .*the token is empty"),
        ("0 'ab' 2", r"bad.txt:257: .*id 0 is the end-of-text token"),
        (
            "300 'é' 1",
            (
                r"bad.txt:257: token b'\\xc3\\xa9' is 2 bytes but the line says 1;"
                r" correct the length"
            ),
        ),
        (
            "12 'ab' 2",
            r"bad.txt:257: id 12 already belongs to line 12; give each token its own id",
        ),
        ("300 b'a' 1", r"bad.txt:257: token b'a' is already on line 98; remove one"),
        ("300 '\\ud800' 1", r"bad.txt:257: .*not encodable as UTF-8"),
    ],
)
def test_malformed_vocabularies_give_one_line_errors(tmp_path, line, message):
    path = _write(tmp_path / "bad.txt", _bytes_lines() + [line])
    with pytest.raises(WorldVocabError, match=message) as error:
        WorldTokenizer.load(path)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(str(path))


def test_other_bad_files(tmp_path):
    with pytest.raises(
        WorldVocabError, match=r"no token for the byte 0x41 \(1 bytes lack one\)"
    ):
        WorldTokenizer.load(
            _write(tmp_path / "gap.txt", _bytes_lines()[:65] + _bytes_lines()[66:])
        )
    with pytest.raises(WorldVocabError, match="holds no tokens"):
        WorldTokenizer.load(_write(tmp_path / "empty.txt", []))
    (tmp_path / "latin1.txt").write_bytes(b"1 'a' 1\n2 '\xe9' 1\n")
    with pytest.raises(WorldVocabError, match=r"latin1.txt:2: not UTF-8 text"):
        WorldTokenizer.load(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        tokenizer_lib.load(tmp_path / "missing.txt")
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(("\r\n".join(_bytes_lines()) + "\r\n").encode())
    assert WorldTokenizer.load(crlf).encode("hi") == [ord("h") + 1, ord("i") + 1]


def test_the_constructor_checks_its_tokens():
    tokens = {b + 1: bytes([b]) for b in range(256)}
    assert WorldTokenizer(tokens).encode("ok") == [ord("o") + 1, ord("k") + 1]
    with pytest.raises(ValueError, match="ids start at 1"):
        WorldTokenizer({**tokens, 0: b"ab"})
    with pytest.raises(ValueError, match="same token"):
        WorldTokenizer({**tokens, 300: b"a"})
    with pytest.raises(ValueError, match="leaves out token id 256"):
        WorldTokenizer(tokens, vocab_size=200)
