"""Train a model on a synthetic task and measure its accuracy.

The step is the training CLI's (`recurrent_lm.train.steps.make_train_step`
with `recurrent_lm.train.optimizer.make_optimizer`: AdamW, warmup + cosine,
global-norm clipping), on a loss over the task's labels instead of every next
token of packed text. Data are generated in memory from the seed (no files).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from recurrent_lm.core import functional
from recurrent_lm.synthetics.tasks import IGNORE, Examples, Task
from recurrent_lm.train import steps as steps_lib
from recurrent_lm.train.config import TrainConfig
from recurrent_lm.train.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """How one model is trained on one task (defaults: the H3 paper's optimiser,
    AdamW at weight decay 0.1, 10 % warmup, batch 32, 5,000 / 500 examples)."""

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.1
    num_train: int = 5000
    num_test: int = 500
    seed: int = 0
    eval_lengths: tuple[int, ...] = ()
    """Input lengths to test at besides the training one (length extrapolation)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_train", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}.")
        object.__setattr__(self, "eval_lengths", tuple(self.eval_lengths))


@dataclasses.dataclass(frozen=True)
class Result:
    """One trained model's scores (JSON-ready via `as_dict`)."""

    task: str
    task_settings: dict[str, Any]
    model: str
    width: int | None
    parameters: int
    learning_rate: float
    steps: int
    accuracy: float
    """Test accuracy at the training length (scored positions)."""
    accuracy_by_length: dict[int, float]
    chance: float
    final_loss: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["accuracy_by_length"] = {str(k): v for k, v in self.accuracy_by_length.items()}
        return out


def task_settings(task: Task) -> dict[str, Any]:
    """The task's settings by name (``vocab_size``, not the field's ``vocab_size_``)."""
    return {f.name.rstrip("_"): getattr(task, f.name) for f in dataclasses.fields(task)}


def label_loss(logits, labels):
    """(sum of cross-entropies at labelled positions, their count); logits
    [batch, seq, vocabulary], labels [batch, seq] with `IGNORE` elsewhere."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    mask = labels != IGNORE
    nll = -jnp.take_along_axis(logp, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _split(model):
    skeleton, params, _ = functional.split(model)
    param_axes = {label: tuple(value.named_shape) for label, value in params.items()}
    return skeleton, {label: params[label].unwrap(*param_axes[label]) for label in params}, param_axes


def _logits_fn(param_axes):
    def logits(params, skeleton, inputs):
        named = steps_lib.named_params(param_axes, params, None)
        return functional.call(skeleton, named, {}, inputs)[0]

    return logits


def accuracy(logits_fn, params, skeleton, examples: Examples, tokens_per_batch: int = 1 << 14) -> float:
    """Share of labelled positions whose argmax is the label (rows in batches of
    about `tokens_per_batch` positions: attention's scores grow with the square
    of the length)."""
    batch_size = max(1, tokens_per_batch // examples.inputs.shape[1])
    right = total = 0
    for start in range(0, len(examples), batch_size):
        part = examples.take(slice(start, start + batch_size))
        predicted = np.asarray(jnp.argmax(logits_fn(params, skeleton, part.inputs), -1))
        mask = part.labels != IGNORE
        right += int(np.sum((predicted == part.labels) & mask))
        total += int(mask.sum())
    if not total:
        raise ValueError("the test examples have no labelled position.")
    return right / total


@functools.lru_cache(maxsize=16)
def _compiled(param_axes_items: tuple, steps: int, warmup_steps: int, weight_decay: float):
    """(optimizer, jitted train step, jitted logits) for a model's parameters and
    a schedule, shared by every learning rate of a sweep: the rate is a value in
    the optimizer state (`optax.inject_hyperparams`), not a constant of the
    program, so a sweep compiles once. AdamW's update is proportional to the
    rate (warmup, cosine and weight decay included), so scaling the update of a
    unit-rate AdamW by it is AdamW at that rate."""
    param_axes = dict(param_axes_items)
    unit = TrainConfig(learning_rate=1.0, steps=steps, weight_decay=weight_decay, warmup_steps=warmup_steps)
    optimizer = optax.chain(
        make_optimizer(unit, param_axes),
        optax.inject_hyperparams(optax.scale)(step_size=1.0),
    )
    logits = _logits_fn(param_axes)

    def loss_sum(params, skeleton, inputs, labels):
        return label_loss(logits(params, skeleton, inputs), labels)

    step = jax.jit(steps_lib.make_train_step(loss_sum, optimizer), donate_argnums=(0, 1))
    return optimizer, step, jax.jit(logits)


def _init_optimizer(optimizer, params, learning_rate: float):
    """The optimizer state with the update scaled by `learning_rate`."""
    state = optimizer.init(params)
    scale = state[1]
    scale.hyperparams["step_size"] = jnp.asarray(learning_rate, jnp.float32)
    return state


def train_on_task(task: Task, model_name: str, architecture, config, settings: RunSettings,
                  *, width: int | None = None) -> Result:
    """Trains `architecture.build_model(config)` on `task` and scores it."""
    start = time.perf_counter()
    data = task.split(settings.num_train, settings.num_test, settings.seed)
    model = architecture.build_model(config, jax.random.key(settings.seed))
    skeleton, params, param_axes = _split(model)
    optimizer, train_step, logits_fn = _compiled(
        tuple(sorted(param_axes.items())), settings.steps,
        int(settings.warmup_fraction * settings.steps), settings.weight_decay)
    opt_state = _init_optimizer(optimizer, params, settings.learning_rate)
    rng = np.random.default_rng(settings.seed + 1)
    order, cursor, loss = rng.permutation(len(data.train)), 0, math.nan
    for _ in range(settings.steps):
        if cursor + settings.batch_size > len(order):
            order, cursor = rng.permutation(len(data.train)), 0
        batch = data.train.take(order[cursor:cursor + settings.batch_size])
        cursor += settings.batch_size
        params, opt_state, metrics = train_step(
            params, opt_state, skeleton, batch.inputs[None], batch.labels[None])
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{model_name} on {task.name}: the loss became {loss} at lr {settings.learning_rate};"
            " try a smaller learning rate.")
    by_length = {task.seq_len: accuracy(logits_fn, params, skeleton, data.test)}
    for length in settings.eval_lengths:
        longer = task.with_length(length)
        if longer.seq_len in by_length:
            continue
        _, test = longer.generate(settings.num_test, np.random.default_rng(settings.seed + 2))
        by_length[longer.seq_len] = accuracy(logits_fn, params, skeleton, test)
    return Result(
        task=task.name, task_settings=task_settings(task), model=model_name, width=width,
        parameters=sum(int(np.prod(p.shape)) for p in params.values()),
        learning_rate=settings.learning_rate, steps=settings.steps,
        accuracy=by_length[task.seq_len], accuracy_by_length=by_length, chance=task.chance,
        final_loss=loss, seconds=time.perf_counter() - start,
    )


def sweep(task: Task, model_name: str, architecture, config, settings: RunSettings,
          learning_rates, *, width: int | None = None) -> tuple[Result, list[Result]]:
    """One run per learning rate: (the best by accuracy, then loss; all runs).
    A run whose loss diverges counts as accuracy 0."""
    results = []
    for lr in learning_rates:
        run = dataclasses.replace(settings, learning_rate=lr)
        try:
            results.append(train_on_task(task, model_name, architecture, config, run, width=width))
        except FloatingPointError:
            results.append(Result(
                task=task.name, task_settings=task_settings(task), model=model_name, width=width, parameters=0,
                learning_rate=lr, steps=settings.steps, accuracy=0.0, accuracy_by_length={},
                chance=task.chance, final_loss=math.inf, seconds=0.0))
    best = max(results, key=lambda r: (r.accuracy, -r.final_loss))
    return best, results
