"""The README's main job runs end to end: the bundled pretrained model samples text."""

import importlib.abc
import json
import os
import pathlib
import re
import sys
import tomllib

import pytest

from recurrent_lm import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]

DEV_MODULES = ("torch", "transformers", "recurrentgemma", "matplotlib", "nbclient", "nbformat",
               "ipykernel")
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
    names = {re.split(r"[<>=!~\[ ]", requirement)[0] for requirement in dev}
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
    for prompt, sample in zip(prompts, result["samples"]):
        assert f"{prompt}{sample}".replace("\n", "\n    ") in out
    assert (tmp_path / "tokenizer.model").exists()


def test_bundled_model_is_the_trained_one():
    """Its recorded final eval loss is far below a uniform guess (ln 2048 = 7.6)."""
    path = demo.bundled_model_path()
    with open(os.path.join(path, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 600 and final["eval_loss"] < 4.1
    model, tokenizer = demo.load_bundled()
    assert model.config.vocab_size == tokenizer.vocab_size == 2048


def test_demo_reports_a_bad_option_in_one_line(tmp_path, capsys):
    assert demo.main(["--max-new-tokens", "0", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: max_new_tokens must be a positive integer, got 0.\n"
