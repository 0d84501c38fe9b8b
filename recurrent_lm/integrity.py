"""Checksum manifests: checkpoint directories that cannot be silently wrong.

orbax stores no checksums, so a checkpoint damaged on disk (a flipped block,
size unchanged) would restore without a word. `write_manifest` records the
size and CRC32C (``google-crc32c``: hardware-accelerated, several GB/s) of
every file under a directory, in `MANIFEST_FILE`, once the directory is
complete; `verify` re-reads every listed file and raises
`CorruptCheckpointError` naming the first one that is missing or changed, or
naming the manifest when it is missing or unreadable.

`atomic_directory` fills a temporary sibling and renames it into place once
its manifest is written, so a directory at the final path is always complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator

import google_crc32c
import jax

MANIFEST_FILE = "recurrent_lm_checksums.json"
MANIFEST_FORMAT = "recurrent_lm.checksums"
_CHUNK_BYTES = 4 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file differs from its manifest, or the manifest is missing."""


def file_crc32c(path: str) -> str:
    """CRC32C of a file's bytes, as 8 hex digits."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            checksum.update(chunk)
    return checksum.hexdigest().decode()


def _listed_files(directory: str) -> list[str]:
    """Every file under `directory`, relative with "/" separators, but the manifest."""
    files = []
    for root, _, names in os.walk(directory):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), directory)
            files.append(relative.replace(os.sep, "/"))
    # The manifest cannot hold its own checksum; a damaged manifest shows up as
    # unreadable JSON or as checksums that no longer match.
    return sorted(f for f in files if f != MANIFEST_FILE)


def _fsync_directory(directory: str) -> None:
    """Makes a rename or a new file in `directory` durable (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: str) -> None:
    """Records size and CRC32C of every file under `directory` (call once complete).

    The manifest is written to a temporary file and renamed, so it is either
    whole or absent.
    """
    files = {}
    for relative in _listed_files(directory):
        path = os.path.join(directory, relative)
        files[relative] = {"size": os.path.getsize(path), "crc32c": file_crc32c(path)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
    target = os.path.join(directory, MANIFEST_FILE)
    partial = target + ".partial"
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, target)
    _fsync_directory(directory)


def has_manifest(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST_FILE))


def _read_manifest(directory: str) -> dict[str, dict]:
    """The manifest's files; raises `CorruptCheckpointError` if missing or unreadable."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(
            f"{directory} is incomplete: it has no {MANIFEST_FILE} (its writing was cut"
            " short)."
        )
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest["format"] != MANIFEST_FORMAT or manifest["version"] != 1:
            raise ValueError(f"format {manifest['format']!r} {manifest['version']!r}")
        return dict(manifest["files"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{path} is corrupt (unreadable checksum manifest: {e})."
        ) from None


def verify(directory: str, *, fix: str = "") -> None:
    """Checks every file listed in `directory`'s manifest.

    Files added after the manifest was written are not checked: the loaders
    read only the files they wrote, all of which are listed.

    Args:
      directory: the directory.
      fix: a sentence appended to the error message: what to do about it.

    Raises:
      CorruptCheckpointError: naming the manifest or the first damaged file.
    """
    try:
        _verify_files(directory)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e} {fix}".strip()) from None


def _verify_files(directory: str) -> None:
    for relative, expected in sorted(_read_manifest(directory).items()):
        path = os.path.join(directory, *relative.split("/"))
        if not os.path.isfile(path):
            problem = "is missing"
        elif os.path.getsize(path) != expected["size"]:
            problem = f"has {os.path.getsize(path)} bytes, {expected['size']} were written"
        elif file_crc32c(path) != expected["crc32c"]:
            problem = "has changed since it was written (CRC32C mismatch, same size)"
        else:
            continue
        raise CorruptCheckpointError(f"{path} is corrupt: it {problem}.")


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a temporary sibling of `path` to fill; then writes its manifest and
    renames it to `path`. On an exception, the temporary directory is removed.

    Every process of a multi-process job gets the same temporary name; process 0
    creates it, writes the manifest and renames it (orbax's own barriers keep the
    other processes' shards inside the save). A temporary directory left by a
    killed process is replaced by the next save to the same path.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new directory.")
    partial = path + ".partial"
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    try:
        yield partial
        if primary:
            write_manifest(partial)
            os.rename(partial, path)
            _fsync_directory(os.path.dirname(path))
    except BaseException:
        if primary:
            shutil.rmtree(partial, ignore_errors=True)
        raise
