"""Time and peak memory of loading / converting a ~1B-parameter HF RecurrentGemma
checkpoint, against the time to read its bytes.

Writes a random HF ``RecurrentGemmaForCausalLM`` directory (bfloat16 by default,
sharded safetensors, generated with numpy one shard at a time; no JAX model is
built) into a temporary directory, then runs each step in a fresh subprocess
and reports its wall time and peak RSS (``VmHWM`` from ``/proc/self/status``:
``ru_maxrss`` would report the parent's RSS, which Linux carries over fork + exec):

- ``imports only``: the baseline (jax, our package) every step pays;
- ``read all bytes``: every file read in 64 MiB chunks (the floor: the disk / page cache);
- ``load_hf_checkpoint``: `checkpoints_conversion.recurrentgemma.load_hf_checkpoint`
  (lazy: one tensor at a time);
- ``convert CLI``: ``python -m checkpoints_conversion.recurrentgemma convert SRC DST``
  (load + `recurrent_lm.checkpoint.save`).

Peak RSS is shown against the checkpoint size: 1.0 x means one full copy.
The files stay in the page cache after writing, so "read all bytes" is a
memory-bandwidth floor rather than a cold-disk one.

    python -m benchmarks.convert_memory [--width 2048 --layers 10 --vocab 256000 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

R, A = "recurrent", "attention"
MIB = 2**20


def hf_config(args) -> dict:
    pattern = [R, R, A]
    return {
        "architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma",
        "vocab_size": args.vocab, "hidden_size": args.width, "lru_width": args.width,
        "intermediate_size": 2 * 3 * args.width, "num_attention_heads": args.heads,
        "num_key_value_heads": 1, "head_dim": args.width // args.heads,
        "num_hidden_layers": args.layers, "block_types": [pattern[i % 3] for i in range(args.layers)],
        "attention_window_size": 2048, "conv1d_width": 4, "logits_soft_cap": 30.0,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True, "dtype": args.dtype,
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF's tensor names and shapes for `config`."""
    D, V, L = config["hidden_size"], config["vocab_size"], config["lru_width"]
    M, H = config["intermediate_size"] // 2, config["num_attention_heads"]
    hd = config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.final_norm.weight": (D,)}
    for i, kind in enumerate(config["block_types"]):
        p = f"model.layers.{i}."
        shapes.update({p + "temporal_pre_norm.weight": (D,), p + "channel_pre_norm.weight": (D,)})
        for proj in ("gate_proj", "up_proj"):
            shapes.update({p + f"mlp_block.{proj}.weight": (M, D), p + f"mlp_block.{proj}.bias": (M,)})
        shapes.update({p + "mlp_block.down_proj.weight": (D, M), p + "mlp_block.down_proj.bias": (D,)})
        t = p + "temporal_block."
        if kind == R:
            for name, (out, inp) in (("linear_y", (L, D)), ("linear_x", (L, D)), ("linear_out", (D, L))):
                shapes.update({t + f"{name}.weight": (out, inp), t + f"{name}.bias": (out,)})
            shapes.update({t + "conv_1d.weight": (L, 1, 4), t + "conv_1d.bias": (L,),
                           t + "rg_lru.recurrent_param": (L,)})
            for gate in ("input_gate", "recurrent_gate"):
                shapes.update({t + f"rg_lru.{gate}_weight": (H, L // H, L // H),
                               t + f"rg_lru.{gate}_bias": (H, L // H)})
        else:
            shapes.update({t + "q_proj.weight": (H * hd, D), t + "k_proj.weight": (hd, D),
                           t + "v_proj.weight": (hd, D), t + "o_proj.weight": (D, H * hd),
                           t + "o_proj.bias": (D,)})
    return shapes


def write_checkpoint(directory: str, args) -> tuple[int, int]:
    """Writes the directory shard by shard; returns (parameters, bytes)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    config = hf_config(args)
    dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
    shapes = tensor_shapes(config)
    rng = np.random.default_rng(0)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if current and size + nbytes > args.shard_mib * MIB:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for name in names:
            out = np.empty(shapes[name], dtype)
            flat = out.reshape(-1)
            for start in range(0, flat.size, 1 << 24):  # float32 noise in 64 MiB pieces
                piece = rng.standard_normal(min(1 << 24, flat.size - start), np.float32)
                flat[start:start + piece.size] = 0.02 * piece
            arrays[name] = out
            total += out.size
        save_file(arrays, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del arrays
    nbytes = sum(os.path.getsize(os.path.join(directory, f)) for f in set(weight_map.values()))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": nbytes}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return total, nbytes


# Each step: code run in a fresh interpreter; it prints {"seconds": ...} as its last line.
_PRELUDE = """
import json, os, resource, sys, time
import jax, numpy as np
import checkpoints_conversion.recurrentgemma as rg
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
"""
_EPILOGUE = """
seconds = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec (the parent's RSS at the
# fork), while VmHWM is this interpreter's own high-water mark.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "maxrss_kib": hwm,
                  "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
STEPS = {
    "imports only (baseline)": "pass",
    "read all bytes (64 MiB chunks)": """
buf = bytearray(64 << 20)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
""",
    "load_hf_checkpoint": """
model = rg.load_hf_checkpoint(src)
jax.block_until_ready(jax.tree.leaves(model))
""",
    "convert CLI (load + save)": """
assert rg.main(["convert", src, dst]) == 0
""",
}


def run_step(code: str, src: str, dst: str) -> tuple[float, float]:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run([sys.executable, "-c", _PRELUDE + code + _EPILOGUE, src, dst],
                         check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["maxrss_kib"] * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256_000)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--shard-mib", type=int, default=1024)
    parser.add_argument("--tmp", default=None, help="where to write (default: the system temp dir)")
    args = parser.parse_args(argv)

    config = hf_config(args)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    expected = sum(int(np.prod(s)) for s in tensor_shapes(config).values()) * itemsize
    root = tempfile.mkdtemp(prefix="convert_memory_", dir=args.tmp)
    try:
        free = shutil.disk_usage(root).free
        if free < 2.5 * expected:  # checkpoint + converted copy + slack
            raise SystemExit(f"need ~{2.5 * expected / 1e9:.1f} GB free in {root}, have {free / 1e9:.1f} GB;"
                             " pass smaller --vocab/--layers or another --tmp.")
        src, dst = os.path.join(root, "hf"), os.path.join(root, "ours")
        os.makedirs(src)
        params, nbytes = write_checkpoint(src, args)
        print(f"checkpoint: {params / 1e9:.3f} B parameters, {args.dtype}, {nbytes / 1e9:.2f} GB in"
              f" {len(os.listdir(src)) - 2} shards")
        results = {name: run_step(code, src, dst) for name, code in STEPS.items()}
        raw = results["read all bytes (64 MiB chunks)"][0]
        print("| step | time (s) | x raw read | peak RSS (GB) | peak RSS / checkpoint |")
        print("|---|---|---|---|---|")
        for name, (seconds, rss) in results.items():
            print(f"| {name} | {seconds:.2f} | {seconds / raw:.1f} | {rss / 1e9:.2f} | {rss / nbytes:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
