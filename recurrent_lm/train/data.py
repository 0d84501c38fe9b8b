"""Text files -> packed rows of token ids with segment positions.

Documents: a ``.jsonl`` file holds one document per line (its ``"text"``
field); any other file is text whose documents are separated by two or more
empty lines. Each document is encoded as ``BOS ids EOS``; the documents are
concatenated and cut into rows of ``seq_len`` tokens. ``segment_pos`` counts
from 0 at each document start (and at the start of a row that continues a
document), and is -1 on the padding that fills the last row, so recurrences
reset at document starts and attention never crosses them.

Loss: position t predicts token t+1 of the same row when that token continues
the same document (``segment_pos[t+1] > 0``); padding and document starts are
masked.

Evaluation: ``eval_fraction`` of the documents is held out (a seeded choice),
or, when the documents are too few for that (one book: one document), the
last ``eval_fraction`` of the token stream, as nanoGPT does (`hold_out`).

Rows are shuffled by grain (seeded, a new order every epoch), and the
iterator's position is a small JSON-able dict saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence

import grain
import numpy as np

logger = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = re.compile(r"\n[ \t]*\n([ \t]*\n)+")


class DataError(ValueError):
    """The training data cannot be used; the message says why and what to do."""


def data_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Files named by `paths` (files, directories searched for .txt/.jsonl, globs)."""
    if not paths:
        raise DataError("no data given: pass --data FILE_OR_DIRECTORY.")
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = sorted(
                f
                for ext in ("txt", "jsonl")
                for f in glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True)
            )
            if not found:
                raise DataError(f"data directory {path} holds no .txt or .jsonl files.")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        elif glob.has_magic(path) and glob.glob(path):
            files += sorted(glob.glob(path))
        else:
            raise DataError(f"data path {path} does not exist.")
    return files


def _file_documents(file: str) -> list[str]:
    with open(file, encoding="utf-8") as f:
        if not file.endswith(".jsonl"):
            return DOCUMENT_SEPARATOR.split(f.read())
        documents = []
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    documents.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(
                        f'{file}:{n}: expected a JSON object with a "text" field ({e}).'
                    ) from None
        return documents


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Non-empty documents of every file, in order."""
    documents = []
    for file in data_files(paths):
        try:
            documents += _file_documents(file)
        except UnicodeDecodeError as e:
            raise DataError(f"{file} is not UTF-8 text ({e.reason}).") from None
    documents = [d.strip() for d in documents if d.strip()]
    if not documents:
        raise DataError(
            f"the data {list(map(os.fspath, paths))} holds no text (empty files)."
        )
    return documents


def fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 over the data files' names and contents (resume checks it)."""
    digest = hashlib.sha256()
    for file in data_files(paths):
        digest.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def documents_to_hold_out(num_documents: int, eval_fraction: float) -> int:
    """How many whole documents make ``eval_fraction`` of `num_documents`; 0 when
    no whole number of them does (none, or all), so the stream's tail is held out."""
    n_eval = round(num_documents * eval_fraction)
    return n_eval if 0 < n_eval < num_documents else 0


def _check_eval_fraction(eval_fraction: float) -> None:
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval fraction must be in [0, 1), got {eval_fraction}.")


def split_documents(documents: list, eval_fraction: float, seed: int):
    """(train, eval) documents: a seeded choice of ``eval_fraction`` of them, in order."""
    _check_eval_fraction(eval_fraction)
    n_eval = documents_to_hold_out(len(documents), eval_fraction)
    if eval_fraction > 0 and not n_eval:
        raise DataError(
            f"the data has {len(documents)} document(s): too few to hold out"
            f" {eval_fraction:.0%} of them as whole documents; `hold_out` holds out the"
            " token stream's tail instead."
        )
    held_out = set(
        np.random.default_rng(seed).permutation(len(documents))[:n_eval].tolist()
    )
    train = [d for i, d in enumerate(documents) if i not in held_out]
    evaluation = [d for i, d in enumerate(documents) if i in held_out]
    return train, evaluation


MIN_EVAL_TOKENS = 2
"""A token and its successor: the least held-out text that has a loss."""


def split_stream(encoded: Sequence[np.ndarray], eval_fraction: float):
    """(train, eval) pieces of the documents' concatenated token stream: its last
    ``eval_fraction`` of tokens is held out (nanoGPT's split).

    The document the cut falls in is split in two pieces; `pack` starts the
    held-out piece at position 0, as it does a row that continues a document.
    """
    _check_eval_fraction(eval_fraction)
    lengths = np.asarray([len(e) for e in encoded], np.int64)
    total = int(lengths.sum())
    n_eval = round(total * eval_fraction)
    if n_eval < MIN_EVAL_TOKENS:
        raise DataError(
            f"the data is {total} tokens: too few to hold out {eval_fraction:.0%} of them"
            f" for evaluation (at least {MIN_EVAL_TOKENS} tokens); add text, raise"
            " --eval-fraction, or pass --eval-fraction 0."
        )
    cut = total - n_eval
    ends = np.cumsum(lengths)
    split = int(np.searchsorted(ends, cut, side="right"))  # the document holding the cut
    offset = cut - int(ends[split] - lengths[split])
    head, tail = encoded[split][:offset], encoded[split][offset:]
    train = [*encoded[:split], *([head] if len(head) else [])]
    return train, [tail, *encoded[split + 1 :]]


def hold_out(encoded: Sequence[np.ndarray], eval_fraction: float, seed: int):
    """(train, eval) token sequences: whole documents (`split_documents`) when
    there are enough, else the stream's tail (`split_stream`); logs which."""
    _check_eval_fraction(eval_fraction)
    if eval_fraction == 0:
        return list(encoded), []
    if documents_to_hold_out(len(encoded), eval_fraction):
        train, evaluation = split_documents(list(encoded), eval_fraction, seed)
        logger.info(
            "holding out %d of %d documents for evaluation", len(evaluation), len(encoded)
        )
        return train, evaluation
    train, evaluation = split_stream(encoded, eval_fraction)
    logger.info(
        "the data has %d document(s), too few to hold out %.0f%% of them for evaluation:"
        " holding out the last %d tokens of the token stream instead",
        len(encoded),
        100 * eval_fraction,
        sum(map(len, evaluation)),
    )
    return train, evaluation


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Rows of ``seq_len`` tokens: ``tokens`` and ``segment_pos`` [rows, seq_len] int32."""

    tokens: np.ndarray
    segment_pos: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return int((self.segment_pos >= 0).sum())


def encode_documents(tokenizer, documents: Sequence[str]) -> list[np.ndarray]:
    bodies = tokenizer.encode_batch(list(documents))
    return [
        np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id], np.int32)
        for ids in bodies
    ]


def pack(encoded: Sequence[np.ndarray], seq_len: int, *, pad_id: int = 0) -> PackedRows:
    """Concatenates documents and cuts the stream into rows (see module doc)."""
    if seq_len < 2:
        raise DataError(
            f"seq_len must be >= 2 (a token and its successor), got {seq_len}."
        )
    stream = np.concatenate(encoded) if encoded else np.zeros(0, np.int32)
    # Position of each token within its document.
    lengths = np.asarray([len(e) for e in encoded], np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    doc_pos = np.arange(len(stream)) - starts
    rows = -(-len(stream) // seq_len)
    tokens = np.full(rows * seq_len, pad_id, np.int32)
    pos = np.full(rows * seq_len, -1, np.int32)
    tokens[: len(stream)] = stream
    pos[: len(stream)] = doc_pos
    tokens, pos = tokens.reshape(rows, seq_len), pos.reshape(rows, seq_len)
    # A row that continues a document starts it afresh: no state crosses rows.
    starts = pos == 0
    first_start = np.where(starts.any(1), starts.argmax(1), seq_len)
    continues = np.arange(seq_len)[None, :] < first_start[:, None]
    pos = np.where(continues & (pos >= 0), pos - pos[:, :1], pos).astype(np.int32)
    return PackedRows(tokens, pos)


def loss_mask(segment_pos: np.ndarray) -> np.ndarray:
    """[..., seq-1] bool: position t has a target (token t+1 continues its document)."""
    return segment_pos[..., 1:] > 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: PackedRows
    eval: PackedRows | None
    num_documents: int
    fingerprint: str


def load_corpus(
    paths: Sequence[str | os.PathLike],
    tokenizer,
    seq_len: int,
    *,
    eval_fraction: float,
    seed: int,
    batch_size: int,
) -> Corpus:
    """Reads, encodes, splits (`hold_out`) and packs the data, checking it can fill a batch.

    A held-out part shorter than ``seq_len`` packs into one padded row: the
    evaluation then scores that shorter window.
    """
    documents = read_documents(paths)
    train_part, eval_part = hold_out(
        encode_documents(tokenizer, documents), eval_fraction, seed
    )
    pad_id = max(tokenizer.pad_id, 0)
    train = pack(train_part, seq_len, pad_id=pad_id)
    _check_fills_a_batch(train, seq_len, batch_size)
    evaluation = pack(eval_part, seq_len, pad_id=pad_id) if eval_part else None
    return Corpus(train, evaluation, len(documents), fingerprint(paths))


def _check_fills_a_batch(train: PackedRows, seq_len: int, batch_size: int) -> None:
    if seq_len > train.num_tokens:
        raise DataError(
            f"--seq-len {seq_len} is longer than the whole training stream"
            f" ({train.num_tokens} tokens); use a shorter --seq-len or more data."
        )
    if len(train) < batch_size:
        raise DataError(
            f"the training data packs into {len(train)} rows of {seq_len} tokens, fewer than"
            f" --batch-size {batch_size}; use a smaller batch or --seq-len, or more data."
        )


class BatchIterator:
    """Shuffled batches of rows forever; ``get_state``/``set_state`` resume it.

    Each process reads only its own rows of every global batch (multi-host).
    """

    def __init__(
        self,
        rows: PackedRows,
        batch_size: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.rows = rows
        if batch_size % process_count:
            raise DataError(
                f"batch size {batch_size} is not divisible by {process_count} processes."
            )
        local = batch_size // process_count
        self._local = slice(process_index * local, (process_index + 1) * local)
        dataset = (
            grain.MapDataset.range(len(rows))
            .shuffle(seed=seed)
            .repeat(None)
            .batch(batch_size)
        )
        self._iterator = iter(dataset.to_iter_dataset())

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(next(self._iterator))[self._local]
        return self.rows.tokens[index], self.rows.segment_pos[index]

    def get_state(self) -> dict:
        return dict(self._iterator.get_state())

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


def eval_batches(rows: PackedRows, batch_size: int, max_batches: int | None):
    """The held-out rows in order, in batches; the last is padded with empty rows."""
    n = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    for start in range(0, n, batch_size):
        tokens = rows.tokens[start : min(start + batch_size, n)]
        pos = rows.segment_pos[start : min(start + batch_size, n)]
        missing = batch_size - len(tokens)
        if missing:
            tokens = np.concatenate(
                [tokens, np.zeros((missing, tokens.shape[1]), np.int32)]
            )
            pos = np.concatenate([pos, np.full((missing, pos.shape[1]), -1, np.int32)])
        yield tokens, pos
