"""Synthetic recall and copying tasks with published results, for every architecture.

    python -m recurrent_lm.synthetics --task assoc_recall --model h3 --width 32 --lr 5e-4

or from Python::

    from recurrent_lm import synthetics
    task = synthetics.make_task("mqar", input_seq_len=64, num_kv_pairs=4)
    architecture, config = synthetics.paper_config("griffin", width=64, vocab_size=task.vocab_size)
    result = synthetics.train_on_task(task, "griffin", architecture, config, synthetics.RunSettings())

Modules: `tasks` (seeded generators: associative recall and induction head as
in the H3 paper, MQAR as in Zoology, selective copying as in Mamba), `models`
(the papers' 2-layer models on our architectures), `run` (training with the
training CLI's step and optimiser, accuracy, learning-rate sweeps).
"""

from recurrent_lm.synthetics.models import (
    PAPER_MODELS,
    model_label,
    paper_config,
    preset_config,
)
from recurrent_lm.synthetics.run import Result, RunSettings, sweep, train_on_task
from recurrent_lm.synthetics.tasks import (
    IGNORE,
    TASKS,
    AssociativeRecall,
    Examples,
    InductionHead,
    MultiQueryAR,
    SelectiveCopying,
    Split,
    make_task,
)

__all__ = [
    "IGNORE", "PAPER_MODELS", "TASKS", "AssociativeRecall", "Examples", "InductionHead",
    "MultiQueryAR", "Result", "RunSettings", "SelectiveCopying", "Split", "make_task",
    "model_label", "paper_config", "preset_config", "sweep", "train_on_task",
]
