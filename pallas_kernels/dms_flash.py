"""DMS-masked flash attention for training and prefill (forward + backward, `jax.custom_vjp`).

Interface::

    dms_flash_attention(q, k, v, q_pos, k_pos, log_keep=None, k_valid=None, *, window, scale=None,
                        backend="auto", interpret=None, block_q=None, block_k=None, skip_blocks=True)

    q:        [B, T, Hq, D]   queries (bf16 / f16 / f32)
    k, v:     [B, S, Hkv, D]  keys / values; GQA: query head h reads KV head h // (Hq // Hkv)
    q_pos:    [B, T] int32    absolute positions of the queries (a prefill chunk has q_pos offset from k_pos)
    k_pos:    [B, S] int32    absolute positions of the keys (any order)
    log_keep: [B, Hkv, S] f32 per-key additive term used only when q_pos - k_pos > window: log(1 - alpha)
              in training, 0 / -inf in hard mode. None = 0 (plain causal attention).
    k_valid:  [B, S] bool     False = padding key. None = all valid.
    window:   int (static)
    returns   [B, T, Hq, D] in q's dtype.

Bias for query i, key j:  -inf if k_pos_j > q_pos_i or key j is padding;  0 if q_pos_i - k_pos_j <= window;
log_keep_j otherwise. A query row that sees no key returns zeros (and zero gradients), not NaN.
Gradients flow to q, k, v and log_keep (training learns the eviction decisions through log_keep); none to
positions or k_valid.

Kernels (same kernel bodies for both lowerings; the difference is how the block lists arrive):
* forward: grid (B, Hq, T / block_q); each program loops over the *active* kv blocks of its q block with an
  online softmax in f32 and writes the output and the row log-sum-exp.
* backward: `dq` kernel with the same grid; `dk, dv, dlog_keep` kernel with grid (B, Hkv, S / block_k), which
  loops over the G query heads of the KV head and the active q blocks, so GQA sums and the per-key sum of
  dS over the "far" region (the gradient of log_keep) need no atomics.
* Block skipping: a kv block is active for a q block unless it is entirely in the causal future, entirely
  padding, or (hard mode) every key in it is past the window for the whole q block *and* has log_keep = -inf.
  The wrapper (plain XLA) turns that map into a compacted list of active blocks and a count per row, so
  skipped blocks cost no loop iteration and no load. TPU: scalar prefetch (SMEM); GPU: ordinary inputs whose
  entries the kernel loads (Triton has no scalar prefetch).
* Layout: the wrapper transposes to head-major [B, H, T, D] and pads T and S to the block sizes. Each
  program keeps the whole K/V of its KV head (forward, dq) or the whole Q/dO of its KV group (dk/dv) as one
  block: on GPU that is just a pointer, on TPU it is a VMEM buffer, so the TPU path is meant for sequences
  of a few thousand tokens per call (the scoped-VMEM limit is sized from the blocks, up to 120 MiB; beyond,
  chunk the prefill or use backend="xla").
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dms_jax.dms import dms_attention_bias, visible_if_marked

from ._common import cdiv, resolve_backend, resolve_interpret, tpu_interpret_arg

__all__ = [
    "dms_flash_attention",
    "dms_flash_attention_reference",
    "dms_flash_block_map",
]

_NEG_INF = float("-inf")
_BIG = 1 << 29  # sentinel position: padding keys sit in everyone's future, padding queries before everyone


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def dms_flash_attention_reference(q, k, v, q_pos, k_pos, log_keep=None, k_valid=None, *, window: int,
                                  scale=None):
    """Plain jnp: materialises the [B, Hkv, T, S] bias (``dms_jax.dms.dms_attention_bias``, masked with -inf so
    that a row that sees no key returns zeros); f32 softmax; differentiable with jax.grad."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    bias = dms_attention_bias(log_keep, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32), window, k_valid,
                              masked=_NEG_INF)  # [B, Hkv|1, T, S]
    qf = q.astype(jnp.float32).reshape(B, T, Hkv, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
    s = s + bias[:, :, None]
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(l == 0.0, 1.0, l)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return o.reshape(B, T, Hq, D).astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Block map (plain XLA)
# ----------------------------------------------------------------------------------------------------------


def dms_flash_block_map(qpos_p, kpos_p, lk_p, window: int, block_q: int, block_k: int):
    """Active (q block, kv block) pairs, [B, Hkv, nq, nk] bool. Inputs are padded: qpos_p [B, Tp] (padding
    = -BIG), kpos_p [B, Sp] (padding or invalid = +BIG), lk_p [B, Hkv, Sp]. Conservative: a pair is dropped
    only if no (query, key) in it can be visible."""
    B, Tp = qpos_p.shape
    Sp = kpos_p.shape[1]
    Hkv = lk_p.shape[1]
    nq, nk = Tp // block_q, Sp // block_k
    qb = qpos_p.reshape(B, nq, block_q)
    qmax = jnp.max(qb, axis=-1)
    qmin = jnp.min(jnp.where(qb > -_BIG, qb, _BIG), axis=-1)
    kb = kpos_p.reshape(B, nk, block_k)
    kvalid = kb < _BIG
    kmin = jnp.min(kb, axis=-1)
    kmax = jnp.max(jnp.where(kvalid, kb, -_BIG), axis=-1)
    kept = kvalid[:, None] & (lk_p.reshape(B, Hkv, nk, block_k) > _NEG_INF)
    kmin_kept = jnp.min(jnp.where(kept, kb[:, None], _BIG), axis=-1)  # [B, Hkv, nk]
    causal_ok = kmin[:, None, :] <= qmax[:, :, None]  # some key not in the future of the block's last query
    # Some key may be inside some query's window (sentinels: qmin - kmax stays below 2**31).
    window_ok = visible_if_marked(qmin[:, :, None], kmax[:, None, :], window)
    kept_ok = kmin_kept[:, :, None, :] <= qmax[:, None, :, None]  # some kept key not in the future
    return causal_ok[:, None] & (window_ok[:, None] | kept_ok)


def _compact(active):
    """[..., n] bool -> (indices of True entries first, in increasing order [..., n] int32; count [...])."""
    n = active.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(active, idx, n + idx), axis=-1, stable=True).astype(jnp.int32)
    return order, jnp.sum(active, axis=-1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Kernel bodies (shared by the TPU and GPU lowerings)
# ----------------------------------------------------------------------------------------------------------


def _dot_nt(a, b):  # a @ b.T, f32 accumulation
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):  # a @ b
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a.T @ b
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(q, k, qp, kp, lk, scale, window):
    """Biased logits of a (q block, kv block) tile and the 'far' mask (where log_keep was added)."""
    s = _dot_nt(q, k) * scale
    far = ~visible_if_marked(qp, kp, window)  # [bq, 1] vs [1, bk]
    s = jnp.where(kp <= qp, s + jnp.where(far, lk, 0.0), _NEG_INF)
    return s, far


def _fwd_body(count, get_kj, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, lk_ref, o_ref, lse_ref, *, scale, window,
              block_k):
    q = q_ref[...]
    qp = qpos_ref[...]
    bq, d = q.shape

    def body(t, carry):
        m_prev, l_prev, acc_prev = carry
        start = pl.multiple_of(get_kj(t) * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        kp = kpos_ref[:, pl.ds(start, block_k)]
        lk = lk_ref[:, pl.ds(start, block_k)]
        s, _ = _scores(q, k, qp, kp, lk, scale, window)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc_prev + _dot_nn(p.astype(v.dtype), v)
        return m_new, l_new, acc

    init = (
        jnp.full((bq, 1), _NEG_INF, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, d), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, count, body, init)
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
    # +inf for rows that see nothing: exp(s - lse) is then 0 in the backward pass.
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _dq_body(count, get_kj, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, lk_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
             scale, window, block_k):
    q = q_ref[...]
    qp = qpos_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]

    def body(t, dq):
        start = pl.multiple_of(get_kj(t) * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        kp = kpos_ref[:, pl.ds(start, block_k)]
        lk = lk_ref[:, pl.ds(start, block_k)]
        s, _ = _scores(q, k, qp, kp, lk, scale, window)
        p = jnp.exp(s - lse)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta)
        return dq + _dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_body(count, get_qi, q_ref, k_ref, v_ref, qpos_ref, kpos_ref, lk_ref, do_ref, lse_ref, delta_ref,
               dk_ref, dv_ref, dlk_ref, *, scale, window, block_q, group):
    k = k_ref[...]
    v = v_ref[...]
    kp = kpos_ref[...]
    lk = lk_ref[...]
    bk, d = k.shape

    def body(t, carry):
        dk, dv, dlk = carry
        g = lax.div(t, count)
        start = pl.multiple_of(get_qi(t - g * count) * block_q, block_q)
        q = q_ref[g, pl.ds(start, block_q), :]
        do = do_ref[g, pl.ds(start, block_q), :]
        lse = lse_ref[g, pl.ds(start, block_q), :]
        delta = delta_ref[g, pl.ds(start, block_q), :]
        qp = qpos_ref[pl.ds(start, block_q), :]
        s, far = _scores(q, k, qp, kp, lk, scale, window)
        p = jnp.exp(s - lse)
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta)
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        dlk = dlk + jnp.sum(jnp.where(far, ds, 0.0), axis=0, keepdims=True)
        return dk, dv, dlk

    init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32), jnp.zeros((1, bk), jnp.float32))
    dk, dv, dlk = lax.fori_loop(0, group * count, body, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    dlk_ref[...] = dlk


# ----------------------------------------------------------------------------------------------------------
# pallas_call plumbing for the two lowerings
# ----------------------------------------------------------------------------------------------------------


class _Cfg(NamedTuple):
    window: int
    scale: float
    backend: str  # "pallas_tpu" | "pallas_gpu"
    interpret: bool
    block_q: int
    block_k: int
    skip_blocks: bool
    num_warps: int | None
    num_stages: int | None


def _vmem_limit(in_specs, args, out_specs, out_shape) -> int:
    """Scoped-VMEM request for the TPU kernels: double-buffered blocks of every operand, plus headroom, at
    least 32 MiB and at most 120 MiB (v5e/v6e have 128 MiB of VMEM; smaller chips fail to compile when the
    blocks themselves do not fit, which is the case to chunk the prefill)."""
    total = 0
    for spec, x in [*zip(in_specs, args), *zip(out_specs, out_shape)]:
        n = 1
        for dim in spec.block_shape:
            n *= 1 if dim is None else int(dim)
        total += 2 * n * jnp.dtype(x.dtype).itemsize
    mib = 1024 * 1024
    return int(min(max(32 * mib, total + total // 4 + 8 * mib), 120 * mib))


def _compiler_params(cfg: _Cfg, ndims: int, vmem_limit: int | None = None):
    if cfg.backend == "pallas_tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * ndims, vmem_limit_bytes=vmem_limit)
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _interpret_arg(cfg: _Cfg):
    if cfg.backend == "pallas_tpu":
        return tpu_interpret_arg(cfg.interpret)
    return bool(cfg.interpret)


def _call(cfg: _Cfg, body, grid, lists, counts, in_specs, args, out_specs, out_shape, name):
    """Runs `body(count, get_idx, *refs)` over `grid` = (B, heads, blocks). `lists` [B, Hkv, nrow, n] and
    `counts` [B, Hkv, nrow] index the active-block list of row (b, head_to_kv(h), i)."""
    B, Hkv, nrow, n = lists.shape
    heads = grid[1]
    ratio = heads // Hkv  # G for the q-major kernels, 1 for the kv-major kernel

    if cfg.backend == "pallas_tpu":
        from jax.experimental.pallas import tpu as pltpu

        def kernel(cnt_ref, lst_ref, *refs):
            b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
            row = (b * Hkv + lax.div(h, ratio)) * nrow + i
            body(cnt_ref[row], lambda t: lst_ref[row * n + t], *refs)

        def wrap(spec):
            return pl.BlockSpec(spec.block_shape, lambda b, h, i, *_: spec.index_map(b, h, i))

        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=grid,
                in_specs=[wrap(s) for s in in_specs],
                out_specs=[wrap(s) for s in out_specs],
            ),
            compiler_params=_compiler_params(cfg, len(grid), _vmem_limit(in_specs, args, out_specs, out_shape)),
            interpret=_interpret_arg(cfg),
            name=name,
        )(counts.reshape(-1), lists.reshape(-1), *args)

    def kernel(cnt_ref, lst_ref, *refs):
        body(cnt_ref[0], lambda t: lst_ref[t], *refs)

    cnt_spec = pl.BlockSpec((None, None, None, 1), lambda b, h, i: (b, lax.div(h, ratio), i, 0))
    lst_spec = pl.BlockSpec((None, None, None, n), lambda b, h, i: (b, lax.div(h, ratio), i, 0))
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=[cnt_spec, lst_spec, *in_specs],
        out_specs=out_specs,
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=_interpret_arg(cfg),
        name=name,
    )(counts[..., None], lists, *args)


def _prepare(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg: _Cfg):
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    Tp, Sp = cdiv(T, bq) * bq, cdiv(S, bk) * bk
    qt = jnp.pad(jnp.transpose(q, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    kt = jnp.pad(jnp.transpose(k, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    vt = jnp.pad(jnp.transpose(v, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, Sp - S), (0, 0)))
    qpos_p = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-_BIG)
    kpos = k_pos.astype(jnp.int32)
    if k_valid is not None:
        kpos = jnp.where(k_valid.astype(bool), kpos, _BIG)
    kpos_p = jnp.pad(kpos, ((0, 0), (0, Sp - S)), constant_values=_BIG)
    lk_p = jnp.pad(log_keep.astype(jnp.float32), ((0, 0), (0, 0), (0, Sp - S)))
    if cfg.skip_blocks:
        active = dms_flash_block_map(qpos_p, kpos_p, lk_p, cfg.window, bq, bk)
    else:
        active = jnp.ones((B, Hkv, Tp // bq, Sp // bk), bool)
    lists_q, counts_q = _compact(active)  # per q block: active kv blocks
    lists_k, counts_k = _compact(jnp.swapaxes(active, 2, 3))  # per kv block: active q blocks
    pos = (qpos_p[:, :, None], kpos_p[:, None, :], lk_p[:, :, None, :])
    return qt, kt, vt, pos, (lists_q, counts_q, lists_k, counts_k)


def _q_major_specs(cfg, G, Tp, Sp, D):
    bq = cfg.block_q
    return dict(
        qblk=pl.BlockSpec((None, None, bq, D), lambda b, h, i: (b, h, i, 0)),
        kv=pl.BlockSpec((None, None, Sp, D), lambda b, h, i: (b, lax.div(h, G), 0, 0)),
        qpos=pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
        kpos=pl.BlockSpec((None, 1, Sp), lambda b, h, i: (b, 0, 0)),
        lk=pl.BlockSpec((None, None, 1, Sp), lambda b, h, i: (b, lax.div(h, G), 0, 0)),
        row=pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)),
    )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _forward(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg: _Cfg):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    qt, kt, vt, (qpos, kpos, lk), (lists_q, counts_q, lists_k, counts_k) = _prepare(
        q, k, v, q_pos, k_pos, log_keep, k_valid, cfg)
    Tp, Sp = qt.shape[2], kt.shape[2]
    sp = _q_major_specs(cfg, G, Tp, Sp, D)
    body = functools.partial(_fwd_body, scale=cfg.scale, window=cfg.window, block_k=cfg.block_k)
    o, lse = _call(
        cfg, body, (B, Hq, Tp // cfg.block_q), lists_q, counts_q,
        [sp["qblk"], sp["kv"], sp["kv"], sp["qpos"], sp["kpos"], sp["lk"]],
        (qt, kt, vt, qpos, kpos, lk),
        [sp["qblk"], sp["row"]],
        [jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((B, Hq, Tp, 1), jnp.float32)],
        "dms_flash_fwd",
    )
    out = jnp.transpose(o[:, :, :T], (0, 2, 1, 3))
    residuals = (qt, kt, vt, qpos, kpos, lk, o, lse, lists_q, counts_q, lists_k, counts_k)
    return out, residuals


@functools.partial(jax.jit, static_argnames=("cfg", "T", "S"))
def _backward(residuals, do, cfg: _Cfg, T: int, S: int):
    qt, kt, vt, qpos, kpos, lk, o, lse, lists_q, counts_q, lists_k, counts_k = residuals
    B, Hq, Tp, D = qt.shape
    Hkv, Sp = kt.shape[1], kt.shape[2]
    G = Hq // Hkv
    bq, bk = cfg.block_q, cfg.block_k
    dot = jnp.pad(jnp.transpose(do, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, Tp - T), (0, 0))).astype(qt.dtype)
    delta = jnp.sum(dot.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, Hq, Tp, 1]

    sp = _q_major_specs(cfg, G, Tp, Sp, D)
    dq_body = functools.partial(_dq_body, scale=cfg.scale, window=cfg.window, block_k=bk)
    (dq,) = _call(
        cfg, dq_body, (B, Hq, Tp // bq), lists_q, counts_q,
        [sp["qblk"], sp["kv"], sp["kv"], sp["qpos"], sp["kpos"], sp["lk"], sp["qblk"], sp["row"], sp["row"]],
        (qt, kt, vt, qpos, kpos, lk, dot, lse, delta),
        [sp["qblk"]],
        [jax.ShapeDtypeStruct(qt.shape, qt.dtype)],
        "dms_flash_bwd_dq",
    )

    grp = lambda x: x.reshape(B, Hkv, G, *x.shape[2:])  # noqa: E731  [B, Hq, ...] -> [B, Hkv, G, ...]
    group_spec = pl.BlockSpec((None, None, G, Tp, D), lambda b, h, j: (b, h, 0, 0, 0))
    group_row = pl.BlockSpec((None, None, G, Tp, 1), lambda b, h, j: (b, h, 0, 0, 0))
    kblk = pl.BlockSpec((None, None, bk, D), lambda b, h, j: (b, h, j, 0))
    dkdv_body = functools.partial(_dkdv_body, scale=cfg.scale, window=cfg.window, block_q=bq, group=G)
    dk, dv, dlk = _call(
        cfg, dkdv_body, (B, Hkv, Sp // bk), lists_k, counts_k,
        [group_spec, kblk, kblk,
         pl.BlockSpec((None, Tp, 1), lambda b, h, j: (b, 0, 0)),
         pl.BlockSpec((None, 1, bk), lambda b, h, j: (b, 0, j)),
         pl.BlockSpec((None, None, 1, bk), lambda b, h, j: (b, h, 0, j)),
         group_spec, group_row, group_row],
        (grp(qt), kt, vt, qpos, kpos, lk, grp(dot), grp(lse), grp(delta)),
        [kblk, kblk, pl.BlockSpec((None, None, 1, bk), lambda b, h, j: (b, h, 0, j))],
        [jax.ShapeDtypeStruct(kt.shape, kt.dtype), jax.ShapeDtypeStruct(vt.shape, vt.dtype),
         jax.ShapeDtypeStruct((B, Hkv, 1, Sp), jnp.float32)],
        "dms_flash_bwd_dkdv",
    )
    dq = jnp.transpose(dq[:, :, :T], (0, 2, 1, 3))
    dk = jnp.transpose(dk[:, :, :S], (0, 2, 1, 3))
    dv = jnp.transpose(dv[:, :, :S], (0, 2, 1, 3))
    return dq, dk, dv, dlk[:, :, 0, :S]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg):
    return _forward(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg):
    out, residuals = _forward(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg)
    return out, (residuals, q_pos, k_pos, log_keep, k_valid)


def _flash_bwd(cfg, res, do):
    residuals, q_pos, k_pos, log_keep, k_valid = res
    dq, dk, dv, dlk = _backward(residuals, do, cfg, q_pos.shape[1], k_pos.shape[1])
    zero_int = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (dq, dk, dv, zero_int(q_pos), zero_int(k_pos), dlk.astype(log_keep.dtype), zero_int(k_valid))


_flash.defvjp(_flash_fwd, _flash_bwd)


def _default_blocks(backend: str, T: int, S: int):
    if backend == "pallas_tpu":
        bq, bk = 128, 128
    else:
        bq, bk = 64, 64
    # Never pad a short sequence up to a huge block (keep powers of two for Triton, >= 16 for its dot).
    bq = min(bq, max(16, 1 << (max(T, 1) - 1).bit_length()))
    bk = min(bk, max(16, 1 << (max(S, 1) - 1).bit_length()))
    return bq, bk


def dms_flash_attention(q, k, v, q_pos, k_pos, log_keep=None, k_valid=None, *, window: int, scale=None,
                        backend: str = "auto", interpret=None, block_q=None, block_k=None, skip_blocks=True,
                        num_warps=None, num_stages=None):
    """DMS-masked attention; see the module docstring. Differentiable w.r.t. q, k, v and log_keep.

    backend: "auto" (xla on CPU, Pallas on TPU/GPU) | "xla" | "pallas_tpu" | "pallas_gpu".
    On TPU, block_k must be a multiple of 128 (or cover the whole padded key length).
    On GPU (Triton), block sizes and head_dim must be powers of two and >= 16.
    """
    B, T, Hq, D = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % k.shape[2]:
        raise ValueError(f"bad shapes q {q.shape}, k {k.shape}, v {v.shape}")
    S, Hkv = k.shape[1], k.shape[2]
    if q_pos.shape != (B, T) or k_pos.shape != (B, S):
        raise ValueError(f"q_pos must be {(B, T)} and k_pos {(B, S)}, got {q_pos.shape}, {k_pos.shape}")
    if log_keep is not None and log_keep.shape != (B, Hkv, S):
        raise ValueError(f"log_keep must be {(B, Hkv, S)}, got {log_keep.shape}")
    if k_valid is not None and k_valid.shape != (B, S):
        raise ValueError(f"k_valid must be {(B, S)}, got {k_valid.shape}")
    backend = resolve_backend(backend)
    if backend == "xla":
        return dms_flash_attention_reference(q, k, v, q_pos, k_pos, log_keep, k_valid, window=window, scale=scale)
    bq0, bk0 = _default_blocks(backend, T, S)
    cfg = _Cfg(
        window=int(window),
        scale=1.0 / math.sqrt(D) if scale is None else float(scale),
        backend=backend,
        interpret=resolve_interpret(backend, interpret),
        block_q=int(block_q or bq0),
        block_k=int(block_k or bk0),
        skip_blocks=bool(skip_blocks),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if log_keep is None:
        log_keep = jnp.zeros((B, Hkv, S), jnp.float32)
    return _flash(q, k, v, q_pos, k_pos, log_keep, k_valid, cfg)
