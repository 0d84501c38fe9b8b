"""Capture, patching, ablation and activation patching (`recurrent_lm.interp`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from recurrent_lm import interp
from recurrent_lm.core import model as base
from recurrent_lm.core import sites
from recurrent_lm.models import griffin
from recurrent_lm.sampling import to_sampling_mode

CONFIG = griffin.GriffinConfig(
    vocab_size=61, hidden_size=24, num_attention_heads=3, intermediate_size=40,
    num_hidden_layers=3, attention_window_size=5, conv1d_width=3,
)
STATE = "blocks.0.temporal_block.rg_lru.hidden_state"
PATTERN = "blocks.2.temporal_block.pattern"


def logits_array(logits):
    return np.asarray(logits.unwrap("batch", "seq", "vocabulary"))


def values(x):
    return np.asarray(x.unwrap(*sorted(x.named_shape)))


@pytest.fixture(scope="module")
def model():
    return griffin.build_model(CONFIG, jax.random.key(1))


@pytest.fixture(scope="module")
def tokens():
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, CONFIG.vocab_size)
    return pz.nx.wrap(ids, "batch", "seq")


@pytest.fixture(scope="module")
def clean(model, tokens):
    return interp.run_with_cache(model, tokens)


@pytest.fixture(scope="module")
def clean_op_by_op(model, tokens):
    with base.op_by_op():
        return interp.run_with_cache(model, tokens)


def test_site_names_and_shapes(model, tokens, clean):
    logits, cache = clean
    names = interp.site_names(model)
    assert list(cache) == names
    assert "embeddings" in names and "blocks.1.output" in names and STATE in names
    assert dict(cache[STATE].named_shape) == {"batch": 2, "seq": 9, "lru": 24}
    assert dict(cache[PATTERN].named_shape) == {"batch": 2, "heads": 3, "seq": 9, "kv_seq": 9}
    # Attention weights are a distribution over visible keys (window 5 -> 6 keys).
    pattern = cache[PATTERN].unwrap("batch", "heads", "seq", "kv_seq")
    np.testing.assert_allclose(pattern.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(pattern)[..., 8, :2] == 0)
    # The state site sees the RG-LRU output, which is what the block gates.
    gate = cache["blocks.0.temporal_block.rg_lru.input_gate_value"]
    assert np.all((values(gate) > 0) & (values(gate) < 1))
    # Two compiled programs (capturing and plain): equal up to how XLA fuses each.
    np.testing.assert_allclose(logits_array(logits), logits_array(model(tokens)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name", [STATE, "blocks.1.output", PATTERN, "blocks.1.temporal_block.rg_lru.recurrence_gate_value"],
)
def test_writing_back_the_clean_activation_is_exact(model, tokens, clean, clean_op_by_op, name):
    # Op by op, the patched model computes the very same floats. Compiled, XLA
    # fuses the patched program differently: last-bit differences only.
    value = clean_op_by_op[1][name]
    with base.op_by_op():
        patched = interp.patch(model, {name: interp.Replace(value, positions=[2, -1])})
        np.testing.assert_array_equal(logits_array(patched(tokens)), logits_array(clean_op_by_op[0]))
    patched = interp.patch(model, {name: interp.Replace(clean[1][name], positions=[2, -1])})
    np.testing.assert_allclose(logits_array(patched(tokens)), logits_array(clean[0]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("propagate", [True, False])
def test_state_patch_changes_only_later_positions(model, tokens, clean, propagate):
    logits, cache = clean
    t = 4
    value = cache[STATE] + 3.0
    patched = interp.patch(model, {STATE: interp.Replace(value, positions=[t])}, propagate=propagate)
    new_logits, new_cache = interp.run_with_cache(patched, tokens, names=STATE)
    delta = np.abs(logits_array(new_logits) - logits_array(logits)).max(axis=(0, 2))
    # (compiled: the patched program may differ in the last bit elsewhere)
    assert np.all(delta[:t] < 1e-5) and np.all(delta[t:] > 1e-3)
    states = np.abs(new_cache[STATE].unwrap("seq", "batch", "lru") - cache[STATE].unwrap("seq", "batch", "lru"))
    np.testing.assert_allclose(new_cache[STATE].unwrap("seq", "batch", "lru")[t],
                               value.unwrap("seq", "batch", "lru")[t], rtol=1e-6)
    later = np.asarray(states[t + 1:]).max()
    # Propagating: later states carry the change through h_{t+1} = a h_t + b.
    assert (later > 1e-3) if propagate else (later < 1e-6)


def test_state_add_propagates_like_the_recurrence(model, tokens, clean):
    """h_t += d at t gives h_s += (prod_{t<u<=s} a_u) d for s > t."""
    _, cache = clean
    t, d = 3, 0.5
    patched = interp.patch(model, {STATE: interp.Add(d, positions=[t])})
    _, new_cache = interp.run_with_cache(patched, tokens, names=STATE)
    # a_u from the recurrence gate: log a = -8 r softplus(a_param).
    rglru = model.blocks.sublayers[0].temporal_block.rg_lru
    _, gates = interp.run_with_cache(model, tokens, names="blocks.0.**.recurrence_gate_value")
    r = np.asarray(next(iter(gates.values())).unwrap("batch", "seq", "lru"))
    a = np.exp(-8.0 * r * np.log1p(np.exp(np.asarray(rglru.a_param.value.unwrap("lru")))))
    expected = d * np.cumprod(np.concatenate([np.ones_like(a[:, t:t + 1]), a[:, t + 1:]], 1), 1)
    got = np.asarray((new_cache[STATE] - cache[STATE]).unwrap("batch", "seq", "lru"))[:, t:]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_zero_ablating_a_head_equals_zeroing_its_output_weights(model, tokens):
    head = 1
    ablated = interp.patch(model, {"blocks.2.temporal_block.head_outputs": interp.Replace(0.0, heads=[head])})
    output = model.blocks.sublayers[2].temporal_block.output
    linear = pz.select(output).at_instances_of(pz.nn.Linear).get()
    w = linear.weights.value
    mask = (pz.nx.arange("heads", 3) != head).astype(w.dtype)
    by_hand = pz.select(model).at(lambda m: m.blocks.sublayers[2].temporal_block.output).apply(
        lambda out: pz.select(out).at_instances_of(pz.nn.Linear).apply(
            lambda lin: dataclasses.replace(lin, weights=pz.Parameter(value=w * mask, label="ablated"))
        )
    )
    np.testing.assert_allclose(logits_array(ablated(tokens)), logits_array(by_hand(tokens)), rtol=1e-5, atol=1e-6)


def test_zero_ablating_a_branch_equals_a_model_without_it(model, tokens):
    ablated = interp.patch(model, {"blocks.1.mlp_output": interp.Replace(0.0)})
    block = model.blocks.sublayers[1]
    without_mlp = pz.select(model).at(lambda m: m.blocks.sublayers[1]).set(
        pz.nn.Sequential([
            pz.nn.Residual(pz.nn.Sequential([block.temporal_pre_norm, block.temporal_block])),
        ])
    )
    np.testing.assert_allclose(logits_array(ablated(tokens)), logits_array(without_mlp(tokens)), rtol=1e-5, atol=1e-6)


def test_mean_ablation_uses_the_reference_mean(model, tokens, clean):
    _, cache = clean
    name = "blocks.1.mlp_block.hidden"
    mean = cache[name].unwrap("batch", "seq", "mlp").mean((0, 1))
    _, new = interp.run_with_cache(
        interp.patch(model, {name: interp.mean_ablation(cache[name], positions=[0, 1])}), tokens, names=name
    )
    got = np.asarray(new[name].unwrap("batch", "seq", "mlp"))
    np.testing.assert_allclose(got[:, :2], np.broadcast_to(mean, got[:, :2].shape), rtol=1e-6)
    np.testing.assert_array_equal(got[:, 2:], np.asarray(cache[name].unwrap("batch", "seq", "mlp"))[:, 2:])


def test_capture_and_patch_under_jit(model, tokens, clean):
    frozen = pz.freeze_params(model)

    @jax.jit
    def run(frozen, tokens):
        patched = interp.patch(frozen, {"blocks.0.output": interp.Add(1.0, positions=[3])})
        logits, cache = interp.run_with_cache(patched, tokens, names=["blocks.0.output", STATE])
        return logits, cache

    logits, cache = run(frozen, tokens)
    eager_logits, eager_cache = interp.run_with_cache(
        interp.patch(model, {"blocks.0.output": interp.Add(1.0, positions=[3])}), tokens,
        names=["blocks.0.output", STATE],
    )
    np.testing.assert_allclose(logits_array(logits), logits_array(eager_logits), rtol=1e-6)
    np.testing.assert_allclose(values(cache[STATE]), values(eager_cache[STATE]), rtol=1e-6)
    added = np.asarray((cache["blocks.0.output"] - clean[1]["blocks.0.output"]).unwrap("batch", "seq", "embedding"))
    expected = np.zeros_like(added)
    expected[:, 3] = 1.0
    np.testing.assert_allclose(added, expected, atol=1e-5)


def test_logit_lens_ends_with_the_logits(model, tokens, clean):
    lens = interp.logit_lens(model, tokens)
    assert dict(lens.named_shape) == {"layers": 4, "batch": 2, "seq": 9, "vocabulary": 61}
    np.testing.assert_allclose(
        lens[{"layers": -1}].unwrap("batch", "seq", "vocabulary"), logits_array(clean[0]), rtol=1e-5, atol=1e-5
    )


def test_activation_patching_table(model):
    clean = pz.nx.wrap(jnp.array([[5, 9, 14, 3, 22, 7]]), "batch", "seq")
    corrupted = pz.nx.wrap(jnp.array([[5, 9, 40, 3, 22, 7]]), "batch", "seq")
    metric = interp.logit_difference(11, 12)
    result = interp.activation_patching(model, clean, corrupted, metric, names=["embeddings", "blocks.*.output"])
    assert result.sites == ("embeddings", "blocks.0.output", "blocks.1.output", "blocks.2.output")
    table = np.asarray(result.patched.unwrap("layers", "seq"))[1:]
    assert table.shape == (3, 6)
    # Before the corrupted token nothing differs; the last block's output at the
    # last position is the whole clean computation for the metric.
    np.testing.assert_allclose(table[:, :2], result.corrupted, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(table[2, 5], result.clean, rtol=1e-5, atol=1e-5)
    # Patching the corrupted token's embedding restores everything; in a
    # block, the corruption has already flowed into later positions' states.
    embeddings = np.asarray(result.patched.unwrap("layers", "seq"))[0]
    np.testing.assert_allclose(embeddings[2], result.clean, rtol=1e-4, atol=1e-4)
    assert abs(table[0, 2] - result.clean) > 1e-4
    # Each entry is one ordinary patched run.
    one = interp.patch(model, {"blocks.1.output": interp.Replace(
        interp.run_with_cache(model, clean, names="blocks.1.output")[1]["blocks.1.output"], positions=[3])})
    np.testing.assert_allclose(table[1, 3], float(metric(one(corrupted))), rtol=1e-5, atol=1e-5)
    normalized = np.asarray(result.normalized().unwrap("layers", "seq"))
    np.testing.assert_allclose(normalized[3, 5], 1.0, rtol=1e-4)


def test_sampling_mode_has_the_same_sites(model, tokens, clean):
    sampler = to_sampling_mode(model, batch_size=2)
    names = interp.site_names(sampler)
    assert names == interp.site_names(model)
    _, cache = interp.run_with_cache(sampler, tokens, names=STATE)
    np.testing.assert_allclose(values(cache[STATE]), values(clean[1][STATE]), rtol=1e-5, atol=1e-6)


def test_custom_hook_with_selectors(model, tokens, clean):
    @pz.pytree_dataclass
    class Clip(sites.Hook):
        limit: float

        def __call__(self, x, /, **_):
            return pz.nx.nmap(jnp.minimum)(x, self.limit)

    clipped = pz.select(model).at(
        lambda m: m.blocks.sublayers[0].temporal_block.rg_lru.input_gate_value
    ).set(Clip(0.5))
    _, cache = interp.run_with_cache(clipped, tokens, names="blocks.0.**.input_gate_value")
    assert float(values(next(iter(cache.values()))).max()) <= 0.5


def test_bad_interventions_name_the_problem(model, tokens):
    with pytest.raises(ValueError, match="no site matches 'blocks.9.output'"):
        interp.patch(model, {"blocks.9.output": interp.Replace(0.0)})
    with pytest.raises(ValueError, match="recurrent state: it has no heads"):
        interp.patch(model, {STATE: interp.Replace(0.0, heads=[0])})
    with pytest.raises(ValueError, match="cannot select 'heads'"):
        interp.patch(model, {"blocks.0.output": interp.Replace(0.0, heads=[0])})(tokens)
    wrong = pz.nx.zeros({"embedding": 7})
    with pytest.raises(ValueError, match="does not fit the activation"):
        interp.patch(model, {"blocks.0.output": interp.Replace(wrong)})(tokens)
    with pytest.raises(TypeError, match="not an interp intervention"):
        interp.patch(model, {"blocks.0.output": 0.0})
    other = pz.nx.wrap(jnp.zeros((1, 4), jnp.int32), "batch", "seq")
    with pytest.raises(ValueError, match="same shape"):
        interp.activation_patching(model, tokens, other, interp.logit_difference(1, 2))
