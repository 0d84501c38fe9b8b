"""Tokenizers: the SentencePiece wrapper (the Gemma-family `tokenizer.model`)
and, through `load`, the RWKV World vocabulary (`recurrent_lm.world_tokenizer`).

`load` tells them apart by the file name: a ``.txt`` file is a World vocabulary
(``rwkv_vocab_v20230424.txt``), anything else a SentencePiece model. Both have
``encode`` / ``encode_batch`` / ``decode`` / ``id_to_piece`` and the special
ids ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``, ``unk_id``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import sentencepiece as spm

from recurrent_lm.user_errors import reports_user_errors
from recurrent_lm.world_tokenizer import WorldTokenizer


class Tokenizer:
    """Text <-> token ids with a SentencePiece model.

    The official RecurrentGemma/Gemma vocabulary has pad 0, eos 1, bos 2, unk 3;
    the ids are read from the model file, not assumed.
    """

    def __init__(self, processor: spm.SentencePieceProcessor):
        self.processor = processor

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path} does not exist.")
        processor = spm.SentencePieceProcessor()
        if not processor.Load(path):
            raise ValueError(f"{path} is not a SentencePiece model.")
        return cls(processor)

    @property
    def vocab_size(self) -> int:
        return self.processor.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = list(self.processor.EncodeAsIds(text))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, without special tokens."""
        return [list(ids) for ids in self.processor.EncodeAsIds(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size}).")
        return self.processor.DecodeIds(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.IdToPiece(int(token_id))


WORLD_VOCAB_SUFFIX = ".txt"


def is_world_vocab(path: str | os.PathLike) -> bool:
    """Whether `load` reads `path` as an RWKV World vocabulary (a ``.txt`` file)."""
    return os.fspath(path).endswith(WORLD_VOCAB_SUFFIX)


def load(path: str | os.PathLike) -> Tokenizer | WorldTokenizer:
    """The tokenizer of `path`: a World vocabulary if it is a ``.txt`` file, else
    a SentencePiece model."""
    if is_world_vocab(path):
        return WorldTokenizer.load(path)
    return Tokenizer.load(path)


def file_name(path: str | os.PathLike) -> str:
    """The name a copy of the tokenizer `path` takes next to a saved model:
    ``tokenizer.txt`` for a World vocabulary, else ``tokenizer.model``."""
    return "tokenizer.txt" if is_world_vocab(path) else "tokenizer.model"


MAX_SENTENCE_BYTES = 4192
"""SentencePiece's default ``max_sentence_length``: the trainer drops longer
lines, so `train` cuts them (a file that is one long line has no other)."""


def cut_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """`line` in pieces of at most `limit` UTF-8 bytes, cut before a space where
    there is one, else between two characters."""
    text = line.encode()
    while len(text) > limit:
        cut = text.rfind(b" ", 1, limit + 1)
        if cut < 1:  # no space: the last character boundary within the limit
            cut = limit
            while text[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
        yield text[:cut].decode()
        text = text[cut:]
    yield text.decode()


def training_sentences(
    text_files: Sequence[str | os.PathLike], limit: int = MAX_SENTENCE_BYTES
) -> Iterator[str]:
    """The non-empty lines of the files, each cut to at most `limit` bytes."""
    found = False
    for file in map(os.fspath, text_files):
        with open(file, encoding="utf-8") as f:
            try:
                for line in f:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        found = True
                        yield from cut_line(line, limit)
            except UnicodeDecodeError as e:
                raise ValueError(f"{file} is not UTF-8 text ({e.reason}).") from None
    if not found:
        raise ValueError(
            f"no text to train a tokenizer on in {list(map(os.fspath, text_files))}."
        )


def train(
    text_files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    **options,
) -> Tokenizer:
    """Trains a SentencePiece model with the Gemma special ids (pad 0, eos 1, bos 2, unk 3).

    Reads the files as UTF-8 and cuts lines longer than SentencePiece's
    ``max_sentence_length`` (`options` may set it) into pieces. Writes
    ``{model_prefix}.model`` (and ``.vocab``) and returns the tokenizer.

    Raises:
      ValueError: a file is not UTF-8, or the files hold no text.
      FileNotFoundError: a file does not exist.
    """
    options.setdefault("max_sentence_length", MAX_SENTENCE_BYTES)
    failures = []

    def sentences():
        # SentencePiece reports an exception of the iterator as a RuntimeError
        # that names only its type; it is re-raised as itself below.
        try:
            yield from training_sentences(text_files, options["max_sentence_length"])
        except (ValueError, OSError) as e:
            failures.append(e)
            raise

    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=sentences(),
            model_prefix=os.fspath(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            minloglevel=2,
            **options,
        )
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        # What is left is SentencePiece refusing the settings for this text
        # (e.g. a vocabulary larger than the text allows with hard_vocab_limit).
        raise ValueError(f"SentencePiece cannot train this tokenizer: {e}") from None
    return Tokenizer.load(f"{os.fspath(model_prefix)}.model")


def gather_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The files of `paths`: files, and the .txt files under directories."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                if n.endswith(".txt")
            )
            if not found:
                raise FileNotFoundError(f"data directory {path} holds no .txt files.")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"data path {path} does not exist.")
    return files


@reports_user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recurrent_lm.tokenizer train --data FILE ... --output PREFIX``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m recurrent_lm.tokenizer")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("train", help="train a SentencePiece model on text files")
    cmd.add_argument("--data", action="append", required=True, metavar="PATH",
                     help="text file or directory of .txt files (repeatable)")
    cmd.add_argument("--output", required=True, metavar="PREFIX",
                     help="writes PREFIX.model and PREFIX.vocab")
    cmd.add_argument("--vocab-size", type=int, default=1024)
    cmd.add_argument("--model-type", default="unigram", choices=("unigram", "bpe", "char", "word"))
    cmd.add_argument("--exact-vocab-size", action="store_true",
                     help="fail instead of shrinking the vocabulary when the text is too small")
    args = parser.parse_args(argv)
    files = gather_text_files(args.data)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tokenizer = train(files, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                      hard_vocab_limit=args.exact_vocab_size)
    print(f"wrote {args.output}.model ({tokenizer.vocab_size} pieces; pad {tokenizer.pad_id},"
          f" eos {tokenizer.eos_id}, bos {tokenizer.bos_id}, unk {tokenizer.unk_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
