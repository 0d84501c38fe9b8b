"""The sampling distribution of temperature, top-k and top-p, from many draws.

`choose_tokens` is drawn 60,000 times (one key per draw, `jax.vmap`) from
fixed logits of two rows; the counts must match the distribution written out
here in numpy from the definitions: ``softmax(logits / T)``; top-k keeps the k
largest (ties at the k-th kept); top-p then keeps the most likely tokens, in
order, until their mass reaches p (the token that crosses p is kept: the
nucleus of Holtzman et al. and HF's ``TopPLogitsWarper``), renormalised.

Tokens outside the kept set must never be drawn. Inside it, a chi-square test
with a 1e-6 p-value threshold: a correct sampler fails it with probability
1e-6 whatever the seed, while the mistakes it is there to catch (temperature
multiplied, a top-k or top-p set one token too large or too small, top-p
before top-k) move at least one bin by hundreds of standard deviations.
"""

import jax
import numpy as np
import pytest
import scipy.stats

from recurrent_lm.sampling import strategies

DRAWS = 60_000
P_VALUE = 1e-6

# Two rows of probabilities (as logits), distinct enough that every kept
# token has >= 1,000 expected draws, and no cumulative sum within 0.01 of a
# top-p used below (so float32 rounding cannot move a token across p).
PROBS = np.array(
    [
        [0.05, 0.30, 0.02, 0.25, 0.13, 0.20, 0.05],
        [0.40, 0.05, 0.10, 0.04, 0.21, 0.12, 0.08],
    ]
)
LOGITS = np.log(PROBS).astype(np.float32) + np.float32(3.0)  # shift: logits, not log-probs


def expected_distribution(logits, temperature, top_k=None, top_p=None):
    """One row's sampling distribution, from the definitions, in float64."""
    z = np.asarray(logits, np.float64) / temperature
    kept = np.ones(len(z), bool)
    if top_k is not None:
        kth = np.sort(z)[::-1][top_k - 1]
        kept = z >= kth
    probs = np.where(kept, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    if top_p is not None:
        nucleus, mass = np.zeros(len(z), bool), 0.0
        for token in np.argsort(-probs, kind="stable"):
            if mass >= top_p:
                break
            nucleus[token] = True
            mass += probs[token]
        probs = np.where(nucleus, probs, 0.0)
        probs /= probs.sum()
    return probs


def draw(logits, seed=0, **settings):
    keys = jax.random.split(jax.random.key(seed), DRAWS)
    choose = jax.jit(jax.vmap(lambda key: strategies.choose_tokens(logits, key, **settings)))
    return np.asarray(choose(keys))  # [DRAWS, rows]


def assert_follows(draws, probs, what=""):
    """Draws of one row against its expected distribution (see module doc)."""
    counts = np.bincount(draws, minlength=len(probs))
    outside = probs == 0
    assert counts[outside].sum() == 0, (
        f"{what}: drew tokens {np.flatnonzero(outside & (counts > 0))} outside the kept set"
        f" (counts {counts}, expected {np.round(probs, 4)})"
    )
    assert (~outside).sum() >= 2, "a one-token distribution tests nothing here"
    assert (DRAWS * probs[~outside]).min() > 100, "too few expected draws for chi-square"
    test = scipy.stats.chisquare(counts[~outside], DRAWS * probs[~outside])
    assert test.pvalue > P_VALUE, (
        f"{what}: counts {counts} vs expected {np.round(DRAWS * probs)} (p = {test.pvalue:.2g})"
    )


CASES = {
    "temperature 1": {"temperature": 1.0, "top_k": None, "top_p": None},
    "temperature 0.6": {"temperature": 0.6, "top_k": None, "top_p": None},
    "temperature 1.7": {"temperature": 1.7, "top_k": None, "top_p": None},
    "top-k 3": {"temperature": 1.0, "top_k": 3, "top_p": None},
    "top-k 4, temperature 0.8": {"temperature": 0.8, "top_k": 4, "top_p": None},
    # Row 0's mass: 0.30, 0.55, 0.75, 0.88: p = 0.5 keeps 2 tokens, the second
    # crossing it; row 1's: 0.40, 0.61: 2 tokens as well.
    "top-p 0.5": {"temperature": 1.0, "top_k": None, "top_p": 0.5},
    "top-p 0.8": {"temperature": 1.0, "top_k": None, "top_p": 0.8},
    "top-p 0.75, temperature 1.3": {"temperature": 1.3, "top_k": None, "top_p": 0.75},
    # Top-p on the top-k distribution: row 0's top 4 renormalised has mass
    # 0.34, 0.63: p = 0.6 keeps 2 tokens (3 on the full distribution).
    "top-k 4 then top-p 0.6": {"temperature": 1.0, "top_k": 4, "top_p": 0.6},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_draws_follow_the_defined_distribution(case):
    settings = CASES[case]
    draws = draw(LOGITS, **settings)
    assert draws.shape == (DRAWS, 2)
    for row in range(2):
        probs = expected_distribution(LOGITS[row], **settings)
        assert_follows(draws[:, row], probs, f"{case}, row {row}")


def test_the_cases_tell_the_settings_apart():
    """Each case's expected distribution differs from its plausible mistakes."""
    def differs(a, b):
        return np.abs(a - b).max() > 0.05

    for row in LOGITS:
        assert differs(expected_distribution(row, 0.6), expected_distribution(row * 0.6, 1.0))
        assert differs(expected_distribution(row, 1.7), expected_distribution(row * 1.7, 1.0))
        assert differs(
            expected_distribution(row, 1.0, top_k=3), expected_distribution(row, 1.0, top_k=4)
        )
        assert differs(
            expected_distribution(row, 1.0, top_k=3), expected_distribution(row, 1.0, top_k=2)
        )
        for p in (0.5, 0.8):
            kept = (expected_distribution(row, 1.0, top_p=p) > 0).sum()
            sorted_mass = np.cumsum(np.sort(np.exp(row) / np.exp(row).sum())[::-1])
            # The crossing token is in; without it the mass would be short of p.
            assert sorted_mass[kept - 2] < p <= sorted_mass[kept - 1]
    both = expected_distribution(LOGITS[0], 1.0, top_k=4, top_p=0.6)
    p_only = expected_distribution(LOGITS[0], 1.0, top_p=0.6)
    assert (both > 0).sum() == 2 and (p_only > 0).sum() == 3
    # No top-p lies within 0.01 of a cumulative mass it is compared with.
    for settings in CASES.values():
        if settings["top_p"] is not None:
            for row in LOGITS:
                before = expected_distribution(row, settings["temperature"], settings["top_k"])
                mass = np.cumsum(np.sort(before)[::-1])
                assert np.abs(mass - settings["top_p"]).min() > 0.01, settings


def test_top_k_keeps_ties_at_the_kth():
    logits = np.log(np.array([[0.30, 0.20, 0.20, 0.20, 0.10]])).astype(np.float32)
    settings = {"temperature": 1.0, "top_k": 2, "top_p": None}
    probs = expected_distribution(logits[0], **settings)
    assert (probs > 0).sum() == 4
    assert_follows(draw(logits, **settings)[:, 0], probs, "ties")


def test_nucleus_is_the_one_transformers_keeps():
    """HF's TopPLogitsWarper (after TopK and temperature) keeps the same tokens."""
    torch = pytest.importorskip("torch")
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    for case, settings in CASES.items():
        scores = torch.from_numpy(LOGITS.astype(np.float64))
        warpers = [logits_process.TemperatureLogitsWarper(settings["temperature"])]
        if settings["top_k"]:
            warpers.append(logits_process.TopKLogitsWarper(settings["top_k"]))
        if settings["top_p"]:
            warpers.append(logits_process.TopPLogitsWarper(settings["top_p"]))
        for warper in warpers:
            scores = warper(None, scores)
        theirs = torch.softmax(scores, dim=-1).numpy()
        for row in range(2):
            ours = expected_distribution(LOGITS[row], **settings)
            np.testing.assert_allclose(ours, theirs[row], atol=1e-9, err_msg=case)
