"""The training loss, eval loss, learning-rate schedule and optimiser update,
each against a computation written here independently of `recurrent_lm.train`:

* the loss: float64 numpy cross-entropy over a hand-made packed batch whose
  documents and padding are written out by hand (the mask comes from those
  document ids, not from `segment_pos`);
* the schedule: the formula of its docstring, and optax's own
  `warmup_cosine_decay_schedule`;
* the optimiser: AdamW with global-norm clipping and weight decay on matrices,
  in numpy;
* the train step: one `jax.grad` of that reference loss, then numpy AdamW.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from penzai import pz
from train_setup import reference_learning_rate

from recurrent_lm.core import functional
from recurrent_lm.models import gemma
from recurrent_lm.train import data, sharding, steps
from recurrent_lm.train.config import TrainConfig
from recurrent_lm.train.loop import StepLoop
from recurrent_lm.train.optimizer import learning_rate_schedule, make_optimizer

# A packed batch of 4 rows of 8, written out by hand. DOC gives each token's
# document (-1: padding): row 0 holds documents 0 and 1; row 1 continues
# document 1 and starts 2; row 2 is document 3 then padding; row 3 holds the
# short documents 4, 5 and 6 and padding. A target counts when it continues
# the document of the token before it.
TOKENS = np.array(
    [
        [2, 11, 12, 13, 1, 2, 14, 15],
        [16, 17, 1, 2, 18, 19, 20, 21],
        [2, 22, 23, 24, 25, 1, 0, 0],
        [2, 1, 2, 26, 1, 2, 0, 0],
    ],
    np.int32,
)
DOC = np.array(
    [
        [0, 0, 0, 0, 0, 1, 1, 1],
        [1, 1, 1, 2, 2, 2, 2, 2],
        [3, 3, 3, 3, 3, 3, -1, -1],
        [4, 4, 5, 5, 5, 6, -1, -1],
    ]
)
SEGMENT_POS = np.array(
    [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 0, 1, 2, 3, 4],
        [0, 1, 2, 3, 4, 5, -1, -1],
        [0, 1, 0, 1, 2, 0, -1, -1],
    ],
    np.int32,
)
TARGETS = (DOC[:, 1:] == DOC[:, :-1]) & (DOC[:, 1:] >= 0)


def numpy_loss(logits, tokens=TOKENS, targets=TARGETS) -> float:
    """Mean next-token cross-entropy over the target positions, in float64."""
    z = np.asarray(logits, np.float64)[:, :-1]
    top = z.max(-1, keepdims=True)
    log_z = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(z, tokens[:, 1:, None], axis=-1)[..., 0]
    return float(((log_z - picked) * targets).sum() / targets.sum())


def test_hand_made_batch_is_what_packing_produces():
    documents = [
        [2, 11, 12, 13, 1],
        [2, 14, 15, 16, 17, 1],
        [2, 18, 19, 20, 21],
    ]
    # Row 1's document 2 runs on past the row: pack's rows 0-1 are ours.
    rows = data.pack([np.asarray(d) for d in documents], 8)
    np.testing.assert_array_equal(rows.tokens[:2], TOKENS[:2])
    np.testing.assert_array_equal(rows.segment_pos[:2], SEGMENT_POS[:2])
    rows = data.pack([np.asarray(d) for d in ([2, 22, 23, 24, 25, 1],)], 8)
    np.testing.assert_array_equal(rows.segment_pos, SEGMENT_POS[2:3])
    rows = data.pack([np.asarray(d) for d in ([2, 1], [2, 26, 1], [2])], 8)
    np.testing.assert_array_equal(rows.segment_pos, SEGMENT_POS[3:4])
    np.testing.assert_array_equal(data.loss_mask(SEGMENT_POS), TARGETS)


@pytest.fixture(scope="module")
def tiny():
    """(skeleton, {label: array}, {label: axes}, mesh, reference) of a one-layer
    Gemma (attention: a document boundary shows in every later logit).

    ``reference(params) -> (loss, (grads, logits))``: the loss written here in
    jnp on the model's logits, and its gradient by `jax.grad`.
    """
    config = gemma.GemmaConfig.from_preset(
        "tiny",
        vocabulary_size=32,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    model = gemma.build_model(config, jax.random.key(3))
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    skeleton, params, param_axes = steps.split_trainable(
        model, mesh, sharding.rules_for("gemma")
    )

    def loss(values):
        named = {
            label: pz.nx.wrap(values[label]).tag(*param_axes[label])
            for label in param_axes
        }
        logits, _ = functional.call(skeleton, named, {}, TOKENS, SEGMENT_POS)
        logp = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logp, TOKENS[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * TARGETS) / TARGETS.sum(), logits

    @jax.jit
    def reference(values):
        (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(values)
        return value, (grads, logits)

    return skeleton, params, param_axes, mesh, reference


# Settings whose every part shows in the update: a warmup, a cosine decay,
# clipping that binds on some steps, weight decay.
OPTIMISER = {
    "learning_rate": 0.02,
    "warmup_steps": 2,
    "steps": 5,
    "decay_steps": 5,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.3,
    "adam_b1": 0.8,
    "adam_b2": 0.9,
    "adam_eps": 1e-6,
}


class NumpyAdamW:
    """AdamW as Loshchilov & Hutter / optax define it, after global-norm clipping.

    Weight decay applies to parameters with 2 or more dimensions only.
    """

    def __init__(self, params, cfg: TrainConfig):
        self.cfg = cfg
        self.m = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
        self.v = {k: np.zeros_like(v, np.float64) for k, v in params.items()}
        self.count = 0

    def step(self, params, grads):
        cfg = self.cfg
        grads = {k: np.asarray(g, np.float64) for k, g in grads.items()}
        norm = math.sqrt(sum((g**2).sum() for g in grads.values()))
        if cfg.grad_clip is not None and norm > cfg.grad_clip:
            grads = {k: g * cfg.grad_clip / norm for k, g in grads.items()}
        lr = reference_learning_rate(cfg, self.count)
        self.count += 1
        t = self.count
        new = {}
        for k, p in params.items():
            p = np.asarray(p, np.float64)
            self.m[k] = cfg.adam_b1 * self.m[k] + (1 - cfg.adam_b1) * grads[k]
            self.v[k] = cfg.adam_b2 * self.v[k] + (1 - cfg.adam_b2) * grads[k] ** 2
            m_hat = self.m[k] / (1 - cfg.adam_b1**t)
            v_hat = self.v[k] / (1 - cfg.adam_b2**t)
            update = m_hat / (np.sqrt(v_hat) + cfg.adam_eps)
            if p.ndim >= 2:
                update = update + cfg.weight_decay * p
            new[k] = p - lr * update
        return new


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_learning_rate_schedule_follows_its_definition(schedule, warmup):
    cfg = TrainConfig(
        learning_rate=0.5,
        lr_schedule=schedule,
        warmup_steps=warmup,
        steps=10,
        min_lr_ratio=0.2,
    )
    ours = learning_rate_schedule(cfg)
    for k in range(14):  # beyond the end it stays at the final value
        np.testing.assert_allclose(
            float(ours(k)), reference_learning_rate(cfg, k), rtol=1e-6, err_msg=k
        )
    if schedule == "cosine" and warmup:
        # optax's warmup starts at 0; ours starts at lr / warmup, one step ahead.
        theirs = optax.warmup_cosine_decay_schedule(
            0.0, 0.5, warmup, 10, end_value=0.5 * 0.2
        )
        for k in range(14):
            np.testing.assert_allclose(
                float(ours(k)), float(theirs(k + 1 if k < warmup else k)), rtol=1e-6
            )


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_optimizer_is_adamw_with_clipping_and_matrix_only_decay(grad_clip):
    cfg = TrainConfig(**OPTIMISER, grad_clip=grad_clip)
    rng = np.random.default_rng(0)
    params = {
        "matrix": rng.normal(size=(3, 4)).astype(np.float32),
        "vector": rng.normal(size=(4,)).astype(np.float32),
        "cube": rng.normal(size=(2, 2, 2)).astype(np.float32),
    }
    optimizer = make_optimizer(cfg)
    state = optimizer.init(jax.tree.map(jnp.asarray, params))
    reference = NumpyAdamW(params, cfg)
    expected = {k: v.astype(np.float64) for k, v in params.items()}
    got = jax.tree.map(jnp.asarray, params)
    clipped = 0
    for step in range(7):  # past the warmup and the end of the decay
        # Gradients of growing size: clipping binds on the later steps.
        grads = {
            k: (rng.normal(size=v.shape) * 0.1 * (step + 1)).astype(np.float32)
            for k, v in params.items()
        }
        clipped += math.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())) > 0.5
        updates, state = optimizer.update(jax.tree.map(jnp.asarray, grads), state, got)
        got = optax.apply_updates(got, updates)
        expected = reference.step(expected, grads)
        for k in params:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=(step, k))
    assert 0 < clipped < 7  # both sides of the clipping threshold were exercised


def test_train_step_loss_gradient_and_update_match_the_reference(tiny):
    """Two steps of the loop's compiled step on 2 microbatches with unequal
    target counts (a mean of per-microbatch means would differ)."""
    skeleton, params, param_axes, _, reference = tiny
    cfg = TrainConfig(**OPTIMISER, grad_clip=0.5)
    fns = steps.step_functions(cfg, param_axes)
    assert TARGETS[:2].sum() != TARGETS[2:].sum()
    current = {k: jnp.array(v) for k, v in params.items()}  # donated below: copies
    opt_state = fns.optimizer.init(current)
    adamw = NumpyAdamW(params, cfg)
    expected = {k: np.asarray(v, np.float64) for k, v in params.items()}
    grad_norms = []
    for step in range(2):
        _, (grads, logits) = reference(current)
        grads = {k: np.asarray(g) for k, g in grads.items()}
        grad_norms.append(math.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads.values())))
        current, opt_state, metrics = fns.train_step(
            current,
            opt_state,
            skeleton,
            jnp.asarray(TOKENS.reshape(2, 2, 8)),
            jnp.asarray(SEGMENT_POS.reshape(2, 2, 8)),
        )
        np.testing.assert_allclose(float(metrics["loss"]), numpy_loss(logits), rtol=2e-6)
        np.testing.assert_allclose(float(metrics["grad_norm"]), grad_norms[-1], rtol=1e-4)
        assert int(metrics["target_tokens"]) == TARGETS.sum()
        expected = adamw.step(expected, grads)
        # Adam divides by |gradient|: where a gradient is near adam_eps, float32
        # rounding of the (differently summed) gradients moves the update by a
        # few 1e-4 of the learning rate; weight decay moves the matrices by
        # ~weight_decay * |p| ~ 7% of it, a wrong warmup step by 50%.
        for k in expected:
            np.testing.assert_allclose(
                current[k], expected[k], rtol=0, atol=2e-3 * cfg.learning_rate, err_msg=(step, k)
            )
    assert min(grad_norms) > cfg.grad_clip  # clipping took part


def test_eval_loss_is_the_mean_over_every_held_out_target(tiny):
    """`StepLoop.evaluate` over 3 rows in batches of 2 (the last padded)."""
    skeleton, params, param_axes, mesh, reference = tiny
    cfg = TrainConfig(batch_size=2, seq_len=8, eval_batches=8)
    rows = data.PackedRows(TOKENS[1:], SEGMENT_POS[1:])
    corpus = data.Corpus(train=rows, eval=rows, num_documents=7, fingerprint="")
    loop = StepLoop(
        cfg,
        steps.step_functions(cfg, param_axes),
        skeleton,
        mesh,
        corpus,
        data.BatchIterator(rows, cfg.batch_size, seed=0),
        None,
        {},
    )
    # Rows are independent: the held-out rows' logits are those of the full batch.
    logits = np.asarray(reference(params)[1][1])[1:]
    expected = numpy_loss(logits, TOKENS[1:], TARGETS[1:])
    np.testing.assert_allclose(loop.evaluate(params), expected, rtol=2e-6)
    # eval_batches bounds the rows read: the first batch only.
    loop.cfg = TrainConfig(batch_size=2, seq_len=8, eval_batches=1)
    expected = numpy_loss(logits[:2], TOKENS[1:3], TARGETS[1:3])
    np.testing.assert_allclose(loop.evaluate(params), expected, rtol=2e-6)


def test_a_token_id_outside_the_vocabulary_stops_training(tiny):
    """The loop's data comes from the tokenizer (ids in range by construction);
    rows from elsewhere with a bad id, even on a masked padding position, make
    the step's loss NaN (`EmbeddingLookup`), and the loop stops on it."""
    from recurrent_lm.train.loop import TrainState

    skeleton, params, param_axes, mesh, _ = tiny
    cfg = TrainConfig(**OPTIMISER, grad_clip=0.5, batch_size=4, grad_accum=2, seq_len=8)
    tokens = TOKENS.copy()
    tokens[3, 6] = 32  # the vocabulary is 32 tokens; padding, outside the loss
    assert not TARGETS[3, 5]
    rows = data.PackedRows(tokens, SEGMENT_POS)
    fns = steps.step_functions(cfg, param_axes)
    loop = StepLoop(
        cfg, fns, skeleton, mesh, data.Corpus(rows, None, 7, ""),
        data.BatchIterator(rows, cfg.batch_size, seed=0), None, {},
    )
    state = TrainState.initial(cfg, fns.optimizer, {k: jnp.array(v) for k, v in params.items()}, mesh)
    with pytest.raises(FloatingPointError, match="loss became nan at step 1"):
        loop.train_step(state)


@pytest.mark.parametrize("chunk_size", [3, 8])
def test_chunked_loss_equals_the_whole_logits_form(tiny, chunk_size):
    """The head and cross-entropy a chunk of positions at a time (under remat;
    3 does not divide the 8 positions, so the last chunk overlaps the one before;
    8 is one chunk): the reference's loss and gradients, which form the whole
    logits."""
    skeleton, params, param_axes, _, reference = tiny
    loss_sum = steps.make_loss_sum(param_axes, "float32", chunk_size)

    @jax.jit
    def chunked(values):
        (total, count), grads = jax.value_and_grad(loss_sum, has_aux=True)(
            values, skeleton, jnp.asarray(TOKENS), jnp.asarray(SEGMENT_POS)
        )
        return total / count, count, jax.tree.map(lambda g: g / count, grads)

    loss, count, grads = chunked(params)
    expected_loss, (expected_grads, _) = reference(params)
    assert int(count) == TARGETS.sum()
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    for label, expected in expected_grads.items():
        scale = np.abs(np.asarray(expected)).max()
        np.testing.assert_allclose(grads[label], expected, rtol=0, atol=1e-6 * scale, err_msg=label)
