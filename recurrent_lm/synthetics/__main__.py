"""Train models on a synthetic task and print (and save) their accuracy.

    python -m recurrent_lm.synthetics --task mqar --model griffin --model attention \\
        --width 64 --width 128 --lr 1e-3 --lr 3e-3 --steps 2000 --json mqar.json

Every (model, width) is trained once per --lr (a sweep: the best is reported,
as the papers do; recurrent models are sensitive to it). --model is one of the
papers' 2-layer models (`recurrent_lm.synthetics.models`: attention, h3, rwkv,
rwkv7, griffin, hawk, ...) or, with --preset, any registered architecture's
preset (--config KEY=VALUE overrides its fields). --task-setting KEY=VALUE
changes the task (e.g. num_kv_pairs=8 input_seq_len=128 vocab_size=8192);
--eval-length tests at other input lengths too (length extrapolation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from recurrent_lm.synthetics import models, run, tasks
from recurrent_lm.train.cli import parse_overrides
from recurrent_lm.user_errors import reports_user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m recurrent_lm.synthetics", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--task", required=True, choices=sorted(tasks.TASKS))
    parser.add_argument("--task-setting", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", action="append", required=True,
                        help="a paper model, or with --preset a registered architecture (repeat)")
    parser.add_argument("--preset", default=None,
                        help="use this preset of --model instead of the papers' 2-layer model")
    parser.add_argument("--width", action="append", type=int, default=[],
                        help="model width of the papers' models (repeat; default 64)")
    parser.add_argument("--window", type=int, default=1024, help="Griffin's local-attention window")
    parser.add_argument("--attention-heads", type=int, default=1,
                        help="heads of the 'attention' model (each width / heads wide; the H3 paper's: 1)")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field (JSON value)")
    parser.add_argument("--lr", action="append", type=float, default=[],
                        help="learning rate (repeat for a sweep; default 5e-4)")
    defaults = run.RunSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-test", type=int, default=defaults.num_test)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-length", action="append", type=int, default=[],
                        help="also test at this input length (repeat)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write every run's result here")
    return parser


def _table(best: list[run.Result]) -> str:
    """Markdown: one row per (model, width) at its best learning rate."""
    lengths = sorted({n for r in best for n in r.accuracy_by_length})
    head = "| model | width | parameters | best lr | accuracy | chance |"
    if len(lengths) > 1:
        head += "".join(f" at {n} |" for n in lengths)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in best:
        row = (f"| {r.model} | {r.width or '-'} | {r.parameters:,} | {r.learning_rate:g} |"
               f" {r.accuracy:.3f} | {r.chance:.3f} |")
        if len(lengths) > 1:
            row += "".join(
                f" {r.accuracy_by_length[n]:.3f} |" if n in r.accuracy_by_length else " - |"
                for n in lengths)
        lines.append(row)
    return "\n".join(lines)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    task = tasks.make_task(args.task, **parse_overrides(args.task_setting))
    settings = run.RunSettings(
        steps=args.steps, batch_size=args.batch_size, weight_decay=args.weight_decay,
        num_train=args.num_train, num_test=args.num_test, seed=args.seed,
        eval_lengths=tuple(args.eval_length))
    overrides = parse_overrides(args.config)
    if args.preset and args.attention_heads != 1:
        raise ValueError("--attention-heads sets the papers' 'attention' model; with --preset use"
                         " --config for the preset's own head fields.")
    learning_rates = args.lr or [settings.learning_rate]
    widths = [None] if args.preset else (args.width or [64])
    print(f"task {task.name}: {run.task_settings(task)}; {task.seq_len} positions, chance"
          f" {task.chance:.3f}; source: {task.source}", flush=True)
    best, every = [], []
    for name in args.model:
        for width in widths:
            if args.preset:
                architecture, config = models.preset_config(name, args.preset, task.vocab_size, **overrides)
            else:
                heads = {"attention_heads": args.attention_heads} if name == "attention" else {}
                architecture, config = models.paper_config(
                    name, width, task.vocab_size, window=args.window, **heads, **overrides)
            label = name if args.preset else models.model_label(name, args.attention_heads)
            top, results = run.sweep(task, label, architecture, config, settings, learning_rates, width=width)
            for r in results:
                print(f"  {name} width {width or args.preset} lr {r.learning_rate:g}: accuracy"
                      f" {r.accuracy:.3f}, loss {r.final_loss:.3f}, {r.seconds:.0f} s", flush=True)
            best.append(top)
            every.extend(results)
    print()
    print(_table(best))
    if args.json:
        payload = {
            "task": task.name, "task_settings": run.task_settings(task), "source": task.source,
            "run_settings": dataclasses.asdict(settings), "learning_rates": learning_rates,
            "best": [r.as_dict() for r in best], "runs": [r.as_dict() for r in every],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
