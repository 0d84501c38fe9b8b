"""Shared RWKV test helpers: random HF transformers models and our twins of them.

Parity tests compare against HF's ``RwkvForCausalLM`` (CPU torch) on random
weights. Every HF parameter is perturbed after init (HF starts time_first at
all ones, LayerNorms at 1/0 and several projections at structured values,
which would hide mistakes in them).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from checkpoints_conversion import rwkv as convert
from recurrent_lm.models import rwkv


@dataclasses.dataclass(frozen=True)
class HFCase:
    """A random HF RWKV-4 configuration and inputs."""

    name: str
    vocab: int
    hidden: int
    layers: int
    attention: int
    intermediate: int
    seq: int
    batch: int
    rescale_every: int = 6
    tie: bool = False
    seed: int = 0

    def config(self, **overrides) -> rwkv.RwkvConfig:
        values = {
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "attention_hidden_size": self.attention,
            "intermediate_size": self.intermediate,
            "context_length": 64,
            "rescale_every": self.rescale_every,
            "tie_word_embeddings": self.tie,
        }
        return rwkv.RwkvConfig(**{**values, **overrides})


CASES = {
    # attention_hidden_size != hidden_size, odd widths, rescaling after block 2.
    "odd": HFCase(
        "odd",
        vocab=37,
        hidden=24,
        layers=3,
        attention=40,
        intermediate=52,
        seq=13,
        batch=3,
        rescale_every=2,
    ),
    # narrower WKV than the residual stream (HF cannot build one block: its init divides by L-1).
    "narrow": HFCase(
        "narrow",
        vocab=50,
        hidden=32,
        layers=2,
        attention=20,
        intermediate=72,
        seq=9,
        batch=2,
        seed=1,
    ),
    # square, four blocks, rescale every block.
    "square": HFCase(
        "square",
        vocab=29,
        hidden=16,
        layers=4,
        attention=16,
        intermediate=64,
        seq=17,
        batch=2,
        rescale_every=1,
        seed=2,
    ),
    # tied embeddings.
    "tied": HFCase(
        "tied",
        vocab=31,
        hidden=20,
        layers=2,
        attention=28,
        intermediate=44,
        seq=7,
        batch=2,
        tie=True,
        seed=3,
    ),
}


def new_hf_model(case: HFCase):
    """HF's RwkvForCausalLM for the case's config, with HF's own initialisation."""
    from transformers import RwkvConfig, RwkvForCausalLM

    values = convert.hf_config_dict(case.config())
    for key in ("architectures", "model_type", "dtype"):
        del values[key]
    return RwkvForCausalLM(RwkvConfig(**values))


@functools.cache
def hf_state_dict(case: HFCase) -> dict[str, np.ndarray]:
    """Random HF weights (numpy, float32), taken before any eval-mode forward."""
    import torch

    torch.manual_seed(case.seed)
    model = new_hf_model(case)
    generator = torch.Generator().manual_seed(100 + case.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("time_decay"):
                param.copy_(torch.linspace(-4, 2, param.numel()) + 0.5 * noise)
            else:
                param.add_(0.3 * noise)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_model(case: HFCase, *, train: bool = True):
    """A fresh HF model with `hf_state_dict(case)` (train mode: no rescaling)."""
    import torch

    model = new_hf_model(case)
    model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in hf_state_dict(case).items()}
    )
    return model.train(train)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


def case_ids(case: HFCase) -> np.ndarray:
    rng = np.random.default_rng(7 + case.seed)
    return rng.integers(0, case.vocab, (case.batch, case.seq)).astype(np.int32)


@functools.cache
def our_model(case: HFCase, scan_method: str | None = None):
    config = dataclasses.replace(case.config(), scan_method=scan_method)
    return convert.from_hf_state_dict(hf_state_dict(case), config)
