"""Pretraining and fine-tuning for every registered architecture.

    python -m recurrent_lm.train --model griffin --preset tiny --data corpus.txt ...

or from Python::

    from recurrent_lm.train import TrainConfig, train
    result = train(TrainConfig(model="griffin", preset="tiny", data=("corpus.txt",), ...))

Modules: `config` (`TrainConfig`), `loop` (`train`: set-up, resume, the step
loop), `steps` (loss, train step with accumulation, eval step), `optimizer`
(schedule, optax chain), `build` (tokenizer and model), `metrics` (JSONL,
progress bar), `data` (text -> packed rows, the grain iterator), `sharding`
(meshes and named-axis rules), `checkpointing` (orbax), `cli` (flags generated
from `TrainConfig`).
"""

from recurrent_lm.train.config import TrainConfig
from recurrent_lm.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
