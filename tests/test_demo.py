"""The README's main job runs end to end."""

from recurrent_lm import demo


def test_demo_runs_the_full_loading_path(tmp_path, capsys):
    result = demo.run("The recurrent layer", str(tmp_path), top_k=3)
    out = capsys.readouterr().out
    assert result["exact"]
    assert "bit-exact: True" in out
    assert "DecoderLM(" in out and "RGLRU(" in out
    assert "top 3 next tokens" in out
    assert len(result["top_ids"]) == 3
    assert (tmp_path / "tokenizer.model").exists()
