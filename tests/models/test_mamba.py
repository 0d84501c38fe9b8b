"""Mamba-1 and Mamba-2 against transformers (pure torch, CPU, float32), and on
their own: every scan form, sampling mode in uneven chunks, packed rows,
generation, sites, scanned layers, presets, init and config errors.

The models are random HF ones, every parameter perturbed, loaded through the
converter (`mamba_cases`); the converter's own round trips are in
tests/checkpoints_conversion/test_mamba_hf.py.
"""

import jax
import numpy as np
import pytest
from griffin_cases import documents, max_relative_error, named_tokens, segment_layout
from mamba_cases import (
    CASES,
    M1_CASES,
    M2_CASES,
    case_ids,
    hf_directory,
    hf_logits,
    our_model,
    positions,
)
from penzai import pz

import recurrent_lm
from checkpoints_conversion import mamba as convert
from recurrent_lm import interp, lora
from recurrent_lm.core import registry
from recurrent_lm.models import mamba, mamba2
from recurrent_lm.params import abstract_parameters, parameter_values
from recurrent_lm.sampling import generate, to_sampling_mode

_call = pz.variable_jit(lambda model, tokens, pos: model(tokens, segment_pos=pos))
# Every case on the default (CPU: sequential) form; the other forms on a case each
# (Mamba-2's chunked on both: HF's own SSD chunks there are 4 and 5 long).
METHODS = [(name, None) for name in CASES] + list(zip(M1_CASES, ("associative", "chunked"), strict=True)) + [
    (name, "chunked") for name in M2_CASES]


def logits_of(model, ids, pos=None):
    if pos is None:
        pos = positions(*ids.shape)
    return np.asarray(_call(model, *named_tokens(ids, pos)).unwrap("batch", "seq", "vocabulary"))


def with_method(case, method):
    """Our model of `case` with a scan form (chunks of 4: several per row)."""
    if method is None:
        return our_model(case)
    chunk = {"scan_chunk_size": 4} if case.family == "mamba" else {}  # Mamba-2: the case's chunk_size
    return our_model(case, scan_method=method, **chunk)


@pytest.mark.parametrize(("name", "method"), METHODS)
def test_logits_match_transformers(name, method):
    case = CASES[name]
    model = with_method(case, method)
    assert model.config.scan_method == method
    ids = case_ids(case)
    error = max_relative_error(recurrent_lm.jit_forward(model)(ids), hf_logits(case, ids))
    print(f"{name} ({method or 'default'} scan): max relative error vs transformers {error:.2e}")
    assert error <= 1e-5


@pytest.mark.parametrize("name", ["m1_odd", "m2_groups"])
def test_sampling_in_uneven_chunks_matches_transformers(name):
    """Chunks of 5, 1, 3, then the rest, against HF's whole-sequence forward
    (HF's Mamba-1 torch path ignores its cache for chunks longer than one
    token: HF is the oracle of whole rows only). On the odd-width Mamba-1 and
    the grouped Mamba-2 (the other cases' whole rows: test_logits_match_transformers)."""
    case = CASES[name]
    model = our_model(case)
    ids = case_ids(case, seed=1)
    sampler = to_sampling_mode(model, batch_size=2)
    tokens, pos = named_tokens(ids, positions(*ids.shape))
    pieces, lo = [], 0
    for length in (5, 1, 3, case.seq - 9):
        piece = {"seq": pz.slice[lo:lo + length]}
        pieces.append(np.asarray(_call(sampler, tokens[piece], pos[piece]).unwrap("batch", "seq", "vocabulary")))
        lo += length
    error = max_relative_error(np.concatenate(pieces, axis=1), hf_logits(case, ids))
    print(f"{name}: sampling in chunks, max relative error vs transformers {error:.2e}")
    assert error <= 1e-5


@pytest.mark.parametrize("name", ["m1_odd", "m2_groups"])
def test_packed_and_padded_rows_equal_each_document_alone(name):
    """Packed and left-padded rows: each document's logits equal a run on it
    alone (the conv is cut and the state restarts at document starts), and
    feeding the packed rows in chunks (sampling mode) gives the same logits.
    (The chunked scan forms on packed rows: the float64 test below.)"""
    case = CASES[name]
    model = our_model(case)
    batch, seq = 4, case.seq
    ids = np.random.default_rng(3).integers(0, case.vocab, (batch, seq)).astype(np.int32)
    pos = segment_layout(batch, seq)
    packed = logits_of(model, ids, pos)
    docs = documents(pos)
    alone_ids = np.zeros((len(docs), seq), np.int32)
    for k, (row, lo, hi) in enumerate(docs):
        alone_ids[k, :hi - lo] = ids[row, lo:hi]
    alone = logits_of(model, alone_ids)
    for k, (row, lo, hi) in enumerate(docs):
        assert max_relative_error(packed[row, lo:hi], alone[k, :hi - lo]) <= 1e-5, (row, lo)
    assert sum(hi - lo for _, lo, hi in docs) == (pos >= 0).sum()
    sampler = to_sampling_mode(model, batch_size=batch)
    tokens, segment_pos = named_tokens(ids, pos)
    pieces, lo = [], 0
    for length in (4, 1, seq - 5):
        piece = {"seq": pz.slice[lo:lo + length]}
        pieces.append(np.asarray(_call(sampler, tokens[piece], segment_pos[piece]).unwrap("batch", "seq", "vocabulary")))
        lo += length
    assert max_relative_error(np.concatenate(pieces, axis=1), packed) <= 1e-5


@pytest.mark.parametrize("name", ["m1_odd", "m2_groups"])
def test_float64_parameters_run_in_float64_and_every_form_agrees(name):
    """With float64 parameters the recurrence and the sampling state are
    float64: the scan forms and chunked feeding of packed rows agree to
    float64 rounding (an exactness check float32 cannot make)."""
    case = CASES[name]
    ids = np.random.default_rng(4).integers(0, case.vocab, (4, case.seq)).astype(np.int32)
    pos = segment_layout(4, case.seq)
    with jax.enable_x64(True):
        model = convert.load_hf_checkpoint(hf_directory(case), param_dtype="float64")
        full = logits_of(model, ids, pos)
        assert full.dtype == np.float64
        chunked = convert.load_hf_checkpoint(hf_directory(case), param_dtype="float64",
                                             scan_method="chunked", **({"scan_chunk_size": 4} if case.family == "mamba" else {}))
        assert max_relative_error(logits_of(chunked, ids, pos), full) <= 1e-12
        sampler = to_sampling_mode(model, batch_size=4)
        tokens, segment_pos = named_tokens(ids, pos)
        pieces, lo = [], 0
        for length in (3, 1, case.seq - 4):
            piece = {"seq": pz.slice[lo:lo + length]}
            pieces.append(np.asarray(_call(sampler, tokens[piece], segment_pos[piece]).unwrap("batch", "seq", "vocabulary")))
            lo += length
        assert max_relative_error(np.concatenate(pieces, axis=1), full) <= 1e-12
        states = pz.select(sampler).at_instances_of(pz.StateVariable).get_sequence()
        assert {v.value.ssm.dtype for v in states if hasattr(v.value, "ssm")} == {np.dtype("float64")}


@pytest.mark.parametrize("name", ["m1_untied", "m2_tied"])
def test_generate_greedy_follows_the_full_forward(name):
    case = CASES[name]
    model = our_model(case)
    prompts = [[1, 5, 7, 2, 9], [3, 4]]
    out = generate(model, prompts, max_new_tokens=4)
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        logits = logits_of(model, np.asarray([prompt + tokens], np.int32))[0]
        for j, token in enumerate(tokens):
            assert int(np.argmax(logits[len(prompt) + j - 1])) == token


# ----------------------------------------------------------------------------- sites

SITES = {
    "mamba": {"x": ("inner",), "z": ("inner",), "conv1d.output": ("inner",), "ssm_input": ("inner",),
              "dt": ("inner",), "B": ("state",), "C": ("state",), "state": ("inner", "state"),
              "ssm_output": ("inner",)},
    "mamba2": {"z": ("heads", "projection"), "xbc": ("fused",), "conv1d.output": ("fused",),
               "dt": ("heads",), "x": ("heads", "projection"), "B": ("groups", "state"),
               "C": ("groups", "state"), "state": ("heads", "projection", "state"),
               "ssm_output": ("heads", "projection")},
}


@pytest.mark.parametrize("name", ["m1_odd", "m2_groups"])
def test_sites_capture_and_the_state_site_patches_the_recurrence(name):
    """Every mixer site is captured with its axes; capturing the state gives
    the primitive's logits and, at the last position, the sampling state;
    patching the state carries forward (``propagate=True``) or changes only
    the position patched (``propagate=False``, in the last block)."""
    case = CASES[name]
    model = our_model(case)
    ids = case_ids(case, seed=2)
    plain = logits_of(model, ids)
    last = case.kwargs["num_hidden_layers"] - 1
    prefix = f"blocks.{last}.temporal_block"
    names = [f"{prefix}.{site}" for site in SITES[case.family]]
    assert set(names) <= set(interp.site_names(model))
    logits, cache = interp.run_with_cache(model, named_tokens(ids), names=names)
    assert max_relative_error(logits.unwrap("batch", "seq", "vocabulary"), plain) <= 1e-6
    for site, own_axes in SITES[case.family].items():
        assert set(cache[f"{prefix}.{site}"].named_shape) == {"batch", "seq", *own_axes}, site
    states = cache[f"{prefix}.state"]
    sampler = to_sampling_mode(model, batch_size=2)
    _call(sampler, *named_tokens(ids, positions(*ids.shape)))
    held = pz.select(sampler).at_instances_of(pz.StateVariable).where(
        lambda v: v.label == f"sampler.{prefix}").get_sequence()[0].value.ssm
    state_axes = ("batch", *SITES[case.family]["state"])
    assert max_relative_error(states[{"seq": -1}].unwrap(*state_axes), held.unwrap(*state_axes)) <= 1e-6

    at = 4
    delta = states[{"seq": at}] * 0.5  # the batch rows' own states, halved
    for propagate in (True, False):
        patched = interp.patch(model, {f"{prefix}.state": interp.Add(delta, positions=[at])},
                               propagate=propagate)
        change = np.abs(logits_of(patched, ids) - plain).max(axis=(0, 2))
        assert change[:at].max() < 1e-6 and change[at] > 1e-4, change
        if propagate:
            assert (change[at + 1:] > 1e-6).all(), change
        else:
            assert change[at + 1:].max() < 1e-6, change


# ----------------------------------------------------------------------------- building

TINY = {"mamba": lambda: mamba.MambaConfig.from_preset("tiny", vocab_size=64, num_hidden_layers=3),
        "mamba2": lambda: mamba2.Mamba2Config.from_preset("tiny", vocab_size=64, num_hidden_layers=3,
                                                          n_groups=2)}
BUILD = {"mamba": mamba.build_model, "mamba2": mamba2.build_model}


@pytest.fixture(scope="module", params=sorted(TINY))
def fresh(request):
    config = TINY[request.param]()
    return request.param, BUILD[request.param](config, jax.random.key(1))


def test_build_model_uses_hf_initialisation(fresh):
    family, model = fresh
    config = model.config
    values = {k: np.asarray(v.unwrap(*v.named_shape)) for k, v in parameter_values(model).items()}
    mixer = "layers.1.mixer."
    np.testing.assert_allclose(values["norm_f.scale"], 1.0)
    np.testing.assert_allclose(values["layers.2.norm.scale"], 1.0)
    np.testing.assert_allclose(values[mixer + "D"], 1.0)
    np.testing.assert_allclose(values[mixer + "conv1d.bias"], 0.0)
    a_log = values[mixer + "A_log"]
    ramp = np.log(np.arange(1, a_log.shape[-1 if family == "mamba" else 0] + 1))
    np.testing.assert_allclose(a_log, np.broadcast_to(ramp, a_log.shape), rtol=1e-6)
    bias = values[mixer + ("dt_proj.bias" if family == "mamba" else "dt_bias")]
    dt = np.log1p(np.exp(bias))
    assert dt.min() >= config.time_step_min * 0.999 and dt.max() <= config.time_step_max * 1.001
    embeddings = values["embeddings.embeddings"]
    assert abs(embeddings.std() - config.initializer_range) < 0.01
    width = config.intermediate_size
    assert np.abs(values[mixer + "out_proj.weights"]).max() <= 1 / np.sqrt(width)
    assert np.abs(values[mixer + "conv1d.weights"]).max() <= 1 / np.sqrt(config.conv_kernel)
    ids = np.arange(10, dtype=np.int32).reshape(1, 10)
    assert np.isfinite(logits_of(model, ids)).all()


def test_scanned_layers_give_the_same_logits(fresh):
    _, model = fresh
    ids = np.random.default_rng(0).integers(0, 64, (2, 9)).astype(np.int32)
    pos = segment_layout(2, 9)
    scanned = recurrent_lm.scan_layers(model, "block")
    assert [type(b).__name__ for b in scanned.blocks.sublayers] == ["ScannedBlocks"]
    assert max_relative_error(logits_of(scanned, ids, pos), logits_of(model, ids, pos)) <= 1e-6


def test_lora_adapts_every_projection(fresh):
    """LoRA wraps the mixers' Linear layers (x_proj included: the mixer reads
    dt's rank from its output); zero-initialised adapters keep the logits."""
    family, model = fresh
    adapted = lora.enable_lora(model, 2)
    projections = {"mamba": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}
    labels = {label.rsplit(".", 2)[0] for label in lora.adapter_values(adapted)}
    assert labels == {f"layers.{i}.mixer.{p}" for i in range(3) for p in projections[family]}
    ids = np.arange(10, dtype=np.int32).reshape(1, 10)
    assert max_relative_error(logits_of(adapted, ids), logits_of(model, ids)) <= 1e-6


def parameter_count(config_class, build, preset):
    config = config_class.from_preset(preset)
    params = abstract_parameters(lambda key: build(config, key))
    return sum(int(np.prod(list(v.named_shape.values()))) for v in params.values())


def test_presets_have_the_released_sizes():
    expected = {"130m": (768, 24, 48), "370m": (1024, 48, 64), "790m": (1536, 48, 96),
                "1.4b": (2048, 48, 128), "2.8b": (2560, 64, 160)}
    for preset, (width, layers, rank) in expected.items():
        config = mamba.MambaConfig.from_preset(preset)
        assert (config.hidden_size, config.num_hidden_layers, config.time_step_rank) == (width, layers, rank)
        assert (config.vocab_size, config.state_size, config.intermediate_size) == (50280, 16, 2 * width)
        assert config.tie_word_embeddings
    heads = {"130m": (768, 24, 24), "370m": (1024, 48, 32), "780m": (1536, 48, 48),
             "1.3b": (2048, 48, 64), "2.7b": (2560, 64, 80)}
    for preset, (width, layers, count) in heads.items():
        config = mamba2.Mamba2Config.from_preset(preset)
        assert (config.hidden_size, config.num_hidden_layers, config.num_heads) == (width, layers, count)
        assert (config.vocab_size, config.state_size, config.head_dim, config.n_groups) == (50288, 128, 64, 1)
        assert config.tie_word_embeddings and config.chunk_size == 256
    # state-spaces/mamba-130m-hf and mamba2-130m: 24 blocks of 3.77 M, 38.6 M embeddings.
    assert parameter_count(mamba.MambaConfig, mamba.build_model, "130m") == 129_135_360
    assert parameter_count(mamba2.Mamba2Config, mamba2.build_model, "130m") == 128_989_632
    for name, config_class in (("mamba", mamba.MambaConfig), ("mamba2", mamba2.Mamba2Config)):
        assert registry.get(name).config_class is config_class
        small = config_class.from_preset("tiny", hidden_size=64)
        assert config_class.from_dict(small.to_dict()) == small


@pytest.mark.parametrize(
    ("config_class", "overrides", "message"),
    [
        (mamba.MambaConfig, {"hidden_act": "gelu"}, "hidden_act must be one of \\('silu',\\)"),
        (mamba.MambaConfig, {"time_step_rank": 0}, 'time_step_rank must be "auto" or a positive integer'),
        (mamba.MambaConfig, {"time_step_min": 0.5}, "time_step_min 0.5 exceeds time_step_max 0.1"),
        (mamba.MambaConfig, {"scan_method": "parallel"}, "scan_method must be one of"),
        (mamba2.Mamba2Config, {"num_heads": 100}, "num_heads \\* head_dim = 6400 but expand \\* hidden_size = 8192"),
        (mamba2.Mamba2Config, {"n_groups": 3}, "n_groups 3 does not divide num_heads 128"),
        (mamba2.Mamba2Config, {"head_dim": 60}, "head_dim 60 does not divide expand \\* hidden_size = 8192"),
        (mamba2.Mamba2Config, {"time_step_limit": (0.5, 0.1)}, "time_step_limit must be a pair \\(low, high\\)"),
        (mamba2.Mamba2Config, {"scan_method": "associative"}, "scan_method must be one of"),
    ],
)
def test_bad_config_values(config_class, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_class(**overrides)


# ----------------------------------------------------------------------------- the fused scan


def _selective_inputs(rng, steps, inner, size, dtype):
    """Random named inputs of `selective_scan` with two batch axes, resets and h0."""
    wrap = lambda x, *names: pz.nx.wrap(jax.numpy.asarray(x, dtype)).tag(*names)
    u = wrap(rng.standard_normal((2, 3, steps, inner)), "batch", "heads", "seq", "inner")
    dt = wrap(rng.uniform(0.01, 0.5, (2, 3, steps, inner)), "batch", "heads", "seq", "inner")
    a = wrap(-rng.uniform(0.1, 2.0, (inner, size)), "inner", "state")
    b = wrap(rng.standard_normal((2, steps, size)), "batch", "seq", "state")  # broadcast over heads
    c = wrap(rng.standard_normal((2, 3, steps, size)), "batch", "heads", "seq", "state")
    reset = pz.nx.wrap(jax.numpy.asarray(rng.random((2, steps)) < 0.2)).tag("batch", "seq")
    h0 = wrap(rng.standard_normal((2, 3, inner, size)), "batch", "heads", "inner", "state")
    return u, dt, a, b, c, reset, h0


def _materialised_selective(u, dt, a, b, c, reset, h0, method):
    """The path of a captured state site: `linear_scan` on the [T, inner, N]
    decays and inputs, then ``C . h``."""
    from recurrent_lm.layers import recurrence

    decay = pz.nx.nmap(jax.numpy.exp)(dt * a)
    h, last = recurrence.linear_scan(decay, (dt * u) * b, h0=h0, reset=reset, method=method)
    return pz.nx.nmap(jax.numpy.sum)((h * c).untag("state")), last


@pytest.mark.parametrize(("steps", "inner", "block"), [(9, 10, 4), (1, 6, 96), (7, 8, 8)])
@pytest.mark.parametrize("x64", [False, True])
def test_fused_selective_scan_equals_the_materialised_scan(steps, inner, block, x64):
    """`selective_scan` (blocks that divide the channels or not, one step)
    gives `linear_scan`'s states and outputs: to float64 rounding in float64,
    float32 rounding in float32; h0, resets and broadcast batch axes alike."""
    from recurrent_lm.layers.mamba import selective_scan

    with jax.enable_x64(x64):
        dtype = np.float64 if x64 else np.float32
        inputs = _selective_inputs(np.random.default_rng(steps), steps, inner, 5, dtype)
        u, dt, a, b, c, reset, h0 = inputs
        y, last = selective_scan(u, dt, a, b, c, h0=h0, reset=reset, block=block)
        want_y, want_last = _materialised_selective(*inputs, "sequential")
        assert y.dtype == want_y.dtype == dtype and last.dtype == want_last.dtype
        order = ("batch", "heads", "seq", "inner")
        tolerance = 1e-12 if x64 else 1e-5
        assert max_relative_error(y.unwrap(*order), want_y.unwrap(*order)) <= tolerance
        state = ("batch", "heads", "inner", "state")
        assert max_relative_error(last.unwrap(*state), want_last.unwrap(*state)) <= tolerance
        # Without h0 (zeros) or resets.
        y, last = selective_scan(u, dt, a, b, c, block=block)
        want_y, _ = _materialised_selective(u, dt, a, b, c, None, None, "sequential")
        assert max_relative_error(y.unwrap(*order), want_y.unwrap(*order)) <= tolerance


@pytest.mark.parametrize("name", M1_CASES)
def test_the_fused_scan_equals_the_materialised_path_in_the_model(name):
    """The model on the fused scan (state site untouched) and on the
    materialised one (the state site captured) give the same logits, on
    packed rows with documents starting mid-row."""
    case = CASES[name]
    model = our_model(case)
    ids = np.random.default_rng(5).integers(0, case.vocab, (4, case.seq)).astype(np.int32)
    pos = segment_layout(4, case.seq)
    fused = logits_of(model, ids, pos)
    sites = [f"blocks.{i}.temporal_block.state" for i in range(case.kwargs["num_hidden_layers"])]
    tokens, segment_pos = named_tokens(ids, pos)
    logits, cache = interp.run_with_cache(model, tokens, segment_pos=segment_pos, names=sites)
    assert set(cache) == set(sites)
    assert max_relative_error(logits.unwrap("batch", "seq", "vocabulary"), fused) <= 1e-6
