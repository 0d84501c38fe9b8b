"""Sample text from a recurrent_lm checkpoint, streaming it as it is generated.

    python -m recurrent_lm.sample --checkpoint DIR --tokenizer tokenizer.model \\
        --prompt "The river" [--prompt "Another"] [--max-new-tokens 64] \\
        [--temperature 0.8 --top-k 40 --top-p 0.95 --seed 0] [--stop "\\n\\n"]

DIR is a directory written by `recurrent_lm.save` (convert official checkpoints
first, e.g. ``python -m checkpoints_conversion.recurrentgemma convert``). With
one prompt the continuation is printed as it comes; with several, each
continuation is printed when generation ends. The tokenizer is a SentencePiece
model or an RWKV World vocabulary ``.txt`` (`recurrent_lm.tokenizer.load`); a
World tokenizer's bos and eos are both its end-of-text id 0.
"""

from __future__ import annotations

import argparse
import sys

from recurrent_lm import checkpoint
from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.sampling import generate, stream
from recurrent_lm.user_errors import reports_user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recurrent_lm.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="directory written by recurrent_lm.save")
    parser.add_argument("--tokenizer", required=True,
                        help="SentencePiece tokenizer.model, or RWKV World vocabulary (.txt)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eos-id", type=int, help="default: the tokenizer's EOS id")
    parser.add_argument("--no-eos", action="store_true", help="do not stop at EOS")
    parser.add_argument("--stop", action="append", default=[], help="stop text (repeatable)")
    parser.add_argument("--no-bos", action="store_true", help="do not prepend BOS to prompts")
    parser.add_argument("--steps-per-call", type=int, default=8,
                        help="tokens generated per device call while streaming")
    parser.add_argument("--prefill-chunk-size", type=int)
    return parser


@reports_user_errors
def main(argv: list[str] | None = None, out=None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    model = checkpoint.load(args.checkpoint)
    tokenizer = tokenizer_lib.load(args.tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model's vocabulary is"
            f" {model.config.vocab_size}: they do not belong together."
        )
    prompts = [tokenizer.encode(text, add_bos=not args.no_bos) for text in args.prompt]
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "eos_id": None if args.no_eos else (tokenizer.eos_id if args.eos_id is None else args.eos_id),
        "stop_sequences": [tokenizer.encode(s, add_bos=False) for s in args.stop] or None,
        "pad_id": max(tokenizer.pad_id, 0),
        "prefill_chunk_size": args.prefill_chunk_size,
    }
    if len(prompts) == 1:
        generated: list[int] = []
        printed = ""
        print(args.prompt[0], end="", file=out, flush=True)
        for pieces in stream(model, prompts, steps_per_call=args.steps_per_call, **options):
            generated += pieces[0]
            # A character split across tokens decodes as U+FFFD until its last
            # byte comes: held back, not printed.
            text = tokenizer.decode(generated).rstrip("\ufffd")
            print(text[len(printed):], end="", file=out, flush=True)
            printed = text
        print(tokenizer.decode(generated)[len(printed):], file=out)
    else:
        result = generate(model, prompts, **options)
        for text, tokens, reason in zip(args.prompt, result.tokens, result.finish_reasons):
            print(f"--- {text!r} ({reason})", file=out)
            print(text + tokenizer.decode(tokens), file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
