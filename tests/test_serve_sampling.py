"""dms_jax.serve.sampling: sample_next is greedy at temperature 0 and otherwise samples exactly the renormalised
distribution restricted by top-k / top-p (frequencies within 5 sigma on a hand-made distribution); temperature
sharpens; SamplingConfig rejects bad settings."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax.serve.sampling import SamplingConfig, sample_next, sample_rows

# A hand-made distribution over 6 tokens: probabilities 0.4, 0.3, 0.15, 0.1, 0.04, 0.01 (shuffled order).
PROBS = np.array([0.1, 0.4, 0.01, 0.3, 0.04, 0.15])
LOGITS = np.log(PROBS)


def _samples(sampling, n=4000, seed=0):
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(PROBS)))
    out = jax.jit(sample_next, static_argnums=2)(logits, jax.random.key(seed), sampling)
    chex.assert_shape(out, (n,))
    chex.assert_type(out, jnp.int32)
    return np.asarray(out)


def _check_frequencies(samples, allowed):
    """Only `allowed` tokens appear, with frequencies within 5 sigma of the renormalised probabilities."""
    n = len(samples)
    assert set(np.unique(samples)) <= set(allowed), f"tokens outside {allowed}: {set(np.unique(samples))}"
    p = PROBS[allowed] / PROBS[allowed].sum()
    for tok, pt in zip(allowed, p):
        freq = np.mean(samples == tok)
        assert abs(freq - pt) <= 5 * np.sqrt(pt * (1 - pt) / n) + 1e-9, (tok, freq, pt)


def test_greedy_sample_next():
    logits = jnp.asarray([LOGITS, LOGITS[::-1]], jnp.float32)
    np.testing.assert_array_equal(sample_next(logits, jax.random.key(0), SamplingConfig()), [1, 4])


def test_top_p_keeps_only_the_nucleus():
    # Sorted: 0.4 (tok 1), 0.3 (tok 3), 0.15 (tok 5), ... top_p=0.75: mass before tok 5 is 0.7 < 0.75, kept;
    # mass before tok 0 is 0.85 >= 0.75, dropped. The nucleus is {1, 3, 5}.
    _check_frequencies(_samples(SamplingConfig(temperature=1.0, top_p=0.75)), [1, 3, 5])
    _check_frequencies(_samples(SamplingConfig(temperature=1.0, top_p=0.35)), [1])
    _check_frequencies(_samples(SamplingConfig(temperature=1.0)), [0, 1, 2, 3, 4, 5])


def test_top_k_keeps_the_k_most_likely():
    _check_frequencies(_samples(SamplingConfig(temperature=1.0, top_k=2)), [1, 3])
    _check_frequencies(_samples(SamplingConfig(temperature=1.0, top_k=4, top_p=0.8)), [1, 3, 5])


def test_temperature_sharpens():
    cold = _samples(SamplingConfig(temperature=0.25))
    assert np.mean(cold == 1) > 0.7  # 0.4^4 / sum p^4 ~ 0.74


def test_sample_rows_applies_each_rows_own_setting():
    """One call over rows of five settings (greedy, top-p, top-k, top-k + top-p, full distribution) samples each
    row group's own restricted distribution, as sample_next does for one setting."""
    settings = [(0.0, 0, 1.0, [1]), (1.0, 0, 0.75, [1, 3, 5]), (1.0, 2, 1.0, [1, 3]), (1.0, 4, 0.8, [1, 3, 5]),
                (1.0, 0, 1.0, [0, 1, 2, 3, 4, 5])]
    n = 3000
    temperature = np.repeat([t for t, _, _, _ in settings], n).astype(np.float32)
    top_k = np.repeat([k for _, k, _, _ in settings], n).astype(np.int32)
    top_p = np.repeat([p for _, _, p, _ in settings], n).astype(np.float32)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (len(temperature), len(PROBS)))
    keys = jax.random.split(jax.random.key(3), len(temperature))
    out = np.asarray(jax.jit(sample_rows)(logits, keys, temperature, top_k, top_p))
    chex.assert_shape(out, (len(temperature),))
    for g, (_, _, _, allowed) in enumerate(settings):
        _check_frequencies(out[g * n:(g + 1) * n], allowed)
    # Every row greedy: the argmax, without a key's influence.
    np.testing.assert_array_equal(sample_rows(logits[:2], keys[:2], jnp.zeros(2), jnp.zeros(2, jnp.int32),
                                              jnp.ones(2)), [1, 1])


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-0.5), r"temperature must be >= 0, got -0.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-1), r"top_k must be >= 0, got -1"),
])
def test_sampling_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)
