"""Gemma: recurrent_lm against penzai 0.2.5's Gemma, and Griffin against Gemma in decoding.

    .venv/bin/python benchmarks/gemma.py                     # the README config
    .venv/bin/python benchmarks/gemma.py --width 256 --layers 4 --vocab 4096 --contexts 512,2048   # quick

Part 1, same weights (a random official-format Gemma 2 tree converted by both
converters; logits compared first): the compiled forward pass (first call and
median run), and greedy decoding in a compiled loop (`lax.fori_loop` of
one-token steps through each library's sampling mode: ours `functional(
to_sampling_mode(...))`, penzai's `KVCachingTransformerLM` via
`stateless_call`; penzai ships only a Python-loop sampler, so both get the
same compiled loop).

Part 2, Griffin vs Gemma 1 (global multi-query attention) vs Gemma 2
(grouped-query, sliding window on every other layer), similar sizes: decode
tokens/s and the sampling state held per sequence for a context of 2k, 8k and
32k tokens. Global-attention caches are sized for the context (plus the
decoded steps); a decode step attends over every slot of its cache, filled or
not (ours and penzai alike), so a short prompt with a cache of C slots costs
per step what a C-token context does, without prefilling C tokens on a CPU.
Griffin's state (RG-LRU, conv taps, a ring buffer of its 2048-token window)
does not grow with the context: that is the point of the architecture.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recurrent_lm
from benchmarks.griffin_decode import timed
from checkpoints_conversion import gemma as convert
from recurrent_lm.models import gemma, griffin
from recurrent_lm.params import abstract_parameters, parameter_values
from recurrent_lm.sampling import functional, to_sampling_mode


def official_tree(config: gemma.GemmaConfig, seed: int = 0) -> dict:
    """Random leaves in the release's flat-key layout, for `config`."""
    rng = np.random.default_rng(seed)
    named = {label: v.named_shape for label, v in abstract_parameters(
        lambda key: gemma.build_model(config, key)).items()}
    tree: dict = {}
    for layout in convert.leaf_layouts(config):
        shape = layout.shape(named[layout.labels[0]])
        scale = 0.1 if layout.path.endswith("scale") else (
            1.0 if "embedding" in layout.path else shape[-2] ** -0.5)
        module, leaf = layout.path.rsplit("/", 1)
        tree.setdefault(f"transformer/{module}", {})[leaf] = (
            scale * rng.standard_normal(shape, np.float32)).astype(np.float32)
    return tree


def penzai_gemma(config: gemma.GemmaConfig, tree: dict):
    """penzai's own converter on `tree`, with `config` registered as a preset."""
    from penzai.models.transformer.variants import gemma as pz_gemma
    from penzai.models.transformer.variants import llamalike_common as lc

    preset = dict(
        num_decoder_blocks=config.num_layers, vocab_size=config.vocabulary_size,
        num_kv_heads=config.num_key_value_heads,
        query_head_multiplier=config.num_query_heads // config.num_key_value_heads,
        embedding_dim=config.hidden_dim, projection_dim=config.head_dim,
        mlp_hidden_dim=config.mlp_width, query_scaling_factor=config.query_scale,
        use_post_attn_norm=config.use_post_attention_norm, use_post_ffw_norm=config.use_post_ffw_norm,
        final_logit_softcap=config.final_logit_soft_cap,
        attn_logits_soft_cap=config.attention_logit_soft_cap,
    )
    if config.use_sliding_window_attention:
        preset["attention_type"] = (lc.AttentionTypeSlidingWindowCausal(config.sliding_window_size),
                                    lc.AttentionTypeGlobalCausal())
    pz_gemma._GEMMA_PRESETS["benchmark"] = preset
    pz_gemma._NEEDS_GATING_TRANSPOSE["benchmark"] = False
    try:
        return pz_gemma.gemma_from_pretrained_checkpoint(tree, preset_name="benchmark")
    finally:
        del pz_gemma._GEMMA_PRESETS["benchmark"], pz_gemma._NEEDS_GATING_TRANSPOSE["benchmark"]


def penzai_forward(model):
    skeleton, params = pz.unbind_params(model, freeze=True)

    @jax.jit
    def run(params, ids):
        tokens = pz.nx.wrap(ids).tag("batch", "seq")
        return skeleton.bind_variables(params)(tokens).unwrap("batch", "seq", "vocabulary")

    return lambda ids: run(params, ids)


def our_step(model, batch: int, max_length: int):
    """``(step(params, state, ids) -> (logits [B, T, V], state), params, state)``."""
    return functional(to_sampling_mode(model, batch_size=batch, max_length=max_length))


def penzai_step(model, batch: int, max_length: int):
    from penzai.models.transformer import sampling_mode

    sampler = sampling_mode.KVCachingTransformerLM.from_uncached(
        model, cache_len=max_length, batch_axes={"batch": batch})
    stateless, state = pz.unbind_state_vars(sampler, freeze=True)
    skeleton, params = pz.unbind_params(stateless, freeze=True)

    def step(params, state, ids):
        tokens = pz.nx.wrap(ids).tag("batch", "seq")
        logits, state = skeleton.bind_variables(params).stateless_call(state, tokens)
        return logits.unwrap("batch", "seq", "vocabulary"), state

    return step, params, state


def greedy_decoder(step, steps: int):
    """A compiled loop of `steps` greedy one-token steps after a prefill's logits."""

    @jax.jit
    def run(params, state, logits):
        def body(_, carry):
            state, logits = carry
            token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
            logits, state = step(params, state, token)
            return state, logits

        return jax.lax.fori_loop(0, steps, body, (state, logits))

    return run


def decoder(step, params, state, prompt, steps: int):
    """``(run, first)``: `run()` decodes `steps` greedy tokens after the prompt
    (compiled; `first` is its compile + first-run seconds)."""
    logits, state = jax.jit(step)(params, state, prompt)
    loop = greedy_decoder(step, steps)
    run = lambda: loop(params, state, logits[:, -1:])
    _, first = timed(run)
    return run, first


def round_robin(runs: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed in turns (the machine is shared:
    load changes hit every implementation alike)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run)[1])
    return {name: statistics.median(t) for name, t in times.items()}


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def param_count(model) -> int:
    return sum(math.prod(v.named_shape.values()) for v in parameter_values(model).values())


def compare_with_penzai(args, rng):
    config = gemma.GemmaConfig(
        vocabulary_size=args.vocab, num_layers=args.layers, num_query_heads=args.heads,
        num_key_value_heads=args.kv_heads, hidden_dim=args.width, intermediate_dim=2 * args.mlp,
        head_dim=args.width // args.heads, use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
        use_sliding_window_attention=True, sliding_window_size=args.window,
    )
    tree = official_tree(config)
    ours = convert.from_official_params(tree, **{
        k: getattr(config, k) for k in ("attention_logit_soft_cap", "final_logit_soft_cap",
                                        "sliding_window_size")})
    assert ours.config == config, (ours.config, config)
    theirs = penzai_gemma(config, tree)
    print(f"## Part 1: same weights, Gemma 2 style: width {args.width}, {args.layers} layers,"
          f" {args.heads} query / {args.kv_heads} KV heads, MLP {args.mlp}, vocab {args.vocab},"
          f" window {args.window}; {param_count(ours) / 1e6:.1f}M parameters, float32")

    ids = jnp.asarray(rng.integers(0, args.vocab, (1, args.seq)), jnp.int32)
    forwards = {"recurrent_lm": recurrent_lm.jit_forward(ours), "penzai": penzai_forward(theirs)}
    results = {name: timed(lambda forward=forward: forward(ids)) for name, forward in forwards.items()}
    medians = round_robin({name: lambda f=f: f(ids) for name, f in forwards.items()}, args.repeats)
    results = {name: (logits, first, medians[name]) for name, (logits, first) in results.items()}
    a, b = (np.asarray(results[n][0], np.float64) for n in ("recurrent_lm", "penzai"))
    print(f"\nlogits agree to {np.abs(a - b).max() / np.abs(b).max():.1e} relative")
    print(f"\n| forward, batch 1 x {args.seq} | first call s | median run ms | tokens/s | throughput vs penzai |")
    print("|---|---|---|---|---|")
    for name, (_, first, run) in results.items():
        ratio = results["penzai"][2] / run
        print(f"| {name} | {first:.1f} | {run * 1e3:.0f} | {args.seq / run:,.0f} | {ratio:.2f}x |")

    print(f"\n| decode, prompt {args.prompt}, {args.steps} steps | batch | tokens/s (all rows) |"
          " compile + first loop s | vs penzai |")
    print("|---|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = jnp.asarray(rng.integers(1, args.vocab, (batch, args.prompt)), jnp.int32)
        runs, firsts = {}, {}
        for name, build, model in (("recurrent_lm", our_step, ours), ("penzai", penzai_step, theirs)):
            step, params, state = build(model, batch, args.prompt + args.steps + 1)
            runs[name], firsts[name] = decoder(step, params, state, prompt, args.steps)
        rates = {name: (args.steps / t, firsts[name]) for name, t in round_robin(runs, 3).items()}
        for name, (rate, first) in rates.items():
            print(f"| {name} | {batch} | {batch * rate:,.1f} | {first:.1f} |"
                  f" {rate / rates['penzai'][0]:.2f}x |")


def griffin_vs_gemma(args, rng):
    width, layers, heads = args.width, args.layers, args.heads
    models = {
        "Griffin (R, R, A; window 2048)": griffin.build_model(griffin.GriffinConfig(
            vocab_size=args.vocab, hidden_size=width, num_attention_heads=heads,
            intermediate_size=args.mlp, num_hidden_layers=layers, attention_window_size=2048),
            jax.random.key(1)),
        "Gemma 1 (global MQA)": gemma.build_model(gemma.GemmaConfig(
            vocabulary_size=args.vocab, num_layers=layers, num_query_heads=heads, num_key_value_heads=1,
            hidden_dim=width, intermediate_dim=2 * args.mlp, head_dim=width // heads),
            jax.random.key(2)),
        f"Gemma 2 (GQA {heads}/{args.kv_heads}, window 4096 on every other layer)": gemma.build_model(
            gemma.GemmaConfig.from_preset(
                "gemma2-2b", vocabulary_size=args.vocab, num_layers=layers, num_query_heads=heads,
                num_key_value_heads=args.kv_heads, hidden_dim=width, intermediate_dim=2 * args.mlp,
                head_dim=width // heads), jax.random.key(3)),
    }
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"\n## Part 2: decode at batch 1 after a context of C tokens ({args.steps} steps timed)\n")
    print("| model | parameters | " + " | ".join(f"C = {c:,}: tokens/s, state MB" for c in contexts) + " |")
    print("|---|---|" + "---|" * len(contexts))
    prompt = jnp.asarray(rng.integers(1, args.vocab, (1, args.prompt)), jnp.int32)
    cells = {name: [] for name in models}
    for context in contexts:
        runs, sizes = {}, {}
        for name, model in models.items():
            step, params, state = our_step(model, 1, context + args.steps + args.prompt)
            runs[name], _ = decoder(step, params, state, prompt, args.steps)
            sizes[name] = state_bytes(state)
        for name, seconds in round_robin(runs, 3).items():
            cells[name].append(f"{args.steps / seconds:,.1f}, {sizes[name] / 1e6:,.3f}")
    for name, model in models.items():
        print(f"| {name} | {param_count(model) / 1e6:.1f}M | " + " | ".join(cells[name]) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=2304, help="width of one MLP branch")
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--window", type=int, default=256, help="Gemma 2 window in part 1")
    parser.add_argument("--seq", type=int, default=512, help="forward sequence length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--part", choices=("1", "2", "both"), default="both")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__};"
          f" load average {os.getloadavg()[0]:.1f}")
    if args.part in ("1", "both"):
        compare_with_penzai(args, rng)
    if args.part in ("2", "both"):
        griffin_vs_gemma(args, rng)


if __name__ == "__main__":
    main()
