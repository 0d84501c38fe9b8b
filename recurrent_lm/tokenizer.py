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
