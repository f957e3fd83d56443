"""DMS-masked flash attention: Pallas kernels (TPU-style under TPU interpret mode, GPU-style under the generic
interpreter) vs the jnp reference, forward and gradients (dq, dk, dv, dlog_keep against jax.grad); the reference
and the "xla" dispatch vs a plain numpy implementation written here."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    dms_flash_attention,
    dms_flash_attention_reference,
    dms_flash_block_map,
)

PATHS = ["pallas_tpu", "pallas_gpu"]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
BLOCKS = dict(block_q=16, block_k=16)


def _rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _make(seed, *, B, T, S, Hq, Hkv, D, dtype, q_offset=None, hard_frac=None, pad_frac=0.0, shuffle_keys=False):
    """Random inputs. Keys sit at positions 0..S-1 (optionally shuffled: cache order is not time order);
    queries are the last T positions (a prefill chunk) unless q_offset is given."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D)), dtype)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), dtype)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D)), dtype)
    k_pos = np.tile(np.arange(S), (B, 1))
    if shuffle_keys:
        k_pos = np.stack([rng.permutation(S) for _ in range(B)])
    off = S - T if q_offset is None else q_offset
    q_pos = np.tile(np.arange(T) + off, (B, 1))
    if hard_frac is None:  # soft: log(1 - alpha), alpha in (0, 1)
        log_keep = np.log1p(-rng.uniform(0.0, 0.95, (B, Hkv, S)))
    else:  # hard: 0 (kept) or -inf (evicted after the window)
        log_keep = np.where(rng.random((B, Hkv, S)) < hard_frac, -np.inf, 0.0)
    k_valid = rng.random((B, S)) >= pad_frac
    return (q, k, v, jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_pos, jnp.int32),
            jnp.asarray(log_keep, jnp.float32), jnp.asarray(k_valid))


def _np_bias(q_pos, k_pos, log_keep, k_valid, window):
    """[B, Hkv, T, S] float64, the rule written out: -inf in the future or on padding, 0 within the window, else
    log_keep (0 when None; the head axis is then 1)."""
    dist = np.asarray(q_pos)[:, :, None] - np.asarray(k_pos)[:, None, :]  # [B, T, S]: how far behind the query
    lk = np.zeros((dist.shape[0], 1, dist.shape[2])) if log_keep is None else np.asarray(log_keep, np.float64)
    valid = np.ones(dist.shape, bool) if k_valid is None else np.asarray(k_valid)[:, None, :]
    bias = np.where((dist > window)[:, None], lk[:, :, None, :], 0.0)
    return np.where(((dist >= 0) & valid)[:, None], bias, -np.inf)


def _np_attention(q, k, v, q_pos, k_pos, log_keep, k_valid, window):
    """Float64 numpy, one query row at a time: softmax(q.k / sqrt(D) + bias) over the keys the row sees; a row that
    sees none gives zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, Hq, D = q.shape
    G = Hq // k.shape[2]
    bias = _np_bias(q_pos, k_pos, log_keep, k_valid, window)
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                row = bias[b, min(h // G, bias.shape[1] - 1), t]
                seen = np.isfinite(row)
                if not seen.any():
                    continue
                s = k[b, seen, h // G] @ q[b, t, h] / np.sqrt(D) + row[seen]
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ v[b, seen, h // G]
    return out


def _loss(fn, q, k, v, log_keep, rest):
    q_pos, k_pos, k_valid = rest
    o = fn(q, k, v, q_pos, k_pos, log_keep, k_valid).astype(jnp.float32)
    w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32) * 0.37).reshape(o.shape)
    return jnp.sum(o * w)


def _check(args, window, backend, dtype, grads=True, **kw):
    q, k, v, q_pos, k_pos, log_keep, k_valid = args
    ref_fn = lambda *a: dms_flash_attention_reference(*a, window=window)  # noqa: E731
    ker_fn = lambda *a: dms_flash_attention(*a, window=window, backend=backend, interpret=True,  # noqa: E731
                                            **{**BLOCKS, **kw})
    out = ker_fn(*args)
    ref = ref_fn(*args)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, dtype)
    chex.assert_tree_all_finite(out)
    assert _rel_err(out, ref) <= TOL[dtype], ("out", _rel_err(out, ref))
    if not grads:
        return out, ref
    rest = (q_pos, k_pos, k_valid)
    g_ker = jax.grad(lambda *a: _loss(ker_fn, *a, rest), argnums=(0, 1, 2, 3))(q, k, v, log_keep)
    g_ref = jax.grad(lambda *a: _loss(ref_fn, *a, rest), argnums=(0, 1, 2, 3))(q, k, v, log_keep)
    for name, a, b in zip(["dq", "dk", "dv", "dlog_keep"], g_ker, g_ref):
        chex.assert_tree_all_finite(a)
        chex.assert_equal_shape([a, b])
        assert _rel_err(a, b) <= TOL[dtype], (name, _rel_err(a, b))
    return out, ref


@pytest.mark.parametrize("backend", PATHS)
def test_flash_soft_f32_gqa_padding(backend):
    """Soft (training) mode, GQA G=2, T=S=40 (not block multiples), padded keys, window 5."""
    args = _make(0, B=2, T=40, S=40, Hq=4, Hkv=2, D=64, dtype=jnp.float32, pad_frac=0.15)
    _check(args, 5, backend, jnp.float32)


@pytest.mark.parametrize("backend", PATHS)
def test_flash_hard_chunked_f32_g1(backend):
    """Hard mode (-inf log_keep), a prefill chunk of 24 queries at positions 32..55 over 56 keys stored in a
    shuffled (non-temporal) order, G=1, D=128. Whole kv blocks are gone for late q blocks and get skipped."""
    args = _make(1, B=1, T=24, S=56, Hq=2, Hkv=2, D=128, dtype=jnp.float32, hard_frac=0.7, shuffle_keys=True)
    _check(args, 7, backend, jnp.float32)


@pytest.mark.parametrize("backend", PATHS)
def test_flash_bf16_g8(backend):
    """bf16 inputs, G=8 (one KV head, eight query heads), soft mode, f32 accumulation inside."""
    args = _make(2, B=1, T=32, S=48, Hq=8, Hkv=1, D=64, dtype=jnp.bfloat16, pad_frac=0.1)
    _check(args, 6, backend, jnp.bfloat16)


@pytest.mark.parametrize("backend", PATHS)
def test_flash_window_edges_hard(backend):
    """Every key evicted: a query sees exactly the keys with 0 <= q_pos - k_pos <= window. Getting w vs w+1
    wrong changes the output at every row. Also a row that sees nothing (all its keys padding) -> zeros."""
    B, T, S, w = 2, 16, 16, 3
    args = list(_make(3, B=B, T=T, S=S, Hq=2, Hkv=1, D=64, dtype=jnp.float32, hard_frac=1.0))
    k_valid = np.ones((B, S), bool)
    k_valid[1] = False  # batch row 1: every key is padding
    args[6] = jnp.asarray(k_valid)
    out, ref = _check(tuple(args), w, backend, jnp.float32, grads=False)
    assert np.all(np.asarray(out)[1] == 0)
    # Dense check of the semantics on batch row 0: a plain softmax over the keys inside the window.
    q, k, v = (np.asarray(a[0], np.float64) for a in args[:3])
    for t in range(T):
        keys = [s for s in range(S) if 0 <= t - s <= w]
        for h in range(2):
            sc = q[t, h] @ k[keys, 0].T / 8.0
            p = np.exp(sc - sc.max())
            np.testing.assert_allclose(np.asarray(out)[0, t, h], (p / p.sum()) @ v[keys, 0], rtol=1e-5, atol=1e-6)


def test_block_map_is_conservative_and_skips():
    """Every (q block, kv block) pair holding a visible entry is active; in hard mode with a chunked query,
    fully evicted blocks and future blocks are inactive."""
    from pallas_kernels.dms_flash import _BIG

    rng = np.random.default_rng(7)
    B, Hkv, T, S, bq, bk, w = 2, 2, 64, 128, 16, 16, 8
    q_pos = np.tile(np.arange(T) + 40, (B, 1))
    k_pos = np.stack([rng.permutation(S) for _ in range(B)])
    k_valid = rng.random((B, S)) > 0.1
    log_keep = np.where(rng.random((B, Hkv, S)) < 0.9, -np.inf, 0.0)
    log_keep[:, :, ::37] = 0.0
    visible = np.isfinite(_np_bias(q_pos, k_pos, log_keep, k_valid, w))
    active = np.asarray(dms_flash_block_map(
        jnp.asarray(q_pos, jnp.int32), jnp.asarray(np.where(k_valid, k_pos, _BIG), jnp.int32),
        jnp.asarray(log_keep, jnp.float32), w, bq, bk))
    blocks = visible.reshape(B, Hkv, T // bq, bq, S // bk, bk).any(axis=(3, 5))
    assert np.all(active[blocks])  # conservative
    # Sorted keys: the map is tight enough to skip a good share of the blocks.
    k_sorted = np.tile(np.arange(S), (B, 1))
    active_sorted = np.asarray(dms_flash_block_map(
        jnp.asarray(q_pos, jnp.int32), jnp.asarray(k_sorted, jnp.int32), jnp.asarray(log_keep, jnp.float32),
        w, bq, bk))
    assert active_sorted.mean() < 0.6, active_sorted.mean()


@pytest.mark.parametrize("backend", PATHS)
def test_flash_skip_blocks_equals_no_skip(backend):
    """Hard mode with sorted keys (most blocks skipped) gives the same result as visiting every block."""
    args = _make(4, B=1, T=32, S=64, Hq=2, Hkv=1, D=64, dtype=jnp.float32, hard_frac=0.9)
    a = dms_flash_attention(*args, window=4, backend=backend, interpret=True, **BLOCKS)
    b = dms_flash_attention(*args, window=4, backend=backend, interpret=True, skip_blocks=False, **BLOCKS)
    assert _rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("case", ["soft_gqa_padded", "hard_chunk_shuffled", "no_log_keep"])
def test_reference_and_xla_dispatch_match_numpy(case):
    """The jnp reference (which every kernel test compares with) and backend="xla" / "auto" (the default on CPU)
    against the numpy implementation above: soft and hard log_keep, GQA, padding, shuffled keys, a row that
    sees nothing, log_keep=None / k_valid=None meaning 0 / all valid."""
    if case == "soft_gqa_padded":
        args, w = _make(8, B=2, T=12, S=12, Hq=4, Hkv=2, D=16, dtype=jnp.float32, pad_frac=0.2), 3
    elif case == "hard_chunk_shuffled":
        args, w = _make(9, B=1, T=6, S=14, Hq=2, Hkv=1, D=16, dtype=jnp.float32, hard_frac=0.6,
                        shuffle_keys=True), 2
    else:
        q, k, v, q_pos, k_pos, _, _ = _make(5, B=1, T=8, S=8, Hq=2, Hkv=1, D=16, dtype=jnp.float32)
        args, w = (q, k, v, q_pos, k_pos, None, None), 2
    if case == "soft_gqa_padded":  # batch row 1's first query sees no valid key
        k_valid = np.asarray(args[6]).copy()
        k_valid[1, :1] = False
        args = args[:6] + (jnp.asarray(k_valid),)
    want = _np_attention(*args, window=w)
    if case == "soft_gqa_padded":
        assert np.all(want[1, 0] == 0)
    for out in (dms_flash_attention_reference(*args, window=w), dms_flash_attention(*args, window=w),
                dms_flash_attention(*args, window=w, backend="xla")):
        np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5, atol=1e-6)
    if case == "no_log_keep":
        ker = dms_flash_attention(*args, window=w, backend="pallas_gpu", interpret=True, **BLOCKS)
        np.testing.assert_allclose(np.asarray(ker, np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", PATHS)
def test_flash_fresh_random_sweep(backend):
    """Fresh seed every run (printed on failure): random shapes, GQA ratios, windows, modes, gradients."""
    seed = int(np.random.SeedSequence().entropy % (2**31))
    rng = np.random.default_rng(seed)
    for trial in range(4):
        Hkv = int(rng.integers(1, 3))
        G = int(rng.choice([1, 2, 4]))
        S = int(rng.integers(8, 70))
        T = int(rng.integers(1, S + 1))
        dtype = [jnp.float32, jnp.bfloat16][trial % 2]
        args = _make(int(rng.integers(1 << 30)), B=int(rng.integers(1, 3)), T=T, S=S, Hq=Hkv * G, Hkv=Hkv,
                     D=int(rng.choice([64, 128])), dtype=dtype, hard_frac=0.5 if trial % 2 else None,
                     pad_frac=0.1, shuffle_keys=bool(trial % 3 == 0))
        try:
            _check(args, int(rng.integers(0, S)), backend, dtype)
        except AssertionError as e:
            raise AssertionError(f"seed={seed} trial={trial}: {e}") from e
