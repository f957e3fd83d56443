"""Paged decode attention over per-(sequence, KV head) block tables.

Interface (the engine's paged cache is built against it; keep it stable)::

    paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, scale=None, page_mask=None,
                           backend="auto", interpret=None, pages_per_block=None, num_splits=None)

    q:            [B, Hkv, G, D]      the G query heads that share each KV head (bf16 / f16 / f32)
    k_pages:      [num_pages, page_size, D]   one static pool shared by all sequences, layers and KV heads;
    v_pages:      [num_pages, page_size, D]   a page holds tokens of exactly one (sequence, layer, KV head);
                  an int8 pool has rows of D + 4 (values, then their scale: kv_codec); every backend reads
                  it, the kernels dequantising each tile after it arrives (bytes read: D + 4 per row)
    block_tables: [B, Hkv, max_pages] int32   physical page ids in logical order; entries past the used
                                              pages are arbitrary but must be in range
    lengths:      [B, Hkv] int32              live slots: slots 0..length-1 of the head's pages (in block-table
                                              order) are attended. No causal mask: RoPE is applied before
                                              caching, and DMS overwrites evicted slots, so physical order is
                                              not temporal order.
    page_mask:    optional [B, Hkv, max_pages] bool. True = the page is read, False = the page is skipped
                  (used by Quest-style page selection). Skipped pages cost no bytes.
    scale:        softmax scale, default 1/sqrt(D)
    returns       [B, Hkv, G, D] in q's dtype. Softmax is online across pages with f32 accumulation.
                  A head with length 0 (or with every page masked) returns zeros, never NaN.

Backends: "xla" = `paged_decode_attention_reference` (pure jnp, gathers every page of the table);
"pallas_tpu" = Mosaic kernel; "pallas_gpu" = Pallas' Triton lowering; "auto" = xla on CPU, the Pallas kernel
for the platform on TPU/GPU. interpret=None runs a Pallas kernel in interpret mode when its hardware is
absent; interpret=True forces it (TPU-style kernels use TPU interpret mode, `pltpu.InterpretParams()`,
which simulates SMEM scalar prefetch, VMEM scratch and DMA semaphores; GPU-style kernels use the generic
Pallas interpreter).

How the kernels read only live pages. The wrapper (plain XLA, O(B*Hkv*max_pages) integer work) compacts each
head's table: the live pages (those below ceil(length / page_size) and, with page_mask, selected) come first,
`n_live[b, h]` counts them, and dead entries repeat the last live page id. Then

* TPU: grid (B, Hkv), `PrefetchScalarGridSpec` with lengths, live counts and the compacted table (and, with a
  page mask, the logical page index of each entry) in SMEM. K/V stay in HBM (`memory_space=ANY`); each grid
  step loops over ceil(n_live / pages_per_block) blocks, DMAs the live pages of the next block into a
  double-buffered VMEM scratch while computing on the current one. Pages past n_live are never copied, so
  bytes read = live pages * page_size * D * itemsize * 2.
* GPU (Triton): grid (B, Hkv, num_splits) ("flash decoding": the live pages of a head are split across
  programs, partial (acc, max, sum) are merged in XLA). Triton has no scalar prefetch, so each program loads
  its block-table entries itself and gathers pages with a vector of page ids; its loop stops at the live
  count. Padding entries of the last block repeat a page already read (an L1/L2 hit, not HBM traffic).
  Triton needs power-of-two tiles: G is padded to >= 16 rows, page_size and pages_per_block must be powers of
  two, and pages_per_block * page_size >= 16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._common import cdiv, next_pow2, resolve_backend, resolve_interpret, tpu_interpret_arg
from .kv_codec import SCALE_BYTES, decode_rows, dequantize, is_quantized, row_width

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_pallas_tpu",
    "paged_decode_attention_pallas_gpu",
    "live_kv_bytes",
]

_NEG_INF = float("-inf")


def _check_shapes(q, k_pages, v_pages, block_tables, lengths, page_mask):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Hkv, G, D], got {q.shape}")
    B, H, G, D = q.shape
    rw = row_width(D, k_pages.dtype)  # int8 pools store a scale after each row (kv_codec)
    if k_pages.shape != v_pages.shape or k_pages.ndim != 3 or k_pages.shape[-1] != rw:
        raise ValueError(f"k_pages/v_pages must be [num_pages, page_size, {rw}], got {k_pages.shape}, {v_pages.shape}")
    if block_tables.ndim != 3 or block_tables.shape[:2] != (B, H):
        raise ValueError(f"block_tables must be [{B}, {H}, max_pages], got {block_tables.shape}")
    if lengths.shape != (B, H):
        raise ValueError(f"lengths must be [{B}, {H}], got {lengths.shape}")
    if page_mask is not None and page_mask.shape != block_tables.shape:
        raise ValueError(f"page_mask must be {block_tables.shape}, got {page_mask.shape}")


def live_kv_bytes(lengths, page_size: int, head_dim: int, itemsize: int, page_mask=None):
    """Bytes of K and V a kernel that reads only live pages moves from HBM for one call (host-side numpy)."""
    import numpy as np

    lengths = np.asarray(lengths)
    pages = -(-lengths // page_size)
    if page_mask is not None:
        pm = np.asarray(page_mask)
        slot = np.arange(pm.shape[-1])
        pages = np.sum(pm & (slot < pages[..., None]), axis=-1)
    return int(pages.sum()) * page_size * head_dim * itemsize * 2


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def paged_decode_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, scale=None, page_mask=None):
    """Pure-jnp paged decode attention: gathers every page of every table, masks, softmax in f32."""
    _check_shapes(q, k_pages, v_pages, block_tables, lengths, page_mask)
    B, H, G, D = q.shape
    page_size = k_pages.shape[1]
    max_pages = block_tables.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    n = max_pages * page_size
    k = decode_rows(k_pages[block_tables]).reshape(B, H, n, D)
    v = decode_rows(v_pages[block_tables]).reshape(B, H, n, D)
    valid = jnp.arange(n)[None, None, :] < lengths[..., None]
    if page_mask is not None:
        valid = valid & jnp.repeat(page_mask.astype(bool), page_size, axis=-1)
    s = jnp.einsum("bhgd,bhnd->bhgn", q.astype(jnp.float32), k, precision=lax.Precision.HIGHEST) * scale
    s = jnp.where(valid[:, :, None, :], s, _NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(valid[..., None], v, 0.0)  # slots past the length may hold garbage (even NaN) in the pool
    o = jnp.einsum("bhgn,bhnd->bhgd", p, v, precision=lax.Precision.HIGHEST)
    o = o / jnp.where(l == 0.0, 1.0, l)
    return o.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Table compaction shared by both Pallas lowerings
# ----------------------------------------------------------------------------------------------------------


def _compact_tables(block_tables, lengths, page_mask, page_size: int, pad_to: int):
    """Live pages first. Returns (phys [B,H,Mp], logical [B,H,Mp] or None, n_live [B,H]), Mp = max_pages
    rounded up to a multiple of `pad_to`; dead entries repeat the last live page id (or entry 0)."""
    B, H, M = block_tables.shape
    block_tables = block_tables.astype(jnp.int32)
    lengths = lengths.astype(jnp.int32)
    slot = jnp.arange(M, dtype=jnp.int32)
    used = slot[None, None, :] < cdiv(lengths, page_size)[..., None]
    if page_mask is None:
        phys = block_tables
        logical = None
        n_live = jnp.minimum(cdiv(lengths, page_size), M).astype(jnp.int32)
    else:
        live = used & page_mask.astype(bool)
        n_live = jnp.sum(live, axis=-1, dtype=jnp.int32)
        order = jnp.argsort(jnp.where(live, slot, M + slot), axis=-1, stable=True).astype(jnp.int32)
        phys = jnp.take_along_axis(block_tables, order, axis=-1)
        logical = order
    mp = cdiv(M, pad_to) * pad_to
    fill_idx = jnp.minimum(jnp.arange(mp, dtype=jnp.int32)[None, None, :], jnp.maximum(n_live - 1, 0)[..., None])
    fill_idx = jnp.minimum(fill_idx, M - 1)
    phys = jnp.take_along_axis(phys, fill_idx, axis=-1)
    if logical is not None:
        logical = jnp.take_along_axis(logical, fill_idx, axis=-1)
    return phys, logical, n_live


def _default_pages_per_block(page_size: int, max_pages: int, target_tokens: int) -> int:
    p = min(max(1, target_tokens // page_size), next_pow2(max_pages))
    return 1 << (p.bit_length() - 1)  # largest power of two <= p


# ----------------------------------------------------------------------------------------------------------
# TPU (Mosaic): scalar prefetch + manual double-buffered DMA of live pages
# ----------------------------------------------------------------------------------------------------------


def _tpu_kernel(len_ref, n_ref, phys_ref, *rest, has_mask, page_size, ppb, mp, num_heads, scale):
    from jax.experimental.pallas import tpu as pltpu

    if has_mask:
        logical_ref, q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sems = rest
    else:
        logical_ref = None
        q_ref, k_hbm, v_hbm, o_ref, kbuf, vbuf, sems = rest
    b = pl.program_id(0)
    h = pl.program_id(1)
    bh = b * num_heads + h
    length = len_ref[bh]
    n = n_ref[bh]
    nblk = lax.div(n + ppb - 1, ppb)  # lax.div/rem: jnp's floor // and % need sign(), which Mosaic lowers
    base = bh * mp
    nt = ppb * page_size
    g, d = q_ref.shape

    def _copy(blk, slot, j, which):
        page = phys_ref[base + blk * ppb + j]
        src, dst = (k_hbm, kbuf) if which == 0 else (v_hbm, vbuf)
        return pltpu.make_async_copy(src.at[page], dst.at[slot, j], sems.at[which, slot])

    def _for_live_pages(blk, slot, fn):
        for j in range(ppb):
            @pl.when(blk * ppb + j < n)
            def _():
                fn(_copy(blk, slot, j, 0))
                fn(_copy(blk, slot, j, 1))

    @pl.when(nblk > 0)
    def _():
        _for_live_pages(0, 0, lambda c: c.start())

    # An int8 pool's tiles arrive as stored rows (values + scale bytes) and are dequantised to f32 in VMEM.
    compute_dtype = jnp.float32 if is_quantized(kbuf.dtype) else kbuf.dtype
    q = q_ref[...].astype(compute_dtype)
    e_row = lax.broadcasted_iota(jnp.int32, (1, nt), 1)
    e_col = lax.broadcasted_iota(jnp.int32, (nt, 1), 0)

    def body(blk, carry):
        m_prev, l_prev, acc_prev = carry
        slot = lax.rem(blk, 2)

        @pl.when(blk + 1 < nblk)
        def _():
            _for_live_pages(blk + 1, 1 - slot, lambda c: c.start())

        _for_live_pages(blk, slot, lambda c: c.wait())
        k = decode_rows(kbuf[slot].reshape(nt, kbuf.shape[-1]), compute_dtype)
        v = decode_rows(vbuf[slot].reshape(nt, vbuf.shape[-1]), compute_dtype)
        # Live slots per page of the block (scalars from SMEM), spread over the block's token axis.
        cnt_row = jnp.zeros((1, nt), jnp.int32)
        cnt_col = jnp.zeros((nt, 1), jnp.int32)
        for j in range(ppb):
            t = blk * ppb + j
            first = (logical_ref[base + t] if has_mask else t) * page_size
            cnt = jnp.where(t < n, jnp.clip(length - first, 0, page_size), 0)
            lo = j * page_size
            cnt_row = jnp.where((e_row >= lo) & (e_row < lo + page_size), cnt + lo, cnt_row)
            cnt_col = jnp.where((e_col >= lo) & (e_col < lo + page_size), cnt + lo, cnt_col)
        valid_row = e_row < cnt_row
        valid_col = e_col < cnt_col
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid_row, s, _NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        v = jnp.where(valid_col, v, jnp.zeros_like(v))
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l_new, alpha * acc_prev + pv

    init = (
        jnp.full((g, 1), _NEG_INF, jnp.float32),
        jnp.zeros((g, 1), jnp.float32),
        jnp.zeros((g, d), jnp.float32),
    )
    _, l, acc = lax.fori_loop(0, nblk, body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "ppb", "interpret"))
def _tpu_impl(q, k_pages, v_pages, block_tables, lengths, page_mask, *, scale, ppb, interpret):
    from jax.experimental.pallas import tpu as pltpu

    B, H, G, D = q.shape
    page_size = k_pages.shape[1]
    phys, logical, n_live = _compact_tables(block_tables, lengths, page_mask, page_size, ppb)
    mp = phys.shape[-1]
    has_mask = logical is not None
    scalars = [lengths.astype(jnp.int32).reshape(-1), n_live.reshape(-1), phys.reshape(-1)]
    if has_mask:
        scalars.append(logical.reshape(-1))
    kernel = functools.partial(
        _tpu_kernel, has_mask=has_mask, page_size=page_size, ppb=ppb, mp=mp, num_heads=H, scale=scale
    )
    if G % 8:
        # A (G, D) block with G % 8 != 0 would sit in (8, 128) tiles; like JAX's TPU paged attention, give the
        # array a unit second-minor dim (so it gets a (1, 128) tiling) and pass q in f32.
        q_in = q.astype(jnp.float32).reshape(B, H, G, 1, D)
        qo_spec = pl.BlockSpec((None, None, G, None, D), lambda b, h, *_: (b, h, 0, 0, 0))
    else:
        q_in = q
        qo_spec = pl.BlockSpec((None, None, G, D), lambda b, h, *_: (b, h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(B, H),
        in_specs=[qo_spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=qo_spec,
        scratch_shapes=[
            pltpu.VMEM((2, ppb, page_size, k_pages.shape[-1]), k_pages.dtype),
            pltpu.VMEM((2, ppb, page_size, v_pages.shape[-1]), v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
        ],
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(q_in.shape, q_in.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=tpu_interpret_arg(interpret),
        name="dms_paged_decode_tpu",
    )(*scalars, q_in, k_pages, v_pages)
    return out.reshape(q.shape).astype(q.dtype)


def paged_decode_attention_pallas_tpu(
    q, k_pages, v_pages, block_tables, lengths, *, scale=None, page_mask=None, interpret=False, pages_per_block=None
):
    """TPU (Mosaic) lowering. On TPU, page_size should be a multiple of 8 (f32) / 16 (bf16) so that the
    (pages_per_block, page_size, D) VMEM buffer collapses to (tokens, D) without relayout."""
    _check_shapes(q, k_pages, v_pages, block_tables, lengths, page_mask)
    D = q.shape[-1]
    page_size = k_pages.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    ppb = pages_per_block or _default_pages_per_block(page_size, block_tables.shape[-1], 512)
    return _tpu_impl(q, k_pages, v_pages, block_tables, lengths, page_mask, scale=scale, ppb=int(ppb),
                     interpret=bool(interpret))


# ----------------------------------------------------------------------------------------------------------
# GPU (Pallas -> Triton): plain grid, block-table entries loaded in the kernel, split-K over live pages
# ----------------------------------------------------------------------------------------------------------


def _load_pages(pool_ref, ids, d):
    """The pages ``ids`` of a pool as [len(ids), page_size, d]. An int8 pool's values and scale bytes are loaded
    apart (Triton tiles must be powers of two: D is, D + 4 is not; the scale comes as four byte planes) and
    dequantised to f32."""
    if not is_quantized(pool_ref.dtype):
        return pool_ref[ids]
    return dequantize(pool_ref[ids, :, pl.ds(0, d)], [pool_ref[ids, :, d + i] for i in range(SCALE_BYTES)])


def _gpu_kernel(len_ref, n_ref, phys_ref, *rest, has_mask, page_size, ppb, num_splits, scale):
    if has_mask:
        logical_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref = rest
    else:
        logical_ref = None
        q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref = rest
    b = pl.program_id(0)
    h = pl.program_id(1)
    split = pl.program_id(2)
    length = len_ref[b, h]
    n = n_ref[b, h]
    nblk = lax.div(n + ppb - 1, ppb)
    per = lax.div(nblk + num_splits - 1, num_splits)
    lo_blk = split * per
    hi_blk = jnp.minimum(lo_blk + per, nblk)
    gp, d = q_ref.shape
    nt = ppb * page_size
    q = q_ref[...]
    if is_quantized(k_ref.dtype):
        q = q.astype(jnp.float32)  # the int8 tiles are dequantised to f32
    within = lax.broadcasted_iota(jnp.int32, (ppb, page_size), 1)
    entry = lax.broadcasted_iota(jnp.int32, (ppb,), 0)

    def body(blk, carry):
        m_prev, l_prev, acc_prev = carry
        ids = phys_ref[pl.ds(blk * ppb, ppb)]
        k = _load_pages(k_ref, ids, d).reshape(nt, d)
        v = _load_pages(v_ref, ids, d).reshape(nt, d)
        t = blk * ppb + entry
        first = (logical_ref[pl.ds(blk * ppb, ppb)] if has_mask else t) * page_size
        cnt = jnp.where(t < n, jnp.clip(length - first, 0, page_size), 0)
        over = within - cnt[:, None]  # < 0 where the slot is live
        valid_row = over.reshape(1, nt) < 0
        valid_col = over.reshape(nt, 1) < 0
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        s = jnp.where(valid_row, s, _NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        v = jnp.where(valid_col, v, jnp.zeros_like(v))
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l_new, alpha[:, None] * acc_prev + pv

    init = (
        jnp.full((gp,), _NEG_INF, jnp.float32),
        jnp.zeros((gp,), jnp.float32),
        jnp.zeros((gp, d), jnp.float32),
    )
    m, l, acc = lax.fori_loop(lo_blk, hi_blk, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "ppb", "num_splits", "interpret", "num_warps", "num_stages"))
def _gpu_impl(q, k_pages, v_pages, block_tables, lengths, page_mask, *, scale, ppb, num_splits, interpret,
              num_warps=4, num_stages=2):
    from jax.experimental.pallas import triton as plgpu

    B, H, G, D = q.shape
    page_size = k_pages.shape[1]
    phys, logical, n_live = _compact_tables(block_tables, lengths, page_mask, page_size, ppb)
    mp = phys.shape[-1]
    has_mask = logical is not None
    gp = max(16, next_pow2(G))
    q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, gp - G), (0, 0))) if gp != G else q
    full2 = pl.BlockSpec((B, H), lambda b, h, s: (0, 0))
    table_spec = pl.BlockSpec((None, None, mp), lambda b, h, s: (b, h, 0))
    pool_spec = pl.BlockSpec(k_pages.shape, lambda b, h, s: (0, 0, 0))
    in_specs = [full2, full2, table_spec] + ([table_spec] if has_mask else []) + [
        pl.BlockSpec((None, None, gp, D), lambda b, h, s: (b, h, 0, 0)),
        pool_spec,
        pool_spec,
    ]
    args = [lengths.astype(jnp.int32), n_live, phys] + ([logical] if has_mask else []) + [q_pad, k_pages, v_pages]
    kernel = functools.partial(
        _gpu_kernel, has_mask=has_mask, page_size=page_size, ppb=ppb, num_splits=num_splits, scale=scale
    )
    acc, m, l = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, B, H, gp, D), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, H, gp), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, B, H, gp), jnp.float32),
        ],
        grid=(B, H, num_splits),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, gp, D), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, gp), lambda b, h, s: (s, b, h, 0)),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=bool(interpret),
        name="dms_paged_decode_gpu",
    )(*args)
    # Merge the split partials (flash decoding).
    m_all = jnp.max(m, axis=0)
    m_all_safe = jnp.where(m_all == _NEG_INF, 0.0, m_all)
    w = jnp.where(m == _NEG_INF, 0.0, jnp.exp(m - m_all_safe[None]))
    l_all = jnp.sum(w * l, axis=0)
    o = jnp.sum(w[..., None] * acc, axis=0) / jnp.where(l_all == 0.0, 1.0, l_all)[..., None]
    return o[:, :, :G, :].astype(q.dtype)


def paged_decode_attention_pallas_gpu(
    q, k_pages, v_pages, block_tables, lengths, *, scale=None, page_mask=None, interpret=False,
    pages_per_block=None, num_splits=None, num_warps=4, num_stages=2,
):
    """GPU lowering through Pallas' Triton backend (no jax-triton). page_size must be a power of two."""
    _check_shapes(q, k_pages, v_pages, block_tables, lengths, page_mask)
    B, H, G, D = q.shape
    page_size = k_pages.shape[1]
    if page_size & (page_size - 1) or D & (D - 1):
        raise ValueError(f"the Triton lowering needs power-of-two page_size and head_dim, got {page_size}, {D}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    max_pages = block_tables.shape[-1]
    ppb = pages_per_block or _default_pages_per_block(page_size, max_pages, 64)
    ppb = max(int(ppb), cdiv(16, page_size))
    if ppb & (ppb - 1):
        raise ValueError(f"pages_per_block must be a power of two for Triton, got {ppb}")
    if num_splits is None:
        # Enough programs to fill ~132 SMs, but never more splits than blocks of pages.
        num_splits = max(1, min(cdiv(max_pages, ppb), cdiv(256, B * H), 16))
    return _gpu_impl(q, k_pages, v_pages, block_tables, lengths, page_mask, scale=scale, ppb=ppb,
                     num_splits=int(num_splits), interpret=bool(interpret), num_warps=int(num_warps),
                     num_stages=int(num_stages))


# ----------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------


def paged_decode_attention(
    q, k_pages, v_pages, block_tables, lengths, *, scale=None, page_mask=None, backend="auto", interpret=None,
    pages_per_block=None, num_splits=None,
):
    """Paged decode attention; see the module docstring for shapes and semantics.

    backend: "auto" (xla on CPU, Pallas on TPU/GPU) | "xla" | "pallas_tpu" | "pallas_gpu".
    interpret: None = interpret mode iff the backend's hardware is absent; True forces interpret mode.
    """
    backend = resolve_backend(backend)
    if backend == "xla":
        return paged_decode_attention_reference(q, k_pages, v_pages, block_tables, lengths, scale=scale,
                                                page_mask=page_mask)
    interp = resolve_interpret(backend, interpret)
    if backend == "pallas_tpu":
        return paged_decode_attention_pallas_tpu(q, k_pages, v_pages, block_tables, lengths, scale=scale,
                                                 page_mask=page_mask, interpret=interp,
                                                 pages_per_block=pages_per_block)
    return paged_decode_attention_pallas_gpu(q, k_pages, v_pages, block_tables, lengths, scale=scale,
                                             page_mask=page_mask, interpret=interp,
                                             pages_per_block=pages_per_block, num_splits=num_splits)
