"""Tiny synthetic corpora and SentencePiece tokenizers trained on them (no downloads)."""

import numpy as np

from recurrent_lm import tokenizer as tokenizer_lib


def train_tokenizer(directory, *, letters: str, words: int, max_word_length: int,
                    words_per_line: int, lines: int, vocab_size: int):
    """Random words over `letters`, lines of them, and a tokenizer trained on that."""
    rng = np.random.default_rng(0)
    vocabulary = ["".join(rng.choice(list(letters), size=rng.integers(2, max_word_length)))
                  for _ in range(words)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(vocabulary, words_per_line)) for _ in range(lines)))
    return tokenizer_lib.train([corpus], directory / "tok", vocab_size=vocab_size)
