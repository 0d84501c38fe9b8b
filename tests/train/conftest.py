"""Shared training fixtures: a small corpus, its tokenizer and one reference run.

Every in-process run uses the same optimiser settings, so the compiled step is
shared (`loop._step_functions` is cached) and each test pays no compilation.
"""

import dataclasses

import numpy as np
import pytest

from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.train import loop

STEPS = 6


def write_corpus(path, documents: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = ["river", "stone", "the", "a", "flows", "under", "bridge", "old", "light",
             "morning", "cat", "sleeps", "on", "warm", "mat", "and", "slowly", "green"]
    docs = []
    for _ in range(documents):
        lines = [" ".join(rng.choice(words, rng.integers(4, 12))) for _ in range(rng.integers(1, 4))]
        docs.append("\n".join(lines))
    path.write_text("\n\n\n".join(docs))
    return path


@dataclasses.dataclass
class Setup:
    directory: object
    corpus: str
    tokenizer: str
    config: loop.TrainConfig
    reference: loop.TrainResult
    reference_dir: str
    model_dir: str

    def config_for(self, name: str, **changes) -> loop.TrainConfig:
        """The reference settings with a fresh checkpoint dir `name`."""
        changes.setdefault("checkpoint_dir", str(self.directory / name))
        return dataclasses.replace(self.config, **changes)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    directory = tmp_path_factory.mktemp("train")
    corpus = write_corpus(directory / "corpus.txt")
    tokenizer_lib.train([corpus], directory / "tok", vocab_size=64, hard_vocab_limit=False)
    config = loop.TrainConfig(
        model="griffin", preset="tiny", data=(str(corpus),), tokenizer=str(directory / "tok.model"),
        steps=STEPS, decay_steps=STEPS, batch_size=8, seq_len=32, seed=0, warmup_steps=2,
        learning_rate=3e-3, checkpoint_interval=2, keep_checkpoints=2, eval_interval=3,
        eval_batches=2, eval_fraction=0.1, progress=False,
    )
    reference_dir = directory / "reference"
    model_dir = directory / "reference_model"
    result = loop.train(dataclasses.replace(
        config, checkpoint_dir=str(reference_dir), metrics_file=str(reference_dir / "metrics.jsonl"),
        save_model=str(model_dir),
    ))
    return Setup(directory, str(corpus), str(directory / "tok.model"), config, result,
                 str(reference_dir), str(model_dir))
