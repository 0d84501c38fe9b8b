"""LoRA: identity at start, adapters alone trainable, merge, save/load, fine-tuning run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.toolshed.lora import LowRankAdapter

import recurrent_lm
from recurrent_lm import lora
from recurrent_lm.models import griffin
from recurrent_lm.params import CheckpointMismatchError, parameter_values
from recurrent_lm.sampling import to_sampling_mode
from recurrent_lm.train import train


@pytest.fixture(scope="module")
def model():
    config = griffin.GriffinConfig.from_preset(
        "tiny",
        num_hidden_layers=2,
        block_types=("recurrent", "attention"),
        vocab_size=64,
    )
    return griffin.build_model(config, jax.random.key(1))


def _logits(model, ids):
    return model(pz.nx.wrap(ids, "batch", "seq")).unwrap("batch", "seq", "vocabulary")


def _perturbed(adapted):
    """Non-zero B matrices, so the adapters change the output."""

    def bump(b):
        value = b.value + 0.05 * pz.nx.ones(b.value.named_shape, b.value.dtype)
        return pz.Parameter(label=b.label, value=value)

    return (
        pz.select(adapted)
        .at_instances_of(pz.Parameter)
        .where(lambda p: p.label.endswith(".lora_b"))
        .apply(bump)
    )


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def test_adapters_start_as_identity_and_are_the_only_trainable_parameters(model):
    adapted = lora.enable_lora(model, 4, targets=r"mlp_block|linear_x", alpha=8.0)
    np.testing.assert_array_equal(_logits(adapted, IDS), _logits(model, IDS))
    _, trainable = pz.unbind_params(adapted)
    labels = {p.label for p in trainable}
    assert labels and all(label.endswith((".lora_a", ".lora_b")) for label in labels)
    assert any("mlp_block" in label for label in labels)
    assert any("linear_x" in label for label in labels)
    assert not any("linear_y" in label or "attention" in label for label in labels)
    layer = pz.select(adapted).at_instances_of(lora.LoRALinear).get_sequence()[0]
    assert isinstance(layer, LowRankAdapter)
    assert layer.update.scale == 2.0 and layer.update.lora_a.value.named_shape["lora_rank"] == 4


def test_an_adapted_model_can_be_sampled_from(model):
    """Every Linear adapted, attention keys too: each projection still holds one
    `pz.nn.Linear` (what the KV cache is sized from)."""
    adapted = _perturbed(lora.enable_lora(model, 2))
    assert any("key" in label for label in lora.adapter_values(adapted))
    sampler = to_sampling_mode(adapted, batch_size=2, max_length=IDS.shape[1])
    np.testing.assert_allclose(
        sampler(pz.nx.wrap(IDS, "batch", "seq")).unwrap("batch", "seq", "vocabulary"),
        _logits(adapted, IDS),
        rtol=1e-4,
        atol=1e-5,
    )


def test_merge_equals_adapted_model_and_adapters_round_trip(model, tmp_path):
    adapted = _perturbed(lora.enable_lora(model, 2, targets="mlp_block", alpha=6.0))
    expected = _logits(adapted, IDS)
    assert not np.allclose(expected, _logits(model, IDS))
    merged = lora.merge_lora(adapted)
    assert not pz.select(merged).at_instances_of(lora.LoRALinear).count()
    assert set(parameter_values(merged)) == set(parameter_values(model))
    np.testing.assert_allclose(_logits(merged, IDS), expected, rtol=1e-5, atol=1e-5)
    lora.save_adapters(adapted, tmp_path / "adapters")
    reloaded = lora.load_adapters(model, tmp_path / "adapters")
    np.testing.assert_array_equal(_logits(reloaded, IDS), expected)


def test_lora_errors_name_the_problem(model, tmp_path):
    with pytest.raises(
        ValueError, match="no Linear layer matches LoRA targets 'nothing'"
    ):
        lora.enable_lora(model, 2, targets="nothing")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.enable_lora(model, 0)
    lora.save_adapters(lora.enable_lora(model, 2, targets="mlp_block"), tmp_path / "a")
    wider = griffin.build_model(
        griffin.GriffinConfig.from_preset(
            "tiny",
            num_hidden_layers=2,
            block_types=("recurrent", "attention"),
            vocab_size=64,
            intermediate_size=96,
        ),
        jax.random.key(0),
    )
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        lora.load_adapters(wider, tmp_path / "a")


def test_lora_fine_tuning_run_trains_only_the_adapters(setup, tmp_path):
    config = dataclasses.replace(
        setup.config,
        steps=2,
        decay_steps=2,
        eval_interval=0,
        init_checkpoint=setup.model_dir,
        lora_rank=2,
        lora_targets=("mlp_block",),
        checkpoint_dir=str(tmp_path / "run"),
        save_adapters=str(tmp_path / "adapters"),
        save_model=str(tmp_path / "merged"),
    )
    result = train(config)
    base = recurrent_lm.load(setup.model_dir)
    before, after = (
        parameter_values(base),
        parameter_values(recurrent_lm.load(tmp_path / "merged")),
    )
    changed = {
        k
        for k in before
        if not np.array_equal(
            before[k].unwrap(*before[k].named_shape),
            after[k].unwrap(*before[k].named_shape),
        )
    }
    assert changed and all("mlp_block" in k and k.endswith("weights") for k in changed)
    adapted = lora.load_adapters(base, tmp_path / "adapters")
    ids = jnp.asarray(
        np.random.default_rng(1).integers(0, base.config.vocab_size, (1, 10)), jnp.int32
    )
    np.testing.assert_allclose(
        _logits(adapted, ids), _logits(result.model, ids), rtol=1e-4, atol=1e-5
    )
