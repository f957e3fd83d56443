"""Tests of dms_jax.dms: hand-worked examples plus independent loop-based numpy re-implementations.

The numpy references below are written with plain loops on purpose (no vectorisation), so they share no
code or indexing tricks with the jnp implementation.  Tolerances: float32 comparisons use rtol/atol 1e-5
unless stated; masks and 0/1 decisions are compared exactly.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax import dms

NEG = np.float32(dms.MASK_VALUE)  # the bias is float32


# ----------------------------------------------------------------------------- numpy references


def np_bias(log_keep, q_pos, k_pos, window, k_valid=None):
    """Loop version of the DMS bias; masked entries are -inf here (compared via a visibility mask)."""
    b_, h_, tk = log_keep.shape
    tq = q_pos.shape[1]
    out = np.zeros((b_, h_, tq, tk), np.float64)
    for b in range(b_):
        for h in range(h_):
            for qi in range(tq):
                for kj in range(tk):
                    i, j = int(q_pos[b, qi]), int(k_pos[b, kj])
                    if j > i or (k_valid is not None and not k_valid[b, kj]):
                        out[b, h, qi, kj] = -np.inf
                    elif i - j <= window:
                        out[b, h, qi, kj] = 0.0
                    else:
                        out[b, h, qi, kj] = log_keep[b, h, kj]
    return out


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_shift(x, pad):
    out = np.empty_like(x)
    t = x.shape[-1]
    for j in range(t):
        out[..., j] = x[..., j + 1] if j + 1 < t else pad
    return out


def simulate_cache(logits, window):
    """Token-by-token delayed-eviction cache for one (sequence, head), driven by *unshifted* logits.

    At step i the logit of token i decides about token i-1 (the one-token shift).  The cache keeps a ring
    of the last window+1 tokens; when token i-window-1 leaves the ring and it was marked, it is removed.
    Returns, per query i, the set of token indices in the cache when query i attends.
    """
    t = len(logits)
    cache = []  # token indices
    marked = {}
    visible = []
    for i in range(t):
        if i >= 1:
            marked[i - 1] = bool(logits[i] > 0)
        cache.append(i)
        leaving = i - window - 1
        if leaving >= 0 and marked.get(leaving, False) and leaving in cache:
            cache.remove(leaving)
        visible.append(set(cache))
    return visible


def rope_rotate_half(x, pos, base=10000.0):
    """Tiny rotate-half RoPE on [B, T, H, D] (numpy, loops over pairs)."""
    d = x.shape[-1]
    half = d // 2
    out = np.empty_like(x)
    for t in range(x.shape[1]):
        for k in range(half):
            theta = pos[t] * base ** (-2.0 * k / d)
            c, s = math.cos(theta), math.sin(theta)
            out[:, t, :, k] = x[:, t, :, k] * c - x[:, t, :, k + half] * s
            out[:, t, :, k + half] = x[:, t, :, k + half] * c + x[:, t, :, k] * s
    return out


# ----------------------------------------------------------------------------- decision logits


def test_neuron_logits_and_zeroing_around_rope():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d = 2, 3, 6, 2, 8
    g = hq // hkv
    q = rng.normal(size=(b, t, hq, d)).astype(np.float32)
    logits = dms.neuron_decision_logits(jnp.asarray(q), hkv, 100.0, 5.0)
    chex.assert_shape(logits, (b, hkv, t))
    chex.assert_type(logits, jnp.float32)
    for bb in range(b):
        for h in range(hkv):
            for tt in range(t):
                assert np.isclose(logits[bb, h, tt], 100.0 * q[bb, tt, h * g, d - 1] - 5.0, rtol=1e-5)

    pos = np.arange(t) + 3.0
    q0 = np.asarray(dms.zero_reused_neuron(jnp.asarray(q), hkv))
    q1 = rope_rotate_half(q0, pos)
    q2 = np.asarray(dms.zero_reused_neuron(jnp.asarray(q1), hkv))
    q_plain = rope_rotate_half(q, pos)
    for h in range(hq):
        if h % g == 0:
            # before RoPE: only element d-1 of the group's first head is zeroed
            assert np.all(q0[:, :, h, d - 1] == 0)
            np.testing.assert_array_equal(q0[:, :, h, : d - 1], q[:, :, h, : d - 1])
            # RoPE writes x[d/2-1]*sin into d-1; the second zeroing clears d-1 again (not d/2-1)
            assert np.abs(q1[:, :, h, d - 1]).max() > 1e-3
            assert np.all(q2[:, :, h, d - 1] == 0)
            # element d/2-1 keeps x[d/2-1]*cos, without the borrowed neuron's contribution
            theta = pos * 10000.0 ** (-2.0 * (d // 2 - 1) / d)
            np.testing.assert_allclose(
                q2[:, :, h, d // 2 - 1], q[:, :, h, d // 2 - 1] * np.cos(theta)[None], rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(q2[:, :, h, : d - 1], q1[:, :, h, : d - 1])
        else:
            np.testing.assert_allclose(q2[:, :, h], q_plain[:, :, h], rtol=1e-5, atol=1e-6)


def test_neuron_logit_keeps_gradient_and_zeroing_cuts_it():
    q = jnp.ones((1, 2, 4, 4))

    def f(q):
        return dms.neuron_decision_logits(q, 2, 100.0, 5.0).sum() + dms.zero_reused_neuron(q, 2).sum()

    grad = jax.grad(f)(q)
    # first head of each group, last element: only the logit's gradient (100); the zeroed copy gives 0
    assert np.all(grad[:, :, ::2, -1] == 100.0)
    assert np.all(grad[:, :, 1::2, -1] == 1.0)
    assert np.all(grad[..., :-1] == 1.0)


def test_bad_gqa_raises():
    with pytest.raises(ValueError, match="num_kv_heads"):
        dms.neuron_decision_logits(jnp.zeros((1, 2, 6, 4)), 4, 1.0, 0.0)


def test_adapter_logits():
    proj = jnp.arange(12.0).reshape(1, 4, 3)  # [B, T, Hkv]
    out = dms.adapter_decision_logits(proj, 100.0, 5.0)
    chex.assert_shape(out, (1, 3, 4))
    np.testing.assert_allclose(out[0, 2, 1], 100.0 * 5.0 - 5.0)
    # zero-initialised adapter: every logit is exactly -offset
    np.testing.assert_array_equal(dms.adapter_decision_logits(jnp.zeros((2, 5, 3)), 100.0, 5.0), -5.0)


def test_alpha_per():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 5)), jnp.float32)
    assert dms.apply_alpha_per(x, "head") is x
    y = dms.apply_alpha_per(x, "layer")
    chex.assert_shape(y, x.shape)
    for h in range(3):
        np.testing.assert_array_equal(y[:, h], x[:, 0])
    with pytest.raises(ValueError, match="alpha_per"):
        dms.apply_alpha_per(x, "token")


# ----------------------------------------------------------------------------- shift


def test_shift_to_owner():
    x = jnp.asarray([[[1.0, 2.0, 3.0, 4.0]]])
    np.testing.assert_array_equal(dms.shift_to_owner(x, 0.0), [[[2.0, 3.0, 4.0, 0.0]]])
    np.testing.assert_array_equal(
        dms.shift_to_owner(x, dms.KEEP_LOGIT), [[[2.0, 3.0, 4.0, dms.KEEP_LOGIT]]]
    )
    # chunk carry: the first logit of the next chunk decides about this chunk's last token
    np.testing.assert_array_equal(dms.shift_to_owner(x, 0.0, jnp.asarray([[9.0]])), [[[2.0, 3.0, 4.0, 9.0]]])
    rng = np.random.default_rng(2)
    r = rng.normal(size=(2, 3, 7)).astype(np.float32)
    np.testing.assert_array_equal(dms.shift_to_owner(jnp.asarray(r), -3.0), np_shift(r, -3.0))
    # the pads mean "keep"
    assert dms.hard_decisions(jnp.float32(dms.KEEP_LOGIT)) == 0
    assert dms.soft_log_keep(jnp.float32(dms.KEEP_LOGIT) / 0.1) == 0.0
    alpha, st = dms.gumbel_sigmoid(jnp.float32(dms.KEEP_LOGIT), None, 0.1)
    assert alpha == 0.0 and st == 0.0


# ----------------------------------------------------------------------------- noise and decisions


def test_logistic_noise_statistics():
    n = dms.logistic_noise(jax.random.PRNGKey(0), (200, 100))
    chex.assert_shape(n, (200, 100))
    chex.assert_type(n, jnp.float32)
    a = np.asarray(n, np.float64)
    # Logistic(0, 1): mean 0, variance pi^2/3 ~ 3.29; 20000 samples -> s.e. of mean ~0.013
    assert abs(a.mean()) < 0.06
    assert abs(a.var() - math.pi**2 / 3) < 0.2
    np.testing.assert_array_equal(n, dms.logistic_noise(jax.random.PRNGKey(0), (200, 100)))
    assert not np.array_equal(n, dms.logistic_noise(jax.random.PRNGKey(1), (200, 100)))
    chex.assert_type(dms.logistic_noise(jax.random.PRNGKey(0), (3,), jnp.bfloat16), jnp.bfloat16)


def test_gumbel_sigmoid_forward_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=0.5, size=(2, 3, 11)).astype(np.float32)
    noise = rng.logistic(size=logits.shape).astype(np.float32)
    tau = 0.7
    alpha, st = dms.gumbel_sigmoid(jnp.asarray(logits), jnp.asarray(noise), tau)
    chex.assert_shape([alpha, st], logits.shape)
    chex.assert_type([alpha, st], jnp.float32)
    ref = np_sigmoid((logits.astype(np.float64) + noise) / tau)
    np.testing.assert_allclose(alpha, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(st, (ref > 0.5).astype(np.float32))
    assert set(np.unique(np.asarray(st)).tolist()) <= {0.0, 1.0}
    z = dms.noisy_logits(jnp.asarray(logits), jnp.asarray(noise), tau)
    np.testing.assert_allclose(dms.soft_log_keep(z), np.log1p(-ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(dms.hard_decisions(jnp.asarray(logits)), (logits > 0).astype(np.float32))


def test_straight_through_gradient():
    logits = jnp.asarray([-2.0, -0.1, 0.05, 0.3, 3.0])
    noise = jnp.asarray([0.1, -0.2, 0.3, 0.0, -0.5])
    w = jnp.asarray([1.0, -2.0, 3.0, 0.5, -1.0])
    tau = 0.5

    def via_st(x):
        return jnp.sum(w * dms.gumbel_sigmoid(x, noise, tau)[1])

    def via_alpha(x):
        return jnp.sum(w * dms.gumbel_sigmoid(x, noise, tau)[0])

    g_st, g_alpha = jax.grad(via_st)(logits), jax.grad(via_alpha)(logits)
    np.testing.assert_allclose(g_st, g_alpha, rtol=1e-6)
    s = np_sigmoid((np.asarray(logits) + np.asarray(noise)) / tau)
    np.testing.assert_allclose(g_st, np.asarray(w) * s * (1 - s) / tau, rtol=1e-5)
    # the forward value is the exact hard decision, also under jit and for values that round badly
    x = jnp.linspace(-3, 3, 1001)
    _, st = jax.jit(lambda x: dms.gumbel_sigmoid(x, None, 0.1))(x)
    np.testing.assert_array_equal(st, (np.asarray(x) / 0.1 > 0).astype(np.float32))


def test_soft_log_keep_stable():
    z = jnp.asarray([-1e4, -30.0, 0.0, 30.0, 1e4])
    lk = dms.soft_log_keep(z)
    assert np.all(np.isfinite(lk))
    np.testing.assert_allclose(lk, [0.0, -9.357623e-14, math.log(0.5), -30.0, -1e4], rtol=1e-5, atol=1e-12)
    g = jax.grad(lambda z: dms.soft_log_keep(z).sum())(z)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g[-1], -1.0)
    hk = dms.hard_log_keep(jnp.asarray([0.0, 1.0, 1.0, 0.0]))
    np.testing.assert_array_equal(hk, [0.0, NEG, NEG, 0.0])


# ----------------------------------------------------------------------------- attention bias


def _visible(bias):
    return np.asarray(bias) > NEG / 2


def test_bias_hand_worked():
    # T = 5, window 1; token 1 and 3 are marked (decisions already owner-shifted)
    d = jnp.asarray([[[0.0, 1.0, 0.0, 1.0, 0.0]]])
    pos = jnp.arange(5)[None]
    bias = dms.dms_attention_bias(dms.hard_log_keep(d), pos, pos, 1)
    chex.assert_shape(bias, (1, 1, 5, 5))
    chex.assert_type(bias, jnp.float32)
    expected = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 0, 1, 1, 0],  # token 1 is 2 > w behind: gone
            [1, 0, 1, 1, 1],  # token 3 is 1 = w behind: still visible
        ],
        bool,
    )
    np.testing.assert_array_equal(_visible(bias)[0, 0], expected)
    assert np.all(np.asarray(bias)[0, 0][expected] == 0.0)

    # soft version: log_keep enters exactly where i - j > w and the key is not masked otherwise
    lk = jnp.asarray([[[-0.5, -1.0, -2.0, -3.0, -4.0]]])
    sb = np.asarray(dms.dms_attention_bias(lk, pos, pos, 1))[0, 0]
    assert sb[2, 0] == -0.5 and sb[3, 1] == -1.0 and sb[4, 2] == -2.0 and sb[4, 0] == -0.5
    assert sb[1, 0] == 0.0 and sb[4, 3] == 0.0 and sb[3, 3] == 0.0
    assert sb[0, 1] == NEG  # causal


@pytest.mark.parametrize("window", [1, 2, 3])
def test_bias_window_edge(window):
    t = window + 3
    d = jnp.zeros((1, 1, t)).at[0, 0, 0].set(1.0)
    pos = jnp.arange(t)[None]
    vis = _visible(dms.dms_attention_bias(dms.hard_log_keep(d), pos, pos, window))[0, 0]
    assert vis[window, 0]  # i - j = w: visible
    assert not vis[window + 1, 0]  # i - j = w + 1: gone
    assert not vis[window + 2, 0]
    assert vis[window + 2, 1]  # unmarked token: kept forever
    np.testing.assert_array_equal(np.triu(vis, 1), False)  # causal


def test_bias_matches_numpy_random_padded_and_chunked():
    rng = np.random.default_rng(4)
    b, h, tk, tq, w = 3, 2, 13, 5, 3
    lk = np.minimum(rng.normal(size=(b, h, tk)), 0).astype(np.float32)
    k_pos = np.stack([np.arange(tk) - 2, np.arange(tk), np.arange(tk) + 4])  # left pad / none / offset
    k_valid = np.ones((b, tk), bool)
    k_valid[0, :2] = False  # left padding
    k_valid[1, -3:] = False  # right padding
    q_pos = k_pos[:, -tq:]  # the last chunk of queries, Tq < Tk
    got = dms.dms_attention_bias(jnp.asarray(lk), jnp.asarray(q_pos), jnp.asarray(k_pos), w, jnp.asarray(k_valid))
    chex.assert_shape(got, (b, h, tq, tk))
    ref = np_bias(lk, q_pos, k_pos, w, k_valid)
    np.testing.assert_array_equal(_visible(got), np.isfinite(ref))
    np.testing.assert_allclose(np.asarray(got)[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
    assert np.all(np.asarray(got)[~np.isfinite(ref)] == NEG)
    # -inf inputs are clamped, never NaN
    got_inf = dms.dms_attention_bias(jnp.full((b, h, tk), -jnp.inf), jnp.asarray(q_pos), jnp.asarray(k_pos), w)
    assert np.all(np.isfinite(got_inf))


def test_hard_bias_equals_delayed_eviction_cache():
    rng = np.random.default_rng(5)
    for w in (1, 2, 4):
        b, h, t = 2, 3, 17
        logits = rng.normal(size=(b, h, t)).astype(np.float32)
        dec = dms.shift_to_owner(dms.hard_decisions(jnp.asarray(logits)), 0)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        full = _visible(dms.dms_attention_bias(dms.hard_log_keep(dec), pos, pos, w))
        # chunked prefill: queries of each chunk against all keys so far, absolute positions
        chunk = 5
        for bb in range(b):
            for hh in range(h):
                vis = simulate_cache(logits[bb, hh], w)
                for i in range(t):
                    assert set(np.nonzero(full[bb, hh, i])[0].tolist()) == vis[i], (w, bb, hh, i)
        for start in range(0, t, chunk):
            stop = min(start + chunk, t)
            # only keys < stop exist yet; the last one's decision is unknown (pad 0 = keep)
            dec_c = dms.shift_to_owner(dms.hard_decisions(jnp.asarray(logits[..., :stop])), 0)
            got = _visible(
                dms.dms_attention_bias(dms.hard_log_keep(dec_c), pos[:, start:stop], pos[:, :stop], w)
            )
            np.testing.assert_array_equal(got, full[:, :, start:stop, :stop])


def test_fully_masked_row_softmax_no_nan():
    lk = jnp.zeros((1, 1, 4))
    pos = jnp.arange(4)[None]
    valid = jnp.asarray([[False, False, True, True]])
    bias = dms.dms_attention_bias(lk, pos, pos, 1, valid)  # queries 0 and 1 see no valid key
    scores = jnp.asarray(np.random.default_rng(6).normal(size=(1, 1, 4, 4)), jnp.float32)
    for dt in (jnp.float32, jnp.bfloat16):
        p = jax.nn.softmax((scores + bias).astype(dt).astype(jnp.float32), axis=-1)
        assert np.all(np.isfinite(p))
        np.testing.assert_allclose(p[0, 0, 2:, :2], 0.0)
    g = jax.grad(lambda s: jax.nn.softmax(s + bias, axis=-1)[..., 0, :].sum())(scores)
    assert np.all(np.isfinite(g))
    b16 = dms.dms_attention_bias(lk, pos, pos, 1, valid, dtype=jnp.float16)
    chex.assert_type(b16, jnp.float16)
    assert np.all(np.isfinite(np.asarray(b16, np.float32)))
    assert np.all(np.isfinite(jax.nn.softmax(b16.astype(jnp.float32), axis=-1)))


def test_bias_under_jit_traced_window():
    """The window may be traced: one compilation serves every window, each against the loop reference."""
    rng = np.random.default_rng(7)
    lk = np.minimum(rng.normal(size=(2, 2, 9)), 0).astype(np.float32)
    k_pos = np.stack([np.arange(9), np.arange(9) + 3])
    q_pos = k_pos[:, 4:]
    traces = []

    def bias(lk, q_pos, k_pos, window):
        traces.append(window)
        return dms.dms_attention_bias(lk, q_pos, k_pos, window)

    f = jax.jit(bias)
    for w in (1, 2, 5, 9):
        got = np.asarray(f(jnp.asarray(lk), jnp.asarray(q_pos), jnp.asarray(k_pos), jnp.int32(w)))
        ref = np_bias(lk, q_pos, k_pos, w)
        np.testing.assert_array_equal(_visible(got), np.isfinite(ref), err_msg=f"window {w}")
        np.testing.assert_allclose(got[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
    assert len(traces) == 1  # traced once: the window is a runtime value


def test_bias_infinite_mask_and_no_log_keep():
    """``masked=-inf`` (the flash kernels' reference) and ``log_keep=None`` (plain causal attention)."""
    q_pos = jnp.asarray([[10]], jnp.int32)
    k_pos = jnp.asarray([[11, 10, 6, 5, 0]], jnp.int32)
    lk = jnp.asarray([[[-0.5, -0.6, -0.7, -0.8, -jnp.inf]]], jnp.float32)
    k_valid = jnp.asarray([[True, True, True, True, False]])
    bias = np.asarray(dms.dms_attention_bias(lk, q_pos, k_pos, 4, k_valid, masked=-np.inf))[0, 0, 0]
    np.testing.assert_array_equal(bias, [-np.inf, 0.0, 0.0, np.float32(-0.8), -np.inf])  # diff -1, 0, w, w+1, pad
    plain = np.asarray(dms.dms_attention_bias(None, q_pos, k_pos, 4, k_valid))
    chex.assert_shape(plain, (1, 1, 1, 5))
    np.testing.assert_array_equal(plain[0, 0, 0], [NEG, 0.0, 0.0, 0.0, NEG])


# ----------------------------------------------------------------------------- the window rule


def test_visible_if_marked_and_ring_size():
    """A marked key at j is seen by queries j .. j + w and by no later one; the ring holds those w + 1 queries."""
    for w in (1, 3, 64):
        assert dms.ring_size(w) == w + 1
        seen_by = [i for i in range(200) if dms.visible_if_marked(i, 7, w)]
        assert seen_by[0] == 0 and seen_by[-1] == 7 + w  # every earlier query passes; causality is checked apart
        assert len([i for i in seen_by if i >= 7]) == dms.ring_size(w)
    # Arrays broadcast, traced windows work, the result is boolean.
    q = jnp.arange(6)[:, None]
    k = jnp.arange(6)[None, :]
    got = jax.jit(dms.visible_if_marked)(q, k, jnp.int32(2))
    chex.assert_type(got, bool)
    np.testing.assert_array_equal(got, np.arange(6)[:, None] - np.arange(6)[None, :] <= 2)


# ----------------------------------------------------------------------------- loss and schedule


def np_frac(dec, valid, shifted=True):
    """Reference: mean over the tokens that have a decision; with shifted decisions (DMS) the last real token
    (whose producer is a pad or the end of the row) has none."""
    l_, b_, h_, t_ = dec.shape
    out = np.zeros(b_)
    for b in range(b_):
        s = c = 0.0
        for l in range(l_):
            for h in range(h_):
                for t in range(t_):
                    producer_real = t + 1 < t_ and valid[b, t + 1]
                    if valid[b, t] and (producer_real or not shifted):
                        s += dec[l, b, h, t]
                        c += 1
        out[b] = s / c
    return out


def test_eviction_fraction_and_loss_match_numpy():
    rng = np.random.default_rng(8)
    dec = (rng.random((3, 2, 2, 6)) > 0.6).astype(np.float32)
    valid = np.ones((2, 6), bool)
    valid[1, 4:] = False
    frac = dms.eviction_fraction(jnp.asarray(dec), jnp.asarray(valid))
    chex.assert_shape(frac, (2,))
    np.testing.assert_allclose(frac, np_frac(dec, valid), rtol=1e-6)
    target = 0.5
    loss = dms.compression_loss(jnp.asarray(dec), jnp.asarray(valid), target)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, np.mean(np.maximum(0.0, target - np_frac(dec, valid))), rtol=1e-6)
    # a single layer [B, Hkv, T] is accepted
    np.testing.assert_allclose(dms.eviction_fraction(jnp.asarray(dec[0])), np_frac(dec[:1], np.ones((2, 6))))
    # per-token decisions (DMC): every real token counts
    np.testing.assert_allclose(dms.eviction_fraction(jnp.asarray(dec), jnp.asarray(valid), shifted=False),
                               np_frac(dec, valid, shifted=False), rtol=1e-6)


def test_eviction_fraction_leaves_the_pending_last_decision_out():
    # Row 0 evicts every decided token; its last real token (index 3, then padding) has no decision yet.
    dec = np.zeros((1, 1, 1, 6), np.float32)
    dec[..., :3] = 1.0
    valid = np.array([[True, True, True, True, False, False]])
    np.testing.assert_allclose(dms.eviction_fraction(jnp.asarray(dec), jnp.asarray(valid)), [1.0])
    np.testing.assert_array_equal(dms.has_decision(jnp.asarray(valid)), [[1, 1, 1, 0, 0, 0]])


def test_owner_logits_never_take_a_pad_tokens_logit():
    rng = np.random.default_rng(21)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    got = np.asarray(dms.owner_logits(jnp.asarray(logits), jnp.asarray(valid)))
    want = np.full_like(logits, dms.KEEP_LOGIT)
    for b in range(2):
        for t in range(4):
            if valid[b, t] and valid[b, t + 1]:
                want[b, :, t] = logits[b, :, t + 1]
    np.testing.assert_array_equal(got, want)


def test_compression_hinge_at_below_past_target():
    def run(target, logits):
        def loss_fn(x):
            _, st = dms.gumbel_sigmoid(x, None, 1.0)
            return dms.compression_loss(st, None, target)

        return jax.value_and_grad(loss_fn)(logits)

    # The last position's decision is pending (not counted): the decided ones [2, -1, 3, -2] give fraction 0.5.
    logits = jnp.asarray([[[2.0, -1.0, 3.0, -2.0, 5.0]]])
    val, grad = run(0.75, logits)  # below target: positive loss, gradient pushes logits up
    np.testing.assert_allclose(val, 0.25, rtol=1e-6)
    g = np.asarray(grad)
    assert np.all(g[..., :4] < 0) and g[..., 4] == 0.0
    s = np_sigmoid(np.asarray(logits[..., :4]))
    np.testing.assert_allclose(g[..., :4], -s * (1 - s) / 4, rtol=1e-5)
    val, grad = run(0.3, logits)  # past target: zero loss, zero gradient
    assert val == 0.0 and np.all(np.asarray(grad) == 0.0)
    val, _ = run(0.5, logits)  # exactly at target
    assert val == 0.0
    # reduction: mean over batch of per-sequence hinges
    d = jnp.asarray([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])  # seq 0 frac 1, seq 1 frac 0 (last pending)
    np.testing.assert_allclose(dms.compression_loss(d, None, 0.5), 0.25)


def test_cr_schedule():
    f = dms.target_compression_ratio
    assert float(f(0, 1.0, 16.0, 510)) == 1.0
    np.testing.assert_allclose(float(f(255, 1.0, 16.0, 510)), 8.5)
    assert float(f(510, 1.0, 16.0, 510)) == 16.0
    assert float(f(10_000, 1.0, 16.0, 510)) == 16.0
    np.testing.assert_allclose(float(jax.jit(f, static_argnums=(1, 2, 3))(jnp.int32(51), 1.0, 16.0, 510)), 2.5)
    np.testing.assert_allclose(float(dms.target_eviction_fraction(4.0)), 0.75)
    assert float(dms.target_eviction_fraction(1.0)) == 0.0
    with pytest.raises(ValueError, match="final_step"):
        f(0, 1.0, 4.0, 0)


# ----------------------------------------------------------------------------- kv stats


def np_kv_stats(dec, valid, w):
    """Loop version: simulate the visible set for every valid query (in valid-token time)."""
    l_, b_, h_, t_ = dec.shape
    res = {k: np.zeros(b_) for k in ("n_tokens", "n_live", "n_old", "n_old_kept", "token_reads")}
    for b in range(b_):
        idx = [t for t in range(t_) if valid[b, t]]
        n = len(idx)
        for l in range(l_):
            for h in range(h_):
                for r_q in range(n):
                    for r_k in range(r_q + 1):
                        if r_q - r_k <= w or dec[l, b, h, idx[r_k]] == 0:
                            res["token_reads"][b] += 1
                for r_k in range(n):
                    res["n_tokens"][b] += 1
                    age = n - 1 - r_k
                    keep = dec[l, b, h, idx[r_k]] == 0
                    if age > w:
                        res["n_old"][b] += 1
                        res["n_old_kept"][b] += keep
                    if age <= w or keep:
                        res["n_live"][b] += 1
    return res


def test_kv_stats_match_numpy():
    rng = np.random.default_rng(9)
    l, b, h, t, w = 2, 3, 2, 12, 2
    dec = (rng.random((l, b, h, t)) > 0.5).astype(np.float32)
    valid = np.ones((b, t), bool)
    valid[0, :3] = False
    valid[1, 7:] = False
    valid[2, [2, 5]] = False  # holes: time is counted in valid tokens
    got = dms.kv_stats(jnp.asarray(dec), jnp.asarray(valid), w)
    ref = np_kv_stats(dec, valid, w)
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, err_msg=k)
    n = valid.sum(-1)
    np.testing.assert_allclose(got["token_reads_dense"], l * h * n * (n + 1) / 2)
    np.testing.assert_allclose(got["cache_ratio"], ref["n_tokens"] / ref["n_live"], rtol=1e-6)
    np.testing.assert_allclose(got["cr_outside_window"], ref["n_old"] / ref["n_old_kept"], rtol=1e-6)
    chex.assert_shape(list(got.values()), (b,))


def test_kv_stats_hand_worked_and_edges():
    # one layer/head, T = 6, window 1, tokens 0, 1, 2 marked: at the end tokens 0..3 are older than w
    dec = jnp.asarray([[[1.0, 1.0, 1.0, 0.0, 1.0, 0.0]]])
    s = dms.kv_stats(dec, None, 1)
    assert float(s["n_old"][0]) == 4 and float(s["n_old_kept"][0]) == 1
    assert float(s["cr_outside_window"][0]) == 4.0
    assert float(s["n_live"][0]) == 3 and float(s["cache_ratio"][0]) == 2.0
    # nothing marked -> ratios 1; everything old marked -> inf; short sequence -> 1
    assert float(dms.kv_stats(jnp.zeros((1, 1, 6)), None, 1)["cr_outside_window"][0]) == 1.0
    assert float(dms.kv_stats(jnp.ones((1, 1, 6)), None, 1)["cr_outside_window"][0]) == math.inf
    assert float(dms.kv_stats(jnp.ones((1, 1, 2)), None, 4)["cr_outside_window"][0]) == 1.0
    empty = dms.kv_stats(jnp.ones((1, 1, 3)), jnp.zeros((1, 3), bool), 1)
    assert float(empty["cache_ratio"][0]) == 1.0 and float(empty["n_tokens"][0]) == 0.0
