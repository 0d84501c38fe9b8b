"""A plain text file (one document: no blank-line separators) trains with the
default flags, end to end: its stream's tail held out, evaluated, resumed."""

import json

import numpy as np
import pytest

from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.train import cli, data

WORDS = ["the", "river", "stone", "flows", "under", "a", "bridge", "old", "light", "morning",
         "cat", "sleeps", "on", "warm", "mat", "and", "slowly", "green", "hill", "town", "road"]


def write_book(path, paragraphs: int, seed: int = 0):
    """Paragraphs of sentences, separated by single blank lines: one document."""
    rng = np.random.default_rng(seed)
    text = "\n\n".join(
        " ".join(
            " ".join(rng.choice(WORDS, rng.integers(5, 12))).capitalize() + "."
            for _ in range(rng.integers(2, 5))
        )
        for _ in range(paragraphs)
    )
    path.write_text(text + "\n")
    assert len(data.read_documents([path])) == 1
    return path


def _pieces(tokenizer) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.mark.slow  # compiles the default model's steps (~1 min of CPU)
def test_one_document_trains_with_default_flags_and_resumes(tmp_path, capsys):
    book = write_book(tmp_path / "book.txt", paragraphs=45)
    run = tmp_path / "run"
    # The defaults, but for the run's length and an evaluation to see.
    argv = ["--data", str(book), "--checkpoint-dir", str(run), "--steps", "4",
            "--eval-interval", "2", "--metrics-file", str(run / "metrics.jsonl"),
            "--no-progress"]
    assert cli.main([*argv, "--stop-after", "2"]) == 0
    err = capsys.readouterr().err
    [held_out] = _lines(err, "holding out")
    assert "1 document(s), too few to hold out 5% of them" in held_out
    tail = int(held_out.split("holding out the last ")[1].split()[0])
    assert 2 <= tail < 128  # shorter than one --seq-len row: one padded row
    assert "eval loss" in _lines(err, "done: step 2")[0]
    assert cli.main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert _lines(err, "resumed from step 2") and _lines(err, "done: step 4")
    with open(run / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert all(np.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in records if "eval_loss" in r)
    # The data fingerprint: the same run on a changed file is refused.
    book.write_text(book.read_text() + "One more sentence.\n")
    assert cli.main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert _lines(err, "error: cannot resume") and _lines(err, "data_fingerprint: checkpoint")


def test_a_failed_start_can_start_again_on_other_data(tmp_path, capsys):
    """The tokenizer a failed start left in the directory neither locks it nor
    outlives a change of data: a fresh start trains its own."""
    run = tmp_path / "run"
    for book, paragraphs, seed in [("book.txt", 45, 0), ("other.txt", 60, 1)]:
        write_book(tmp_path / book, paragraphs, seed)
        argv = ["--data", str(tmp_path / book), "--checkpoint-dir", str(run), "--steps", "1",
                "--seq-len", "100000", "--no-progress"]
        assert cli.main(argv) == 2
        assert "longer than the whole training stream" in capsys.readouterr().err
    expected = tokenizer_lib.train([tmp_path / "other.txt"], tmp_path / "expected",
                                   vocab_size=1024, hard_vocab_limit=False)
    first = tokenizer_lib.train([tmp_path / "book.txt"], tmp_path / "first", vocab_size=1024,
                                hard_vocab_limit=False)
    kept = tokenizer_lib.Tokenizer.load(run / "tokenizer.model")
    assert _pieces(kept) == _pieces(expected) != _pieces(first)


def test_too_little_text_to_hold_out_is_one_clear_error(tmp_path, capsys):
    book = tmp_path / "tiny.txt"
    book.write_text("A cat.\n")
    argv = ["--data", str(book), "--checkpoint-dir", str(tmp_path / "run"), "--seq-len", "2",
            "--batch-size", "1", "--steps", "1", "--no-progress"]
    assert cli.main(argv) == 2
    [error] = _lines(capsys.readouterr().err, "error:")
    assert error.startswith("error: the data is") and "too few to hold out 5% of them" in error


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_stream_split_holds_out_the_last_tokens(fraction):
    documents = [np.arange(n, dtype=np.int32) + 100 * i for i, n in enumerate([7, 30, 4, 9])]
    stream = np.concatenate(documents)
    train, held_out = data.split_stream(documents, fraction)
    n_eval = round(len(stream) * fraction)
    np.testing.assert_array_equal(np.concatenate(held_out), stream[-n_eval:])
    np.testing.assert_array_equal(np.concatenate(train), stream[:-n_eval])
    assert all(len(piece) for piece in train + held_out)
    rows = data.pack(held_out, 64)  # one row: only the pieces' starts have no target
    assert rows.segment_pos[0, 0] == 0  # the cut document restarts: no target across the cut
    assert data.loss_mask(rows.segment_pos).sum() == n_eval - len(held_out)


def test_hold_out_takes_whole_documents_when_there_are_enough(caplog):
    documents = [np.full(10, i, np.int32) for i in range(20)]
    with caplog.at_level("INFO", logger="recurrent_lm.train.data"):
        train, held_out = data.hold_out(documents, 0.05, seed=0)
    assert len(held_out) == 1 and len(train) == 19  # one whole document
    assert caplog.messages == ["holding out 1 of 20 documents for evaluation"]
    caplog.clear()
    with caplog.at_level("INFO", logger="recurrent_lm.train.data"):
        train, held_out = data.hold_out(documents[:5], 0.05, seed=0)  # 5% of 5 rounds to 0
    assert sum(map(len, held_out)) == round(50 * 0.05)
    [message] = caplog.messages
    assert "5 document(s), too few to hold out 5% of them" in message
    with pytest.raises(data.DataError, match="too few to hold out 5% of them as whole documents"):
        data.split_documents(documents[:5], 0.05, seed=0)
    assert data.hold_out(documents, 0.0, seed=0) == (documents, [])
