"""The README's main job runs end to end: the bundled pretrained model samples text."""

import json
import os

from recurrent_lm import demo


def test_demo_samples_from_the_bundled_model_and_round_trips(tmp_path, capsys):
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
