"""Token ids outside the vocabulary, in every architecture.

Eager calls (concrete ids) raise a clear error. Under the caller's own
`jax.jit` the ids are tracers, so the embedding lookup makes the mistake
visible instead: that batch row's logits are NaN from the bad position on
(`recurrent_lm.layers.embeddings.EmbeddingLookup`), and every other row is
exactly what it is without the bad id.
"""

import jax
import numpy as np
import pytest
from griffin_cases import on_device
from penzai import pz

import recurrent_lm
from recurrent_lm.core import registry

VOCAB = 50
SMALL = {
    "griffin": {"vocab_size": VOCAB, "hidden_size": 32, "lru_width": 32, "num_attention_heads": 2,
                "intermediate_size": 48, "num_hidden_layers": 3, "attention_window_size": 4},
    "rwkv": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2,
             "attention_hidden_size": 32, "intermediate_size": 64},
    "h3": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "n_inner": 64,
           "d_state": 8, "attn_layer_idx": (1,)},
    "gemma": {"vocab_size": VOCAB, "num_layers": 2, "hidden_dim": 32, "intermediate_dim": 64,
              "head_dim": 8, "sliding_window_size": 4},
    "rwkv7": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "head_size": 8},
    "mamba": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 4},
    "mamba2": {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 4,
               "head_dim": 16},
}
# Layers that mix a whole row (attention's zero weights times a NaN value, H3's
# FFT convolution) spread the NaN to earlier positions too; RWKV is a pure
# left-to-right recurrence, so its earlier positions keep their logits (RWKV-7 and
# Mamba-2 too, with the sequential matrix scan, the CPU default; Mamba with the
# sequential linear scan).
CAUSAL_WITHOUT_MIXING = {"rwkv", "rwkv7", "mamba", "mamba2"}
BAD = {1: (5, VOCAB), 2: (7, -1)}  # row: (position, id)


def test_every_architecture_is_covered():
    assert sorted(SMALL) == registry.names()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bad_ids_raise_eagerly_and_give_nan_rows_under_jit(name):
    architecture = registry.get(name)
    model = architecture.build_model(
        architecture.config_class.from_preset("tiny", **SMALL[name]), jax.random.key(0)
    )
    good = np.random.default_rng(0).integers(0, VOCAB, (3, 12)).astype(np.int32)
    bad = good.copy()
    for row, (t, token) in BAD.items():
        bad[row, t] = token
        with pytest.raises(ValueError, match=f"token id {token} .* outside the vocabulary"):
            model(pz.nx.wrap(on_device(bad[row : row + 1]), "batch", "seq"))
    apply, params, state = recurrent_lm.functional(model)
    forward = jax.jit(lambda params, ids: apply(params, state, ids)[0])
    clean, out = np.asarray(forward(params, good)), np.asarray(forward(params, bad))
    assert np.isfinite(clean).all()
    np.testing.assert_array_equal(out[0], clean[0])  # the other row is untouched
    for row, (t, _) in BAD.items():
        assert np.isnan(out[row, t:]).all(), (row, np.isnan(out[row]).all(-1))
        if name in CAUSAL_WITHOUT_MIXING:
            np.testing.assert_array_equal(out[row, :t], clean[row, :t])
