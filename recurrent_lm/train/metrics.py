"""Per-step reporting: the JSONL metrics file and the progress bar."""

from __future__ import annotations

import json
import os
import sys


class MetricsWriter:
    """One JSON object per line; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: str | None, start_step: int, enabled: bool):
        self.file = None
        if not path or not enabled:
            return
        kept = []
        if start_step and os.path.exists(path):
            with open(path) as f:
                kept = [
                    line
                    for line in f
                    if line.strip() and json.loads(line)["step"] <= start_step
                ]
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self.file = open(path, "w")  # noqa: SIM115 - kept open for the whole run
        self.file.writelines(kept)
        self.file.flush()

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar on stderr (disabled: a no-op one)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        desc="train",
    )
