"""Synthetic tasks: the generators' exact statistics, and short trainings that must
learn each task well above chance (the full tables are benchmarks)."""

import json
import math

import numpy as np
import pytest

from recurrent_lm import synthetics
from recurrent_lm.synthetics import IGNORE, tasks
from recurrent_lm.synthetics.__main__ import main as cli_main


def scored(examples):
    return examples.labels != IGNORE


# ----------------------------------------------------------------------------- generators


def test_associative_recall_follows_the_h3_definition():
    task = synthetics.make_task("assoc_recall")  # 20 input tokens, vocabulary 10
    train, test = task.generate(2000, np.random.default_rng(0))
    n = task.num_keys
    assert (task.vocab_size, n, task.seq_len, task.chance) == (10, 4, 22, 0.25)
    sequences = np.concatenate([train.inputs, train.labels[:, -1:]], 1)  # the whole example
    assert sequences.shape == (2000, 23)
    keys, values = sequences[:, 0:20:2], sequences[:, 1:20:2]
    assert keys.min() == 0 and keys.max() == n - 1 and values.min() == n and values.max() == 2 * n - 1
    np.testing.assert_array_equal(sequences[:, 20], task.copy_token)
    query, answer = sequences[:, 21], sequences[:, 22]
    for row in range(2000):  # one value per key in an example; the query is present
        mapping = {}
        for k, v in zip(keys[row], values[row], strict=True):
            assert mapping.setdefault(k, v) == v
        assert answer[row] == mapping[query[row]]
    # Maps are fresh per example: key 0's value takes every value across examples.
    assert set(values[keys == 0]) == set(range(n, 2 * n))
    # Every next token trains; the test scores only the answer.
    np.testing.assert_array_equal(train.labels, sequences[:, 1:])
    assert scored(test).sum() == 2000 and scored(test)[:, -1].all()


def test_induction_head_follows_the_h3_definition():
    task = synthetics.make_task("induction_head")  # 30 tokens, vocabulary 20
    train, test = task.generate(3000, np.random.default_rng(1))
    sequences = np.concatenate([train.inputs, train.labels[:, -1:]], 1)
    assert sequences.shape == (3000, 32) and task.seq_len == 31
    copies = sequences == task.copy_token
    np.testing.assert_array_equal(copies.sum(1), 2)
    np.testing.assert_array_equal(copies[:, 30], True)
    first = copies[:, :30].argmax(1)
    assert first.min() == 0 and first.max() == 27  # uniform over [0, 28)
    np.testing.assert_array_equal(sequences[:, 31], sequences[np.arange(3000), first + 1])
    ordinary = sequences[~copies]
    assert ordinary.min() == 0 and ordinary.max() == 17 and task.chance == 1 / 18
    assert scored(test).sum() == 3000 and scored(test)[:, -1].all()


def test_mqar_follows_the_zoology_definition():
    task = synthetics.make_task("mqar", input_seq_len=64, num_kv_pairs=4, vocab_size=256)
    examples, same = task.generate(500, np.random.default_rng(2))
    assert examples is same  # labels only at queries, train and test alike
    inputs, labels = examples.inputs, examples.labels
    keys, values = inputs[:, 0:8:2], inputs[:, 1:8:2]
    assert keys.min() >= 1 and keys.max() < 128 and values.min() >= 128 and values.max() < 256
    assert all(len(set(k)) == 4 for k in keys) and all(len(set(v)) == 4 for v in values)
    np.testing.assert_array_equal(scored(examples)[:, :8], False)
    np.testing.assert_array_equal(scored(examples).sum(1), 4)
    for row in range(500):
        where = np.flatnonzero(labels[row] != IGNORE)
        assert ((where - 8) % 2 == 0).all()  # queries at even offsets of the query region
        mapping = dict(zip(keys[row], values[row], strict=True))
        assert sorted(inputs[row, where]) == sorted(keys[row])  # each key queried once
        assert all(labels[row, t] == mapping[inputs[row, t]] for t in where)


def test_mqar_query_gaps_follow_the_power_law():
    """With one pair the gap is one draw from p ~ g ** (a - 1): a chi-square test
    (28 bins, 20000 draws) at a false-failure rate of 1e-6."""
    task = synthetics.make_task("mqar", input_seq_len=64, num_kv_pairs=1, vocab_size=128)
    examples, _ = task.generate(20000, np.random.default_rng(3))
    gaps = (np.flatnonzero(scored(examples).ravel()) % 64 - 2) // 2
    p = task.gap_probabilities()
    counts = np.bincount(gaps, minlength=len(p))
    expected = p * len(gaps)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 99.9999th percentile of chi-square with 30 degrees of freedom: 79.7 (> the 27 here).
    assert chi2 < 79.7, chi2
    assert counts[0] > 0.9 * expected[0]  # the near gaps dominate, as intended


def test_selective_copying_places_the_tokens_in_order():
    task = synthetics.make_task("selective_copying", input_seq_len=64, num_tokens=8, vocab_size=10)
    examples, _ = task.generate(300, np.random.default_rng(4))
    context, markers = examples.inputs[:, :64], examples.inputs[:, 64:]
    np.testing.assert_array_equal(markers, 9)
    np.testing.assert_array_equal((context != 0).sum(1), 8)
    np.testing.assert_array_equal(scored(examples)[:, :64], False)
    for row in range(300):
        np.testing.assert_array_equal(examples.labels[row, 64:], context[row][context[row] != 0])
    assert context.max() == 8 and context[context != 0].min() == 1


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_split_is_seeded_and_has_no_test_example_in_the_training_set(name):
    task = synthetics.make_task(name)
    split = task.split(400, 100, seed=5)
    again = task.split(400, 100, seed=5)
    np.testing.assert_array_equal(split.train.inputs, again.train.inputs)
    np.testing.assert_array_equal(split.test.labels, again.test.labels)
    assert len(split.train) == 400 and len(split.test) == 100
    train = {row.tobytes() for row in split.train.inputs}
    test = [row.tobytes() for row in split.test.inputs]
    assert not train & set(test) and len(set(test)) == 100
    other = task.split(400, 100, seed=6)
    assert not np.array_equal(other.train.inputs, split.train.inputs)


def test_a_task_too_small_for_a_disjoint_test_set_is_refused():
    task = synthetics.make_task("assoc_recall", vocab_size=6, input_seq_len=2)  # 2 x 2 x 2 x 2 sequences
    with pytest.raises(ValueError, match="test examples differ from the training set"):
        task.split(500, 100, seed=0)


@pytest.mark.parametrize("name, settings, message", [
    ("nope", {}, "unknown task 'nope'"),
    ("mqar", {"pairs": 3}, r"has no setting \['pairs'\]"),
    ("mqar", {"input_seq_len": 63}, "must be even"),
    ("mqar", {"input_seq_len": 64, "num_kv_pairs": 17}, "input_seq_len >= 4 x num_kv_pairs"),
    ("assoc_recall", {"vocab_size": 7}, "must be even"),
])
def test_bad_task_settings_name_the_problem(name, settings, message):
    with pytest.raises(ValueError, match=message):
        synthetics.make_task(name, **settings)


# ----------------------------------------------------------------------------- training


def above_chance(result, scored_positions):
    """Accuracy more than 6 standard deviations of a chance guesser above chance."""
    sigma = math.sqrt(result.chance * (1 - result.chance) / scored_positions)
    return result.accuracy > result.chance + 6 * sigma


# The cheapest settings (steps, batch, width, rate) measured to clear the bar with a
# wide margin (6 sigma; these reach 11-18): the steps run with the suite's XLA flags
# (no backend optimisation), ~30-50 ms each. Induction heads are learnt late.
@pytest.mark.parametrize("name, settings, model, run", [
    ("assoc_recall", {}, "griffin", dict(steps=150, batch_size=16, width=16, learning_rate=1e-2)),
    ("mqar", {"input_seq_len": 32, "num_kv_pairs": 2, "vocab_size": 64}, "hawk",
     dict(steps=200, batch_size=32, width=16, learning_rate=1e-2)),
    ("induction_head", {"input_seq_len": 16, "vocab_size": 8}, "hawk",
     dict(steps=400, batch_size=32, width=32, learning_rate=3e-3)),
], ids=["assoc_recall", "mqar", "induction_head"])
def test_a_short_training_learns_the_task(name, settings, model, run):
    task = synthetics.make_task(name, **settings)
    width = run.pop("width")
    architecture, config = synthetics.paper_config(model, width, task.vocab_size)
    run = synthetics.RunSettings(**run, num_train=2000, num_test=300)
    result = synthetics.train_on_task(task, model, architecture, config, run, width=width)
    positions = int(scored(task.split(2000, 300, 0).test).sum())
    assert above_chance(result, positions), result
    assert math.isfinite(result.final_loss)


def test_cli_sweeps_learning_rates_and_writes_json(tmp_path, capsys):
    out = tmp_path / "copy.json"
    code = cli_main([
        "--task", "selective_copying", "--task-setting", "input_seq_len=24",
        "--task-setting", "num_tokens=4", "--task-setting", "vocab_size=8", "--model", "griffin",
        "--width", "16", "--lr", "1e-4", "--lr", "1e-2", "--steps", "150", "--batch-size", "16",
        "--num-train", "2000", "--num-test", "300", "--eval-length", "48", "--json", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    runs = payload["runs"]
    assert [r["learning_rate"] for r in runs] == [1e-4, 1e-2]
    (best,) = payload["best"]
    assert best["accuracy"] == max(r["accuracy"] for r in runs) and best["learning_rate"] == 1e-2
    assert set(best["accuracy_by_length"]) == {"28", "52"}  # the training length and 48 + 4 markers
    assert best["accuracy"] > 0.5 > 1 / 6  # chance 1/6; 1200 scored positions
    table = capsys.readouterr().out
    assert "| griffin | 16 |" in table and "at 52" in table


def test_cli_reports_a_bad_setting_as_one_error_line(capsys):
    assert cli_main(["--task", "mqar", "--task-setting", "pairs=3", "--model", "griffin"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: task 'mqar' has no setting")


def test_the_swept_rate_is_adamw_at_that_rate():
    """The sweep's optimizer (unit-rate AdamW, update scaled by a state value) takes
    the same steps as the training CLI's AdamW built at the rate."""
    import jax
    import jax.numpy as jnp
    import optax

    from recurrent_lm.synthetics import run
    from recurrent_lm.train.config import TrainConfig
    from recurrent_lm.train.optimizer import make_optimizer

    axes = {"w": ("embedding", "vocabulary"), "b": ("vocabulary",)}
    params = {"w": jnp.ones((3, 4)) * 0.5, "b": jnp.zeros(4)}
    grads = [jax.tree.map(lambda p, i=i: jnp.sin(p + i) * (i + 1), params) for i in range(6)]
    swept, _, _ = run._compiled(tuple(sorted(axes.items())), 6, 2, 0.1)
    reference = make_optimizer(TrainConfig(learning_rate=3e-3, steps=6, weight_decay=0.1, warmup_steps=2), axes)
    a, b = dict(params), dict(params)
    state_a, state_b = run._init_optimizer(swept, a, 3e-3), reference.init(b)
    for g in grads:
        update, state_a = swept.update(g, state_a, a)
        a = optax.apply_updates(a, update)
        update, state_b = reference.update(g, state_b, b)
        b = optax.apply_updates(b, update)
    for key in params:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-8)
    assert not np.allclose(a["w"], params["w"])  # it moved


def test_attention_heads_split_the_width_and_are_checked(capsys):
    _, config = synthetics.paper_config("attention", 32, 16, attention_heads=4)
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (4, 4, 8)
    _, single = synthetics.paper_config("attention", 32, 16)
    assert (single.num_query_heads, single.head_dim) == (1, 32)
    assert synthetics.model_label("attention", 4) == "attention (4 heads)"
    assert synthetics.model_label("hawk") == "hawk"
    with pytest.raises(ValueError, match="must divide the width"):
        synthetics.paper_config("attention", 32, 16, attention_heads=3)
    with pytest.raises(ValueError, match="applies to the 'attention' model"):
        synthetics.paper_config("hawk", 32, 16, attention_heads=2)
    assert cli_main(["--task", "mqar", "--model", "gemma", "--preset", "tiny", "--attention-heads", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention-heads" in err[0]
