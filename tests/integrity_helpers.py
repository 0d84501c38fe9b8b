"""Damaging files as a disk or a copy would: same size, different bytes."""

import os


def flip_middle(path, count: int = 256) -> None:
    """Inverts `count` bytes in the middle of the file (all of it if shorter); size unchanged."""
    size = os.path.getsize(path)
    count = min(count, size)
    start = (size - count) // 2
    with open(path, "r+b") as f:
        f.seek(start)
        original = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in original))
    assert os.path.getsize(path) == size


def files_under(directory) -> list[str]:
    """Every file under `directory`, relative with "/" separators, sorted."""
    return sorted(
        os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
        for root, _, names in os.walk(directory)
        for name in names
    )


def largest_file(directory) -> str:
    return os.path.join(
        directory,
        max(files_under(directory), key=lambda f: os.path.getsize(os.path.join(directory, f))),
    )
