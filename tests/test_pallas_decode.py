"""Paged decode attention: Pallas kernels (TPU-style and GPU-style, interpret mode on CPU) vs the jnp reference.

Both lowerings run here: the TPU kernel under TPU interpret mode (`pltpu.InterpretParams()`: simulated SMEM
scalar prefetch, VMEM scratch, DMA semaphores; uninitialised VMEM reads as NaN, so a masking bug shows), the
GPU (Triton-style) kernel under the generic Pallas interpreter. Real-hardware lowering is checked separately
in test_pallas_lowering.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    live_kv_bytes,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels._common import resolve_backend, resolve_interpret
from pallas_kernels.paged_decode import _compact_tables

PATHS = ["pallas_tpu", "pallas_gpu"]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _make_case(seed, *, B, H, G, D, page_size, max_pages, lengths, dtype, garbage=True, mask_frac=None):
    """Random pool with non-contiguous, shuffled page ids; pool slots no live token uses are NaN."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32).reshape(B, H)
    num_pages = B * H * max_pages + 7
    perm = rng.permutation(num_pages)[: B * H * max_pages].reshape(B, H, max_pages)
    k_pages = rng.standard_normal((num_pages, page_size, D)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, D)).astype(np.float32)
    if garbage:
        live = np.zeros((num_pages, page_size), bool)
        for b in range(B):
            for h in range(H):
                for t in range(lengths[b, h]):
                    live[perm[b, h, t // page_size], t % page_size] = True
        k_pages[~live] = np.nan
        v_pages[~live] = np.nan
    q = rng.standard_normal((B, H, G, D)).astype(np.float32)
    page_mask = None
    if mask_frac is not None:
        page_mask = jnp.asarray(rng.random((B, H, max_pages)) < mask_frac)
    return dict(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        block_tables=jnp.asarray(perm, jnp.int32),
        lengths=jnp.asarray(lengths),
        page_mask=page_mask,
    )


def _np_paged_attention(case, scale=None):
    """Float64 numpy, one (sequence, KV head) at a time: a dense softmax of its G queries over the live slots its
    block table lists (slot t in page t // page_size), restricted to the pages page_mask selects; no live slot ->
    zeros. Only live slots are read, so NaN garbage elsewhere in the pool never enters."""
    q = np.asarray(case["q"], np.float64)
    kp, vp = np.asarray(case["k_pages"], np.float64), np.asarray(case["v_pages"], np.float64)
    tables, lengths = np.asarray(case["block_tables"]), np.asarray(case["lengths"])
    mask = None if case["page_mask"] is None else np.asarray(case["page_mask"])
    B, H, G, D = q.shape
    ps = kp.shape[1]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            slots = [t for t in range(lengths[b, h]) if mask is None or mask[b, h, t // ps]]
            if not slots:
                continue
            k = np.stack([kp[tables[b, h, t // ps], t % ps] for t in slots])
            v = np.stack([vp[tables[b, h, t // ps], t % ps] for t in slots])
            s = q[b, h] @ k.T * scale
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = (p / p.sum(-1, keepdims=True)) @ v
    return out


def _check(case, backend, dtype, **kw):
    ref = paged_decode_attention_reference(
        case["q"], case["k_pages"], case["v_pages"], case["block_tables"], case["lengths"],
        page_mask=case["page_mask"])
    out = paged_decode_attention(
        case["q"], case["k_pages"], case["v_pages"], case["block_tables"], case["lengths"],
        page_mask=case["page_mask"], backend=backend, interpret=True, **kw)
    chex.assert_shape(out, case["q"].shape)
    chex.assert_type(out, dtype)
    chex.assert_tree_all_finite(out)
    assert _rel_err(out, ref) <= TOL[dtype], _rel_err(out, ref)
    lengths = np.asarray(case["lengths"])
    assert np.all(np.asarray(out)[lengths == 0] == 0)  # length 0 -> zeros, not NaN
    return out, ref


# B=2, H=4: lengths 0 / exactly one page / not a page multiple / full table, and very different lengths.
MIXED = dict(B=2, H=4, max_pages=6)


@pytest.mark.parametrize("backend", PATHS)
def test_decode_f32_g1_d64_mixed_lengths(backend):
    ps = 16
    case = _make_case(1, G=1, D=64, page_size=ps, lengths=[0, ps, 37, 6 * ps, 1, 95, 50, 6 * ps - 1],
                      dtype=jnp.float32, **MIXED)
    _check(case, backend, jnp.float32, pages_per_block=2)


@pytest.mark.parametrize("backend", PATHS)
def test_decode_bf16_g8_d128_mixed_lengths(backend):
    ps = 8
    case = _make_case(2, G=8, D=128, page_size=ps, lengths=[6 * ps, 0, 3, ps, 33, 2 * ps, 47, 17],
                      dtype=jnp.bfloat16, **MIXED)
    _check(case, backend, jnp.bfloat16)


@pytest.mark.parametrize("backend", PATHS)
def test_decode_f32_g4_page_mask(backend):
    ps = 16
    case = _make_case(3, G=4, D=64, page_size=ps, lengths=[96, 70, 16, 0, 5, 81, 96, 33], dtype=jnp.float32,
                      mask_frac=0.6, **MIXED)
    _check(case, backend, jnp.float32, pages_per_block=2)
    # Every page masked off -> zeros.
    case["page_mask"] = jnp.zeros_like(case["page_mask"])
    out, _ = _check(case, backend, jnp.float32)
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("backend", PATHS)
def test_decode_one_page_per_block_and_splits(backend):
    """One page per block (many loop steps) and, on the GPU path, several splits of the live pages."""
    ps = 16
    case = _make_case(4, B=1, H=2, G=4, D=128, page_size=ps, max_pages=7, lengths=[7 * ps, 40],
                      dtype=jnp.float32)
    kw = dict(pages_per_block=1)
    if backend == "pallas_gpu":
        kw["num_splits"] = 3
    _check(case, backend, jnp.float32, **kw)


@pytest.mark.parametrize("mask_frac", [None, 0.5])
def test_reference_matches_dense_attention(mask_frac):
    """The reference (which every kernel test compares with) against the numpy dense softmax over the live
    (and selected) slots, NaN garbage in the unused pool slots, lengths 0 / one page / partial."""
    case = _make_case(5, B=2, H=2, G=2, D=64, page_size=8, max_pages=3, lengths=[19, 8, 0, 24], dtype=jnp.float32,
                      mask_frac=mask_frac)
    ref = np.asarray(paged_decode_attention_reference(case["q"], case["k_pages"], case["v_pages"],
                                                      case["block_tables"], case["lengths"], scale=0.3,
                                                      page_mask=case["page_mask"]))
    np.testing.assert_allclose(ref, _np_paged_attention(case, scale=0.3), rtol=1e-5, atol=1e-6)


def test_compact_tables_reads_only_live_pages():
    """The kernels' loops run over n_live entries; those are exactly the live (and selected) pages, in
    block-table order, and padding entries repeat a page already read."""
    bt = jnp.asarray([[[5, 9, 2, 7, 3]]], jnp.int32)
    lengths = jnp.asarray([[33]], jnp.int32)  # 3 pages of 16 in use
    phys, logical, n = _compact_tables(bt, lengths, None, 16, 4)
    assert int(n[0, 0]) == 3 and logical is None
    assert np.asarray(phys)[0, 0].tolist() == [5, 9, 2, 2, 2, 2, 2, 2]
    mask = jnp.asarray([[[True, False, True, True, True]]])
    phys, logical, n = _compact_tables(bt, lengths, mask, 16, 1)
    assert int(n[0, 0]) == 2
    assert np.asarray(phys)[0, 0, :2].tolist() == [5, 2]
    assert np.asarray(logical)[0, 0, :2].tolist() == [0, 2]
    assert live_kv_bytes([[33, 0], [16, 17]], 16, 128, 2) == (3 + 0 + 1 + 2) * 16 * 128 * 2 * 2
    assert live_kv_bytes([[33]], 16, 128, 2, page_mask=np.asarray(mask)) == 2 * 16 * 128 * 2 * 2


def test_dispatch_on_cpu():
    assert jax.devices()[0].platform == "cpu"
    assert resolve_backend("auto") == "xla"
    assert resolve_interpret("pallas_tpu", None) is True
    assert resolve_interpret("pallas_gpu", None) is True
    with pytest.raises(ValueError):
        resolve_backend("triton")
    case = _make_case(6, B=1, H=2, G=2, D=64, page_size=8, max_pages=2, lengths=[9, 3], dtype=jnp.float32)
    args = (case["q"], case["k_pages"], case["v_pages"], case["block_tables"], case["lengths"])
    want = _np_paged_attention(case)
    # "auto" on CPU (what the engine's "xla" path gets), against numpy rather than the reference it resolves to.
    np.testing.assert_allclose(np.asarray(paged_decode_attention(*args), np.float64), want, rtol=1e-5, atol=1e-6)
    # Works under jit (the engine calls it inside its decode step).
    out = jax.jit(lambda *a: paged_decode_attention(*a, backend="pallas_gpu", interpret=True))(*args)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("backend", PATHS)
def test_decode_fresh_random_sweep(backend):
    """Fresh seed every run (printed on failure): random shapes, lengths, page ids, masks, dtypes."""
    seed = int(np.random.SeedSequence().entropy % (2**31))
    rng = np.random.default_rng(seed)
    for trial in range(6):
        G = int(rng.choice([1, 2, 4, 8]))
        D = int(rng.choice([64, 128]))
        ps = int(rng.choice([8, 16, 32]))
        B, H, M = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        dtype = [jnp.float32, jnp.bfloat16][trial % 2]
        lengths = rng.integers(0, M * ps + 1, (B, H))
        case = _make_case(int(rng.integers(1 << 30)), B=B, H=H, G=G, D=D, page_size=ps, max_pages=M,
                          lengths=lengths, dtype=dtype, mask_frac=0.7 if trial % 3 == 0 else None)
        try:
            _check(case, backend, dtype, pages_per_block=int(rng.choice([1, 2, 4])))
        except AssertionError as e:
            raise AssertionError(f"seed={seed} trial={trial}: {e}") from e
