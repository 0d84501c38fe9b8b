"""H3 model and SSM layers: float64 references, FFT == scan, packing, sampling, errors.

Parity with the original implementation is in
`tests/checkpoints_conversion/test_h3_conversion.py` (the shared fixture).
"""

import math

import jax
import numpy as np
import pytest
from griffin_cases import on_device
from penzai import pz
from streams import context, run_fresh

from recurrent_lm import checkpoint
from recurrent_lm.layers import ssm
from recurrent_lm.models import h3
from recurrent_lm.params import abstract_parameters, parameter_values
from recurrent_lm.sampling import generate, to_sampling_mode


def named(array, *names):
    return pz.nx.wrap(on_device(array)).tag(*names)


def rel(ours, theirs) -> float:
    ours = np.asarray(ours).astype(np.result_type(np.float64, np.asarray(ours).dtype))
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def packed_positions(seq):
    """Row 0: one document; row 1: three packed documents; row 2: left padding."""
    pos = np.stack([np.arange(seq), np.arange(seq), np.arange(seq) - 5])
    pos[1, 7:] = np.arange(seq - 7)
    pos[1, 20:] = np.arange(seq - 20)
    pos[2, :5] = -1
    return pos.astype(np.int32)


# ---------------------------------------------------------------------------
# The diagonal SSM against a float64 NumPy recurrence.
# ---------------------------------------------------------------------------

H, MODES, SEQ = 6, 5, 160


def random_diagonal(discretisation, method, seed=0):
    rng = np.random.default_rng(seed)
    shape = {"heads": H, "state": MODES}
    values = {
        "log_dt": rng.uniform(math.log(1e-3), math.log(1e-1), H),
        "inv_A_real": np.log(rng.uniform(0.05, 1.0, (H, MODES))),
        "A_imag": math.pi * np.arange(MODES) + rng.normal(0, 0.3, (H, MODES)),
        "B_re": rng.normal(1.0, 0.3, (H, MODES)),
        "B_im": rng.normal(0, 0.3, (H, MODES)),
        "C_re": rng.normal(0, 0.7, (H, MODES)),
        "C_im": rng.normal(0, 0.7, (H, MODES)),
        "D": rng.normal(0, 1, H),
    }
    params = {
        k: pz.Parameter(
            value=named(v.astype(np.float32), *(shape if v.ndim == 2 else ["heads"])),
            label=k,
        )
        for k, v in values.items()
    }
    layer = ssm.DiagonalSSM(**params, discretisation=discretisation, method=method)
    return layer, {
        k: v.astype(np.float32).astype(np.float64) for k, v in values.items()
    }


def reference_diagonal(p, z, starts, discretisation, h0=None):
    """float64 step-by-step recurrence; z [B, T, H], starts [B, T]."""
    dt = np.exp(p["log_dt"])[:, None]
    a = -np.exp(p["inv_A_real"]) + 1j * p["A_imag"]
    b = p["B_re"] + 1j * p["B_im"]
    c = p["C_re"] + 1j * p["C_im"]
    if discretisation == "bilinear":
        d_a = (1 + dt * a / 2) / (1 - dt * a / 2)
        d_b = dt * b / (1 - dt * a / 2)
    else:
        d_a = np.exp(dt * a)
        d_b = b * (d_a - 1) / a
    h = np.zeros((z.shape[0], H, MODES), complex) if h0 is None else h0.astype(complex)
    ys = []
    for t in range(z.shape[1]):
        h = np.where(starts[:, t, None, None], 0, h)
        h = d_a * h + d_b * z[:, t, :, None]
        ys.append(2 * np.sum(c * h, -1).real + p["D"] * z[:, t])
    return np.stack(ys, 1), h


@pytest.mark.parametrize("discretisation", ["bilinear", "zoh"])
@pytest.mark.parametrize("method", ["fft", "scan"])
def test_diagonal_ssm_against_float64(discretisation, method):
    layer, params = random_diagonal(discretisation, method)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(3, SEQ, H)).astype(np.float32)
    pos = packed_positions(SEQ)
    starts = pos == 0
    h0 = (rng.normal(size=(3, H, MODES)) + 1j * rng.normal(size=(3, H, MODES))).astype(
        np.complex64
    )
    run = jax.jit(
        lambda z, pos, h0: layer.forward(
            named(z, "batch", "seq", "heads"),
            context(named(pos, "batch", "seq"), stream_offset=0),
            named(h0, "batch", "heads", "state"),
        )
    )
    # One plain row (the FFT route), then packed and padded rows.
    for rows in ([0], [0, 1, 2]):
        for state in (h0[rows],):
            y, h_last = run(z[rows], pos[rows], state)
            y_ref, h_ref = reference_diagonal(
                params, z[rows].astype(np.float64), starts[rows], discretisation, state
            )
            assert rel(y.unwrap("batch", "seq", "heads"), y_ref) <= 2e-5
            assert rel(h_last.unwrap("batch", "heads", "state"), h_ref) <= 2e-5


def test_fft_and_scan_agree_on_long_rows():
    layer, _ = random_diagonal("bilinear", "fft", seed=3)
    z = named(
        np.random.default_rng(2).normal(size=(2, 1024, H)).astype(np.float32),
        "batch",
        "seq",
        "heads",
    )
    pos = named(
        np.broadcast_to(np.arange(1024, dtype=np.int32), (2, 1024)), "batch", "seq"
    )
    run = lambda method: jax.jit(
        lambda z, p: run_fresh(ssm.with_ssm_method(layer, method), z, p)
    )(z, pos)
    (y_fft, h_fft), (y_scan, h_scan) = run("fft"), run("scan")
    assert (
        rel(
            y_fft.unwrap("batch", "seq", "heads"),
            np.asarray(y_scan.unwrap("batch", "seq", "heads")),
        )
        <= 1e-5
    )
    assert (
        rel(
            h_fft.unwrap("batch", "heads", "state"),
            np.asarray(h_scan.unwrap("batch", "heads", "state")),
        )
        <= 1e-5
    )


def test_shift_ssm_against_the_original_register():
    """The original's step: s_t = shift(s_{t-1}) + B k_t, y = C . s_t + D k_t."""
    rng = np.random.default_rng(4)
    n = 8
    b, c, d = rng.normal(size=(H, n)), rng.normal(size=(H, n)), rng.normal(size=H)
    param = lambda v, label, *names: pz.Parameter(
        value=named(v.astype(np.float32), *names), label=label
    )
    layer = ssm.ShiftSSM(
        B=param(b, "B", "heads", "state"),
        C=param(c, "C", "heads", "state"),
        D=param(d, "D", "heads"),
    )
    pos = packed_positions(40)
    k = rng.normal(size=(3, 40, H)).astype(np.float32)
    y, history = jax.jit(
        lambda k, p: run_fresh(layer, named(k, "batch", "seq", "heads"), named(p, "batch", "seq"))
    )(k, pos)
    s = np.zeros((3, H, n))
    ys = []
    for t in range(40):
        s = np.where((pos[:, t] == 0)[:, None, None], 0, s)
        s = (
            np.concatenate([np.zeros((3, H, 1)), s[..., :-1]], -1)
            + b * k[:, t, :, None]
        )
        ys.append(np.sum(c * s, -1) + d * k[:, t])
    assert rel(y.unwrap("batch", "seq", "heads"), np.stack(ys, 1)) <= 1e-5
    assert rel(layer.register(history).unwrap("batch", "heads", "state"), s) <= 1e-5


# ---------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------

CONFIG = h3.H3Config.from_preset(
    "tiny",
    vocab_size=50,
    hidden_size=24,
    num_attention_heads=3,
    d_state=8,
    attn_layer_idx=(1,),
)


@pytest.fixture(scope="module")
def model():
    # Random init under one jit, then every parameter perturbed (zero biases and
    # unit norms would hide mistakes) and bound into the structure.
    values = jax.jit(lambda key: parameter_values(h3.build_model(CONFIG, key)))(
        jax.random.key(0)
    )
    rng = np.random.default_rng(1)
    noisy = [
        pz.Parameter(
            label=label,
            value=pz.nx.wrap(
                np.asarray(v.data_array)
                + 0.05 * rng.normal(size=v.data_array.shape).astype(np.float32)
            ).tag(*v.named_shape),
        )
        for label, v in values.items()
    ]
    return pz.bind_variables(h3.build_model(CONFIG, None), noisy)


def logits(model, ids, pos=None):
    pos = None if pos is None else named(pos, "batch", "seq")
    return np.asarray(
        model(named(ids, "batch", "seq"), segment_pos=pos).unwrap(
            "batch", "seq", "vocabulary"
        )
    )


@pytest.fixture(scope="module")
def inputs():
    seq = 33
    ids = (
        np.random.default_rng(5)
        .integers(0, CONFIG.vocab_size, (3, seq))
        .astype(np.int32)
    )
    return ids, packed_positions(seq)


@pytest.fixture(scope="module")
def full_logits(model, inputs):
    return logits(model, *inputs)


def test_packed_documents_equal_each_document_alone(model, inputs, full_logits):
    ids, _ = inputs
    spans = ((1, 0, 7), (1, 7, 20), (1, 20, ids.shape[1]), (2, 5, ids.shape[1]))
    # Each document alone at the start of a row (what follows it cannot matter).
    alone_ids = np.zeros((len(spans), ids.shape[1] - 5), np.int32)
    for row, (i, lo, hi) in enumerate(spans):
        alone_ids[row, : hi - lo] = ids[i, lo:hi]
    alone = logits(model, alone_ids)
    for row, (i, lo, hi) in enumerate(spans):
        assert rel(full_logits[i, lo:hi], alone[row, : hi - lo]) <= 1e-5


@pytest.mark.parametrize("chunk", [1, 3])
def test_sampling_chunks_equal_the_full_forward(model, inputs, full_logits, chunk):
    ids, pos = inputs
    sampler = to_sampling_mode(model, batch_size=3, max_length=ids.shape[1])
    pieces = []
    for lo in range(0, ids.shape[1], chunk):
        piece = slice(lo, lo + chunk)
        pieces.append(logits(sampler, ids[:, piece], pos[:, piece]))
    assert rel(np.concatenate(pieces, 1), full_logits) <= 1e-5


def test_greedy_generation_follows_the_full_forward(model):
    prompts = [[3, 17, 5, 9], [11, 2, 4, 8]]
    out = generate(model, prompts, max_new_tokens=6)
    # Teacher forcing: each generated token is the argmax after everything before it.
    full = np.asarray([p + g for p, g in zip(prompts, out.tokens)])
    predicted = np.argmax(logits(model, full[:, :-1]), -1)[:, len(prompts[0]) - 1 :]
    np.testing.assert_array_equal(predicted, full[:, len(prompts[0]) :])


def test_dropout_only_in_training_mode(model, inputs, full_logits):
    config = CONFIG
    assert pz.select(model).at_instances_of(pz.nn.StochasticDropout).count() == 0
    training = h3.training_mode(model)
    assert (
        pz.select(training).at_instances_of(pz.nn.StochasticDropout).count()
        == 2 * config.num_hidden_layers + 1
    )
    tokens, pos = named(inputs[0], "batch", "seq"), named(inputs[1], "batch", "seq")
    dropped = jax.jit(
        lambda key: training.forward(
            tokens, pos, random_stream=pz.RandomStream.from_base_key(key)
        ).unwrap("batch", "seq", "vocabulary")
    )(jax.random.key(0))
    assert not np.allclose(dropped, full_logits)
    np.testing.assert_array_equal(logits(h3.eval_mode(training), *inputs), full_logits)


def test_original_initialisation():
    config = h3.H3Config.from_preset("tiny", num_hidden_layers=2, d_state=64, max_position_embeddings=256)
    values = jax.jit(lambda key: parameter_values(h3.build_model(config, key)))(
        jax.random.key(2)
    )
    std = lambda label: float(np.std(values[label].data_array))
    assert abs(std("blocks.0.mixer.q_proj.weights") - 0.02) < 0.002
    assert (
        abs(std("blocks.0.mixer.output_linear.weights") - 0.02) < 0.002
    )  # not rescaled
    assert abs(std("embedder.embeddings") - 0.02) < 0.002
    assert abs(std("embedder.position_embeddings") - 0.02) < 0.002  # the original's nn.Embedding
    residual = 0.02 / math.sqrt(2 * config.num_hidden_layers)
    assert abs(std("blocks.0.mlp.down.weights") - residual) < 0.1 * residual
    assert abs(std("blocks.1.mixer.output.weights") - residual) < 0.1 * residual
    kernel = lambda name: np.asarray(
        values[f"blocks.0.mixer.kernel.{name}"].unwrap("heads", "state")
    )
    np.testing.assert_allclose(kernel("A_imag")[0], math.pi * np.arange(32), rtol=1e-6)
    np.testing.assert_allclose(kernel("inv_A_real"), math.log(0.5), rtol=1e-6)
    np.testing.assert_array_equal(kernel("B_re"), 1.0)
    assert abs(np.var(kernel("C_re")) - 0.5) < 0.06
    log_dt = np.asarray(values["blocks.0.mixer.kernel.log_dt"].data_array)
    assert log_dt.min() >= math.log(1e-3) and log_dt.max() <= math.log(1e-1)
    shift_b = np.asarray(values["blocks.0.mixer.ssm_k.B"].unwrap("heads", "state"))
    np.testing.assert_array_equal(shift_b, np.eye(64)[0][None].repeat(64, 0))
    shift_c = np.asarray(values["blocks.0.mixer.ssm_k.C"].data_array)
    assert np.abs(shift_c).max() <= 1 / 8 and np.abs(shift_c).max() > 0.1
    np.testing.assert_array_equal(values["blocks.0.norm1.scale"].data_array, 1.0)


def test_presets_match_the_released_sizes():
    count = lambda name: sum(
        math.prod(v.named_shape.values())
        for v in abstract_parameters(
            lambda key: h3.build_model(h3.H3Config.from_preset(name), key)
        ).values()
    )
    assert count("125m") == 126_387_456  # the released 125M (tie counted once)
    config = h3.H3Config.from_preset("2.7b-2attn-rotary")
    assert config.attn_layer_idx == (10, 21) and config.rotary_emb_dim == 64


def test_save_and_load_round_trip(model, inputs, full_logits, tmp_path):
    checkpoint.save(model, tmp_path / "h3")
    again = checkpoint.load(tmp_path / "h3")
    assert again.config == model.config
    np.testing.assert_array_equal(logits(again, *inputs), full_logits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"attn_layer_idx": (5,)}, "attn_layer_idx has \\[5\\]"),
        ({"num_attention_heads": 5}, "does not divide hidden_size"),
        ({"discretisation": "euler"}, "discretisation must be one of \\('bilinear', 'zoh'\\), got 'euler'"),
        ({"ssm_mode": "nplr"}, "ssm_mode must be one of \\('diag',\\), got 'nplr'"),
        ({"d_state": 7}, "d_state must be even"),
        ({"head_dim": 2}, "head_dim must be 1 .*got 2"),
        ({"embedding_dropout": 1.5}, "embedding_dropout must be in"),
        ({"rotary_emb_dim": 3}, "rotary_emb_dim must be even"),
        ({"rotary_emb_dim": 18}, "rotary_emb_dim must be even and in \\[0, attention head dim 16\\]"),
        ({"max_position_embeddings": -1}, "max_position_embeddings must be a non-negative integer"),
        ({"attention_softmax_scale": 0.0}, "attention_softmax_scale must be > 0"),
    ],
)
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        h3.H3Config.from_preset("tiny", **overrides)


def test_heads_matter_only_with_attention_layers():
    config = h3.H3Config.from_preset("tiny", attn_layer_idx=(), num_attention_heads=5)
    assert config.attn_layer_idx == ()
    with pytest.raises(ValueError, match="num_attention_heads 5 does not divide hidden_size 64"):
        h3.H3Config.from_preset("tiny", num_attention_heads=5)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="missing axes \\['seq'\\]"):
        model(named(np.zeros((2, 5), np.int32), "batch", "time"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(named(np.full((1, 3), CONFIG.vocab_size), "batch", "seq"))
    with pytest.raises(ValueError, match="unknown SSM method"):
        ssm.with_ssm_method(model, "conv")
    with pytest.raises(ValueError, match="unknown H3Config preset"):
        h3.H3Config.from_preset("7b")
    with pytest.raises(ValueError, match="unknown H3Config fields"):
        h3.H3Config.from_dict({"hidden_sise": 3})


def test_forward_has_no_quadratic_cumulative_ops(model, inputs):
    """cumsum-like ops lower to O(T^2) reduce_window on XLA:CPU (JAX 0.10)."""
    skeleton, frozen = pz.unbind_params(model, freeze=True)
    for method in ssm.SSM_METHODS:
        layer = ssm.with_ssm_method(skeleton, method)

        def forward(values, ids, pos, layer=layer):
            tokens, pos = named(ids, "batch", "seq"), named(pos, "batch", "seq")
            return layer.bind_variables(values).forward(tokens, pos).data_array

        text = str(jax.make_jaxpr(forward)(frozen, *inputs))
        for op in ("cumsum", "cumlogsumexp", "cumprod", "cummax", "reduce_window"):
            assert op not in text, f"{op} in the {method} forward"
