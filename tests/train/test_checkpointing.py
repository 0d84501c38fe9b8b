"""Training checkpoints on a tiny state: manifests, damage of any file, incomplete steps,
retention that never leaves only an unverified checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from integrity_helpers import files_under, flip_middle, largest_file

from recurrent_lm import integrity
from recurrent_lm.train import checkpointing

RUN = {"model": "tiny", "seed": 0}


def _state(step):
    return {"w": jnp.arange(4096, dtype=jnp.float32) + step, "step": np.int64(step)}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), _state(0))


def _save_steps(path, steps, keep=3):
    checkpointer = checkpointing.Checkpointer(str(path), keep=keep)
    try:
        for step in steps:
            checkpointer.save(step, _state(step), {"position": step}, RUN)
    finally:
        checkpointer.close()


def _restore(path):
    checkpointer = checkpointing.Checkpointer(str(path), keep=3)
    try:
        step, state, data = checkpointer.restore_latest(ABSTRACT, RUN)
    finally:
        checkpointer.close()
    assert int(state["step"]) == step and data == {"position": step}
    np.testing.assert_array_equal(state["w"], _state(step)["w"])
    return step


def test_each_step_gets_a_manifest_of_all_its_files_and_old_ones_go(tmp_path):
    _save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    assert sorted(os.listdir(tmp_path)) == ["3", "4", checkpointing.MARKER]
    for step in ("3", "4"):
        listed = files_under(tmp_path / step)
        assert integrity.MANIFEST_FILE in listed and any(f.startswith("state/") for f in listed)
        integrity.verify(str(tmp_path / step))
    assert _restore(tmp_path) == 4


# A sample of a step's files, one of each kind (every file is in the manifest).
VICTIMS = [
    "_CHECKPOINT_METADATA",
    "state/manifest.ocdbt",
    "state/_METADATA",
    "data/metadata",
    "run/metadata",
    "largest state file",
]


@pytest.mark.parametrize("victim", VICTIMS)
def test_a_flipped_file_of_the_newest_step_falls_back_to_the_previous(tmp_path, victim):
    _save_steps(tmp_path, [1, 2])
    step_dir = tmp_path / "2"
    path = largest_file(step_dir / "state") if victim == "largest state file" else step_dir / victim
    flip_middle(path)
    with pytest.warns(checkpointing.CorruptCheckpointWarning) as warned:
        assert _restore(tmp_path) == 1
    (message,) = [str(w.message) for w in warned]
    assert "step 2" in message and "is corrupt" in message and str(path) in message
    assert sorted(os.listdir(tmp_path)) == ["1", "corrupt-2", checkpointing.MARKER]


def test_a_truncated_file_of_the_newest_step_falls_back_to_the_previous(tmp_path):
    _save_steps(tmp_path, [1, 2])
    victim = largest_file(tmp_path / "2" / "state")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.warns(
        checkpointing.CorruptCheckpointWarning, match=f"is corrupt: it has {size // 2} bytes"
    ):
        assert _restore(tmp_path) == 1


def test_a_step_without_manifest_is_incomplete_and_skipped(tmp_path):
    _save_steps(tmp_path, [1, 2])
    os.remove(tmp_path / "2" / integrity.MANIFEST_FILE)
    with pytest.warns(checkpointing.CorruptCheckpointWarning, match="step 2 .* is incomplete"):
        assert _restore(tmp_path) == 1


def test_killed_before_the_manifest_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """keep=1: the old step must outlive the new one's commit until its manifest exists."""
    _save_steps(tmp_path, [1], keep=1)

    class Killed(Exception):
        pass

    def killed(directory):
        raise Killed("stopped between commit and manifest")

    monkeypatch.setattr(integrity, "write_manifest", killed)
    with pytest.raises(Killed):
        _save_steps(tmp_path, [2], keep=1)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", checkpointing.MARKER]
    with pytest.warns(checkpointing.CorruptCheckpointWarning, match="incomplete"):
        assert _restore(tmp_path) == 1


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for step in ("1", "2"):
        flip_middle(largest_file(tmp_path / step / "state"))
    with pytest.warns(checkpointing.CorruptCheckpointWarning), pytest.raises(
        checkpointing.CheckpointDirError, match="no intact checkpoint left"
    ) as info:
        _restore(tmp_path)
    assert "\n" not in str(info.value) and "without --resume" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["corrupt-1", "corrupt-2", checkpointing.MARKER]


def test_a_step_moved_aside_twice_keeps_both_copies(tmp_path):
    _save_steps(tmp_path, [1, 2])
    os.rename(tmp_path / "1", tmp_path / "corrupt-2")  # as if step 2 was moved aside before
    flip_middle(largest_file(tmp_path / "2" / "state"))
    with (
        pytest.warns(checkpointing.CorruptCheckpointWarning, match="corrupt-2.2"),
        pytest.raises(checkpointing.CheckpointDirError),
    ):
        _restore(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["corrupt-2", "corrupt-2.2", checkpointing.MARKER]


def test_a_refused_resume_deletes_nothing(tmp_path):
    """Old checkpoints go only after a new save of ours, not when a resume is refused."""
    _save_steps(tmp_path, [1, 2, 3])
    checkpointer = checkpointing.Checkpointer(str(tmp_path), keep=1)
    try:
        with pytest.raises(checkpointing.RunMismatchError, match="seed: checkpoint 0, now 1"):
            checkpointer.restore_latest(ABSTRACT, {**RUN, "seed": 1})
    finally:
        checkpointer.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", checkpointing.MARKER]
