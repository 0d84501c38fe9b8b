"""Training with scanned layer stacks (``scan_layers``, ``remat``): the same
losses as the unrolled model, per-layer labels in the saved model, exact resume."""

import dataclasses

import numpy as np
import pytest
from train_setup import write_corpus

from recurrent_lm import load, tokenizer
from recurrent_lm.core import stack
from recurrent_lm.params import parameter_values
from recurrent_lm.train import TrainConfig, train
from recurrent_lm.train.checkpointing import RunMismatchError


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> TrainConfig:
    directory = tmp_path_factory.mktemp("scanned")
    corpus = write_corpus(directory / "corpus.txt", documents=40)
    tokenizer.train([corpus], directory / "tok", vocab_size=64, hard_vocab_limit=False)
    return TrainConfig(
        model="rwkv", preset="tiny",
        # Three identical blocks: one scan of three repeats.
        config_overrides={"hidden_size": 32, "num_hidden_layers": 3,
                          "attention_hidden_size": 32, "intermediate_size": 64},
        data=(str(corpus),), tokenizer=str(directory / "tok.model"),
        steps=2, decay_steps=2, batch_size=4, seq_len=16, warmup_steps=1,
        learning_rate=1e-2, eval_interval=0, checkpoint_interval=1, progress=False,
        # AdamW's first update is lr * sign(g) for |g| >> eps: a gradient element
        # near zero flips on float rounding. With eps = 1 the update is smooth in g.
        adam_eps=1.0,
    )


def test_scanned_run_matches_unrolled_and_resumes_exactly(config, tmp_path):
    unrolled = train(dataclasses.replace(config, scan_layers=False))
    scanned_config = dataclasses.replace(
        config, scan_layers=True, remat="block", checkpoint_dir=str(tmp_path / "run"),
        save_model=str(tmp_path / "model"),
    )
    scanned = train(scanned_config)
    assert sorted(scanned.losses) == [1, 2]
    np.testing.assert_allclose(
        [scanned.losses[s] for s in (1, 2)], [unrolled.losses[s] for s in (1, 2)], rtol=1e-6
    )
    # The trained and the saved model are per layer.
    assert not stack.is_scanned(scanned.model)
    expected = parameter_values(unrolled.model)
    for model in (scanned.model, load(tmp_path / "model")):
        got = parameter_values(model)
        assert sorted(got) == sorted(expected)
        for label, value in expected.items():
            np.testing.assert_allclose(
                np.asarray(got[label].unwrap(*value.named_shape)),
                np.asarray(value.unwrap(*value.named_shape)), rtol=1e-5, atol=1e-6, err_msg=label,
            )
    # Stop after step 1, resume: step 2 is the uninterrupted run's.
    resumed_config = dataclasses.replace(scanned_config, checkpoint_dir=str(tmp_path / "resumed"),
                                         save_model=None)
    assert sorted(train(dataclasses.replace(resumed_config, stop_after=1)).losses) == [1]
    resumed = train(dataclasses.replace(resumed_config, resume=True))
    assert resumed.start_step == 1
    assert resumed.losses[2] == scanned.losses[2]
    # Checkpoints hold the stacked parameters: a resume must scan the same way.
    with pytest.raises(RunMismatchError, match="scan_layers"):
        train(dataclasses.replace(resumed_config, resume=True, scan_layers=False, steps=3))
