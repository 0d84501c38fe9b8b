"""Griffin training step: recurrent_lm against the official `recurrentgemma` Flax model.

    .venv/bin/python benchmarks/train_step.py                 # the README config
    .venv/bin/python benchmarks/train_step.py --seq 128       # quicker

Both steps do the same work on the same weights and batch: forward, masked
next-token cross-entropy (float32 log-softmax), `jax.value_and_grad`, then
optax (global-norm clipping + AdamW, `recurrent_lm.train.optimizer.make_optimizer`),
jitted with the parameters and optimizer state donated. Ours is the exact step
``python -m recurrent_lm.train`` runs (`steps.step_functions`); the official one
is built from ``recurrentgemma.jax.Griffin.apply``. Checks the first-step
losses agree, then times the steps round-robin and prints a Markdown table:
first call (trace + compile + run), median step, training tokens/s, ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recurrentgemma.jax as rg
from recurrentgemma import common

from benchmarks import common as common_args
from checkpoints_conversion import recurrentgemma as convert
from recurrent_lm.train import data, sharding, steps
from recurrent_lm.train import optimizer as optimizer_lib
from recurrent_lm.train.config import TrainConfig


def official_step(config, optimizer):
    model = rg.Griffin(config)

    def loss_fn(params, ids, pos):
        logits, _ = model.apply({"params": params}, ids, pos, return_cache=False)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        mask = data.loss_mask(pos).astype(jnp.float32)
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    @jax.jit
    def step(params, opt_state, ids, pos):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, pos)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args.add_model_arguments(parser)
    parser.set_defaults(width=512, layers=6, heads=8, vocab=8192, window=512)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--skip-official-linear",
        action="store_true",
        help="skip the official LINEAR_NATIVE scan (slow to compile)",
    )
    args = parser.parse_args(argv)

    config = common_args.official_config(args)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, args.vocab)
    pos = jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), ids.shape)
    init_params = jax.device_get(
        rg.Griffin(config).init(jax.random.key(0), ids[:, :8], pos[:, :8])["params"]
    )
    train_cfg = TrainConfig(
        lr_schedule="constant", warmup_steps=0, learning_rate=1e-3
    )
    optimizer = optimizer_lib.make_optimizer(train_cfg)

    # Ours: the training loop's own step, on the converted official weights.
    model = convert.from_official_params(init_params, attention_window_size=args.window)
    mesh = sharding.make_mesh("data=1", devices=jax.devices()[:1])
    skeleton, ours, param_axes = steps.split_trainable(
        model, mesh, sharding.rules_for("griffin")
    )
    fns = steps.step_functions(train_cfg, param_axes)
    state = {"ours": [ours, optimizer_lib.init_optimizer_state(fns.optimizer, ours, mesh)]}
    batch = (ids[None], pos[None])

    def run_ours():
        params, opt_state, metrics = fns.train_step(*state["ours"], skeleton, *batch)
        state["ours"] = [params, opt_state]
        return metrics["loss"]

    candidates = {"recurrent_lm (sequential scan, CPU default)": run_ours}
    kinds = [("ASSOCIATIVE_NATIVE", common.ScanType.ASSOCIATIVE_NATIVE)]
    if not args.skip_official_linear:
        kinds.insert(
            0, ("LINEAR_NATIVE, its CPU default", common.ScanType.LINEAR_NATIVE)
        )
    for name, scan_type in kinds:
        step = official_step(config._replace(scan_type=scan_type), optimizer)
        params = jax.tree.map(jnp.asarray, init_params)
        state[name] = [params, optimizer.init(params)]

        def run_official(name=name, step=step):
            params, opt_state, loss = step(*state[name], ids, pos)
            state[name] = [params, opt_state]
            return loss

        candidates[f"official ({name})"] = run_official
    reference = list(candidates)[1]

    first, first_loss = {}, {}
    for name, fn in candidates.items():
        start = time.perf_counter()
        first_loss[name] = float(jax.block_until_ready(fn()))
        first[name] = time.perf_counter() - start
    for name, loss in first_loss.items():
        rel = abs(loss - first_loss[reference]) / abs(first_loss[reference])
        print(f"# {name}: first-step loss {loss:.6f} (relative difference {rel:.1e})")

    times = common_args.round_robin(candidates, args.rounds)

    tokens = args.batch * args.seq
    ref = statistics.median(times[reference])
    print(
        f"\nGriffin training step (forward + backward + AdamW), width {args.width},"
        f" {args.layers} layers (R,R,A), vocab {args.vocab}, seq {args.seq}, batch"
        f" {args.batch}, window {args.window}, float32, backend {jax.default_backend()},"
        f" {os.cpu_count()} CPUs, {args.rounds} rounds, load {os.getloadavg()[0]:.1f}\n"
    )
    print("| implementation | first call s | median step ms | tokens/s | vs official |")
    print("|---|---|---|---|---|")
    for name in candidates:
        median = statistics.median(times[name])
        print(
            f"| {name} | {first[name]:.1f} | {median * 1e3:.0f} | {tokens / median:,.0f}"
            f" | {ref / median:.2f}x |"
        )


if __name__ == "__main__":
    main()
