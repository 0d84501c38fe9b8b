"""Fixtures of the training tests (helpers in `train_setup`)."""

import dataclasses
import logging

import pytest
from train_setup import STEPS, Setup, write_corpus

from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.train import TrainConfig, train


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """`cli.main` configures the root logger of its process (its handler writes to
    the test's captured stderr, closed after the test): tests that call it
    in-process hand the previous configuration back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    directory = tmp_path_factory.mktemp("train")
    corpus = write_corpus(directory / "corpus.txt")
    tokenizer_lib.train(
        [corpus], directory / "tok", vocab_size=64, hard_vocab_limit=False
    )
    config = TrainConfig(
        model="griffin",
        preset="tiny",
        config_overrides={
            "num_hidden_layers": 2,
            "block_types": ["recurrent", "attention"],
        },
        data=(str(corpus),),
        tokenizer=str(directory / "tok.model"),
        steps=STEPS,
        decay_steps=STEPS,
        batch_size=8,
        seq_len=32,
        seed=0,
        warmup_steps=2,
        learning_rate=3e-3,
        checkpoint_interval=2,
        keep_checkpoints=2,
        eval_interval=3,
        eval_batches=2,
        eval_fraction=0.1,
        progress=False,
    )
    reference_dir = directory / "reference"
    model_dir = directory / "reference_model"
    records = []
    result = train(
        dataclasses.replace(
            config,
            checkpoint_dir=str(reference_dir),
            metrics_file=str(reference_dir / "metrics.jsonl"),
            save_model=str(model_dir),
        ),
        on_step_end=lambda step, record: records.append((step, dict(record))),
    )
    return Setup(
        directory,
        str(corpus),
        str(directory / "tok.model"),
        config,
        result,
        records,
        str(reference_dir),
        str(model_dir),
    )
