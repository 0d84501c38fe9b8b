"""Training test helpers: a small corpus, settings, and the reference run record.

Every in-process run uses the same optimiser settings, so the compiled step is
shared (`steps._step_functions` is cached) and each test pays no compilation.
"""

import dataclasses
import json
import math

import numpy as np

from recurrent_lm.train import TrainConfig, TrainResult

STEPS = 6


def reference_learning_rate(cfg: TrainConfig, update: int) -> float:
    """The learning rate of optimiser update `update` (0-based), as the settings
    define it: a linear warmup whose ``warmup_steps`` updates end at the peak
    (lr * (update + 1) / warmup), then a decay from the peak at update
    ``warmup_steps`` to ``lr * min_lr_ratio`` at ``total_decay_steps``, held after.
    """
    lr, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    total = cfg.total_decay_steps
    warmup = min(cfg.warmup_steps, total)
    if update < warmup:
        return lr * (update + 1) / warmup
    if cfg.lr_schedule == "constant":
        return lr
    done = min((update - warmup) / max(total - warmup, 1), 1.0)
    if cfg.lr_schedule == "linear":
        return lr + (end - lr) * done
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * done))


def write_corpus(path, documents: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = [
        "river",
        "stone",
        "the",
        "a",
        "flows",
        "under",
        "bridge",
        "old",
        "light",
        "morning",
        "cat",
        "sleeps",
        "on",
        "warm",
        "mat",
        "and",
        "slowly",
        "green",
    ]
    docs = []
    for _ in range(documents):
        lines = [
            " ".join(rng.choice(words, rng.integers(4, 12)))
            for _ in range(rng.integers(1, 4))
        ]
        docs.append("\n".join(lines))
    path.write_text("\n\n\n".join(docs))
    return path


@dataclasses.dataclass
class Setup:
    directory: object
    corpus: str
    tokenizer: str
    config: TrainConfig
    reference: TrainResult
    reference_hook_calls: list[tuple[int, dict]]
    """(step, record) of each `on_step_end` call of the reference run."""
    reference_dir: str
    model_dir: str

    def config_for(self, name: str, **changes) -> TrainConfig:
        """The reference settings with a fresh checkpoint dir `name`."""
        changes.setdefault("checkpoint_dir", str(self.directory / name))
        return dataclasses.replace(self.config, **changes)

    def cli_flags(self, name: str) -> list[str]:
        """``python -m recurrent_lm.train`` flags of the reference run's trajectory
        (no evaluation, a checkpoint every 2 steps), in a fresh checkpoint dir `name`
        that also holds the metrics file."""
        c, directory = self.config, self.directory / name
        flags = {
            "--model": c.model, "--preset": c.preset, "--data": self.corpus,
            "--tokenizer": self.tokenizer, "--steps": c.steps, "--decay-steps": c.decay_steps,
            "--batch-size": c.batch_size, "--seq-len": c.seq_len, "--seed": c.seed,
            "--warmup-steps": c.warmup_steps, "--learning-rate": c.learning_rate,
            "--eval-interval": 0, "--eval-fraction": c.eval_fraction,
            "--checkpoint-dir": directory, "--checkpoint-interval": 2,
            "--metrics-file": directory / "metrics.jsonl",
        }
        args = [str(x) for flag, value in flags.items() for x in (flag, value)]
        for key, value in c.config_overrides.items():
            args += ["--config", f"{key}={json.dumps(value)}"]
        return [*args, "--no-progress"]

    def metrics_losses(self, name: str) -> dict[int, float]:
        """{step: loss} of the metrics file that `cli_flags(name)` names."""
        with open(self.directory / name / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        losses = {r["step"]: r["loss"] for r in records}
        assert len(losses) == len(records), "a step was written twice"
        return losses
