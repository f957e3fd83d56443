"""Prefill of one chunk of prompts, all layers in one ``lax.scan``, over the paged cache.

Per layer, the chunk's queries attend to the head's cached live slots plus the chunk itself with the exact hard
DMS mask (cached ring tokens marked for eviction vanish once the query is more than ``window`` behind; chunk keys
use the usual delayed-eviction bias). Then the chunk is inserted (``plans.insert_chunk``): tokens evicted within
the chunk are never written, the survivors fill the slots freed by older ring tokens leaving the window, the rest
are appended (pages allocated on device). The one-token shift across chunks: the first logit of a chunk is the
decision for the previous chunk's last token, which waits in the ring as "pending" (kept) until then. The cached
keys are read with the blocked XLA loop (``pallas_kernels.xla_blocked.online_blocks``); the pool is only read
inside the layers and written once after them, so XLA never copies it.

**DMC** (policy "dmc"): a chunk's queries attend to the cached slots (minus the last one when the chunk's first
token merges into it) and to the chunk's intermediate merged states, continued from the per-head window state,
with the training-side visibility; only the states that end a segment are written (``_dmc_prefill_layer``).

A prompt whose pages do not fit is preempted (``failed``): its pages go back to the pool at once, layer by layer
during the scan and for all layers after it; the engine turns that into a result status or an error.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dms_jax import dmc, dms
from dms_jax.model import apply_rope, rope_cos_sin
from dms_jax.serve.pages import cond_without_pools, drop_rows, note_high_water, release, write_kv
from dms_jax.serve.plans import (cached_reads, chunk_owner_decisions, dmc_chunk_states, dmc_plan_chunk,
                                 dmc_window_after_chunk, insert_chunk, marked_gone, marked_positions,
                                 set_previous_decision)
from dms_jax.serve.policies import EvictionPolicy
from dms_jax.serve.spec import SINK_PAGE, CacheSpec, PagedCache
from dms_jax.serve.tensor_parallel import over_kv_heads
from pallas_kernels.xla_blocked import BLOCK_TOKENS, block_pages, online_blocks, pad_tables


def _prefill_attention(q, k_chunk, v_chunk, chunk_vis, k_pages, v_pages, tables, lengths, marked_pos, q_pos,
                       window, bp, exclude_slot=None):
    """``_chunk_attention`` on each device's own KV heads under a tensor-parallel mesh
    (``tensor_parallel.over_kv_heads``). Returns [B, C, Hq, D]."""

    def run(kp, vp, tab, q, k_chunk, v_chunk, chunk_vis, lengths, marked_pos, q_pos, exclude_slot):
        return _chunk_attention(q, k_chunk, v_chunk, chunk_vis, kp, vp, tab, lengths, marked_pos, q_pos, window, bp,
                                exclude_slot)

    return over_kv_heads(run, (k_pages, v_pages), tables, ((q, 2), (k_chunk, 2), (v_chunk, 2), (chunk_vis, 1),
                                                          (lengths, 1), (marked_pos, 1), (q_pos, None),
                                                          (exclude_slot, 1)), out_axis=2)


def _chunk_attention(q, k_chunk, v_chunk, chunk_vis, k_pages, v_pages, tables, lengths, marked_pos, q_pos,
                     window, bp, exclude_slot=None):
    """Attention of a chunk's queries to the cached live slots (blocked, exact DMS visibility) and to the chunk.

    q [B, C, Hq, D]; chunk keys [B, C, Hkv, D] with chunk_vis [B, Hkv, C, C]; cached: tables [B, Hkv, M] (M a
    multiple of the block), lengths [B, Hkv], marked_pos [B, Hkv, M * page_size] (position of a slot's token if it
    is a marked ring token, else -1; see plans.marked_positions; None: no marked tokens), q_pos [B, C].
    exclude_slot [B, Hkv]: a cached slot hidden from every query (DMC: the last slot, when the chunk's first token
    merges into it), -1 for none. Returns [B, C, Hq, D].
    """
    b, c, hq, d = q.shape
    hkv = k_chunk.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    qg = jnp.transpose(q.reshape(b, c, hkv, g, d), (0, 2, 3, 1, 4))  # [B, H, G, C, D]
    s_chunk = jnp.einsum("bhgcd,bshd->bhgcs", qg, k_chunk, preferred_element_type=jnp.float32) * scale
    s_chunk = jnp.where(chunk_vis[:, :, None], s_chunk, -jnp.inf)
    m = jnp.max(s_chunk, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s_chunk - m_safe[..., None])
    carry = (m, jnp.sum(p, axis=-1), jnp.einsum("bhgcs,bshd->bhgcd", p, v_chunk.astype(jnp.float32)))
    ps = k_pages.shape[1]
    t = bp * ps

    def visible(i):
        slot = i * t + jnp.arange(t)
        live = slot[None, None, :] < lengths[..., None]  # [B, H, T]
        if exclude_slot is not None:
            live = live & (slot[None, None, :] != exclude_slot[..., None])
        if marked_pos is None:
            return jnp.broadcast_to(live[:, :, None, :], (b, hkv, c, t))
        mp = jax.lax.dynamic_slice_in_dim(marked_pos, i * t, t, axis=2)
        return live[:, :, None, :] & ~marked_gone(mp, q_pos, window)

    num_blocks = (jnp.max(lengths) + t - 1) // t
    (_, l, acc), _, _ = online_blocks(qg, k_pages, v_pages, tables, num_blocks, visible, carry, scale, bp)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]  # [B, H, G, C, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, c, hq, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "all_logits",
                                             "block_tokens"), donate_argnames=("cache",))
def prefill_chunk(layer_gd, layer_params, outer_gd, outer_params, cache: PagedCache, slots, tokens, n_valid,
                  alive, *, spec: CacheSpec, policy: EvictionPolicy, all_logits: bool,
                  block_tokens: int | None = None):
    """One chunk of prompts into sequence slots ``slots`` [B]. tokens [B, C] (right-padded), n_valid [B] real
    tokens of the chunk per sequence, alive [B] (False: the prompt was preempted earlier; skipped).

    Returns (logits [B, C, V] if all_logits else the logits of each sequence's last valid token [B, V], cache,
    failed [B] (preempted now for lack of pages), prefill reads [B], overflow (a bookkeeping bug if True))."""
    outer = nnx.merge(outer_gd, outer_params)
    b, c = tokens.shape
    ps = spec.page_size
    n_valid = jnp.where(alive, n_valid, 0)
    n = cache.num_tokens[slots]
    positions = n[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    qvalid = jnp.arange(c)[None, :] < n_valid[:, None]  # [B, C]
    dms_on = policy.uses_model_decisions
    x = outer.embed_tokens(tokens)
    pstate = None if cache.policy_state is None else jax.tree.map(lambda a: a[:, slots], cache.policy_state)
    xs = (layer_params, cache.block_tables[:, slots], cache.lengths[:, slots], cache.ring_slot[:, slots],
          cache.ring_dec[:, slots], pstate)

    k_pages, v_pages = cache.k_pages, cache.v_pages  # read-only inside the layer scan

    def body(carry, per_layer):
        x, refcount, failed, reads, bad = carry
        params, tables, lengths, ring_slot, ring_dec, pst = per_layer
        layer = nnx.merge(layer_gd, params)

        # A sequence preempted at an earlier layer of this chunk gives its pages of this layer back right away,
        # so that the other sequences can use them in this and the later layers (its pages of the earlier layers
        # go back after the scan).
        refcount, tables, lengths, ring_slot, ring_dec = drop_rows(refcount, tables, lengths, ring_slot,
                                                                   ring_dec, failed, ps)

        def attention_fn(p):
            args = (refcount, tables, lengths, ring_slot, ring_dec, pst, n, n_valid, positions, qvalid, ~failed,
                    k_pages, v_pages, policy, spec, block_tokens)
            if policy.merges:
                out, (refcount2, pre, layer_reads, overflow, new, kv, pst2) = _dmc_prefill_layer(
                    p, layer.self_attn.cfg, *args)
            else:
                out, (refcount2, pre, layer_reads, overflow, new, kv, pst2) = _dms_prefill_layer(p, *args)
            return out, (refcount2, failed | pre, reads + layer_reads, overflow, new, kv, pst2)

        x, (refcount, failed, reads, overflow, new, kv, pst2) = layer(x, positions, attention_fn, dms_on)
        return (x, refcount, failed, reads, bad | overflow), (new, kv, pst2)

    init = (x, cache.refcount, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((), bool))
    (x, refcount, failed, reads, overflow), (new, kv, pstate) = jax.lax.scan(body, init, xs)
    cache = _store_chunk(cache, spec, slots, n_valid, failed, refcount, new, kv, pstate)
    if all_logits:
        logits = outer.unembed(x)
    else:
        last = jnp.take_along_axis(x, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = outer.unembed(last)
    return logits, cache, failed, jnp.where(failed, 0, reads), overflow


def _store_chunk(cache: PagedCache, spec: CacheSpec, slots, n_valid, failed, refcount, new, kv, pstate):
    """The cache after a chunk's layer scan: every layer's K/V written in one scatter, the chunk rows' tables,
    lengths, ring, token counts and policy state put back, and the prompts that failed released."""
    tables, lengths, ring_slot, ring_dec = new
    page, off, k_new, v_new = kv
    # Sequences preempted at a later layer have pages written by earlier layers: those writes are harmless (the
    # sequence is released below), but send them to the sink anyway.
    drop = failed[None, :, None, None]
    page = jnp.where(drop, SINK_PAGE, page)
    off = jnp.where(drop, 0, off)
    k_pages, v_pages = write_kv(cache.k_pages, cache.v_pages, page, off, k_new, v_new)
    cache = cache.replace(
        k_pages=k_pages, v_pages=v_pages, refcount=refcount,
        block_tables=cache.block_tables.at[:, slots].set(tables),
        lengths=cache.lengths.at[:, slots].set(lengths),
        ring_slot=cache.ring_slot.at[:, slots].set(ring_slot),
        ring_dec=cache.ring_dec.at[:, slots].set(ring_dec),
        num_tokens=cache.num_tokens.at[slots].add(jnp.where(failed, 0, n_valid)),
        policy_state=None if pstate is None else jax.tree.map(lambda a, u: a.at[:, slots].set(u),
                                                              cache.policy_state, pstate),
    )
    cache = note_high_water(cache)
    failed_s = jnp.zeros((spec.max_seqs,), bool).at[slots].set(failed)
    return cond_without_pools(jnp.any(failed), lambda cc: release(cc, failed_s, spec.page_size), cache)


def _dms_prefill_layer(p, refcount, tables, lengths, ring_slot, ring_dec, pst, n, n_valid, positions, qvalid, ok,
                       k_pages, v_pages, policy, spec, block_tokens):
    """One layer of a prefill chunk for the evicting policies (every policy but "dmc").

    The chunk's decisions (the first one is the previous chunk's last token's, recorded in the ring), the
    attention of its queries to the cached slots and the chunk with the hard DMS mask, and the booking of its
    surviving tokens (``plans.insert_chunk``, with the ring's plan or the policy's own). Returns (out,
    (refcount, preempted [B], this layer's reads [B], overflow, (tables, lengths, ring_slot, ring_dec),
    (page, offset, k, v) of the chunk's K/V writes, the layer's policy state))."""
    ps, r, w, hkv = spec.page_size, spec.ring, spec.window, spec.num_kv_heads
    kk = jnp.arange(positions.shape[1])
    dec_at = policy.decisions(p.decision_logits, positions, hkv) & qvalid[:, None, :]
    ring_dec1 = set_previous_decision(ring_dec, n, dec_at[..., 0], (n_valid > 0) & ok, r)
    dec_chunk = chunk_owner_decisions(dec_at, n_valid)
    # Chunk keys: causal, valid, and the delayed-eviction rule with the chunk's own decisions.
    causal = kk[None, :] <= kk[:, None]  # [query, key]
    in_window = dms.visible_if_marked(kk[:, None], kk[None, :], w)
    chunk_vis = (causal[None, None] & qvalid[:, None, None, :]
                 & (in_window[None, None] | ~dec_chunk[:, :, None, :]))
    chunk_vis = chunk_vis & qvalid[:, None, :, None]
    layer_reads = (jnp.sum(chunk_vis, axis=(1, 2, 3), dtype=jnp.int32)
                   + cached_reads(lengths, ring_slot, ring_dec1, n, positions, qvalid, w))
    bp = block_pages(ps, block_tokens or BLOCK_TOKENS)
    tpad = pad_tables(tables, bp)
    marked = marked_positions(ring_slot, ring_dec1, n, tpad.shape[-1] * ps)
    out = _prefill_attention(p.q, p.k, p.v, chunk_vis, k_pages, v_pages, tpad, lengths, marked, positions, w, bp)
    # A policy may plan the chunk itself (TOVA / H2O keep their budget; see baselines.py).
    plan, pst2 = policy.prefill_plan(
        pst, q=p.q, k=p.k, chunk_vis=chunk_vis, k_pages=k_pages, block_tables=tables, lengths=lengths,
        ring_slot=ring_slot, ring_dec=ring_dec1, num_tokens=n, n_valid=n_valid, page_size=ps)
    # Book the chunk: only tokens still alive at its end get a slot. The K/V writes of all layers happen
    # after the scan (layers never read each other's pages), so the pool is read-only in here and XLA
    # never copies it.
    (refcount2, *new), (page, off), pre, overflow = insert_chunk(
        refcount, tables, lengths, ring_slot, ring_dec1, n, n_valid, dec_chunk, ok, ps, plan=plan,
        groups=spec.kv_groups)
    refcount2, *new = drop_rows(refcount2, *new, pre, ps)  # preempted here: this layer's pages go now
    kv = (page, off, jnp.swapaxes(p.k, 1, 2), jnp.swapaxes(p.v, 1, 2))
    return out, (refcount2, pre, layer_reads, overflow, tuple(new), kv, pst2)


def _dmc_prefill_layer(p, cfg, refcount, tables, lengths, ring_slot, ring_dec, win, n, n_valid, positions, qvalid,
                       ok, k_pages, v_pages, policy, spec, block_tokens):
    """One layer of a DMC prefill chunk (policy "dmc"; ``_dms_prefill_layer`` in DMC's terms).

    The chunk's keys are its tokens' intermediate merged states (``plans.dmc_chunk_states``: the training-side
    parallel form, continued from the window state), RoPE'd at each token's position; query i sees chunk state
    j <= i iff j == i or token j + 1 appends (state j survives), and every cached slot except the last one when the
    chunk's first token merges into it. Then the states that end a segment are booked (``plans.dmc_plan_chunk``,
    ``insert_chunk``) and the window state moves on. Returns what ``_dms_prefill_layer`` returns, with the
    layer's window state as its policy state."""
    ps, hkv = spec.page_size, spec.num_kv_heads
    c = positions.shape[1]
    merge = policy.decisions(p.decision_logits, positions, hkv) & qvalid[:, None, :]  # [B, H, C]
    k_states, v_states = dmc_chunk_states(win, n, p.k_unrotated, p.v, p.importance, merge, spec.state_dtype)
    cos, sin = rope_cos_sin(cfg, positions)
    k_states = dmc.scale_borrowed_neurons(apply_rope(k_states, cos, sin), 0.0)
    kk = jnp.arange(c)
    dist = kk[:, None] - kk[None, :]  # query - key
    survives = ~dms.shift_to_owner(merge, False)  # state j stays iff token j + 1 does not merge into it
    chunk_vis = (((dist == 0)[None, None] | ((dist > 0)[None, None] & survives[:, :, None, :]))
                 & qvalid[:, None, :, None] & qvalid[:, None, None, :])
    hidden = jnp.where(merge[..., 0], lengths - 1, -1)  # [B, H]
    per_q = jnp.where(qvalid[:, None, :], (lengths - (hidden >= 0))[..., None], 0)
    layer_reads = jnp.sum(chunk_vis, axis=(1, 2, 3), dtype=jnp.int32) + jnp.sum(per_q, axis=(1, 2), dtype=jnp.int32)
    bp = block_pages(ps, block_tokens or BLOCK_TOKENS)
    out = _prefill_attention(p.q, k_states.astype(p.q.dtype), v_states.astype(p.q.dtype), chunk_vis, k_pages,
                             v_pages, pad_tables(tables, bp), lengths, None, positions, 0, bp, exclude_slot=hidden)
    plan = dmc_plan_chunk(lengths, ring_slot, ring_dec, merge, n_valid, ps)
    (refcount2, *new), (page, off), pre, overflow = insert_chunk(
        refcount, tables, lengths, ring_slot, ring_dec, n, n_valid, merge, ok, ps, plan=plan, groups=spec.kv_groups)
    refcount2, *new = drop_rows(refcount2, *new, pre, ps)
    win2 = dmc_window_after_chunk(win, n, n_valid, p.k_unrotated, p.v, p.importance, merge, ok & ~pre)
    kv = (page, off, jnp.swapaxes(k_states, 1, 2), jnp.swapaxes(v_states, 1, 2))
    return out, (refcount2, pre, layer_reads, overflow, tuple(new), kv, win2)
