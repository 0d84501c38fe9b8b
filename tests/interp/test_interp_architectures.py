"""`recurrent_lm.interp` on every architecture: capture, write-back (to float32 rounding),
recurrent-state patching that only changes later positions, and jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from griffin_cases import on_device
from penzai import pz

from recurrent_lm import interp
from recurrent_lm.models import gemma, griffin, h3, mamba, mamba2, rwkv, rwkv7

SEQ = 8
STATE_PATCH_AT = 3


def perturbed(model, seed=0, scale=0.2):
    """Random offsets on every parameter (zero-initialised projections too)."""
    rng = np.random.default_rng(seed)  # NumPy: eager jax.random compiles once per shape
    done = {}  # a tied parameter appears twice: perturb it once

    def perturb(param):
        if param.label not in done:
            value = param.value
            names = tuple(value.named_shape)
            array = np.asarray(value.unwrap(*names))
            array = array + scale * rng.standard_normal(array.shape).astype(array.dtype)
            done[param.label] = pz.Parameter(value=pz.nx.wrap(on_device(array)).tag(*names), label=param.label)
        return done[param.label]

    return pz.select(model).at_instances_of(pz.Parameter).apply(perturb)


# name -> (builder, recurrent state site, first output position the state at t changes)
ARCHITECTURES = {
    "griffin": (
        lambda: griffin.build_model(griffin.GriffinConfig(
            vocab_size=53, hidden_size=16, num_attention_heads=2, intermediate_size=24,
            num_hidden_layers=3, attention_window_size=4), jax.random.key(0)),
        "blocks.1.temporal_block.rg_lru.hidden_state", 0,
    ),
    "rwkv": (
        lambda: perturbed(rwkv.build_model(rwkv.RwkvConfig(
            vocab_size=53, hidden_size=16, num_hidden_layers=2, attention_hidden_size=12,
            intermediate_size=20), jax.random.key(0))),
        "blocks.1.temporal_block.state", 1,  # wkv_t reads the state before t
    ),
    "rwkv7": (
        lambda: perturbed(rwkv7.build_model(rwkv7.Rwkv7Config(
            vocab_size=53, hidden_size=16, num_hidden_layers=2, head_size=8, decay_low_rank=3,
            rate_low_rank=3, value_low_rank=2, gate_low_rank=4, intermediate_size=20),
            jax.random.key(0))),
        "blocks.1.temporal_block.state", 0,  # y_t reads the state after t
    ),
    "gemma": (
        lambda: gemma.build_model(gemma.GemmaConfig(
            vocabulary_size=53, num_layers=2, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=16, intermediate_dim=32, head_dim=8, use_post_ffw_norm=True,
            use_post_attention_norm=True, attention_logit_soft_cap=50.0,
            final_logit_soft_cap=30.0, sliding_window_size=4), jax.random.key(0)),
        None, None,
    ),
    "h3": (
        lambda: perturbed(h3.build_model(h3.H3Config.from_preset(
            "tiny", vocab_size=53, hidden_size=16, num_hidden_layers=2, d_state=4,
            n_inner=32, num_attention_heads=2, attn_layer_idx=(1,)), jax.random.key(0)), scale=0.05),
        "blocks.0.temporal_block.0.kernel.state", 0,
    ),
    "mamba": (
        lambda: perturbed(mamba.build_model(mamba.MambaConfig(
            vocab_size=53, hidden_size=16, num_hidden_layers=2, state_size=4), jax.random.key(0))),
        "blocks.1.temporal_block.state", 0,  # y_t reads the state after t
    ),
    "mamba2": (
        lambda: perturbed(mamba2.build_model(mamba2.Mamba2Config(
            vocab_size=53, hidden_size=16, num_hidden_layers=2, head_dim=8, state_size=4,
            n_groups=2), jax.random.key(0))),
        "blocks.1.temporal_block.state", 0,  # y_t reads the state after t
    ),
}


RECURRENT = sorted(name for name, (_, state_site, _) in ARCHITECTURES.items() if state_site)
_BUILT = {}


def _setup(name):
    """(model, tokens, clean run, state site, lag), built once per architecture."""
    if name not in _BUILT:
        build, state_site, lag = ARCHITECTURES[name]
        model = build()
        ids = jax.random.randint(jax.random.key(1), (2, SEQ), 0, 53)
        tokens = pz.nx.wrap(ids, "batch", "seq")
        _BUILT[name] = (model, tokens, interp.run_with_cache(model, tokens), state_site, lag)
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def setup(request):
    return _setup(request.param)


@pytest.fixture(scope="module", params=RECURRENT)
def recurrent_setup(request):
    return _setup(request.param)


def logits_array(x):
    return np.asarray(x.unwrap("batch", "seq", "vocabulary"))


def test_capture_covers_the_residual_stream(setup):
    model, tokens, (logits, cache), _, _ = setup
    names = list(cache)
    assert names[0] == "embeddings"
    outputs = [n for n in names if n.startswith("blocks.") and n.count(".") == 2 and n.endswith(".output")]
    assert len(outputs) == len(model.blocks.sublayers)
    lens = interp.logit_lens(model, tokens)
    np.testing.assert_allclose(lens[{"layers": -1}].unwrap("batch", "seq", "vocabulary"),
                               logits_array(logits), rtol=1e-4, atol=1e-4)


def test_writing_back_gives_the_same_logits(setup):
    """Replacing the state (or the attention pattern) at one position by its own
    captured value changes nothing. Compiled, the patched program may fuse
    differently, so the bound is float32 rounding; bitwise exactness op by op is
    `tests/interp/test_interp.py`'s (Griffin, four sites): op by op here would
    compile ~150 kernels per architecture."""
    model, tokens, (logits, _), state_site, _ = setup
    name = state_site or "blocks.0.temporal_block.pattern"
    _, cache = interp.run_with_cache(model, tokens, names=name)
    patched = interp.patch(model, {name: interp.Replace(cache[name], positions=[STATE_PATCH_AT])})
    got, expected = logits_array(patched(tokens)), logits_array(logits)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    # A wrong value written there does change them (the bound above can fail).
    wrong = interp.patch(model, {name: interp.Replace(cache[name] * 0.0 + 0.5, positions=[STATE_PATCH_AT])})
    assert np.abs(logits_array(wrong(tokens)) - expected).max() > 1e-4


def test_state_patch_changes_only_later_outputs(recurrent_setup):
    model, tokens, (logits, cache), state_site, lag = recurrent_setup
    value = cache[state_site] * 0.0 + 0.5
    patched = interp.patch(model, {state_site: interp.Replace(value, positions=[STATE_PATCH_AT])})
    delta = np.abs(logits_array(patched(tokens)) - logits_array(logits)).max(axis=(0, 2))
    first = STATE_PATCH_AT + lag
    assert np.all(delta[:first] < 1e-5), delta
    assert np.all(delta[first:] > 1e-4), delta


def test_patch_and_capture_under_jit(setup):
    model, tokens, (logits, cache), _, _ = setup

    width = cache["blocks.0.output"].named_shape["embedding"]
    # Not constant over "embedding": LayerNorm would remove a constant shift.
    delta = pz.nx.wrap(jnp.linspace(-1.0, 1.0, width), "embedding")

    @jax.jit
    def run(frozen, tokens, delta):
        patched = interp.patch(frozen, {"blocks.0.output": interp.Add(delta, positions=[-1])})
        return interp.run_with_cache(patched, tokens, names="blocks.*.output")

    new_logits, new_cache = run(pz.freeze_params(model), tokens, delta)
    delta = np.abs(logits_array(new_logits) - logits_array(logits)).max(axis=(0, 2))
    assert np.all(delta[:-1] < 1e-5) and delta[-1] > 1e-4
    added = np.asarray((new_cache["blocks.0.output"] - cache["blocks.0.output"]).unwrap("batch", "seq", "embedding"))
    np.testing.assert_allclose(added[:, -1], np.broadcast_to(np.linspace(-1, 1, width), added[:, -1].shape), atol=1e-5)
    np.testing.assert_allclose(added[:, :-1], 0.0, atol=1e-5)
