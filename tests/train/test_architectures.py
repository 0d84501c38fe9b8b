"""The training loop runs every registered architecture (the "tiny" presets, shrunk)."""

import math

import pytest

from recurrent_lm.train import train

SMALL = {
    "rwkv": {"hidden_size": 32, "num_hidden_layers": 2, "attention_hidden_size": 32, "intermediate_size": 64},
    "rwkv7": {"hidden_size": 32, "num_hidden_layers": 2, "head_size": 16, "intermediate_size": 64,
              "decay_low_rank": 8, "rate_low_rank": 8, "value_low_rank": 8, "gate_low_rank": 8},
    "h3": {"hidden_size": 32, "num_hidden_layers": 2, "n_inner": 64, "d_state": 8, "attn_layer_idx": (1,)},
    "gemma": {"num_layers": 2, "hidden_dim": 32, "intermediate_dim": 64, "head_dim": 8},
    "mamba": {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8},
    "mamba2": {"hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "head_dim": 16},
}


@pytest.mark.parametrize("model", sorted(SMALL))
def test_a_few_steps_lower_the_loss(setup, model, tmp_path):
    config = setup.config_for(
        f"arch-{model}", model=model, config_overrides=SMALL[model], steps=4, decay_steps=4,
        eval_interval=0, learning_rate=1e-2, metrics_file=str(tmp_path / "metrics.jsonl"),
    )
    result = train(config)
    losses = [result.losses[step] for step in sorted(result.losses)]
    assert len(losses) == 4
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert type(result.model.config).__module__.endswith(model)
