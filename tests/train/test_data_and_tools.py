"""Packing, loss mask, data iterator state, sharding rules, tokenizer CLI."""

import dataclasses
import typing

import numpy as np
import pytest
from train_setup import write_corpus

from recurrent_lm import axes
from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.train import TrainConfig, build, data, sharding


def test_pack_marks_documents_padding_and_row_continuations():
    rows = data.pack(
        [np.arange(5) + 10, np.arange(3) + 20, np.arange(9) + 30], 4, pad_id=0
    )
    np.testing.assert_array_equal(
        rows.tokens,
        [
            [10, 11, 12, 13],
            [14, 20, 21, 22],
            [30, 31, 32, 33],
            [34, 35, 36, 37],
            [38, 0, 0, 0],
        ],
    )
    # A row continuing a document restarts its positions (no state crosses rows).
    np.testing.assert_array_equal(
        rows.segment_pos,
        [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [0, -1, -1, -1]],
    )
    mask = data.loss_mask(rows.segment_pos)
    assert not mask[1, 0]  # token 20 starts a document: not predicted from 14
    assert not mask[4].any()  # padding
    assert rows.num_tokens == 17


def test_documents_split_and_batches_resume_exactly(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt", documents=40)
    docs = data.read_documents([corpus])
    assert len(docs) == 40
    train, held_out = data.split_documents(docs, 0.1, seed=3)
    assert len(held_out) == 4 and not set(train) & set(held_out)
    assert data.split_documents(docs, 0.1, seed=3) == (train, held_out)
    rows = data.PackedRows(
        np.arange(50 * 4).reshape(50, 4).astype(np.int32), np.zeros((50, 4), np.int32)
    )
    first = data.BatchIterator(rows, 8, seed=1)
    batches = [next(first)[0] for _ in range(3)]
    state = first.get_state()
    rest = [next(first)[0] for _ in range(8)]  # crosses an epoch boundary
    second = data.BatchIterator(rows, 8, seed=1)
    np.testing.assert_array_equal(next(second)[0], batches[0])
    second.set_state(state)
    for expected in rest:
        np.testing.assert_array_equal(next(second)[0], expected)
    # Two processes read disjoint halves of the same global batch.
    halves = [
        next(data.BatchIterator(rows, 8, seed=1, process_index=i, process_count=2))[0]
        for i in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), batches[0])


def test_jsonl_documents_and_bad_files(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two\\n\\n\\nstill two"}\n')
    assert data.read_documents([good]) == ["one", "two\n\n\nstill two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(data.DataError, match="bad.jsonl:1: expected a JSON object"):
        data.read_documents([bad])
    (tmp_path / "sub").mkdir()
    with pytest.raises(data.DataError, match="no .txt or .jsonl"):
        data.read_documents([tmp_path / "sub"])


class FakeMesh:
    shape: typing.ClassVar = {"data": 2, "fsdp": 2, "model": 4}


def test_sharding_rules_map_named_axes_to_mesh_axes():
    rules = sharding.rules_for("griffin")
    spec, notes = sharding.partition_spec(
        (axes.VOCABULARY, axes.EMBEDDING), (64, 32), FakeMesh, rules
    )
    assert tuple(spec) == ("model", "fsdp") and not notes
    # kv_heads = 1 cannot be split: replicated, and said so.
    spec, notes = sharding.partition_spec(
        (axes.EMBEDDING, axes.KV_HEADS, axes.PROJECTION), (32, 1, 8), FakeMesh, rules
    )
    assert tuple(spec) == ("fsdp", None, None) and "kv_heads" in notes[0]
    # One mesh axis per array; overrides win.
    spec, _ = sharding.partition_spec((axes.MLP, axes.LRU), (8, 8), FakeMesh, rules)
    assert tuple(spec) == ("model", None)
    spec, _ = sharding.partition_spec(
        (axes.EMBEDDING,),
        (32,),
        FakeMesh,
        sharding.rules_for("griffin", {"embedding": None}),
    )
    assert tuple(spec) == (None,)
    assert sharding.parse_mesh_shape("fsdp=2,model=-1", 8) == {
        "data": 1,
        "fsdp": 2,
        "model": 4,
    }
    assert sharding.parse_mesh_shape(None, 8) == {"data": 8, "fsdp": 1, "model": 1}
    with pytest.raises(ValueError, match="bad mesh entry 'tensor=2'"):
        sharding.parse_mesh_shape("tensor=2", 8)
    with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
        sharding.parse_mesh_shape("data=2,fsdp=2", 8)


def test_grad_accum_grows_to_the_token_budget_per_device():
    """4 batch devices (FakeMesh: data 2 x fsdp 2): 32 rows are 8 per device."""
    plain = TrainConfig(batch_size=32, seq_len=64)
    assert build.resolve_grad_accum(plain, FakeMesh) == plain
    budget = dataclasses.replace(plain, max_tokens_per_device=128)  # 2 rows per device
    assert build.resolve_grad_accum(budget, FakeMesh).grad_accum == 4
    # Microbatches stay whole rows that split evenly: 8 rows per device are never
    # cut in 3; a budget under one row gives one row per device.
    odd = dataclasses.replace(plain, max_tokens_per_device=64 * 3)
    assert build.resolve_grad_accum(odd, FakeMesh).grad_accum == 4
    tight = dataclasses.replace(plain, max_tokens_per_device=10)
    assert build.resolve_grad_accum(tight, FakeMesh).grad_accum == 8
    # Never fewer microbatches than asked for.
    asked = dataclasses.replace(budget, grad_accum=8)
    assert build.resolve_grad_accum(asked, FakeMesh).grad_accum == 8
    with pytest.raises(ValueError, match=r"make --batch-size a multiple of 8"):
        build.resolve_grad_accum(TrainConfig(batch_size=12, grad_accum=2), FakeMesh)


def test_tokenizer_train_command(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", documents=60)
    assert (
        tokenizer_lib.main(
            [
                "train",
                "--data",
                str(corpus),
                "--output",
                str(tmp_path / "tok" / "sp"),
                "--vocab-size",
                "48",
            ]
        )
        == 0
    )
    assert "pad 0, eos 1, bos 2, unk 3" in capsys.readouterr().out
    tok = tokenizer_lib.Tokenizer.load(tmp_path / "tok" / "sp.model")
    assert tok.decode(tok.encode("the old river", add_bos=False)) == "the old river"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code = tokenizer_lib.main(
        ["train", "--data", str(empty), "--output", str(tmp_path / "x")]
    )
    assert code == 2
    assert "error: no text to train a tokenizer on" in capsys.readouterr().err


def test_bfloat16_compute_binds_bf16_copies_of_float32_masters():
    import jax.numpy as jnp

    from recurrent_lm.models import griffin
    from recurrent_lm.params import abstract_parameters
    from recurrent_lm.train import steps

    config = griffin.GriffinConfig.from_preset("tiny", vocab_size=32)
    build = lambda key: griffin.build_model(config, key)
    abstract = abstract_parameters(build)  # no initialiser runs: zeros will do
    axes_by_label = {label: tuple(v.named_shape) for label, v in abstract.items()}
    arrays = {
        label: jnp.zeros(tuple(v.named_shape.values()), v.dtype)
        for label, v in abstract.items()
    }
    named = steps.named_params(axes_by_label, arrays, "bfloat16")
    assert named and all(v.dtype == jnp.bfloat16 for v in named.values())
    assert all(named[label].named_shape == abstract[label].named_shape for label in abstract)
    assert all(a.dtype == jnp.float32 for a in arrays.values())  # masters untouched
