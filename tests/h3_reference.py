"""A float64 NumPy H3 language model, read from the ORIGINAL code's state dict.

Written from the original sources, not from ours: HazyResearch/H3 @5c4d06b
(``src/models/ssm_seq.py`` SSMLMHeadModel, ``src/models/ssm/h3.py`` H3,
``ss_kernel_diag.py`` / ``ss_kernel_shift.py``) and flash-attention v0.2.8
(``modules/embedding.py`` GPT2Embeddings, ``modules/mha.py`` MHA and
SelfAttention, ``layers/rotary.py``, ``modules/block.py``), full-sequence
forward (the FFT-convolution path, here a direct causal sum: the same linear
convolution). It takes the original's names and keyword arguments, so tests
can check configurations the shipped fixtures do not cover (odd widths,
several attention layers, learned positions, ``softmax_scale``) and is itself
checked against those fixtures.
"""

import math

import numpy as np


def layer_norm(x, sd, name, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def causal_conv(x, kernel):
    """y[b, t, h] = sum_{s <= t} kernel[h, t - s] x[b, s, h]; kernel [H, >= T]."""
    steps = x.shape[1]
    y = np.zeros_like(x)
    for lag in range(steps):
        y[:, lag:] += kernel[:, lag] * x[:, : steps - lag]
    return y


def shift_kernel(sd, prefix, steps):
    """SSKernelShift: k[h, l] = sum_n B[h, n] C[h, n + l] for l < N, else 0."""
    b, c = sd[f"{prefix}.B"], sd[f"{prefix}.C"][0]
    size = b.shape[-1]
    k = np.zeros((b.shape[0], max(steps, size)))
    for lag in range(size):
        k[:, lag] = np.sum(b[:, : size - lag] * c[:, lag:], -1)
    return k[:, :steps]


def diag_kernel(sd, prefix, steps, disc="bilinear"):
    """SSKernelDiag (real_type 'exp'): K[h, l] = 2 Re sum_n C_n dB_n dA_n^l."""
    dt = np.exp(sd[f"{prefix}.log_dt"])[:, None]
    a = -np.exp(sd[f"{prefix}.inv_A_real"]) + 1j * sd[f"{prefix}.A_imag"]
    b = sd[f"{prefix}.B"][..., 0] + 1j * sd[f"{prefix}.B"][..., 1]
    c = sd[f"{prefix}.C"][0, ..., 0] + 1j * sd[f"{prefix}.C"][0, ..., 1]
    if disc == "bilinear":
        d_a = (1 + dt * a / 2) / (1 - dt * a / 2)
        d_b = dt * b / (1 - dt * a / 2)
    else:  # zoh
        d_a = np.exp(dt * a)
        d_b = b * (d_a - 1) / a
    powers = d_a[..., None] ** np.arange(steps)
    return 2 * np.einsum("hn,hnl->hl", c * d_b, powers).real


def h3_mixer(u, sd, p, disc):
    """H3.forward (head_dim 1): output_linear(q * DiagSSM(ShiftSSM(k) * v))."""
    steps = u.shape[1]
    q, k, v = (linear(u, sd, f"{p}.{n}") for n in ("q_proj", "k_proj", "v_proj"))
    k = causal_conv(k, shift_kernel(sd, f"{p}.ssm_k_kernel.kernel", steps)) + sd[f"{p}.ssm_k_D"] * k
    z = k * v
    y = causal_conv(z, diag_kernel(sd, f"{p}.kernel.kernel", steps, disc)) + sd[f"{p}.D"] * z
    return linear(q * y, sd, f"{p}.output_linear")


def rotate(x, positions, rotary_dim, base=10000.0):
    """flash-attn rotary: rotate-half pairs (j, j + rot/2) of the first rot features."""
    if not rotary_dim:
        return x
    half = rotary_dim // 2
    inv_freq = 1.0 / base ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    angle = positions[:, None] * inv_freq  # [T, rot/2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., rotary_dim:]], -1)


def mha(u, sd, p, attn_cfg):
    """MHA (causal, use_flash_attn False): fused Wqkv, rotary, -10000 causal mask."""
    batch, steps, width = u.shape
    heads = attn_cfg["num_heads"]
    dim = width // heads
    qkv = linear(u, sd, f"{p}.Wqkv").reshape(batch, steps, 3, heads, dim)
    rot = attn_cfg.get("rotary_emb_dim", 0)
    positions = np.arange(steps, dtype=np.float64)
    q, k, v = rotate(qkv[:, :, 0], positions, rot), rotate(qkv[:, :, 1], positions, rot), qkv[:, :, 2]
    scale = attn_cfg.get("softmax_scale") or 1 / math.sqrt(dim)
    scores = np.einsum("bthd,bshd->bhts", q, k * scale)
    scores = scores + np.triu(np.full((steps, steps), -10000.0), 1)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", probs, v).reshape(batch, steps, width)
    return linear(out, sd, f"{p}.out_proj")


def lm_logits(state_dict, kwargs, ids):
    """SSMLMHeadModel(**kwargs) forward on one document per row: ids [B, T] ->
    logits [B, T, padded vocab], float64 (eval mode: no dropout)."""
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
    eps = kwargs.get("layer_norm_epsilon", 1e-5)
    attn_layers = kwargs.get("attn_layer_idx") or ()
    disc = (kwargs.get("ssm_cfg") or {}).get("disc", "bilinear")
    table = sd["backbone.embeddings.word_embeddings.weight"]
    x = table[ids]
    if kwargs.get("max_position_embeddings", 0) > 0:  # GPT2Embeddings: arange(seqlen)
        x = x + sd["backbone.embeddings.position_embeddings.weight"][np.arange(ids.shape[1])]
    for i in range(kwargs["n_layer"]):
        p = f"backbone.layers.{i}"
        h = layer_norm(x, sd, f"{p}.norm1", eps)
        if i in attn_layers:
            x = x + mha(h, sd, f"{p}.mixer", kwargs.get("attn_cfg") or {})
        else:
            x = x + h3_mixer(h, sd, f"{p}.mixer", disc)
        h = layer_norm(x, sd, f"{p}.norm2", eps)
        x = x + linear(gelu_tanh(linear(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
    return layer_norm(x, sd, "backbone.ln_f", eps) @ table.T


def random_state_dict(kwargs, seed):
    """A state dict of ``SSMLMHeadModel(**kwargs)`` under the original names and
    shapes, every entry well-scaled noise (float32): a checkpoint of a
    configuration the fixtures do not cover."""
    rng = np.random.default_rng(seed)
    width, layers = kwargs["d_model"], kwargs["n_layer"]
    inner = kwargs.get("d_inner") or 4 * width
    multiple = kwargs.get("pad_vocab_size_multiple", 1)
    vocab = -(-kwargs["vocab_size"] // multiple) * multiple
    n = (kwargs.get("ssm_cfg") or {}).get("d_state", 64)
    attn_cfg = kwargs.get("attn_cfg") or {}
    noise = lambda scale, *shape: scale * rng.standard_normal(shape)
    sd = {"backbone.embeddings.word_embeddings.weight": noise(0.5, vocab, width)}
    if kwargs.get("max_position_embeddings", 0) > 0:
        sd["backbone.embeddings.position_embeddings.weight"] = noise(
            0.5, kwargs["max_position_embeddings"], width)

    def dense(name, out, into):
        sd[f"{name}.weight"] = noise(0.8 / math.sqrt(into), out, into)
        sd[f"{name}.bias"] = noise(0.1, out)

    def norm(name):
        sd[f"{name}.weight"] = 1 + noise(0.2, width)
        sd[f"{name}.bias"] = noise(0.1, width)

    for i in range(layers):
        p = f"backbone.layers.{i}"
        norm(f"{p}.norm1")
        norm(f"{p}.norm2")
        dense(f"{p}.mlp.fc1", inner, width)
        dense(f"{p}.mlp.fc2", width, inner)
        if i in (kwargs.get("attn_layer_idx") or ()):
            dense(f"{p}.mixer.Wqkv", 3 * width, width)
            dense(f"{p}.mixer.out_proj", width, width)
            rot = attn_cfg.get("rotary_emb_dim", 0)
            if rot:
                sd[f"{p}.mixer.rotary_emb.inv_freq"] = 1.0 / (
                    10000 ** (np.arange(0, rot, 2, dtype=np.float32) / rot))
            continue
        for proj in ("q_proj", "k_proj", "v_proj", "output_linear"):
            dense(f"{p}.mixer.{proj}", width, width)
        k = f"{p}.mixer.kernel.kernel"
        sd[f"{k}.log_dt"] = rng.uniform(math.log(1e-3), math.log(1e-1), width)
        sd[f"{k}.inv_A_real"] = math.log(0.5) + noise(0.5, width, n // 2)
        sd[f"{k}.A_imag"] = math.pi * np.arange(n // 2) + noise(1.0, width, n // 2)
        sd[f"{k}.B"] = np.stack([1 + noise(0.5, width, n // 2), noise(0.5, width, n // 2)], -1)
        sd[f"{k}.C"] = noise(0.3, 1, width, n // 2, 2)
        sd[f"{p}.mixer.D"] = noise(0.3, width)
        sd[f"{p}.mixer.ssm_k_D"] = noise(0.3, width)
        sd[f"{p}.mixer.ssm_k_kernel.kernel.B"] = np.eye(n)[0] + noise(0.2, width, n)
        sd[f"{p}.mixer.ssm_k_kernel.kernel.C"] = noise(0.1, 1, width, n)
    norm("backbone.ln_f")
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    sd["lm_head.weight"] = sd["backbone.embeddings.word_embeddings.weight"].copy()
    return sd
