"""The RWKV "World" tokenizer: greedy longest match over bytes.

The vocabulary is a text file (BlinkDL's ``rwkv_vocab_v20230424.txt``, shipped
with the PyPI ``rwkv`` package, Apache-2.0), one token a line::

    <id> <Python literal of a str or bytes> <length in bytes>

e.g. ``33 ' ' 1``, ``257 b'\\xe4\\xb8' 2``. A str token stands for its UTF-8
bytes. Ids start at 1; id 0 is the end-of-text token, which the file does not
list. Every one of the 256 bytes has a token, so any text encodes.

Encoding walks the UTF-8 bytes from the start and takes, at each position, the
longest token that matches there. The search runs in `re`'s matcher, one
pattern per two-byte prefix: the tokens of two bytes or more that start with
it, as a trie-shaped pattern whose alternatives at each node are the possible
next bytes and whose optional tails are tried before stopping at a shorter
token, so the first match `re` finds is the longest token; where none matches,
the single byte is the token. Each pattern is compiled the first time its
prefix occurs (short texts compile a few; all 3,652 of the World vocabulary
take about 1.5 s), after which 1 MB of text encodes in about 0.5 s.

Decoding concatenates the tokens' bytes and decodes them as UTF-8. A token may
hold part of a character, so ids cut at an arbitrary point may end, or start,
inside one; such bytes decode as U+FFFD (Python's ``errors="replace"``), one
for each invalid sequence, and the rest of the text is kept. (The ``rwkv``
package's ``TRIE_TOKENIZER.decode`` returns a single ``"\\ufffd"`` for the
whole text instead; on valid UTF-8 the two agree.) `decode_bytes` gives the
bytes themselves, e.g. to decode a stream incrementally.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Sequence

WORLD_VOCAB_SIZE = 65536
"""Rows of the World models' embedding: ids 0 (end of text), 1..65529 (the
file's tokens) and six unused ids."""

END_OF_TEXT_ID = 0

_LINE_FORMAT = "'<id> <Python str or bytes literal> <byte length>'"


class WorldVocabError(ValueError):
    """A vocabulary file that does not hold a valid World vocabulary."""


class WorldTokenizer:
    """Text <-> token ids with an RWKV World vocabulary.

    Same interface as `recurrent_lm.tokenizer.Tokenizer`. The end-of-text id 0
    serves as eos, bos and pad (RWKV's training data separates documents with
    it); there is no unknown token (`unk_id` is -1, SentencePiece's "none").
    `encode` adds no bos unless asked.
    """

    def __init__(self, tokens: dict[int, bytes], *, vocab_size: int | None = None):
        """`tokens`: id -> bytes, ids >= 1, each token non-empty and distinct.

        `vocab_size` defaults to the larger of `WORLD_VOCAB_SIZE` and the
        largest id + 1; ids without a token decode to nothing.
        """
        if min(tokens, default=1) < 1 or not all(tokens.values()):
            raise ValueError(
                "token ids start at 1 (0 is the end of text); no token is empty."
            )
        largest = max(tokens, default=0)
        self._vocab_size = (
            max(WORLD_VOCAB_SIZE, largest + 1) if vocab_size is None else vocab_size
        )
        if self._vocab_size <= largest:
            raise ValueError(f"vocab_size {vocab_size} leaves out token id {largest}.")
        self._bytes: list[bytes] = [b""] * self._vocab_size
        for token_id, token in tokens.items():
            self._bytes[token_id] = token
        self._ids = {token: token_id for token_id, token in tokens.items()}
        if len(self._ids) != len(tokens):
            raise ValueError("two ids have the same token.")
        missing = [b for b in range(256) if bytes([b]) not in self._ids]
        if missing:
            raise ValueError(
                f"no token for the byte 0x{missing[0]:02x} ({len(missing)} bytes lack one):"
                " every byte needs a token of its own, or some text cannot be encoded."
            )
        by_prefix: dict[bytes, list[bytes]] = {}
        for token in self._ids:
            if len(token) > 1:
                by_prefix.setdefault(token[:2], []).append(token)
        self._by_prefix = by_prefix
        # Compiled on first use; None: no token of two bytes or more has the prefix.
        self._patterns: dict[bytes, re.Pattern[bytes] | None] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> WorldTokenizer:
        """Reads and checks a vocabulary file (see the module doc for the format).

        Raises:
          FileNotFoundError: `path` does not exist.
          WorldVocabError: a line that is malformed, whose byte length is
            wrong, or whose id or token comes again; named by file and line.
        """
        tokens = read_vocab(path)
        try:
            return cls(tokens, **kwargs)
        except ValueError as e:
            raise WorldVocabError(f"{os.fspath(path)}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return END_OF_TEXT_ID

    @property
    def bos_id(self) -> int:
        return END_OF_TEXT_ID

    @property
    def pad_id(self) -> int:
        return END_OF_TEXT_ID

    @property
    def unk_id(self) -> int:
        return -1

    def encode_bytes(self, data: bytes) -> list[int]:
        """The ids of `data` by greedy longest match (no special tokens)."""
        ids, patterns, by_prefix = self._ids, self._patterns, self._by_prefix
        found = []
        start, end = 0, len(data)
        while start < end:
            prefix = data[start : start + 2]
            try:
                pattern = patterns[prefix]
            except KeyError:
                tokens = by_prefix.get(prefix)
                pattern = patterns[prefix] = tokens and _longest_match_pattern(tokens)
            match = pattern and pattern.match(data, start)
            if match:
                found.append(ids[match.group()])
                start = match.end()
            else:  # every byte is a token
                found.append(ids[data[start : start + 1]])
                start += 1
        return found

    def encode(
        self, text: str, *, add_bos: bool = False, add_eos: bool = False
    ) -> list[int]:
        ids = self.encode_bytes(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, without special tokens."""
        return [self.encode(text) for text in texts]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The tokens' bytes, concatenated (end of text and unused ids add none)."""
        ids = [int(i) for i in ids]
        if ids and not (0 <= min(ids) and max(ids) < self._vocab_size):
            bad = [i for i in ids if not 0 <= i < self._vocab_size]
            raise ValueError(
                f"token ids {bad[:5]} are outside [0, {self._vocab_size})."
            )
        return b"".join(map(self._bytes.__getitem__, ids))

    def decode(self, ids: Sequence[int], *, errors: str = "replace") -> str:
        """`decode_bytes` as UTF-8; `errors` as for `bytes.decode` (see the module
        doc: by default each invalid sequence becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def id_to_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def id_to_piece(self, token_id: int) -> str:
        """The token as text; bytes that are not UTF-8 are written ``\\xNN``."""
        return self.id_to_bytes(token_id).decode("utf-8", "backslashreplace")


def read_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """id -> token bytes of a World vocabulary file, checked line by line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer vocabulary {path} does not exist.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise WorldVocabError(
            f"{path}:{line}: not UTF-8 text; a World vocabulary is UTF-8 (write bytes"
            " tokens as b'...' literals)."
        ) from None
    tokens: dict[int, bytes] = {}
    id_line: dict[int, int] = {}
    token_line: dict[bytes, int] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        token_id, token = _parse_line(path, number, line)
        if token_id in id_line:
            raise WorldVocabError(
                f"{path}:{number}: id {token_id} already belongs to line {id_line[token_id]};"
                " give each token its own id."
            )
        if token in token_line:
            raise WorldVocabError(
                f"{path}:{number}: token {token!r} is already on line {token_line[token]};"
                " remove one of the two lines."
            )
        tokens[token_id] = token
        id_line[token_id] = number
        token_line[token] = number
    if not tokens:
        raise WorldVocabError(
            f"{path}: holds no tokens; expected lines {_LINE_FORMAT}."
        )
    return tokens


def _parse_line(path: str, number: int, line: str) -> tuple[int, bytes]:
    def malformed(why: str) -> WorldVocabError:
        shown = line if len(line) <= 60 else line[:57] + "..."
        return WorldVocabError(
            f"{path}:{number}: malformed line {shown!r} ({why}); expected {_LINE_FORMAT}."
        )

    first, last = line.find(" "), line.rfind(" ")
    if first < 1 or last <= first + 1 or last == len(line) - 1:
        raise malformed("not three fields")
    id_field, literal, length_field = (
        line[:first],
        line[first + 1 : last],
        line[last + 1 :],
    )
    if not (id_field.isascii() and id_field.isdigit()):
        raise malformed(f"id {id_field!r} is not a number")
    if not (length_field.isascii() and length_field.isdigit()):
        raise malformed(f"byte length {length_field!r} is not a number")
    token_id = int(id_field)
    if token_id == END_OF_TEXT_ID:
        raise malformed(
            "id 0 is the end-of-text token, which is not listed; ids start at 1"
        )
    quote = literal[:1]
    if (
        len(literal) >= 2
        and quote in "'\""
        and literal[-1] == quote
        and "\\" not in literal
        and quote not in literal[1:-1]
    ):
        value = literal[1:-1]  # a plain quoted str, as most lines are: no need to parse
    else:
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
    if isinstance(value, str):
        try:
            token = value.encode("utf-8")
        except UnicodeEncodeError:
            raise malformed(
                "the str token is not encodable as UTF-8; write it as b'...'"
            ) from None
    elif isinstance(value, bytes):
        token = value
    else:
        raise malformed(f"{literal!r} is not a str or bytes literal")
    if not token:
        raise malformed("the token is empty")
    if len(token) != int(length_field):
        raise WorldVocabError(
            f"{path}:{number}: token {token!r} is {len(token)} bytes but the line says"
            f" {int(length_field)}; correct the length (UTF-8 bytes, not characters)."
        )
    return token_id, token


def _longest_match_pattern(tokens) -> re.Pattern[bytes]:
    """A pattern whose match at a position is the longest of `tokens` there.

    For the trie of `tokens`, the pattern of a node is the alternation over its
    children of ``byte`` + the child's pattern: required when the child is no
    token, optional (``(?:...)?``, tried first) when it is. Only one child can
    match the next byte, so the matcher follows the input's single path down
    the trie, and backtracks only to the deepest token on it. Chains of
    single-child non-token nodes become one literal.
    """
    end = None  # key marking a node that is a token
    trie: dict = {}
    for token in tokens:
        node = trie
        for byte in token:
            node = node.setdefault(byte, {})
        node[end] = True

    def pattern(node: dict) -> bytes:
        singles, alternatives = [], []
        for byte, child in node.items():
            if byte is end:
                continue
            literal = bytes([byte])
            # Follow a chain of nodes that are neither tokens nor branches.
            while end not in child and len(child) == 1:
                ((next_byte, child),) = child.items()
                literal += bytes([next_byte])
            if len(child) == 1:  # a token with no longer token after it
                if len(literal) == 1:
                    singles.append(literal)
                else:
                    alternatives.append(re.escape(literal))
            elif end in child:
                alternatives.append(
                    re.escape(literal) + b"(?:" + pattern(child) + b")?"
                )
            else:
                alternatives.append(re.escape(literal) + b"(?:" + pattern(child) + b")")
        if len(singles) == 1:
            alternatives.append(re.escape(singles[0]))
        elif singles:
            alternatives.append(b"[" + b"".join(map(re.escape, singles)) + b"]")
        return b"|".join(alternatives)

    return re.compile(pattern(trie))
