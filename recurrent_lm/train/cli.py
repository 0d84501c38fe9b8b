"""Pretrain or fine-tune a recurrent_lm model from text files.

    python -m recurrent_lm.train --model griffin --preset tiny --data corpus.txt \\
        --steps 1000 --batch-size 16 --seq-len 256 --checkpoint-dir run/ \\
        --metrics-file run/metrics.jsonl [--resume] [--tokenizer tokenizer.model]

Without --tokenizer, a SentencePiece tokenizer is trained on the data and kept
in the checkpoint directory. Multi-host: pass --coordinator-address,
--num-processes and --process-id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and run the same command on every host.
"""

from __future__ import annotations

import argparse
import logging
import sys

from recurrent_lm.train import checkpointing, data, loop, sharding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recurrent_lm.train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = loop.TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=d.model, help="architecture (a registered model type)"
    )
    g.add_argument(
        "--preset", default=d.preset, help="config preset of the architecture"
    )
    g.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (JSON value), e.g. hidden_size=128",
    )
    g.add_argument("--param-dtype", default=d.param_dtype, help="master weight dtype")
    g.add_argument(
        "--compute-dtype", default=d.compute_dtype, choices=loop.COMPUTE_DTYPES
    )
    g.add_argument(
        "--init-checkpoint", help="fine-tune this recurrent_lm.save directory"
    )
    g.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0: off)"
    )
    g.add_argument(
        "--lora-alpha", type=float, help="LoRA scale numerator (scale = alpha / rank)"
    )
    g.add_argument(
        "--lora-target",
        action="append",
        default=[],
        metavar="REGEX",
        help="adapt Linear layers whose weight label matches (default: all)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="text/.jsonl file, directory or glob (repeatable)",
    )
    g.add_argument(
        "--tokenizer", help="SentencePiece model (default: train one on the data)"
    )
    g.add_argument("--tokenizer-vocab-size", type=int, default=d.tokenizer_vocab_size)
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch (rows)"
    )
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help="share of documents held out for evaluation",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--learning-rate", "--lr", type=float, default=d.learning_rate)
    g.add_argument("--lr-schedule", default=d.lr_schedule, choices=loop.SCHEDULES)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--decay-steps", type=int, help="schedule length (default: --steps)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--adam-b1", type=float, default=d.adam_b1)
    g.add_argument("--adam-b2", type=float, default=d.adam_b2)
    g.add_argument(
        "--grad-clip", type=float, default=d.grad_clip, help="global norm; 0: off"
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="microbatches per step (same global batch)",
    )
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument(
        "--eval-interval",
        type=int,
        default=d.eval_interval,
        help="evaluate every N steps and at the last step (0: never)",
    )
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--checkpoint-dir")
    g.add_argument("--checkpoint-interval", type=int, default=d.checkpoint_interval)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument(
        "--resume", action="store_true", help="continue the run in --checkpoint-dir"
    )
    g.add_argument("--metrics-file", help="JSONL, one object per step")
    g.add_argument(
        "--save-model",
        metavar="DIR",
        help="write the final model (recurrent_lm.save) and tokenizer.model here",
    )
    g.add_argument(
        "--save-adapters", metavar="DIR", help="write the LoRA adapters alone here"
    )
    g.add_argument(
        "--stop-after", type=int, help="stop (with a checkpoint) after this step"
    )
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("distribution")
    g.add_argument(
        "--mesh", help="e.g. data=2,fsdp=2,model=2 (default: all devices on data)"
    )
    g.add_argument(
        "--shard",
        action="append",
        default=[],
        metavar="AXIS=MESH_AXIS",
        help="override a sharding rule, e.g. embedding=model or mlp=null",
    )
    g.add_argument("--coordinator-address")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    return p


def config_from_args(args) -> loop.TrainConfig:
    return loop.TrainConfig(
        model=args.model,
        preset=args.preset,
        config_overrides=loop.parse_overrides(args.config),
        data=tuple(args.data),
        tokenizer=args.tokenizer,
        tokenizer_vocab_size=args.tokenizer_vocab_size,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        metrics_file=args.metrics_file,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        decay_steps=args.decay_steps,
        min_lr_ratio=args.min_lr_ratio,
        weight_decay=args.weight_decay,
        adam_b1=args.adam_b1,
        adam_b2=args.adam_b2,
        grad_clip=args.grad_clip or None,
        grad_accum=args.grad_accum,
        param_dtype=args.param_dtype,
        compute_dtype=args.compute_dtype,
        eval_interval=args.eval_interval,
        eval_batches=args.eval_batches,
        eval_fraction=args.eval_fraction,
        checkpoint_interval=args.checkpoint_interval,
        keep_checkpoints=args.keep_checkpoints,
        mesh=args.mesh,
        sharding_overrides=loop.parse_overrides(args.shard),
        init_checkpoint=args.init_checkpoint,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_target),
        save_model=args.save_model,
        save_adapters=args.save_adapters,
        stop_after=args.stop_after,
        progress=not args.no_progress,
    )


USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    data.DataError,
    checkpointing.CheckpointDirError,
    checkpointing.RunMismatchError,
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sharding.maybe_initialize_distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )
    loop.ensure_models_imported()
    try:
        result = loop.train(config_from_args(args))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.losses.get(result.final_step)
    summary = f"done: step {result.final_step}"
    if last is not None:
        summary += f", loss {last:.4f}"
    if result.eval_losses:
        step = max(result.eval_losses)
        summary += f", eval loss {result.eval_losses[step]:.4f} (step {step})"
    print(summary, file=sys.stderr)
    return 0
