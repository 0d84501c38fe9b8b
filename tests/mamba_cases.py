"""Shared Mamba / Mamba-2 test helpers: random transformers models and ours.

The oracle is transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` on
CPU in float32, on their pure-torch paths: the fast kernels' packages
(``mamba_ssm``, ``causal_conv1d``) and the hub's ``kernels`` are not
installed (`assert_torch_paths`). Every HF parameter is perturbed after init
(HF starts norms at one, biases at zero, ``D`` at one, ``A_log`` on a ramp,
which would hide mistakes in them).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import tempfile

import numpy as np

from checkpoints_conversion import mamba as convert

MAMBA, MAMBA2 = "mamba", "mamba2"


@dataclasses.dataclass(frozen=True)
class Case:
    """A random HF model (its config's arguments) and the length of its inputs."""

    name: str
    family: str
    config: tuple  # sorted (key, value) pairs of the HF config's arguments
    seq: int
    seed: int = 0

    @property
    def kwargs(self) -> dict:
        return dict(self.config)

    @property
    def vocab(self) -> int:
        return self.kwargs["vocab_size"]


def case(name, family, seq, seed=0, **config) -> Case:
    return Case(name, family, tuple(sorted(config.items())), seq, seed)


CASES = {
    # Mamba-1: odd width and state, dt_rank "auto" (ceil(18 / 16) = 2), biases on the projections.
    "m1_odd": case("m1_odd", MAMBA, 13, vocab_size=37, hidden_size=18, state_size=5,
                   num_hidden_layers=2, expand=2, conv_kernel=3, use_bias=True),
    # Mamba-1: an explicit dt_rank, no conv bias, an untied head, residual in the
    # parameter dtype, another epsilon, three blocks, expand 3.
    "m1_untied": case("m1_untied", MAMBA, 11, seed=1, vocab_size=29, hidden_size=12, state_size=7,
                      num_hidden_layers=3, expand=3, conv_kernel=4, time_step_rank=5,
                      use_conv_bias=False, tie_word_embeddings=False, residual_in_fp32=False,
                      layer_norm_epsilon=1e-3),
    # Mamba-2: two groups of three heads, chunks of 4 (HF runs 4 SSD chunks), untied (HF's default).
    "m2_groups": case("m2_groups", MAMBA2, 13, seed=2, vocab_size=41, hidden_size=12, num_heads=6,
                      head_dim=4, state_size=5, n_groups=2, num_hidden_layers=2, conv_kernel=3,
                      chunk_size=4),
    # Mamba-2: one group of five heads, chunks of 5, no conv bias, projection biases, dt clipped,
    # tied, another epsilon.
    "m2_tied": case("m2_tied", MAMBA2, 12, seed=3, vocab_size=31, hidden_size=10, expand=2,
                    num_heads=5, head_dim=4, state_size=6, n_groups=1, num_hidden_layers=2,
                    conv_kernel=4, chunk_size=5, use_conv_bias=False, use_bias=True,
                    time_step_limit=(0.05, 0.5), tie_word_embeddings=True, layer_norm_epsilon=1e-4),
}
M1_CASES = [n for n, c in CASES.items() if c.family == MAMBA]
M2_CASES = [n for n, c in CASES.items() if c.family == MAMBA2]


def assert_torch_paths() -> None:
    """transformers can run Mamba only on its reference torch code here."""
    for package in ("mamba_ssm", "causal_conv1d", "kernels"):
        assert importlib.util.find_spec(package) is None, f"{package} is installed: not the torch path"


@functools.cache
def hf_model(case: Case):
    """The case's transformers model, every parameter perturbed (eval mode)."""
    import torch
    import transformers

    assert_torch_paths()
    classes = {MAMBA: (transformers.MambaConfig, transformers.MambaForCausalLM),
               MAMBA2: (transformers.Mamba2Config, transformers.Mamba2ForCausalLM)}
    config_class, model_class = classes[case.family]
    kwargs = case.kwargs
    if "time_step_limit" in kwargs:
        kwargs["time_step_limit"] = list(kwargs["time_step_limit"])
    torch.manual_seed(case.seed)
    model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():
        for param in model.parameters():  # a tied head is the embeddings: perturbed once
            param.add_(0.1 * torch.randn_like(param))
    return model


_DIRECTORIES = tempfile.TemporaryDirectory(prefix="mamba_cases_")


@functools.cache
def hf_directory(case: Case) -> str:
    """The case's model written by ``save_pretrained`` (once per process)."""
    path = f"{_DIRECTORIES.name}/{case.name}"
    hf_model(case).save_pretrained(path)
    return path


@functools.cache
def our_model(case: Case, **overrides):
    """Ours, loaded from the case's HF directory (config fields overridden)."""
    return convert.load_hf_checkpoint(hf_directory(case), **overrides)


def hf_logits(case: Case, ids: np.ndarray) -> np.ndarray:
    """transformers' logits of whole rows (no cache): [batch, seq, vocabulary]."""
    import torch

    with torch.no_grad():
        out = hf_model(case)(torch.as_tensor(ids, dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def hf_state(case: Case) -> dict[str, np.ndarray]:
    """The HF model's state dict as numpy, without a tied head."""
    model = hf_model(case)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def case_ids(case: Case, batch: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(100 * case.seed + seed)
    return rng.integers(0, case.vocab, (batch, case.seq)).astype(np.int32)


def positions(batch: int, seq: int) -> np.ndarray:
    return np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
