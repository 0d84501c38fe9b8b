"""Checksum manifests, atomic directories, and `recurrent_lm.save` / `load` on damaged,
half-written and foreign-version directories."""

import json
import os

import jax
import numpy as np
import pytest
from integrity_helpers import files_under, flip_middle, largest_file

import recurrent_lm
from recurrent_lm import demo, integrity
from recurrent_lm.checkpoint import METADATA_FILE
from recurrent_lm.models import griffin
from recurrent_lm.params import parameter_values


def _fill(directory):
    os.makedirs(directory / "sub")
    (directory / "a.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    (directory / "sub" / "b.txt").write_text("hello")
    (directory / "empty").write_bytes(b"")


def test_manifest_lists_every_file_but_itself(tmp_path):
    _fill(tmp_path)
    integrity.write_manifest(str(tmp_path))
    with open(tmp_path / integrity.MANIFEST_FILE) as f:
        listed = json.load(f)["files"]
    assert sorted(listed) == ["a.bin", "empty", "sub/b.txt"]
    assert files_under(tmp_path) == sorted([*listed, integrity.MANIFEST_FILE])
    assert listed["sub/b.txt"] == {"size": 5, "crc32c": "9a71bb4c"}  # CRC32C("hello")
    integrity.verify(str(tmp_path))
    (tmp_path / "added later.txt").write_text("not read by any loader")
    integrity.verify(str(tmp_path))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda d: flip_middle(d / "a.bin"), "a.bin is corrupt: it has changed"),
        (lambda d: flip_middle(d / "sub" / "b.txt", 1), "b.txt is corrupt: it has changed"),
        (lambda d: (d / "empty").write_bytes(b"x"), "empty is corrupt: it has 1 bytes, 0 were"),
        (lambda d: os.remove(d / "sub" / "b.txt"), "b.txt is corrupt: it is missing"),
        (lambda d: flip_middle(d / integrity.MANIFEST_FILE), "unreadable checksum manifest"),
        (lambda d: (d / integrity.MANIFEST_FILE).write_text("{}"), "unreadable checksum manifest"),
        (lambda d: os.remove(d / integrity.MANIFEST_FILE), "incomplete: it has no recurrent_lm_"),
    ],
    ids=["flip", "flip-1-byte", "size", "missing", "manifest-flip", "manifest-empty", "no-manifest"],
)
def test_verify_names_the_damage(tmp_path, damage, problem):
    _fill(tmp_path)
    integrity.write_manifest(str(tmp_path))
    damage(tmp_path)
    with pytest.raises(integrity.CorruptCheckpointError, match=problem) as info:
        integrity.verify(str(tmp_path), fix="Do this.")
    assert str(info.value).endswith(" Do this.") and "\n" not in str(info.value)


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="cut short"),
        integrity.atomic_directory(str(target)) as partial,
    ):
        (tmp_path / partial / "file").write_text("half")
        assert not target.exists()
        raise RuntimeError("cut short")
    assert os.listdir(tmp_path) == []
    with integrity.atomic_directory(str(target)) as partial:
        (tmp_path / partial / "file").write_text("whole")
    assert os.listdir(tmp_path) == ["out"]
    integrity.verify(str(target))
    with pytest.raises(FileExistsError, match="already exists"), integrity.atomic_directory(
        str(target)
    ):
        pass


# recurrent_lm.save / load ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    config = griffin.GriffinConfig(
        vocab_size=32, hidden_size=16, num_attention_heads=2, intermediate_size=16,
        num_hidden_layers=2, attention_window_size=8,
    )
    return griffin.build_model(config, jax.random.key(0))


@pytest.fixture
def saved(tiny_model, tmp_path):
    path = tmp_path / "model"
    recurrent_lm.save(tiny_model, path)
    return path


def test_save_is_verified_and_loads_the_same_weights(tiny_model, saved):
    assert os.listdir(saved.parent) == ["model"]  # no temporary directory left
    listed = json.loads((saved / integrity.MANIFEST_FILE).read_text())["files"]
    assert METADATA_FILE in listed and any(f.startswith("params/") for f in listed)
    assert files_under(saved) == sorted([*listed, integrity.MANIFEST_FILE])
    loaded = parameter_values(recurrent_lm.load(saved))
    for label, value in parameter_values(tiny_model).items():
        np.testing.assert_array_equal(
            loaded[label].unwrap(*value.named_shape), value.unwrap(*value.named_shape)
        )


def test_load_of_a_damaged_model_is_an_error_naming_the_file(saved):
    victim = largest_file(saved / "params")
    flip_middle(victim)
    with pytest.raises(recurrent_lm.CorruptCheckpointError) as info:
        recurrent_lm.load(saved)
    message = str(info.value)
    assert f"{victim} is corrupt" in message and "save or convert the model again" in message
    assert "\n" not in message


def test_load_of_a_half_written_model_is_an_error(saved):
    os.remove(saved / integrity.MANIFEST_FILE)
    with pytest.raises(recurrent_lm.CorruptCheckpointError, match="is incomplete"):
        recurrent_lm.load(saved)


def test_load_of_damaged_metadata_is_an_error(saved):
    flip_middle(saved / METADATA_FILE)
    with pytest.raises(recurrent_lm.CorruptCheckpointError, match="recurrent_lm.json is corrupt"):
        recurrent_lm.load(saved)


def test_load_refuses_another_format_version(saved):
    metadata = json.loads((saved / METADATA_FILE).read_text())
    metadata["format_version"] = 99
    (saved / METADATA_FILE).write_text(json.dumps(metadata))
    integrity.write_manifest(str(saved))  # a consistent directory of a future version
    with pytest.raises(ValueError, match="has format_version 99; this recurrent_lm reads version 1"):
        recurrent_lm.load(saved)


def test_failed_save_leaves_nothing_behind(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError):
        recurrent_lm.save(
            tiny_model, tmp_path / "model", extra_files={"tokenizer.model": str(tmp_path / "nope")}
        )
    assert os.listdir(tmp_path) == []


def test_save_copies_extra_files_under_the_checksums(tiny_model, tmp_path):
    source = tmp_path / "tok.model"
    source.write_bytes(b"tokenizer bytes")
    recurrent_lm.save(tiny_model, tmp_path / "model", extra_files={"tokenizer.model": str(source)})
    assert (tmp_path / "model" / "tokenizer.model").read_bytes() == b"tokenizer bytes"
    flip_middle(tmp_path / "model" / "tokenizer.model", 1)
    with pytest.raises(recurrent_lm.CorruptCheckpointError, match="tokenizer.model is corrupt"):
        recurrent_lm.load(tmp_path / "model")


def test_bundled_model_has_a_complete_manifest():
    path = demo.bundled_model_path()
    with open(os.path.join(path, integrity.MANIFEST_FILE)) as f:
        listed = json.load(f)["files"]
    assert files_under(path) == sorted([*listed, integrity.MANIFEST_FILE])
    integrity.verify(path)
