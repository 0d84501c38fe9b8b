"""The README's main job runs end to end: the bundled pretrained model samples text."""

import importlib.abc
import json
import math
import os
import pathlib
import re
import sys
import tomllib

import jax
import numpy as np
import pytest
import scipy.special
from griffin_cases import on_device
from penzai import pz

from recurrent_lm import demo
from recurrent_lm.models import griffin
from recurrent_lm.train import data

ROOT = pathlib.Path(__file__).resolve().parents[1]

DEV_MODULES = ("torch", "transformers", "recurrentgemma", "matplotlib", "nbclient", "nbformat",
               "ipykernel", "rwkv", "keras", "h5py", "kagglehub", "libtpu")
"""The modules of the dev extras (`make test`), which `make demo` does not install."""


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in DEV_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (the demo runs without the dev extras)")
        # Anything else: None, so the next finder looks.


@pytest.fixture
def without_dev_extras(monkeypatch):
    """Imports of `DEV_MODULES` fail as if they were not installed (`make demo`)."""
    for name in [m for m in sys.modules if m.split(".")[0] in DEV_MODULES]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NotInstalled(), *sys.meta_path])


def test_dev_modules_cover_the_dev_extras():
    with open(ROOT / "pyproject.toml", "rb") as f:
        dev = tomllib.load(f)["project"]["optional-dependencies"]["dev"]
    # jax[tpu] brings the module libtpu.
    names = {
        "libtpu" if requirement.startswith("jax[tpu]") else re.split(r"[<>=!~\[ ]", requirement)[0]
        for requirement in dev
    }
    assert names - {"pytest", "pytest-xdist"} == set(DEV_MODULES)


def test_hidden_dev_extras_cannot_be_imported(without_dev_extras):
    with pytest.raises(ModuleNotFoundError, match="without the dev extras"):
        import torch  # noqa: F401


def test_demo_samples_from_the_bundled_model_and_round_trips(tmp_path, capsys, without_dev_extras):
    prompts = ["Return a new list", "The socket module provides"]
    result = demo.run(prompts, str(tmp_path), max_new_tokens=12)
    out = capsys.readouterr().out
    assert result["exact"] and result["same_samples"]
    assert "bit-exact: True" in out and "same samples: True" in out
    assert "DecoderLM(" in out and "RGLRU(" in out
    assert len(result["samples"]) == 2 and all(s.strip() for s in result["samples"])
    for prompt, sample in zip(prompts, result["samples"], strict=True):
        assert f"{prompt}{sample}".replace("\n", "\n    ") in out
    assert (tmp_path / "tokenizer.model").exists()


# The bundled model's training command (README): defaults seed 0, 5% held out.
SEQ_LEN, EVAL_FRACTION, SEED = 256, 0.05, 0
UNIFORM = math.log(2048)  # 7.62 nats: a model that learned nothing


def held_out_loss(model, rows, max_batches=None) -> float:
    """Mean next-token NLL (float64 numpy, from the model's logits) over `rows`
    (the first `max_batches` batches of 16 rows, or all)."""
    total = count = 0.0
    for tokens, pos in data.eval_batches(rows, 16, max_batches):
        logits = model(
            pz.nx.wrap(on_device(tokens), "batch", "seq"),
            segment_pos=pz.nx.wrap(on_device(pos), "batch", "seq"),
        ).unwrap("batch", "seq", "vocabulary")
        z = np.asarray(logits, np.float64)[:, :-1]
        log_z = scipy.special.logsumexp(z, axis=-1)
        nll = log_z - np.take_along_axis(z, tokens[:, 1:, None], axis=-1)[..., 0]
        mask = data.loss_mask(pos)
        total, count = total + (nll * mask).sum(), count + mask.sum()
    return total / count


def test_bundled_model_is_the_trained_one():
    """Its loss on the docstrings its training held out (split as training
    split them) is far below a uniform guess; a random model's is not."""
    model, tokenizer = demo.load_bundled()
    assert model.config.vocab_size == tokenizer.vocab_size == 2048
    corpus = os.path.join(os.path.dirname(demo.bundled_model_path()), "..", "stdlib_docstrings.txt")
    documents = data.read_documents([corpus])
    _, held_out = data.split_documents(documents, EVAL_FRACTION, SEED)
    assert (len(documents), len(held_out)) == (2221, 111)
    rows = data.pack(
        data.encode_documents(tokenizer, held_out), SEQ_LEN, pad_id=max(tokenizer.pad_id, 0)
    )
    trained = held_out_loss(model, rows)
    assert trained < 4.1
    # A random model's, on the first 16 of those rows (a whole pass costs seconds).
    random = held_out_loss(griffin.build_model(model.config, jax.random.key(0)), rows, max_batches=1)
    assert random > UNIFORM - 0.5 and not random < 4.1
    # The same number training wrote at its last evaluation (float32 sums there).
    with open(os.path.join(demo.bundled_model_path(), "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 600
    assert trained == pytest.approx(final["eval_loss"], abs=1e-3)


def test_demo_reports_a_bad_option_in_one_line(tmp_path, capsys):
    assert demo.main(["--max-new-tokens", "0", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: max_new_tokens must be a positive integer, got 0.\n"
