"""Shared RWKV-7 test helpers: random BlinkDL x070 state dicts and his runtime.

BlinkDL's runtime (PyPI ``rwkv``) picks its model family when ``rwkv.model`` is
imported (``RWKV_V7_ON``), and the RWKV-4 tests import it without that in the
same process; `blinkdl_v7` therefore executes a private copy of the module
under another name with the x070 settings, leaving ``rwkv.model`` (and the
environment) as it found them, so both families run in one process in any
order.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from checkpoints_conversion import rwkv as convert
from checkpoints_conversion import verify


@dataclasses.dataclass(frozen=True)
class Case:
    """A random RWKV-7 in BlinkDL's layout, and inputs."""

    name: str
    vocab: int
    hidden: int
    head_size: int
    layers: int
    ranks: tuple[int, int, int, int]  # decay, in-context rate, value residual, gate
    intermediate: int
    seq: int
    batch: int
    first_layer_value_gate: bool = True
    seed: int = 0

    @property
    def heads(self) -> int:
        return self.hidden // self.head_size


CASES = {
    # odd low-rank widths, three blocks, three heads of 16.
    "odd": Case("odd", vocab=37, hidden=48, head_size=16, layers=3, ranks=(5, 7, 3, 9),
                intermediate=70, seq=11, batch=2, seed=0),
    # five heads of 8, two blocks, block 0 without the unused value gate.
    "narrow": Case("narrow", vocab=29, hidden=40, head_size=8, layers=2, ranks=(6, 4, 5, 11),
                   intermediate=100, seq=9, batch=2, first_layer_value_gate=False, seed=1),
}


def blinkdl_state_dict(case: Case) -> dict[str, np.ndarray]:
    """Random float32 weights in BlinkDL's x070 layout, every tensor perturbed
    (norm scales around 1, token-shift mixes around 0.5, decays spread from
    fast to slow)."""
    rng = np.random.default_rng(case.seed)
    C, N, H, F, V = case.hidden, case.head_size, case.heads, case.intermediate, case.vocab
    dw, da, dv, dg = case.ranks
    normal = lambda *shape, scale=0.3: (scale * rng.standard_normal(shape)).astype(np.float32)
    around = lambda centre, *shape, scale=0.2: (centre + normal(*shape, scale=scale)).astype(np.float32)
    state = {
        "emb.weight": normal(V, C, scale=1.0),
        "blocks.0.ln0.weight": around(1.0, C),
        "blocks.0.ln0.bias": normal(C),
    }
    for i in range(case.layers):
        b, att = f"blocks.{i}.", f"blocks.{i}.att."
        for ln in ("ln1", "ln2"):
            state[b + f"{ln}.weight"] = around(1.0, C)
            state[b + f"{ln}.bias"] = normal(C)
        for mix in "rwkvag":
            state[att + f"x_{mix}"] = around(0.5, 1, 1, C)
        state[att + "w0"] = (np.linspace(-3, 1.5, C) + normal(C, scale=0.5)).astype(np.float32).reshape(1, 1, C)
        state[att + "a0"] = normal(1, 1, C, scale=0.5)
        pairs = {"w": dw, "a": da, "g": dg}
        if i > 0 or case.first_layer_value_gate:
            state[att + "v0"] = normal(1, 1, C, scale=0.5)
            pairs["v"] = dv
        for name, rank in pairs.items():
            state[att + f"{name}1"] = normal(C, rank)
            state[att + f"{name}2"] = normal(rank, C)
        state[att + "k_k"] = around(0.8, 1, 1, C)
        state[att + "k_a"] = around(1.0, 1, 1, C)
        state[att + "r_k"] = normal(H, N)
        for name in ("receptance", "key", "value", "output"):
            state[att + f"{name}.weight"] = normal(C, C, scale=1.5 / np.sqrt(C))
        state[att + "ln_x.weight"] = around(1.0, C)
        state[att + "ln_x.bias"] = normal(C)
        state[b + "ffn.x_k"] = around(0.5, 1, 1, C)
        state[b + "ffn.key.weight"] = normal(F, C, scale=1.5 / np.sqrt(C))
        state[b + "ffn.value.weight"] = normal(C, F, scale=1.0 / np.sqrt(F))
    state["ln_out.weight"] = around(1.0, C)
    state["ln_out.bias"] = normal(C)
    state["head.weight"] = normal(V, C)
    return state


def save_pth(state: dict[str, np.ndarray], path) -> None:
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)


def case_ids(case: Case, seed: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed + case.seed)
    return rng.integers(0, case.vocab, (case.batch, case.seq)).astype(np.int32)


@functools.cache
def our_model(case: Case, scan_method: str | None = None, chunk_size: int | None = None):
    """Our RWKV-7 converted from the case's BlinkDL state dict (with a chosen
    matrix-scan form and chunk length)."""
    model = convert.from_blinkdl_state_dict(blinkdl_state_dict(case))
    if scan_method is None and chunk_size is None:
        return model
    options = {"scan_method": scan_method} | ({} if chunk_size is None else {"scan_chunk_size": chunk_size})
    config = dataclasses.replace(model.config, **options)
    return convert.from_blinkdl_state_dict(blinkdl_state_dict(case), config)


# ----------------------------------------------------------------------------- his runtime

@functools.cache
def blinkdl_v7():
    """BlinkDL's ``rwkv.model`` executed afresh with the x070 settings, as a
    private module (``rwkv.model`` itself, and the environment, untouched)."""
    return verify.blinkdl_x070_module()


def his_runtime(path):
    """His x070 runtime on `path` (a ``.pth``; he takes the name without it), cpu fp32."""
    name = os.fspath(path).removesuffix(".pth")
    return blinkdl_v7().RWKV_x070(model=name, strategy="cpu fp32")


def his_sequence(runtime, ids, state=None):
    """(logits at every position [T, V], state) in his sequence mode (T >= 2)."""
    logits, state = runtime.forward([int(t) for t in ids], state, full_output=True)
    return logits.numpy(), state


def his_token_by_token(runtime, ids, state=None):
    rows = []
    for t in ids:
        logits, state = runtime.forward([int(t)], state)
        rows.append(logits.numpy())
    return np.stack(rows), state


def his_chunk(runtime, ids, state=None):
    """His sequence mode, or his one-token mode for a one-token chunk."""
    return (his_sequence if len(ids) > 1 else his_token_by_token)(runtime, ids, state)


def his_states(state, layers: int):
    """His flat list (3 per block: time-mix shift, matrix [H, value, key],
    channel-mix shift) per block, as float64 numpy."""
    return [tuple(state[3 * i + j].double().numpy() for j in range(3)) for i in range(layers)]
