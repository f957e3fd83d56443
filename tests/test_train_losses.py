"""dms_jax.train.losses: KL(student || teacher) and the next-token NLL against float64 numpy.

Tolerances: rtol 1e-5 (float32 log-softmax); garbage logits at padded positions: rtol 1e-6.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dms_jax.train import losses


def np_kl(student, teacher, valid, weight=None):
    def log_softmax(x):
        x = x.astype(np.float64)
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    ls, lt = log_softmax(student), log_softmax(teacher)
    kl = (np.exp(ls) * (ls - lt)).sum(-1)
    w = valid * (1.0 if weight is None else weight)
    return (kl * w).sum() / max(w.sum(), 1)


def test_kl_student_teacher_matches_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    t = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    valid = rng.random((3, 7)) > 0.3
    got = float(losses.kl_student_teacher(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid)))
    np.testing.assert_allclose(got, np_kl(s, t, valid), rtol=1e-5)
    # The direction is KL(student || teacher) (mode-seeking), not the reverse: the two differ here.
    assert abs(np_kl(s, t, valid) - np_kl(t, s, valid)) > 1e-2
    # Padding is excluded (garbage logits at invalid positions change nothing), KL(p || p) = 0, KL >= 0.
    s2 = np.where(valid[..., None], s, 1e4).astype(np.float32)
    np.testing.assert_allclose(
        float(losses.kl_student_teacher(jnp.asarray(s2), jnp.asarray(t), jnp.asarray(valid))), got, rtol=1e-6)
    assert float(losses.kl_student_teacher(jnp.asarray(s), jnp.asarray(s), jnp.asarray(valid))) == 0.0
    assert float(losses.kl_student_teacher(jnp.asarray(s), jnp.asarray(t), jnp.zeros((3, 7), bool))) == 0.0
    # bf16 logits are upcast before the log-softmax.
    got_bf16 = losses.kl_student_teacher(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16),
                                         jnp.asarray(valid))
    assert got_bf16.dtype == jnp.float32
    np.testing.assert_allclose(float(got_bf16), np_kl(s.astype(jnp.bfloat16).astype(np.float32),
                                                      t.astype(jnp.bfloat16).astype(np.float32), valid), rtol=1e-5)


def test_weighted_kl_matches_numpy():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(2, 9, 13)).astype(np.float32) * 2
    t = rng.normal(size=(2, 9, 13)).astype(np.float32) * 2
    valid = rng.random((2, 9)) > 0.2
    weight = rng.uniform(1.0, 12.0, size=(2, 9)).astype(np.float32)
    got = float(losses.kl_student_teacher(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid), jnp.asarray(weight)))
    np.testing.assert_allclose(got, np_kl(s, t, valid, weight), rtol=1e-5)
    assert abs(got - np_kl(s, t, valid)) > 1e-3  # the weights change the mean
    # A weight on a padded position counts for nothing.
    w2 = np.where(valid, weight, 1e6).astype(np.float32)
    np.testing.assert_allclose(
        float(losses.kl_student_teacher(jnp.asarray(s), jnp.asarray(t), jnp.asarray(valid), jnp.asarray(w2))),
        got, rtol=1e-6)


def test_next_token_nll_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 9)).astype(np.float32)
    tokens = rng.integers(0, 9, size=(2, 6))
    valid = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
    total, n = losses.next_token_nll(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(valid))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = [-lp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(5) if valid[b, t] and valid[b, t + 1]]
    assert float(n) == len(want) == 8
    np.testing.assert_allclose(float(total), np.sum(want), rtol=1e-5)
