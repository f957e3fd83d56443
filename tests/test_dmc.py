"""Tests of DMC (dms_jax/dmc.py and its wiring in model.py; the training wiring and the CLI: test_dmc_train.py).

The numpy references are plain loops (a token-by-token merge cache, the recurrence, double sums), sharing no code
with the jnp implementation. The central check is the one DMC's training rests on: with hard decisions, the
training-side parallel form (every intermediate state kept, overwritten states hidden by the bias) gives exactly
what a query sees in the token-by-token merge cache.

Tolerances (float32): pure math against float64 numpy: rtol 1e-5 / atol 1e-6 (accumulate, bias, logits) and
atol 2e-5 on attention outputs of magnitude ~1 (a softmax and two weighted means in float32); model logits, hard
forward against the token-by-token cache: max |diff| <= 1e-4 * max |logit| (the brief's bound; observed ~1e-6);
0/1 decisions and counts exactly.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dms_jax import dmc, dms
from dms_jax import model as M
from dms_jax.config import DMCConfig, DMSConfig, ModelConfig
from dms_jax.train import step as train

# ----------------------------------------------------------------------------------------------- numpy references


def np_rope(x, pos, theta=10000.0):
    """Rotate-half RoPE of one vector x [D] at integer position pos."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x[d // 2:], x[:d // 2]])
    return x * np.cos(ang) + rot * np.sin(ang)


def zero_last(x):
    x = np.array(x, np.float64)
    x[..., -1] = 0
    return x


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_accumulate_recurrence(x, alpha, w):
    """acc_t = alpha_t acc_{t-1} + w_t x_t, z_t = alpha_t z_{t-1} + w_t, state_t = acc_t / z_t (no window).
    x [B, T, H, D], alpha/w [B, H, T]."""
    b_, t_, h_, _ = x.shape
    out = np.zeros(x.shape)
    for b in range(b_):
        for h in range(h_):
            acc, z = 0.0, 0.0
            for t in range(t_):
                acc = alpha[b, h, t] * acc + w[b, h, t] * x[b, t, h].astype(np.float64)
                z = alpha[b, h, t] * z + w[b, h, t]
                out[b, t, h] = acc / z
    return out


def np_accumulate_window(x, alpha, w, window):
    """The windowed double sum: state_t = sum_{m<W} c x_{t-m} / sum c, c = w_{t-m} prod_{i=t-m+1}^{t} alpha_i."""
    b_, t_, h_, _ = x.shape
    out = np.zeros(x.shape)
    for b in range(b_):
        for h in range(h_):
            for t in range(t_):
                num, den = 0.0, 0.0
                for m in range(min(window, t + 1)):
                    c = w[b, h, t - m] * np.prod([alpha[b, h, i] for i in range(t - m + 1, t + 1)])
                    num = num + c * x[b, t - m, h].astype(np.float64)
                    den += c
                out[b, t, h] = num / den
    return out


def np_merge_cache(q, k, v, merge, w, window, pos, valid=None):
    """Token-by-token DMC cache of one attention layer with hard decisions; returns (attention outputs [B, T, Hq, D],
    slots: per (b, h) the list of (rotated key, value) after the last token).

    q [B, T, Hq, D], k/v [B, T, Hkv, D] before RoPE; merge [B, Hkv, T] 0/1 (1 = merge into the last slot); w [B, Hkv, T]
    importance. A merge takes the importance-weighted mean of the slot's newest `window` tokens (pre-RoPE); the
    slot's key is that mean with element d-1 zeroed, rotated at the newest token's position, zeroed again."""
    b_, t_, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    out = np.zeros(q.shape)
    slots_all = {}
    for b in range(b_):
        for h in range(hkv):
            slots, segment = [], []
            for t in range(t_):
                if valid is not None and not valid[b, t]:
                    continue
                entry = (w[b, h, t], zero_last(k[b, t, h]), np.asarray(v[b, t, h], np.float64))
                if merge[b, h, t] and slots:
                    segment.append(entry)
                else:
                    segment = [entry]
                    slots.append(None)
                used = segment[-window:]
                tot = sum(e[0] for e in used)
                sk = sum(e[0] * e[1] for e in used) / tot
                sv = sum(e[0] * e[2] for e in used) / tot
                slots[-1] = (zero_last(np_rope(sk, pos[b, t])), sv)
                keys = np.stack([s[0] for s in slots])
                vals = np.stack([s[1] for s in slots])
                for j in range(g):
                    qh = zero_last(np_rope(zero_last(q[b, t, h * g + j]), pos[b, t]))
                    scores = keys @ qh / np.sqrt(d)
                    p = np.exp(scores - scores.max())
                    out[b, t, h * g + j] = (p / p.sum()) @ vals
            slots_all[b, h] = slots
    return out, slots_all


def random_hard_merges(rng, b, h, t, p=0.6):
    m = (rng.random((b, h, t)) < p).astype(np.float32)
    m[..., 0] = 0  # the first token appends
    return m


# ----------------------------------------------------------------------------------------------- pure math


def test_merge_logits_and_importance_match_numpy():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d = 2, 5, 6, 2, 8  # G = 3: the importance is the mean of three query heads
    q = rng.normal(size=(b, t, hq, d)).astype(np.float32) * 3
    k = rng.normal(size=(b, t, hkv, d)).astype(np.float32) * 3
    logits = dmc.merge_logits(jnp.asarray(k), 5.0)
    omega = dmc.importance_weights(jnp.asarray(q), hkv, 5.0)
    chex.assert_shape([logits, omega], (b, hkv, t))
    chex.assert_type([logits, omega], jnp.float32)
    want_logits = np.zeros((b, hkv, t))
    want_omega = np.zeros((b, hkv, t))
    for bi in range(b):
        for h in range(hkv):
            for ti in range(t):
                want_logits[bi, h, ti] = k[bi, ti, h, d - 1] - 5.0
                mean_q = np.mean([q[bi, ti, h * 3 + j, d - 1] for j in range(3)])
                want_omega[bi, h, ti] = np_sigmoid(mean_q + 5.0) + 2.0 ** -7
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(omega), want_omega, rtol=1e-6, atol=1e-7)
    # bf16 inputs still give float32 logits and weights.
    chex.assert_type(dmc.merge_logits(jnp.asarray(k, jnp.bfloat16), 5.0), jnp.float32)
    with pytest.raises(ValueError, match="divide"):
        dmc.importance_weights(jnp.asarray(q), 4, 5.0)
    # logit_scale s: s * k[d-1] - offset and sigmoid(s * mean q[d-1] + offset).
    scaled = dmc.merge_logits(jnp.asarray(k), 5.0, 7.5)
    np.testing.assert_allclose(np.asarray(scaled), 7.5 * (want_logits + 5.0) - 5.0, rtol=1e-5, atol=1e-5)
    omega_scaled = dmc.importance_weights(jnp.asarray(q), hkv, 5.0, 0.25)
    mean_q = q[..., d - 1].reshape(b, t, hkv, 3).mean(-1).transpose(0, 2, 1)
    np.testing.assert_allclose(np.asarray(omega_scaled), np_sigmoid(0.25 * mean_q + 5.0) + 2.0 ** -7,
                               rtol=1e-6, atol=1e-7)


def test_borrowed_neuron_scaling_and_decay_schedule():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 2, 4)), jnp.float32)
    z = dmc.scale_borrowed_neurons(x, 0.0)
    assert float(jnp.abs(z[..., -1]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(z[..., :-1]), np.asarray(x[..., :-1]))
    half = dmc.scale_borrowed_neurons(x, jnp.float32(0.5))
    np.testing.assert_allclose(np.asarray(half[..., -1]), 0.5 * np.asarray(x[..., -1]), rtol=1e-7)
    # 1 -> 0 linearly over 80% of the decay steps, then 0 (reference: max(0, 1 - it / (0.8 * iters))).
    got = [float(dmc.neuron_decay_scale(s, 10)) for s in (0, 4, 8, 9, 12)]
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0, 0.0, 0.0], atol=1e-7)
    assert float(dmc.neuron_decay_scale(3, 0)) == 0.0


def test_segment_starts_with_left_and_right_padding():
    valid = np.array([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]], bool)
    starts = np.asarray(dmc.segment_starts(jnp.asarray(valid)))
    np.testing.assert_array_equal(starts, [[1, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]])
    x = jnp.ones((2, 3, 6))
    forced = np.asarray(dmc.force_append(x, jnp.asarray(starts), 0.0))
    np.testing.assert_array_equal(forced, np.broadcast_to(~starts[:, None, :], (2, 3, 6)).astype(np.float32))


@pytest.mark.parametrize("window", [1, 3, 40])
def test_accumulate_soft_matches_the_windowed_double_sum(window):
    rng = np.random.default_rng(window)
    b, t, h, d = 2, 17, 3, 4
    x = rng.normal(size=(b, t, h, d)).astype(np.float32)
    alpha = rng.random((b, h, t)).astype(np.float32)
    alpha[..., 0] = 0
    w = (0.05 + rng.random((b, h, t))).astype(np.float32)
    got = dmc.accumulate(jnp.asarray(x), jnp.asarray(alpha), jnp.asarray(w), window)
    chex.assert_shape(got, x.shape)
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np_accumulate_window(x, alpha, w, window), rtol=1e-5, atol=1e-6)
    if window >= t:  # no truncation: the plain recurrence acc = alpha acc + w x, z = alpha z + w
        np.testing.assert_allclose(np.asarray(got), np_accumulate_recurrence(x, alpha, w), rtol=1e-5, atol=1e-6)
    # bf16 in, bf16 out (computed in float32 inside).
    chex.assert_type(dmc.accumulate(jnp.asarray(x, jnp.bfloat16), jnp.asarray(alpha), jnp.asarray(w), window),
                     jnp.bfloat16)


def test_attention_bias_matches_numpy_with_chunked_queries_and_padding():
    rng = np.random.default_rng(3)
    b, h, tk, tq = 2, 2, 9, 4
    log_keep = np.log(rng.random((b, h, tk))).astype(np.float32)
    k_pos = np.tile(np.arange(tk), (b, 1))
    q_pos = k_pos[:, -tq:]  # a chunk of the last 4 positions against every key
    k_valid = np.ones((b, tk), bool)
    k_valid[1, :2] = False
    got = np.asarray(dmc.attention_bias(jnp.asarray(log_keep), jnp.asarray(q_pos), jnp.asarray(k_pos),
                                        jnp.asarray(k_valid)))
    chex.assert_shape(got, (b, h, tq, tk))
    neg = dms.mask_value(jnp.float32)
    for bi in range(b):
        for hi in range(h):
            for qi in range(tq):
                for kj in range(tk):
                    i, j = q_pos[bi, qi], k_pos[bi, kj]
                    if j > i or not k_valid[bi, kj]:
                        want = neg
                    elif j == i:
                        want = 0.0
                    else:
                        want = log_keep[bi, hi, kj]
                    assert got[bi, hi, qi, kj] == pytest.approx(want, rel=1e-6), (bi, hi, qi, kj)
    # -inf log-keep (alpha = 1 exactly) is clamped to the finite mask value: no NaN in a softmax.
    inf = dmc.attention_bias(jnp.full((1, 1, 3), -jnp.inf), jnp.arange(3)[None], jnp.arange(3)[None])
    assert np.isfinite(np.asarray(inf)).all()


@pytest.mark.parametrize("window", [3, 32])
def test_merge_cache_equals_parallel_form_with_hard_decisions(window):
    """One attention layer, GQA (G = 2), fresh random inputs: the token-by-token merge cache (numpy) against the
    training-side parallel form (accumulate + RoPE + bias, jnp), and the jnp cache update functions against the
    numpy cache's slots."""
    rng = np.random.default_rng(10 + window)
    b, t, hq, hkv, d = 2, 24, 4, 2, 8
    q = rng.normal(size=(b, t, hq, d)).astype(np.float32)
    k = rng.normal(size=(b, t, hkv, d)).astype(np.float32)
    v = rng.normal(size=(b, t, hkv, d)).astype(np.float32)
    merge = random_hard_merges(rng, b, hkv, t, p=0.7)
    w = (0.05 + rng.random((b, hkv, t))).astype(np.float32)
    pos = np.tile(np.arange(t), (b, 1)) + np.array([[0], [5]])  # the second row starts at position 5
    # Some segment must be longer than the window for the truncation to be tested.
    longest = max(len(s) for s in "".join(map(str, merge.astype(int).ravel())).split("0"))
    assert window >= 32 or longest >= window

    cfg = ModelConfig(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=hq, num_kv_heads=hkv, head_dim=d)
    cos, sin = M.rope_cos_sin(cfg, jnp.asarray(pos))
    rot = lambda x: dmc.scale_borrowed_neurons(M.apply_rope(dmc.scale_borrowed_neurons(x, 0.0), cos, sin), 0.0)
    k_states = dmc.accumulate(dmc.scale_borrowed_neurons(jnp.asarray(k), 0.0), jnp.asarray(merge), jnp.asarray(w),
                              window)
    v_states = dmc.accumulate(jnp.asarray(v), jnp.asarray(merge), jnp.asarray(w), window)
    log_keep = dms.hard_log_keep(dms.shift_to_owner(jnp.asarray(merge), 0.0))
    bias = dmc.attention_bias(log_keep, jnp.asarray(pos), jnp.asarray(pos))
    got = M.attend(rot(jnp.asarray(q)), rot(k_states), v_states, bias)
    want, slots = np_merge_cache(q, k, v, merge, w, window, pos)
    chex.assert_shape(got, q.shape)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)

    # The jnp cache update (dmc.window_update + dmc.slot_write), one token at a time.
    s_max = t
    win_k = jnp.zeros((b, hkv, window, d))
    win_v = jnp.zeros((b, hkv, window, d))
    win_w = jnp.ones((b, hkv, window))
    seg_len = jnp.zeros((b, hkv), jnp.int32)
    slots_k = jnp.zeros((b, hkv, s_max, d))
    slots_v = jnp.zeros((b, hkv, s_max, d))
    n_slots = jnp.zeros((b, hkv), jnp.int32)
    valid = jnp.ones((b,), bool)
    for ti in range(t):
        m = jnp.asarray(merge[..., ti] > 0.5)
        win_k, win_v, win_w, seg_len, sk, sv = dmc.window_update(
            win_k, win_v, win_w, seg_len, jnp.full((b,), ti, jnp.int32),
            dmc.scale_borrowed_neurons(jnp.asarray(k[:, ti]), 0.0), jnp.asarray(v[:, ti]), jnp.asarray(w[..., ti]),
            m, valid)
        c1, s1 = M.rope_cos_sin(cfg, jnp.asarray(pos[:, ti:ti + 1]))
        sk = dmc.scale_borrowed_neurons(M.apply_rope(sk[:, None], c1, s1), 0.0)[:, 0]
        slots_k, slots_v, n_slots = dmc.slot_write(slots_k, slots_v, n_slots, sk, sv, m, valid)
    for bi in range(b):
        for h in range(hkv):
            n = len(slots[bi, h])
            assert int(n_slots[bi, h]) == n == t - int(merge[bi, h].sum())
            np.testing.assert_allclose(np.asarray(slots_k[bi, h, :n]), np.stack([s[0] for s in slots[bi, h]]),
                                       atol=2e-6)
            np.testing.assert_allclose(np.asarray(slots_v[bi, h, :n]), np.stack([s[1] for s in slots[bi, h]]),
                                       atol=2e-6)


def test_kv_stats_counts_slots():
    rng = np.random.default_rng(4)
    nl, b, h, t = 2, 2, 3, 11
    merge = random_hard_merges(rng, nl * b, h, t).reshape(nl, b, h, t)
    valid = np.ones((b, t), bool)
    valid[1, :3] = False
    merge[:, 1, :, :4] = 0  # padding and the first valid token append (dmc.segment_starts)
    s = {k_: np.asarray(x) for k_, x in dmc.kv_stats(jnp.asarray(merge), jnp.asarray(valid)).items()}
    for bi in range(b):
        slots, reads = 0, 0
        for li in range(nl):
            for hi in range(h):
                count = 0
                for ti in range(t):
                    if valid[bi, ti]:
                        count += merge[li, bi, hi, ti] == 0
                        reads += count
                slots += count
        n = valid[bi].sum()
        assert s["n_tokens"][bi] == nl * h * n and s["n_live"][bi] == slots and s["token_reads"][bi] == reads
        assert s["token_reads_dense"][bi] == nl * h * n * (n + 1) / 2
        assert s["cache_ratio"][bi] == pytest.approx(nl * h * n / slots)
        assert s["cr_outside_window"][bi] == s["cache_ratio"][bi]


def test_dmc_config_validation():
    assert DMCConfig() == DMCConfig(accumulation_window=12, tau=0.1, logit_offset=5.0, logit_scale=1.0)
    for kw, msg in [({"accumulation_window": 0}, "accumulation_window"), ({"accumulation_window": 2.5},
                    "accumulation_window"), ({"tau": 0.0}, "tau"), ({"logit_offset": float("nan")}, "logit_offset"),
                    ({"logit_scale": 0.0}, "logit_scale"), ({"logit_scale": float("inf")}, "logit_scale")]:
        with pytest.raises(ValueError, match=msg):
            DMCConfig(**kw)


# ----------------------------------------------------------------------------------------------- the model

LLAMA = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
QWEN3 = dataclasses.replace(LLAMA, model_type="qwen3", qk_norm=True, num_heads=6, num_kv_heads=2, head_dim=16,
                            rope_theta=1e6)


def wide_model(cfg, dmc_cfg, seed=0):
    """A random model whose weights are wide enough (embeddings ~N(0, 1), kernels ~N(0, 0.2^2)) that merges change
    the logits visibly and the merge neuron k[d-1] is of order 1."""
    model = M.create_model(cfg, dmc_cfg=dmc_cfg, seed=seed)  # every matrix N(0, 0.02^2)
    nnx.update(model, jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, nnx.state(model, nnx.Param)))
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 5.0
    return model


def run_hard(model, tokens, positions, valid):
    gd, state = nnx.split(model)
    return jax.jit(lambda s, t, p, v: nnx.merge(gd, s)(t, p, v, dms_mode="hard"))(state, tokens, positions, valid)


@pytest.mark.parametrize("family,window", [("llama", 3), ("qwen3", 16)])
def test_hard_forward_equals_prefill_and_decode_through_the_merge_cache(family, window):
    """The training-side forward in hard mode (fp32) against prefill + token-by-token decode through the dense DMC
    cache, on a batch with one left-padded row."""
    cfg = LLAMA if family == "llama" else QWEN3
    ccfg = DMCConfig(accumulation_window=window, logit_offset=0.3)  # offset 0.3: a mix of merges and appends
    model = wide_model(cfg, ccfg, seed=1)
    b, t, pad, prefill = 2, 20, 3, 12
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, t)), jnp.int32)
    valid = np.ones((b, t), bool)
    valid[1, :pad] = False
    positions = np.tile(np.arange(t), (b, 1))
    positions[1] = np.maximum(positions[1] - pad, 0)
    valid, positions = jnp.asarray(valid), jnp.asarray(positions, jnp.int32)

    ref, aux = run_hard(model, tokens, positions, valid)
    decisions = np.asarray(aux["decisions"])
    chex.assert_shape(decisions, (cfg.num_layers, b, cfg.num_kv_heads, t))
    frac = decisions.transpose(0, 2, 1, 3)[:, :, np.asarray(valid)].mean()  # over layers, heads, valid tokens
    assert 0.2 < frac < 0.8, frac  # the check has teeth: both appends and merges
    assert np.all(decisions[:, 1, :, :pad + 1] == 0) and np.all(decisions[..., 0] == 0)  # segment starts append
    vanilla, _ = model(tokens, positions, valid)
    assert np.abs(np.asarray(vanilla) - np.asarray(ref)).max() > 1e-2 * np.abs(np.asarray(ref)).max()

    gd, state = nnx.split(model)
    step = jax.jit(lambda s, c, tk, p, v: M.forward_with_dmc_cache(nnx.merge(gd, s), tk, p, v, c))
    cache = M.init_dmc_cache(cfg, ccfg, b, max_slots=t)
    logits, cache = step(state, cache, tokens[:, :prefill], positions[:, :prefill], valid[:, :prefill])
    out = [logits]
    for i in range(prefill, t):
        logits, cache = step(state, cache, tokens[:, i:i + 1], positions[:, i:i + 1], valid[:, i:i + 1])
        out.append(logits)
    got = np.concatenate([np.asarray(x) for x in out], axis=1)
    v_np = np.asarray(valid)
    err = np.abs(got - np.asarray(ref))[v_np].max()
    assert err <= 1e-4 * np.abs(np.asarray(ref))[v_np].max(), err
    # Slots per head = appended valid tokens, as dmc.kv_stats counts them.
    want_slots = (v_np[None, :, None, :] & (decisions < 0.5)).sum(-1)
    np.testing.assert_array_equal(np.asarray(cache["n_slots"]), want_slots)
    assert np.asarray(cache["n_seen"]).tolist() == [t, t - pad]


def test_train_mode_without_noise_at_low_temperature_is_hard_mode(monkeypatch):
    """The soft path (sigmoid alpha in the accumulation, log(1 - alpha_{j+1}) bias) tends to the hard path as
    tau -> 0 without noise: checks that the relaxation relaxes the same computation."""
    ccfg = DMCConfig(accumulation_window=4, logit_offset=0.3, tau=1e-4)
    model = wide_model(LLAMA, ccfg, seed=2)
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, LLAMA.vocab_size, size=(2, 16)), jnp.int32)
    hard, aux_h = model(tokens, dms_mode="hard")
    monkeypatch.setattr(dms, "logistic_noise", lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype))
    soft, aux_s = model(tokens, dms_mode="train", noise_key=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(aux_s["decisions"]), np.asarray(aux_h["decisions"]))
    np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), atol=1e-4 * np.abs(np.asarray(hard)).max())


def test_train_mode_gradients_reach_both_borrowed_neurons():
    """The hinge's straight-through gradient and the KL reach the k neuron (merge logit) and the q neuron
    (importance) of every layer; the noisy forward is finite."""
    ccfg = DMCConfig(accumulation_window=4, logit_offset=0.3)
    model = wide_model(LLAMA, ccfg, seed=3)
    teacher = nnx.state(model)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, LLAMA.vocab_size, size=(2, 16)), jnp.int32)
    valid = jnp.ones(tokens.shape, bool)
    gd, params, frozen = nnx.split(model, nnx.Param, ...)
    grads, metrics = jax.grad(train.distill_loss, argnums=1, has_aux=True)(
        gd, params, frozen, teacher, tokens, valid, jax.random.key(1), jnp.float32(0.9), False)
    assert all(np.isfinite(float(x)) for x in metrics.values()) and float(metrics["loss_cr"]) > 0
    d = LLAMA.head_dim
    for i in range(LLAMA.num_layers):
        gk = np.asarray(grads["layers"][i]["self_attn"]["k_proj"]["kernel"][...])
        gq = np.asarray(grads["layers"][i]["self_attn"]["q_proj"]["kernel"][...])
        assert np.abs(gk[:, d - 1::d]).max() > 0 and np.abs(gq[:, d - 1::d]).max() > 0


def test_stage_one_scale_one_is_the_teacher_and_scale_zero_is_dmc_without_merges():
    ccfg = DMCConfig(accumulation_window=4, logit_offset=1e4)  # offset 1e4: no token ever merges, omega = 1
    model = wide_model(LLAMA, ccfg, seed=4)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, LLAMA.vocab_size, size=(2, 12)), jnp.int32)
    teacher, _ = model(tokens)
    np.testing.assert_array_equal(np.asarray(model(tokens, borrowed_neuron_scale=jnp.float32(1.0))[0]),
                                  np.asarray(teacher))
    zeroed, _ = model(tokens, borrowed_neuron_scale=jnp.float32(0.0))
    hard, aux = model(tokens, dms_mode="hard")
    assert float(aux["decisions"].max()) == 0.0
    np.testing.assert_allclose(np.asarray(zeroed), np.asarray(hard), atol=1e-5 * np.abs(np.asarray(hard)).max())
    assert np.abs(np.asarray(zeroed) - np.asarray(teacher)).max() > 1e-3  # the neurons did matter
    with pytest.raises(ValueError, match="borrowed_neuron_scale"):
        model(tokens, dms_mode="hard", borrowed_neuron_scale=0.5)
    with pytest.raises(ValueError, match="not both"):
        M.create_model(LLAMA, DMSConfig(), dmc_cfg=ccfg)


# ----------------------------------------------------------------------------------------------- generation


def _left_and_right_padded_batch(cfg, rng, t=14):
    """Three rows of t slots: full, four slots of left padding, three slots of right padding."""
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(3, t)), jnp.int32)
    valid = np.ones((3, t), bool)
    valid[1, :4] = False
    valid[2, -3:] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0)
    return tokens, jnp.asarray(positions, jnp.int32), jnp.asarray(valid)


def test_parallel_prefill_equals_the_token_by_token_cache():
    """model.prefill_dmc_cache (one full-sequence pass, states scattered to their slots) against
    forward_with_dmc_cache (one dmc_decode_step per token): the same logits and the same cache, with left and right
    padding and segments longer than the accumulation window (W = 3)."""
    ccfg = DMCConfig(accumulation_window=3, logit_offset=0.3)
    model = wide_model(LLAMA, ccfg, seed=1)
    t, max_slots = 14, 16
    tokens, positions, valid = _left_and_right_padded_batch(LLAMA, np.random.default_rng(11), t)
    gd, state = nnx.split(model)
    parallel = jax.jit(lambda s, tk, p, v: M.prefill_dmc_cache(nnx.merge(gd, s), tk, p, v, max_slots,
                                                               all_logits=True))
    scan = jax.jit(lambda s, tk, p, v: M.forward_with_dmc_cache(
        nnx.merge(gd, s), tk, p, v, M.init_dmc_cache(LLAMA, ccfg, 3, max_slots)))
    got_logits, got = parallel(state, tokens, positions, valid)
    want_logits, want = scan(state, tokens, positions, valid)
    v_np = np.asarray(valid)
    ref = np.asarray(want_logits)[v_np]
    assert np.abs(np.asarray(got_logits)[v_np] - ref).max() <= 1e-4 * np.abs(ref).max()
    assert set(got) == set(want)
    for key in ("n_slots", "seg_len", "n_seen"):
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
    for key in ("k", "v", "win_k", "win_v", "win_w"):
        chex.assert_equal_shape([got[key], want[key]])
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), atol=1e-5, err_msg=key)
    # The check has teeth: both merges and appends, and some segment longer than the window.
    slots = np.asarray(want["n_slots"])
    seen = v_np.sum(-1)
    assert (slots < seen[None, :, None]).any() and (slots > seen[None, :, None] // 2).any()
    assert (np.asarray(want["seg_len"]) == 3).any()
    last, _ = jax.jit(lambda s: M.prefill_dmc_cache(nnx.merge(gd, s), tokens, positions, valid, max_slots))(state)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(got_logits)[:, -1])
    with pytest.raises(ValueError, match="max_slots"):
        M.prefill_dmc_cache(model, tokens, positions, valid, t - 1)


def _greedy_by_full_recompute(model, prompt, n_new, width):
    """Greedy tokens by recomputing the whole hard-mode forward for every new token (right-padded to `width` so
    that one compiled forward serves every step; padding after the last token changes nothing before it)."""
    gd, state = nnx.split(model)
    fwd = jax.jit(lambda s, tk, v: nnx.merge(gd, s)(tk, valid=v, dms_mode="hard")[0])
    seq = list(prompt)
    for _ in range(n_new):
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(seq)] = seq
        valid = np.arange(width)[None] < len(seq)
        logits = fwd(state, jnp.asarray(tokens), jnp.asarray(valid))
        seq.append(int(np.argmax(np.asarray(logits)[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_generate_dmc_greedy_equals_recomputing_the_hard_forward():
    """generate_dmc (parallel prefill, then merge-cache decode, stop ids, left-padded batch) against greedy decoding
    that recomputes the hard-mode full forward from scratch for every token; its cache statistics against the
    decisions of that forward over everything the cache has seen."""
    from dms_jax.serve.reference import generate, generate_dmc

    ccfg = DMCConfig(accumulation_window=3, logit_offset=0.3)
    model = wide_model(LLAMA, ccfg, seed=2)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(0, LLAMA.vocab_size, size=n).tolist() for n in (5, 11)]
    n_new = 10
    refs = [_greedy_by_full_recompute(model, p, n_new, 11 + n_new) for p in prompts]
    # Stop at the first occurrence of a token the first row emits mid-way; other rows stop there too if they emit it.
    k = next(i for i in range(2, n_new) if refs[0][i] not in refs[0][:i])
    stop = refs[0][k]
    want = [r[:r.index(stop) + 1] if stop in r else r for r in refs]
    assert len(want[0]) == k + 1 < n_new

    got, stats = generate_dmc(model, prompts, max_new_tokens=n_new, stop_ids=[stop], pad_to_multiple=8)
    assert got == want
    got_scan, stats_scan = generate_dmc(model, prompts, max_new_tokens=n_new, stop_ids=[stop], pad_to_multiple=8,
                                        prefill="scan")
    assert got_scan == want
    for key in stats:
        np.testing.assert_allclose(stats_scan[key], stats[key], err_msg=key)
    # Merges change the continuation: the comparison is not one between two dense decodes.
    assert generate(model, prompts, max_new_tokens=n_new, stop_ids=[stop], pad_to_multiple=8) != want

    # Statistics: every prompt and emitted token went into the cache; a head holds one slot per appended token.
    for row, (p, out) in enumerate(zip(prompts, got)):
        seq = jnp.asarray([p + out], jnp.int32)
        _, aux = model(seq, dms_mode="hard")
        slots = (np.asarray(aux["decisions"])[:, 0] < 0.5).sum(-1)  # [L, Hkv]
        np.testing.assert_array_equal(stats["slots"][row], slots)
        assert stats["tokens_seen"][row] == seq.shape[1]
        assert stats["n_tokens"][row] == LLAMA.num_layers * LLAMA.num_kv_heads * seq.shape[1]
        assert stats["n_live"][row] == slots.sum()
        assert stats["cache_ratio"][row] == pytest.approx(stats["n_tokens"][row] / slots.sum())
    assert stats["cache_ratio"].min() > 1.2  # merges happened
    with pytest.raises(ValueError, match="prefill"):
        generate_dmc(model, prompts, prefill="chunked")
    with pytest.raises(ValueError, match="DMCConfig"):
        generate_dmc(M.create_model(LLAMA), prompts)


def test_generate_dmc_without_merges_equals_dense_generation():
    """Borrowed neurons zeroed (every merge logit = -offset < 0): no token merges, and DMC generation, greedy and
    sampled, equals plain dense generation of the same weights; the cache ratio is 1."""
    from dms_jax.serve.reference import generate, generate_dmc
    from dms_jax.serve.sampling import SamplingConfig

    model = wide_model(LLAMA, DMCConfig(accumulation_window=3), seed=3)
    train.zero_dmc_neurons(model)
    rng = np.random.default_rng(13)
    prompts = [rng.integers(0, LLAMA.vocab_size, size=n).tolist() for n in (9, 3)]
    for sampling in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=20)):
        kw = dict(max_new_tokens=8, stop_ids=[-1], sampling=sampling, seed=7, pad_to_multiple=8)
        got, stats = generate_dmc(model, prompts, **kw)
        assert got == generate(model, prompts, **kw), sampling
        assert all(len(x) == 8 for x in got)
        np.testing.assert_array_equal(stats["tokens_seen"], [9 + 8, 3 + 8])
        np.testing.assert_array_equal(stats["cache_ratio"], [1.0, 1.0])
        np.testing.assert_array_equal(stats["slots"], np.broadcast_to(
            stats["tokens_seen"][:, None, None], (2, LLAMA.num_layers, LLAMA.num_kv_heads)))
