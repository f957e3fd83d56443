"""Blocked paged attention in plain XLA: the engine's CPU attention backend ("xla_blocked").

Same contract as ``paged_decode_attention`` (``pallas_kernels/paged_decode.py``): per-(sequence, KV head) block
tables into one static page pool, slots ``0..length-1`` of each head's pages live, no causal mask. An online
softmax over blocks of cached pages whose trip count is the longest live head, so the cost follows the live
cache and no gathered copy of all K/V is ever made; the engine's prefill uses the same blocked loop
(``online_blocks``) for its cached keys, with its own visibility mask.

The pools are only read here, and the engine writes them in place once per step after the layers. On CPU, XLA
copies a 200 MB pool whenever a cond or a loop leaves it with two live users (before: 4 whole-pool copies, 1.6 GB
of memory traffic, per step at 8K x 8 chains); ``online_blocks(thread_pools=True)`` threads the pools through
the loop as a genuine loop value so that this does not happen.

``SINK_PAGE`` (page 0) is the page whose contents never matter: padded table entries point at it and the threaded
loops write their marks into it. The serving cache reserves it for that (``dms_jax.serve.spec``, which takes
this constant).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.kv_codec import decode_rows, is_quantized, round_trip

SINK_PAGE = 0  # never allocated by the serving cache: padded table entries and masked writes land here

BLOCK_TOKENS = 512  # cached tokens per block of the prefill's blocked attention (its queries make blocks big)
DECODE_BLOCK_BYTES = 1 << 19  # decode: ~0.5 MB of K+V gathered per block (see _decode_block_tokens)


def block_pages(page_size: int, tokens: int = BLOCK_TOKENS) -> int:
    return max(1, tokens // page_size)


def _decode_block_tokens(rows: int, head_dim: int, itemsize: int) -> int:
    """Cached tokens per block of the decode attention: ~DECODE_BLOCK_BYTES of K and V over the ``rows``
    (sequence, KV head) pairs, a power of two in [256, 8192]. Small blocks waste little past the longest head
    (the last block is masked) and stay in cache; measured on SmolLM2 shapes (30 layers, 2-core CPU), 256-token
    blocks beat 512 / 1024 / 2048 for 3 and 24 rows, at ~1K (2x faster) and ~8K live tokens per head alike."""
    t = DECODE_BLOCK_BYTES // max(rows * head_dim * itemsize * 2, 1)
    return int(min(max(1 << (max(t, 1).bit_length() - 1), 256), 8192))


def online_blocks(q, k_pages, v_pages, tables, num_blocks, visible, carry, scale, bp=None, thread_pools=False,
                  first_block=0):
    """Online softmax over blocks of pages ``first_block .. num_blocks - 1`` (both may be traced).

    q ``[B, H, G, Q, D]`` (Q queries per head); tables ``[B, H, M]`` (M a multiple of the block); visible(i) ->
    ``[B, H, Q, T]`` bool for block i (T tokens); carry = (m, l, acc) ``[B, H, G, Q]``, ``[B, H, G, Q]``,
    ``[B, H, G, Q, D]`` in f32. Pages are gathered one block at a time, so no full copy of the head's K/V is ever
    materialised and blocks past the longest head are never touched.

    Returns ((m, l, acc), k_pages, v_pages). The pools go through the loop carry unchanged, except with
    ``thread_pools``: then every trip writes one element of its result into the sink page (whose contents never
    matter), so that the returned pools are a genuine loop value. A caller that reads the pools in a chain of
    loops and writes them afterwards (the decode: 30 layers, then one scatter) must thread them through the loops
    this way: a loop that merely passes them through lets XLA forward its input around it, after which the input
    has several users and XLA copies the whole pool (hundreds of MB) to let the write happen in place.
    """
    b, h, g, nq, d = q.shape
    ps, rw = k_pages.shape[1], k_pages.shape[2]  # rw: stored row width (kv_codec: D, or D + 4 for int8)
    quantized = is_quantized(k_pages.dtype)
    bp = bp or block_pages(ps)
    t = bp * ps

    n_pages = k_pages.shape[0]
    # Decode over several sequences: multiply-and-reduce, which XLA fuses with the page gathers, so the gathered
    # K / V block is never written out (8K x 8 chains, SmolLM2 shapes, 2-core CPU: 15% faster than two einsums).
    # One sequence (b == 1) takes the einsums: there the fused reduction ran 3.8-4.7x slower than the einsums at
    # 1K-8K tokens (2 sequences: even), perhaps because its leading dimension of 1 leaves XLA's CPU backend
    # nothing to split over threads (docs/kernels.md, "CPU decode attention").
    fused_reduce = nq == 1 and b > 1

    def body(i, carry):
        (m, l, acc), k_pages, v_pages = carry
        idx = jax.lax.dynamic_slice_in_dim(tables, i * bp, bp, axis=2)
        # Gather pages as rows of a [pages, page_size * D] view: on CPU this is several times faster than
        # gathering [page_size, D] slices of the 3-D pool (the view is free).
        k = k_pages.reshape(n_pages, ps * rw)[idx].reshape(b, h, t, rw)
        v = v_pages.reshape(n_pages, ps * rw)[idx].reshape(b, h, t, rw)
        if quantized:  # int8 rows with their scales -> f32 values, fused with the gather
            k, v = decode_rows(k), decode_rows(v)
        if fused_reduce:
            s = jnp.sum(k[:, :, None].astype(jnp.float32) * q[:, :, :, 0, None].astype(jnp.float32), axis=-1)
            s = s[:, :, :, None] * scale
        else:
            s = jnp.einsum("bhgqd,bhtd->bhgqt", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        s = jnp.where(visible(i)[:, :, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        if fused_reduce:
            pv = jnp.sum(p[:, :, :, 0, :, None] * v[:, :, None].astype(jnp.float32), axis=3)[:, :, :, None]
        else:
            pv = jnp.einsum("bhgqt,bhtd->bhgqd", p, v.astype(jnp.float32))
        acc = alpha[..., None] * acc + pv
        if thread_pools:
            # One element of the result into the sink page, with a plain in-place dynamic-update-slice. It must
            # depend on everything this trip reads from both pools (acc does), or XLA cannot order the write
            # after the reads and copies the pool instead.
            at = (SINK_PAGE, 0, 0)
            mark = acc[:1, :1, :1, :1, :1].reshape(1, 1, 1)
            k_pages = jax.lax.dynamic_update_slice(k_pages, mark.astype(k_pages.dtype), at)
            v_pages = jax.lax.dynamic_update_slice(v_pages, mark.astype(v_pages.dtype), at)
        return (m_new, l, acc), k_pages, v_pages

    return jax.lax.fori_loop(first_block, num_blocks, body, (carry, k_pages, v_pages))


def empty_softmax_state(shape, d: int):
    """The online-softmax state (m, l, acc) over no keys yet: m = -inf, l = 0, acc = 0; ``shape`` is m's."""
    return (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, d), jnp.float32))


def merge_softmax_states(a, b):
    """Two online-softmax states (m, l, acc) over disjoint sets of keys -> the state over their union."""
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    c1, c2 = jnp.exp(m1 - m_safe), jnp.exp(m2 - m_safe)
    return m, c1 * l1 + c2 * l2, c1[..., None] * acc1 + c2[..., None] * acc2


def shared_prefix_slots(tables, lengths, chains, page_size, exclude_slot=None):
    """Where the chains of one prompt read the same pages: ([P, H] shared slots, [P, H, M] their table).

    Sequences ``p * chains .. (p + 1) * chains - 1`` are the chains of prompt p (the engine's prompt-major layout).
    For each (prompt, KV head) the shared span is the run of leading table entries that every chain holding the
    head points at the same physical page, cut at the shortest such chain's length and at any chain's
    ``exclude_slot``: those slots hold the same keys for every chain (copy-on-write gives a chain that writes
    into a page its own copy). A chain of length 0 (finished, its pages released) does not count."""
    b, h, m = tables.shape
    p = b // chains
    tg, lg = tables.reshape(p, chains, h, m), lengths.reshape(p, chains, h)
    held = lg > 0
    ref_row = jnp.argmax(held, axis=1)  # [P, H]: the first chain that holds the head
    ref = jnp.take_along_axis(tg, ref_row[:, None, :, None], axis=1)[:, 0]
    same = jnp.all((tg == ref[:, None]) | ~held[..., None], axis=1)  # [P, H, M]
    leading = jnp.sum(jnp.cumprod(same.astype(jnp.int32), axis=-1), axis=-1)
    never = jnp.iinfo(jnp.int32).max
    shared = jnp.minimum(leading * page_size, jnp.min(jnp.where(held, lg, never), axis=1))
    if exclude_slot is not None:
        ex = exclude_slot.reshape(p, chains, h)
        shared = jnp.minimum(shared, jnp.min(jnp.where(held & (ex >= 0) & (ex < lg), ex, never), axis=1))
    return jnp.where(jnp.any(held, axis=1), shared, 0), ref


def pad_tables(tables, bp):
    m = tables.shape[-1]
    pad = (-m) % bp
    return jnp.pad(tables, ((0, 0), (0, 0), (0, pad)), constant_values=SINK_PAGE) if pad else tables


def paged_attention_blocked(q, k_pages, v_pages, block_tables, lengths, *, scale=None, block_tokens=None,
                            return_pools=False, new_kv=None, exclude_slot=None, thread_pools=False, chains=1):
    """Paged decode attention, same contract as ``pallas_kernels.paged_decode_attention`` (q ``[B, Hkv, G, D]``,
    slots ``0..length-1`` of each head's pages are live, no causal mask), in plain XLA for the CPU: an online
    softmax over blocks of ``BLOCK_TOKENS`` cached tokens whose trip count is the longest head's, so the cost
    follows the live cache and no gathered copy of all K/V is made. A head of length 0 returns zeros.
    block_tokens: cached tokens per block (default: ~0.5 MB of K+V, at least 256 tokens: ``_decode_block_tokens``).

    new_kv: optional (k, v) ``[B, Hkv, D]`` of the incoming token, attended to as one more key that is not in the
    pool yet, and exclude_slot ``[B, Hkv]``: a slot below ``length`` to skip (the one the incoming token will
    take: stale or an evicted token). With both, the caller can write the token into the pool after the attention
    (the decode does, for all layers at once), so the pool is only read here. thread_pools (with return_pools):
    see ``online_blocks``; only for a caller whose pools nothing else reads before it writes them.

    chains: sequences come in groups of ``chains`` that share their prompt's pages (``Engine.generate(chains=W)``,
    prompt-major). The span every chain of a group reads from the same pages (``shared_prefix_slots``) is then read
    once, for the queries of all the group's chains together, and each chain reads only the rest on its own. The
    result is the same; the K/V read for the shared span drops W-fold (cascade attention, as serving engines do for
    shared prefixes)."""
    b, h, g, d = q.shape
    if chains < 1 or b % chains:
        raise ValueError(f"chains must be a positive divisor of the {b} sequences, got {chains}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ps = k_pages.shape[1]
    bp = block_pages(ps, block_tokens or _decode_block_tokens(b * h, k_pages.shape[-1],
                                                              jnp.dtype(k_pages.dtype).itemsize))
    bp = min(bp, max(1, block_tables.shape[-1]))  # never more than the table holds
    tables = pad_tables(block_tables, bp)
    t = bp * ps
    num_blocks = (jnp.max(lengths) + t - 1) // t
    if new_kv is None:
        carry = empty_softmax_state((b, h, g, 1), d)
    else:  # the incoming token opens the online softmax (rounded to the pool's format, as if read from it)
        k_new, v_new = (round_trip(a, k_pages.dtype) for a in new_kv)
        s_new = jnp.einsum("bhgd,bhd->bhg", q.astype(jnp.float32), k_new)[..., None] * scale
        carry = (s_new, jnp.ones((b, h, g, 1), jnp.float32),
                 jnp.broadcast_to(v_new[:, :, None, None, :], (b, h, g, 1, d)))

    first_block, shared = 0, None
    if chains > 1:
        shared, shared_tables = shared_prefix_slots(tables, lengths, chains, ps, exclude_slot)
        # Whole blocks only: the private pass then starts where the shared one ends, and no block is read twice
        # (a DMS cache at 1K x CR 8 shares less than a block: it reads as without chains).
        shared = shared // t * t
        shared_state, k_pages, v_pages = _shared_span_state(q, k_pages, v_pages, shared_tables, shared, chains,
                                                            scale, bp, thread_pools)
        carry = merge_softmax_states(carry, shared_state)
        shared = jnp.repeat(shared, chains, axis=0)  # [B, H]
        first_block = jnp.min(shared) // t

    def visible(i):
        slot = (i * t + jnp.arange(t))[None, None, None, :]
        vis = slot < lengths[:, :, None, None]
        if shared is not None:  # read above, once per group
            vis = vis & (slot >= shared[:, :, None, None])
        return vis if exclude_slot is None else vis & (slot != exclude_slot[:, :, None, None])

    (_, l, acc), k_pages, v_pages = online_blocks(q[:, :, :, None], k_pages, v_pages, tables, num_blocks,
                                                  visible, carry, scale, bp, thread_pools=thread_pools,
                                                  first_block=first_block)
    out = (acc / jnp.where(l == 0.0, 1.0, l)[..., None])[:, :, :, 0].astype(q.dtype)
    return (out, k_pages, v_pages) if return_pools else out


def _shared_span_state(q, k_pages, v_pages, shared_tables, shared, chains, scale, bp, thread_pools):
    """The online-softmax state of every sequence over its group's shared span (``shared_prefix_slots``), read once
    per group: all chains' queries of a KV head attend together, [P, H, 1, chains * G, D], one matmul per block.
    Returns ((m, l, acc) laid out as paged_attention_blocked's carry, [B, H, G, 1] and [B, H, G, 1, D]), pools)."""
    b, h, g, d = q.shape
    p, n = b // chains, chains * g
    t = bp * k_pages.shape[1]
    q_group = q.reshape(p, chains, h, g, d).transpose(0, 2, 1, 3, 4).reshape(p, h, 1, n, d)
    carry = empty_softmax_state((p, h, 1, n), d)

    def visible(i):
        return (i * t + jnp.arange(t))[None, None, None, :] < shared[:, :, None, None]

    num_blocks = (jnp.max(shared) + t - 1) // t
    state, k_pages, v_pages = online_blocks(q_group, k_pages, v_pages, shared_tables, num_blocks, visible, carry,
                                            scale, bp, thread_pools=thread_pools)

    def per_sequence(x):  # [P, H, 1, chains * G, ...] -> [B, H, G, 1, ...]
        x = jnp.moveaxis(x.reshape(p, h, chains, g, *x.shape[4:]), 2, 1)
        return x.reshape(b, h, g, 1, *x.shape[4:])

    return tuple(per_sequence(x) for x in state), k_pages, v_pages
