"""Synthetic recall and copying tasks: seeded generators of (inputs, labels).

Every task makes `Examples`: ``inputs`` int32 [examples, seq] and ``labels``
int32 [examples, seq], where ``labels[i, t]`` is the token the model must
predict after reading ``inputs[i, :t + 1]``, or `IGNORE` (no target there).
Training uses the task's ``train`` labels, accuracy its ``test`` labels (the
published setups score fewer positions than they train on).

Each task is a frozen dataclass of its settings, with the source it follows;
token ids are laid out by us (a relabelling of the originals' vocabularies,
which changes nothing a model can learn). `split(seed)` draws a train set and
a test set with no example in common.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

IGNORE = -100
"""Label of a position without a target (the originals' ``ignore_index``)."""


@dataclasses.dataclass(frozen=True)
class Examples:
    """``inputs`` and ``labels``, int32 [examples, seq] (see the module docstring)."""

    inputs: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, rows) -> Examples:
        return Examples(self.inputs[rows], self.labels[rows])


@dataclasses.dataclass(frozen=True)
class Split:
    """A task's train and test examples (test: the positions that are scored)."""

    train: Examples
    test: Examples


class Task:
    """Base of the tasks: `generate` (train and test labels of fresh examples)
    and `split` (disjoint train and test sets)."""

    name: ClassVar[str]
    source: ClassVar[str]

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        raise NotImplementedError

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the possible answers."""
        raise NotImplementedError

    def generate(self, count: int, rng: np.random.Generator) -> tuple[Examples, Examples]:
        """`count` examples: (with train labels, with test labels)."""
        raise NotImplementedError

    def with_length(self, seq_len: int) -> Task:
        """The same task at another input length (for length extrapolation)."""
        raise NotImplementedError(f"{self.name} has no length to change.")

    def split(self, num_train: int, num_test: int, seed: int) -> Split:
        """`num_train` training and `num_test` test examples, no test example
        equal to a training one (redrawn until enough are new)."""
        rng = np.random.default_rng(seed)
        train, _ = self.generate(num_train, rng)
        seen = {row.tobytes() for row in train.inputs}
        inputs, labels, have = [], [], 0
        for _ in range(100):
            _, test = self.generate(max(num_test - have, 1) * 2, rng)
            unique = []  # new to the training set and to the test set so far
            for i, row in enumerate(test.inputs):
                key = row.tobytes()
                if key not in seen:
                    seen.add(key)
                    unique.append(i)
            inputs.append(test.inputs[unique])
            labels.append(test.labels[unique])
            have += len(unique)
            if have >= num_test:
                break
        if have < num_test:
            raise ValueError(
                f"{self.name}: only {have} test examples differ from the training set;"
                f" ask for fewer than {num_test} or a task with more possible sequences."
            )
        test = Examples(np.concatenate(inputs)[:num_test], np.concatenate(labels)[:num_test])
        return Split(train, test)


def _next_token(sequences: np.ndarray, scored: np.ndarray) -> tuple[Examples, Examples]:
    """Next-token examples of whole sequences [n, seq + 1]: every position
    trains; the test labels keep the positions where `scored` [seq] is True."""
    inputs = sequences[:, :-1].astype(np.int32)
    labels = sequences[:, 1:].astype(np.int32)
    test = np.where(scored[None, :], labels, IGNORE).astype(np.int32)
    return Examples(inputs, labels), Examples(inputs, test)


@dataclasses.dataclass(frozen=True)
class AssociativeRecall(Task):
    """Associative recall of the H3 paper (Fu et al. 2023, "Hungry Hungry
    Hippos", HazyResearch safari ``generate_assoc_recall``).

    Per example a fresh map from the keys (the first half of the ordinary
    tokens) to values (the second half, drawn with replacement); the context
    is ``input_seq_len // 2`` key-value pairs (keys drawn with replacement),
    then the copy token, a key present in the context, and its value. Every
    next token trains (as in the original); the test scores the value at the
    end. Ids: keys, values, then the copy and no-op tokens (``vocab_size``
    counts both, as the original's does).
    """

    name: ClassVar[str] = "assoc_recall"
    source: ClassVar[str] = "H3 paper / HazyResearch safari src/dataloaders/synthetics.py"
    input_seq_len: int = 20
    vocab_size_: int = 10

    def __post_init__(self):
        if self.vocab_size_ < 6 or self.vocab_size_ % 2:
            raise ValueError(f"assoc_recall vocab_size must be even and >= 6, got {self.vocab_size_}.")
        if self.input_seq_len < 2:
            raise ValueError(f"assoc_recall input_seq_len must be >= 2, got {self.input_seq_len}.")

    @property
    def vocab_size(self) -> int:
        return self.vocab_size_

    @property
    def num_keys(self) -> int:
        return (self.vocab_size_ - 2) // 2

    @property
    def copy_token(self) -> int:
        return self.vocab_size_ - 2

    @property
    def seq_len(self) -> int:
        return 2 * (self.input_seq_len // 2) + 2

    @property
    def chance(self) -> float:
        return 1 / self.num_keys

    def with_length(self, seq_len: int) -> AssociativeRecall:
        return dataclasses.replace(self, input_seq_len=seq_len)

    def generate(self, count, rng):
        n, pairs = self.num_keys, self.input_seq_len // 2
        kv_map = rng.integers(0, n, (count, n)) + n  # key -> value id
        keys = rng.integers(0, n, (count, pairs))
        values = np.take_along_axis(kv_map, keys, 1)
        # The query: uniform among the keys present (the original's draw).
        present = np.zeros((count, n), bool)
        np.put_along_axis(present, keys, True, 1)
        weights = present / present.sum(1, keepdims=True)
        query = (rng.random((count, 1)) < np.cumsum(weights, 1)).argmax(1)
        answer = np.take_along_axis(kv_map, query[:, None], 1)[:, 0]
        context = np.stack([keys, values], 2).reshape(count, 2 * pairs)
        tail = np.stack([np.full(count, self.copy_token), query, answer], 1)
        sequences = np.concatenate([context, tail], 1)
        scored = np.zeros(sequences.shape[1] - 1, bool)
        scored[-1] = True
        return _next_token(sequences, scored)


@dataclasses.dataclass(frozen=True)
class InductionHead(Task):
    """The induction-head task of the H3 paper (safari ``generate_induction_head``),
    also the Mamba and Griffin papers' (vocabulary 16, trained at 256 tokens,
    evaluated at longer lengths).

    ``input_seq_len`` ordinary tokens drawn uniformly; at a position drawn
    uniformly from ``[0, input_seq_len - 2)`` the copy token replaces the
    token there (the one after it is kept); the copy token again, then the
    token that followed its first occurrence. Every next token trains; the test
    scores the last. Ids: the ordinary tokens, then the copy and no-op tokens
    (``vocab_size`` counts both, as in the original).
    """

    name: ClassVar[str] = "induction_head"
    source: ClassVar[str] = "H3 paper / safari src/dataloaders/synthetics.py; Mamba, Griffin papers"
    input_seq_len: int = 30
    vocab_size_: int = 20

    def __post_init__(self):
        if self.vocab_size_ < 4:
            raise ValueError(f"induction_head vocab_size must be >= 4, got {self.vocab_size_}.")
        if self.input_seq_len < 3:
            raise ValueError(f"induction_head input_seq_len must be >= 3, got {self.input_seq_len}.")

    @property
    def vocab_size(self) -> int:
        return self.vocab_size_

    @property
    def copy_token(self) -> int:
        return self.vocab_size_ - 2

    @property
    def seq_len(self) -> int:
        return self.input_seq_len + 1

    @property
    def chance(self) -> float:
        return 1 / (self.vocab_size_ - 2)

    def with_length(self, seq_len: int) -> InductionHead:
        return dataclasses.replace(self, input_seq_len=seq_len)

    def generate(self, count, rng):
        length = self.input_seq_len
        tokens = rng.integers(0, self.vocab_size_ - 2, (count, length))
        trigger = rng.integers(0, length - 2, count)
        rows = np.arange(count)
        tokens[rows, trigger] = self.copy_token
        answer = tokens[rows, trigger + 1]
        sequences = np.concatenate(
            [tokens, np.full((count, 1), self.copy_token), answer[:, None]], 1)
        scored = np.zeros(length + 1, bool)
        scored[-1] = True
        return _next_token(sequences, scored)


@dataclasses.dataclass(frozen=True)
class MultiQueryAR(Task):
    """Multi-query associative recall (MQAR) of Zoology (Arora et al. 2023,
    HazyResearch zoology ``zoology/data/multiquery_ar.py``).

    ``num_kv_pairs`` distinct keys (from ``1 .. vocab_size // 2 - 1``) with
    distinct values (from the upper half) open the sequence; each key is then
    queried once, at gap ``g`` (position ``2 g`` of the query region) drawn
    without replacement with ``p(g) ~ (g + 1) ** (power_a - 1)``; the label at
    a query is its value, every other position has none (train and test
    alike). The other query-region positions hold random tokens
    (``random_non_queries``, the original's default).
    """

    name: ClassVar[str] = "mqar"
    source: ClassVar[str] = "Zoology / HazyResearch zoology zoology/data/multiquery_ar.py"
    input_seq_len: int = 64
    num_kv_pairs: int = 4
    vocab_size_: int = 256
    power_a: float = 0.01

    def __post_init__(self):
        if self.input_seq_len % 2:
            raise ValueError(f"mqar input_seq_len must be even, got {self.input_seq_len}.")
        if self.vocab_size_ <= self.input_seq_len:
            raise ValueError(
                f"mqar vocab_size ({self.vocab_size_}) must exceed input_seq_len ({self.input_seq_len}):"
                " raise vocab_size (as Zoology requires).")
        if 4 * self.num_kv_pairs > self.input_seq_len:
            raise ValueError(
                f"mqar needs input_seq_len >= 4 x num_kv_pairs, got {self.input_seq_len} and"
                f" {self.num_kv_pairs}.")
        if self.num_kv_pairs > self.vocab_size_ // 2 - 1:
            raise ValueError(f"mqar has only {self.vocab_size_ // 2 - 1} keys for {self.num_kv_pairs} pairs.")

    @property
    def vocab_size(self) -> int:
        return self.vocab_size_

    @property
    def seq_len(self) -> int:
        return self.input_seq_len

    @property
    def chance(self) -> float:
        return 1 / (self.vocab_size_ - self.vocab_size_ // 2)

    def with_length(self, seq_len: int) -> MultiQueryAR:
        return dataclasses.replace(self, input_seq_len=seq_len)

    def gap_probabilities(self) -> np.ndarray:
        space = (self.input_seq_len - 2 * self.num_kv_pairs) // 2
        p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        return p / p.sum()

    def generate(self, count, rng):
        half, pairs = self.vocab_size_ // 2, self.num_kv_pairs
        context = 2 * pairs
        keys = np.argsort(rng.random((count, half - 1)), 1)[:, :pairs] + 1
        values = np.argsort(rng.random((count, self.vocab_size_ - half)), 1)[:, :pairs] + half
        # Gaps without replacement, in proportion to p: the top `pairs` of
        # log p + Gumbel noise (the same law as successive weighted draws).
        p = self.gap_probabilities()
        gaps = np.argsort(-(np.log(p) + rng.gumbel(size=(count, len(p)))), 1)[:, :pairs]
        inputs = rng.integers(0, self.vocab_size_, (count, self.input_seq_len))
        inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
        labels = np.full((count, self.input_seq_len), IGNORE)
        rows = np.arange(count)[:, None]
        inputs[rows, context + 2 * gaps] = keys
        labels[rows, context + 2 * gaps] = values
        examples = Examples(inputs.astype(np.int32), labels.astype(np.int32))
        return examples, examples


@dataclasses.dataclass(frozen=True)
class SelectiveCopying(Task):
    """Selective copying (Gu and Dao 2023, "Mamba", section 3.1 / appendix E.1;
    used by Griffin's copy experiments): ``num_tokens`` data tokens at random
    positions of a ``input_seq_len``-long context otherwise filled with a
    noise token, then ``num_tokens`` marker tokens; at the markers the model
    outputs the data tokens in order. Labels only there (train and test).
    Ids: 0 noise, 1 .. vocab_size - 2 data, vocab_size - 1 marker.
    """

    name: ClassVar[str] = "selective_copying"
    source: ClassVar[str] = "Mamba paper (Gu & Dao 2023) section 3.1; Griffin paper section 6.2"
    input_seq_len: int = 256
    num_tokens: int = 16
    vocab_size_: int = 16

    def __post_init__(self):
        if self.vocab_size_ < 3:
            raise ValueError(f"selective_copying vocab_size must be >= 3, got {self.vocab_size_}.")
        if self.num_tokens > self.input_seq_len:
            raise ValueError(
                f"selective_copying cannot place {self.num_tokens} tokens in {self.input_seq_len}.")

    @property
    def vocab_size(self) -> int:
        return self.vocab_size_

    @property
    def seq_len(self) -> int:
        return self.input_seq_len + self.num_tokens

    @property
    def chance(self) -> float:
        return 1 / (self.vocab_size_ - 2)

    def with_length(self, seq_len: int) -> SelectiveCopying:
        return dataclasses.replace(self, input_seq_len=seq_len)

    def generate(self, count, rng):
        length, n = self.input_seq_len, self.num_tokens
        data = rng.integers(1, self.vocab_size_ - 1, (count, n))
        where = np.sort(np.argsort(rng.random((count, length)), 1)[:, :n], 1)
        context = np.zeros((count, length), np.int64)
        np.put_along_axis(context, where, data, 1)
        markers = np.full((count, n), self.vocab_size_ - 1)
        inputs = np.concatenate([context, markers], 1)
        labels = np.concatenate([np.full((count, length), IGNORE), data], 1)
        # The first output is read at the first marker.
        examples = Examples(inputs.astype(np.int32), labels.astype(np.int32))
        return examples, examples


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (AssociativeRecall, InductionHead, MultiQueryAR, SelectiveCopying)
}


def make_task(name: str, **settings) -> Task:
    """The task called `name` with `settings` (its dataclass fields; ``vocab_size``
    for ``vocab_size_``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}.")
    cls = TASKS[name]
    if "vocab_size" in settings:
        settings["vocab_size_"] = settings.pop("vocab_size")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        known = sorted(f.replace("vocab_size_", "vocab_size") for f in fields)
        raise ValueError(f"task {name!r} has no setting {unknown}; its settings: {known}.")
    return cls(**settings)
