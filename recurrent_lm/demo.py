"""The main job: a small Griffin through the official checkpoint format and back.

    python -m recurrent_lm.demo [--prompt TEXT] [--output-dir DIR]

1. trains a small SentencePiece tokenizer on the bundled demo corpus (Gemma
   special ids: pad 0, eos 1, bos 2, unk 3);
2. builds a small random Griffin and writes it in the official RecurrentGemma
   release layout (an orbax directory with the bare parameter tree, plus
   ``tokenizer.model``);
3. loads it back through `checkpoints_conversion.recurrentgemma` and checks
   every parameter survived bit for bit;
4. prints the model (treescope text rendering) and the top next tokens for
   the prompt.

The weights are random until the pretraining issue bundles a trained model, so
the predicted tokens are arbitrary; the point is the full loading path.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import treescope
from penzai import pz

from checkpoints_conversion import recurrentgemma as rg_convert
from recurrent_lm import params as params_lib
from recurrent_lm import tokenizer as tokenizer_lib
from recurrent_lm.models import griffin


def demo_config(vocab_size: int) -> griffin.GriffinConfig:
    return griffin.GriffinConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        lru_width=64,
        num_attention_heads=4,
        intermediate_size=96,
        num_hidden_layers=3,
        attention_window_size=16,
    )


def write_official_checkpoint(model, directory: str) -> str:
    """Writes `model` as the release does: an orbax PyTree of the bare tree."""
    import orbax.checkpoint as ocp

    path = os.path.join(directory, "griffin")
    ocp.PyTreeCheckpointer().save(path, rg_convert.to_official_params(model))
    return path


def run(prompt: str, output_dir: str, *, seed: int = 0, top_k: int = 5) -> dict:
    corpus = importlib.resources.files("recurrent_lm") / "data" / "demo_corpus.txt"
    with importlib.resources.as_file(corpus) as corpus_path:
        tokenizer = tokenizer_lib.train(
            [corpus_path], os.path.join(output_dir, "tokenizer"),
            vocab_size=256, hard_vocab_limit=False,
        )

    config = demo_config(tokenizer.vocab_size)
    model = griffin.build_model(config, jax.random.key(seed))
    path = write_official_checkpoint(model, output_dir)
    print(f"wrote an official-layout RecurrentGemma checkpoint to {path}"
          f" (tokenizer: {tokenizer.vocab_size} pieces, {output_dir}/tokenizer.model)")

    loaded = rg_convert.load_official_checkpoint(
        path, attention_window_size=config.attention_window_size
    )
    before, after = params_lib.parameter_values(model), params_lib.parameter_values(loaded)
    exact = before.keys() == after.keys() and all(
        np.array_equal(before[k].unwrap(*before[k].named_shape),
                       after[k].unwrap(*before[k].named_shape))
        for k in before
    )
    print(f"loaded it back through checkpoints_conversion: {len(after)} parameters,"
          f" bit-exact: {exact}")
    if not exact:
        raise RuntimeError("the checkpoint round trip changed parameters")

    print("\nmodel:")
    with treescope.using_expansion_strategy(max_height=None, target_width=120):
        print(treescope.render_to_text(loaded))

    ids = tokenizer.encode(prompt)
    tokens = pz.nx.wrap(jnp.asarray([ids], jnp.int32), "batch", "seq")
    logits = loaded(tokens)
    last = logits[{"batch": 0, "seq": -1}].unwrap("vocabulary")
    probs = np.asarray(jax.nn.softmax(last))
    top = np.argsort(-probs)[:top_k]
    print(f"\nprompt: {prompt!r} -> {len(ids)} tokens {ids}")
    print(f"top {top_k} next tokens (random weights, so arbitrary):")
    for rank, token_id in enumerate(top, 1):
        print(f"  {rank}. id {token_id:4d}  {tokenizer.id_to_piece(token_id)!r:16}  p={probs[token_id]:.4f}")
    return {"checkpoint": path, "top_ids": [int(t) for t in top], "exact": exact}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recurrent_lm.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="The recurrent layer of Griffin")
    parser.add_argument("--output-dir", help="where to write the checkpoint (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        run(args.prompt, args.output_dir, seed=args.seed, top_k=args.top_k)
    else:
        with tempfile.TemporaryDirectory() as directory:
            run(args.prompt, directory, seed=args.seed, top_k=args.top_k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
