"""SentencePiece tokenizer wrapper (the Gemma-family `tokenizer.model`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm


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

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside [0, {self.vocab_size}).")
        return self.processor.DecodeIds(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.IdToPiece(int(token_id))


def train(
    text_files: Sequence[str | os.PathLike],
    model_prefix: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    **options,
) -> Tokenizer:
    """Trains a SentencePiece model with the Gemma special ids (pad 0, eos 1, bos 2, unk 3).

    Writes ``{model_prefix}.model`` (and ``.vocab``) and returns the tokenizer.
    """
    spm.SentencePieceTrainer.Train(
        input=",".join(os.fspath(f) for f in text_files),
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
    return Tokenizer.load(f"{os.fspath(model_prefix)}.model")


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
    files = []
    for path in args.data:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(root, n) for root, _, names in os.walk(path) for n in names
                if n.endswith(".txt")
            )
        elif os.path.isfile(path):
            files.append(path)
        else:
            parser.error(f"data path {path} does not exist.")
    if not files or not any(os.path.getsize(f) for f in files):
        parser.error(f"no text to train on in {args.data}.")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tokenizer = train(files, args.output, vocab_size=args.vocab_size, model_type=args.model_type,
                      hard_vocab_limit=args.exact_vocab_size)
    print(f"wrote {args.output}.model ({tokenizer.vocab_size} pieces; pad {tokenizer.pad_id},"
          f" eos {tokenizer.eos_id}, bos {tokenizer.bos_id}, unk {tokenizer.unk_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
