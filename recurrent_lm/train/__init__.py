"""Pretraining and fine-tuning for every registered architecture.

    python -m recurrent_lm.train --model griffin --preset tiny --data corpus.txt ...

or from Python::

    from recurrent_lm.train import TrainConfig, train
    result = train(TrainConfig(model="griffin", preset="tiny", data=("corpus.txt",), ...))

Modules: `loop` (settings, step functions, the loop), `data` (text -> packed
rows, the grain iterator), `sharding` (meshes and named-axis rules),
`checkpointing` (orbax), `cli`.
"""

from recurrent_lm.train.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
