"""The main job: sample text from the bundled pretrained Griffin, and round-trip it
through the official checkpoint format.

    python -m recurrent_lm.demo [--prompt TEXT ...] [--max-new-tokens N] [--output-dir DIR]

1. loads the small Griffin bundled with the package (``recurrent_lm/data/
   pretrained/griffin-stdlib``: 1.1M parameters and a 2048-piece SentencePiece
   tokenizer, pretrained with ``python -m recurrent_lm.train`` on the Python
   standard library's docstrings; the exact command is in the README);
2. prints the model (treescope text rendering) and samples a continuation of
   each prompt with the compiled stateful decoder;
3. writes the model in the official RecurrentGemma release layout (an orbax
   directory with the bare parameter tree, plus ``tokenizer.model``), loads it
   back through `checkpoints_conversion.recurrentgemma`, checks every parameter
   survived bit for bit, and that the reloaded model predicts the same tokens.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import treescope

from checkpoints_conversion import recurrentgemma as rg_convert
from recurrent_lm import checkpoint
from recurrent_lm import params as params_lib
from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.sampling import generate
from recurrent_lm.user_errors import reports_user_errors

BUNDLED_MODEL = "griffin-stdlib"
DEFAULT_PROMPTS = ("Return a new list", "The socket module provides")


def bundled_model_path() -> str:
    """Directory of the bundled model (``recurrent_lm.save`` layout + tokenizer.model)."""
    resource = (
        importlib.resources.files("recurrent_lm")
        / "data"
        / "pretrained"
        / BUNDLED_MODEL
    )
    return os.fspath(resource)


def load_bundled():
    """(model, tokenizer) pretrained on the standard library's docstrings."""
    path = bundled_model_path()
    return checkpoint.load(path), tokenizer_lib.Tokenizer.load(
        os.path.join(path, "tokenizer.model")
    )


def write_official_checkpoint(model, directory: str) -> str:
    """Writes `model` as the release does: an orbax PyTree of the bare tree."""
    import orbax.checkpoint as ocp

    path = os.path.join(directory, "griffin")
    ocp.PyTreeCheckpointer().save(path, rg_convert.to_official_params(model))
    return path


def sample(
    model, tokenizer, prompts, *, max_new_tokens: int, temperature: float, seed: int
):
    encoded = [tokenizer.encode(p) for p in prompts]
    out = generate(
        model,
        encoded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=40 if temperature else None,
        seed=seed,
        eos_id=tokenizer.eos_id,
    )
    # Decode prompt and continuation together: SentencePiece drops the space
    # that starts a piece sequence.
    texts = [
        tokenizer.decode(p + t)[len(tokenizer.decode(p)) :]
        for p, t in zip(encoded, out.tokens)
    ]
    return texts, out.tokens


def run(
    prompts,
    output_dir: str,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.7,
    seed: int = 0,
) -> dict:
    start = time.perf_counter()
    model, tokenizer = load_bundled()
    config = model.config
    print(f"bundled model {bundled_model_path()}:")
    print(
        f"  Griffin, width {config.hidden_size}, blocks {list(config.block_types)},"
        f" {sum(v.data_array.size for v in params_lib.parameter_values(model).values()):,} parameters,"
        f" tokenizer of {tokenizer.vocab_size} pieces"
    )
    print("\nmodel:")
    with treescope.using_expansion_strategy(max_height=None, target_width=120):
        print(treescope.render_to_text(model))

    how = "greedy" if not temperature else f"temperature {temperature}, top-k 40"
    print(f"\nsamples ({how}, {max_new_tokens} new tokens at most):")
    texts, tokens = sample(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    for prompt, text in zip(prompts, texts):
        print(f"  {prompt}{bold}{text}{plain}".replace("\n", "\n    "))

    shutil.copyfile(
        os.path.join(bundled_model_path(), "tokenizer.model"),
        os.path.join(output_dir, "tokenizer.model"),
    )
    path = write_official_checkpoint(model, output_dir)
    loaded = rg_convert.load_official_checkpoint(
        path, attention_window_size=config.attention_window_size
    )
    before, after = (
        params_lib.parameter_values(model),
        params_lib.parameter_values(loaded),
    )
    exact = before.keys() == after.keys() and all(
        np.array_equal(
            before[k].unwrap(*before[k].named_shape),
            after[k].unwrap(*before[k].named_shape),
        )
        for k in before
    )
    _, reloaded_tokens = sample(
        loaded,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
    )
    same = reloaded_tokens == tokens
    print(
        f"\nwrote it in the official RecurrentGemma layout to {path} and loaded it back"
        f" through checkpoints_conversion: {len(after)} parameters, bit-exact: {exact},"
        f" same samples: {same}"
    )
    if not (exact and same):
        raise RuntimeError("the checkpoint round trip changed the model")
    print(f"({time.perf_counter() - start:.1f} s)")
    return {"checkpoint": path, "samples": texts, "exact": exact, "same_samples": same}


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recurrent_lm.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        help="where to write the official-layout checkpoint"
        " (default: a temporary directory)",
    )
    args = parser.parse_args(argv)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    options = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        run(prompts, args.output_dir, **options)
    else:
        with tempfile.TemporaryDirectory() as directory:
            run(prompts, directory, **options)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
