"""Where tokens go in the paged cache (spec.py): the decode plan (one token per sequence), the chunk plans of
prefill, the visibility of cached slots to a chunk's queries, and DMC's merge-or-append slots.

The DMS update for an incoming token at position ``t`` (identical for every head, vectorised over all of them):
the ring entry ``t % R`` holds token ``t - R = t - window - 1``, the token that leaves the window now. If its
decision is 1 its slot is *overwritten* by the new token (length unchanged, the evicted token is gone); otherwise
the new token is *appended* at slot ``length`` and takes a new page when ``length`` is a multiple of the page
size. The decision for token ``t - 1`` is the logit computed at ``t`` (the one-token shift); it is stored in the
ring after the forward of token ``t``. The invariant: after inserting token ``t`` the head holds exactly the tokens
``{j <= t : t - j <= window or d_j = 0}`` (``dms.visible_if_marked``) -- the visible set of the hard-mode
attention mask -- so live slots equal live tokens and memory is actually freed (not masked).

DMC (policy "dmc"; policies.py's docstring) never evicts: a token appends a slot or merges into the head's last
one. Helpers: ``dmc_chunk_states`` / ``dmc_plan_chunk`` / ``dmc_window_after_chunk`` (prefill),
``dmc_decode_slots`` (decode).

All functions here are pure and jit-compatible; the engine's prefill and decode (prefill.py, decode.py) compose
them with the page accounting of pages.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from dms_jax import dmc, dms
from dms_jax.serve.pages import (allocate, by_group, fits, group_free_pages, note_high_water, pages_for,
                                 select_preemptions)
from dms_jax.serve.policies import EvictionPolicy
from dms_jax.serve.spec import SINK_PAGE, CacheSpec, PagedCache, ring_positions

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Decode: one token per sequence
# ---------------------------------------------------------------------------------------------------------


@struct.dataclass
class DecodePlan:
    """Where each head's incoming token goes, decided before the forward (all of it is known then: the token that
    leaves the window was decided at least one step ago)."""

    target: Array  # [L, S, H] slot the token is written to
    new_lengths: Array  # [L, S, H]
    need: Array  # [L, S, H] bool: needs a fresh page (append at a page boundary, or copy-on-write)
    cow: Array  # [L, S, H] bool: the target page is shared and must be copied first
    page_index: Array  # [L, S, H] table index of the target page


def plan_decode(cache: PagedCache, spec: CacheSpec, active: Array, policy: EvictionPolicy,
                policy_state: Any = None) -> DecodePlan:
    ps, r = spec.page_size, spec.ring
    n = cache.num_tokens[None, :, None]  # position of the incoming token
    idx = (cache.num_tokens % r)[None, :, None, None]
    old_slot = jnp.take_along_axis(cache.ring_slot, idx, axis=-1)[..., 0]
    old_dec = jnp.take_along_axis(cache.ring_dec, idx, axis=-1)[..., 0] & (n >= r)
    ring_victim = jnp.where(old_dec, old_slot, -1)
    victim = policy.victims(ring_victim, cache.lengths, cache.policy_state if policy_state is None else policy_state,
                            cache.num_tokens)
    act = active[None, :, None]
    overwrite = (victim >= 0) & act
    target = jnp.where(overwrite, victim, cache.lengths)
    append = act & ~overwrite
    new_lengths = cache.lengths + append.astype(jnp.int32)
    page_index = target // ps
    fresh = append & (cache.lengths % ps == 0)
    cur = jnp.take_along_axis(cache.block_tables, jnp.minimum(page_index, spec.max_pages_per_head - 1)[..., None],
                              axis=-1)[..., 0]
    cow = act & ~fresh & (cache.refcount[cur] > 1)
    return DecodePlan(target=target, new_lengths=new_lengths, need=fresh | cow, cow=cow, page_index=page_index)


def apply_decode_plan(cache: PagedCache, spec: CacheSpec, plan: DecodePlan, active: Array):
    """Allocates the planned pages (the caller made sure they fit), copies shared target pages (copy-on-write),
    records the incoming token in the ring with a pending decision, bumps lengths and token counts.

    Returns (cache, write_page [L, S, H], write_offset [L, S, H]); inactive heads write to the sink.
    """
    ps, r = spec.page_size, spec.ring
    ids, refcount = allocate(cache.refcount, plan.need, cache.kv_groups)
    pidx = jnp.minimum(plan.page_index, spec.max_pages_per_head - 1)[..., None]
    old = jnp.take_along_axis(cache.block_tables, pidx, axis=-1)[..., 0]

    # Copy-on-write, unconditionally (heads without a shared target copy the sink onto itself, which stays in
    # cache): a lax.cond carrying the pools made XLA copy both pools (hundreds of MB) at every step.
    src = jnp.where(plan.cow, old, SINK_PAGE).reshape(-1)
    dst = jnp.where(plan.cow, ids, SINK_PAGE).reshape(-1)
    k_pages = cache.k_pages.at[dst].set(cache.k_pages[src])
    v_pages = cache.v_pages.at[dst].set(cache.v_pages[src])
    refcount = refcount.at[src].add(-plan.cow.reshape(-1).astype(jnp.int32)).at[SINK_PAGE].set(1)
    tables = jnp.where(
        (jnp.arange(spec.max_pages_per_head) == plan.page_index[..., None]) & plan.need[..., None],
        ids[..., None], cache.block_tables)
    write_page = jnp.take_along_axis(tables, pidx, axis=-1)[..., 0]
    act = active[None, :, None]
    write_page = jnp.where(act, write_page, SINK_PAGE)
    write_off = jnp.where(act, plan.target % ps, 0)
    ring_idx = (cache.num_tokens % r)[None, :, None]
    hit = (jnp.arange(r) == ring_idx[..., None]) & act[..., None]
    cache = cache.replace(
        k_pages=k_pages, v_pages=v_pages, refcount=refcount, block_tables=tables,
        lengths=jnp.where(act, plan.new_lengths, cache.lengths),
        ring_slot=jnp.where(hit, plan.target[..., None], cache.ring_slot),
        ring_dec=cache.ring_dec & ~hit,
        num_tokens=cache.num_tokens + active.astype(jnp.int32),
    )
    return note_high_water(cache), write_page, write_off


def set_previous_decision(ring_dec: Array, num_tokens_before: Array, decision: Array, active: Array, ring: int):
    """Stores the decision for token ``n - 1`` (computed at the incoming token ``n``) in one layer's ring.

    ring_dec ``[S, H, R]``; num_tokens_before ``[S]`` (n); decision ``[S, H]`` bool; active ``[S]``.
    """
    idx = ((num_tokens_before - 1) % ring)[:, None, None]
    ok = (active & (num_tokens_before >= 1))[:, None, None]
    hit = (jnp.arange(ring) == idx) & ok
    return jnp.where(hit, decision[..., None], ring_dec)


# ---------------------------------------------------------------------------------------------------------
# Prefill: a chunk of tokens per sequence
# ---------------------------------------------------------------------------------------------------------


def marked_positions(ring_slot: Array, ring_dec: Array, num_tokens: Array, width_tokens: int) -> Array:
    """``[B, H, width_tokens]``: for each cached slot, the position of its token if it is a ring token marked for
    eviction, else -1 (kept for good, or not a live slot). ring ``[B, H, R]``, num_tokens ``[B]``."""
    b, h, r = ring_slot.shape
    pos = ring_positions(num_tokens, r)  # [B, R]
    valid = (pos >= 0)[:, None, :] & ring_dec
    slot = jnp.where(valid, ring_slot, width_tokens)  # out of range -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    return jnp.full((b, h, width_tokens), -1, jnp.int32).at[bi, hi, slot].set(
        jnp.broadcast_to(pos[:, None, :], (b, h, r)), mode="drop")


def marked_gone(marked_pos: Array, q_pos: Array, window: int) -> Array:
    """``[B, H, C, W]``: which cached slots are gone for each chunk query -- those holding a token marked for
    eviction that the query no longer sees (``dms.visible_if_marked``). marked_pos ``[B, H, W]``
    (``marked_positions``: -1 for a slot kept for good), q_pos ``[B, C]``."""
    mp = marked_pos[:, :, None, :]
    return (mp >= 0) & ~dms.visible_if_marked(q_pos[:, None, :, None], mp, window)


def cached_visibility(lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array, q_pos: Array,
                      width_tokens: int, window: int) -> Array:
    """Which cached slots each chunk query may attend to: ``[B, H, C, width_tokens]`` bool.

    lengths ``[B, H]``, ring ``[B, H, R]``, num_tokens ``[B]`` (before the chunk), q_pos ``[B, C]``. A cached slot
    ``< length`` is visible unless it holds a ring token marked for eviction whose window has passed for the
    query (``marked_gone``). Slots outside the ring hold tokens with decision 0 (kept forever): a marked token
    is overwritten the moment it leaves the window.
    """
    mp = marked_positions(ring_slot, ring_dec, num_tokens, width_tokens)
    live = jnp.arange(width_tokens)[None, None, :] < lengths[..., None]  # [B, H, W]
    return live[:, :, None, :] & ~marked_gone(mp, q_pos, window)


def cached_reads(lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array, q_pos: Array, q_valid: Array,
                 window: int) -> Array:
    """``[B]`` cached slots read by the chunk's valid queries, summed over heads: each query reads the head's live
    slots except marked ring tokens already out of its window (the same count as ``cached_visibility``)."""
    r = ring_slot.shape[-1]
    pos = ring_positions(num_tokens, r)  # [B, R]
    marked = (pos >= 0)[:, None, :] & ring_dec  # [B, H, R]
    gone = marked_gone(jnp.where(marked, pos[:, None, :], -1), q_pos, window)  # [B, H, C, R]
    per_q = lengths[:, :, None] - jnp.sum(gone, axis=-1, dtype=jnp.int32)
    return jnp.sum(jnp.where(q_valid[:, None, :], per_q, 0), axis=(1, 2), dtype=jnp.int32)


@struct.dataclass
class ChunkPlan:
    """Where the tokens of one chunk go in one layer (per (sequence, KV head))."""

    target: Array  # [B, H, C] slot of each surviving chunk token (garbage where not written)
    write: Array  # [B, H, C] bool: token is written (valid and still alive at the end of the chunk)
    new_lengths: Array  # [B, H]
    have: Array  # [B, H] pages held before the chunk
    need: Array  # [B, H, J] bool: fresh pages to allocate (table indices have + j)
    ring_slot: Array  # [B, H, R] after the chunk
    ring_dec: Array  # [B, H, R] after the chunk


def plan_chunk(lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array, n_valid: Array,
               dec_chunk: Array, page_size: int) -> ChunkPlan:
    """Vectorised equivalent of inserting the chunk's tokens one by one, writing only the tokens still alive
    after the chunk.

    lengths ``[B, H]``; ring ``[B, H, R]`` with the decision for token n-1 already filled in; num_tokens ``[B]``
    (n, before the chunk); n_valid ``[B]`` (c, tokens of the chunk for each sequence, 0..C); dec_chunk
    ``[B, H, C]`` owner decisions for the chunk's tokens (the last valid one pending = False).

    Chunk token k at position n + k pushes token n + k - R out of the window. If that token is marked it goes:
    when it is an older ring token its slot becomes a *hole*; when it is a chunk token (k >= R) it is simply
    never written. Surviving chunk tokens fill the holes first, in order, then append. Each insertion evicts at
    most one token, so holes <= survivors and no hole is left behind: live slots stay ``0 .. length-1``.
    """
    b, h, c_max = dec_chunk.shape
    r = ring_slot.shape[-1]
    k = jnp.arange(c_max)
    in_chunk = k[None, None, :] < n_valid[:, None, None]  # [B, 1, C]
    # Older ring tokens leaving the window during the chunk (chunk indices k < R).
    kr = min(r, c_max)
    ko = jnp.arange(kr)
    ridx = (num_tokens[:, None] + ko[None, :]) % r  # [B, Kr]: entry of token n + k - R
    leave_valid = (num_tokens[:, None] + ko[None, :] >= r) & (ko[None, :] < n_valid[:, None])  # [B, Kr]
    old_dec = jnp.take_along_axis(ring_dec, jnp.broadcast_to(ridx[:, None, :], (b, h, kr)), axis=-1)
    old_slot = jnp.take_along_axis(ring_slot, jnp.broadcast_to(ridx[:, None, :], (b, h, kr)), axis=-1)
    # Chunk tokens evicted within the chunk: marked and pushed out by a later chunk token.
    evicted = dec_chunk & (k[None, None, :] + r < n_valid[:, None, None])
    surv = in_chunk & ~evicted
    plan = _fill_holes(lengths, old_dec & leave_valid[:, None, :], old_slot, surv, page_size)
    # The ring after the chunk: its last min(c, R) tokens (all alive) replace their entries.
    return _ring_after_chunk(plan, ring_slot, ring_dec, num_tokens, n_valid, plan.target, dec_chunk)


def plan_chunk_explicit(lengths: Array, hole: Array, surv: Array, ring_slot: Array, ring_dec: Array,
                        num_tokens: Array, n_valid: Array, page_size: int) -> ChunkPlan:
    """A chunk plan from explicit choices (score-based policies): ``hole`` ``[B, H, W]`` marks the cached slots
    (``< lengths``) to free, ``surv`` ``[B, H, C]`` the chunk tokens to keep. Survivors fill the holes first (in
    slot order), then append, as in ``plan_chunk``; the caller guarantees ``sum(hole) <= sum(surv)`` per head (a
    policy that keeps ``min(budget, cached + chunk)`` tokens with ``cached <= budget`` does), so live slots stay
    ``0 .. length-1``. The ring gets the last chunk tokens with decision 0 (these policies never use it)."""
    b, h, w = hole.shape
    slots = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, h, w))
    plan = _fill_holes(lengths, hole, slots, surv, page_size)
    return _ring_after_chunk(plan, ring_slot, ring_dec, num_tokens, n_valid, jnp.where(surv, plan.target, 0),
                             jnp.zeros(surv.shape, bool))


def _fill_holes(lengths: Array, hole: Array, hole_slot: Array, surv: Array, page_size: int) -> ChunkPlan:
    """The slots of a chunk's surviving tokens (both chunk plans): the freed slots first -- ``hole_slot``
    ``[B, H, K]`` where ``hole`` -- in order, then appended after ``lengths`` ``[B, H]``; the new lengths and the
    fresh pages that takes. surv ``[B, H, C]``. The ring fields are left None, for ``_ring_after_chunk``."""
    b, h, kh = hole.shape
    c_max = surv.shape[-1]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    n_holes = jnp.sum(hole, axis=-1, dtype=jnp.int32)
    hrank = jnp.cumsum(hole.astype(jnp.int32), axis=-1) - 1
    holes = jnp.zeros((b, h, kh), jnp.int32).at[bi, hi, jnp.where(hole, hrank, kh)].set(hole_slot, mode="drop")
    n_surv = jnp.sum(surv, axis=-1, dtype=jnp.int32)
    srank = jnp.cumsum(surv.astype(jnp.int32), axis=-1) - 1
    from_hole = jnp.take_along_axis(holes, jnp.clip(srank, 0, kh - 1), axis=-1)
    target = jnp.where(srank < n_holes[..., None], from_hole, lengths[..., None] + srank - n_holes[..., None])
    new_lengths = lengths + n_surv - n_holes
    have = pages_for(lengths, page_size)
    want = pages_for(new_lengths, page_size)
    j_max = -(-c_max // page_size) + 1
    need = jnp.arange(j_max)[None, None, :] < (want - have)[..., None]
    return ChunkPlan(target=target, write=surv, new_lengths=new_lengths, have=have, need=need,
                     ring_slot=None, ring_dec=None)


def _ring_after_chunk(plan: ChunkPlan, ring_slot: Array, ring_dec: Array, num_tokens: Array, n_valid: Array,
                      slot: Array, dec: Array) -> ChunkPlan:
    """``plan`` with the ring after the chunk: the chunk's last ``min(c, R)`` tokens take their entries
    ``(n + k) % R`` with slot ``slot`` and decision ``dec`` (both ``[B, H, C]``)."""
    b, h, c_max = slot.shape
    r = ring_slot.shape[-1]
    k = jnp.arange(c_max)[None, None, :]
    c = n_valid[:, None, None]
    last = (k < c) & (k >= c - r)
    ent = jnp.where(last, (num_tokens[:, None, None] + k) % r, r)  # r -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    return plan.replace(ring_slot=ring_slot.at[bi, hi, ent].set(slot, mode="drop"),
                        ring_dec=ring_dec.at[bi, hi, ent].set(dec, mode="drop"))


def insert_chunk(refcount: Array, tables: Array, lengths: Array, ring_slot: Array, ring_dec: Array,
                 num_tokens: Array, n_valid: Array, dec_chunk: Array, ok: Array, page_size: int,
                 plan: ChunkPlan | None = None, groups: int = 1):
    """Books one chunk into one layer of sequences ``[B]`` (rows of the layer's tables): allocates pages, updates
    tables, lengths and ring, and says where each chunk token's K/V goes (``pages.write_kv`` does the write, so that a
    caller can write many layers at once).

    tables ``[B, H, M]``, lengths ``[B, H]``, ring ``[B, H, R]`` (decision for token n-1 filled in), num_tokens /
    n_valid / ok ``[B]``, dec_chunk ``[B, H, C]`` (``chunk_owner_decisions``). ``plan``: a policy's own plan
    (``plan_chunk_explicit``) instead of the ring's.
    Sequences not ``ok`` are left untouched. When the free pages do not cover the requests, the highest rows that
    ask for pages are dropped (``select_preemptions``) and reported in ``preempted`` ``[B]``: the caller releases
    them (their pages in other layers are not visible here).

    Returns ((refcount, tables, lengths, ring_slot, ring_dec), (page, offset) ``[B, H, C]`` -- the sink for
    tokens not written --, preempted, overflow). ``overflow`` (scalar bool) would mean more pages were handed
    out than were free -- a bookkeeping bug; callers turn it into an error, never into silent corruption.
    """
    b, h, _ = dec_chunk.shape
    if plan is None:
        plan = plan_chunk(lengths, ring_slot, ring_dec, num_tokens, n_valid, dec_chunk, page_size)
    need_seq = by_group(jnp.sum(plan.need & ok[:, None, None], axis=2), groups)  # [B, groups]
    n_free = group_free_pages(refcount, groups)
    pre = select_preemptions(need_seq, jnp.zeros_like(need_seq), ok & (n_valid > 0), n_free)
    ok = ok & ~pre
    need = plan.need & ok[:, None, None]
    overflow = ~fits(need, refcount, groups, head_axis=1)
    ids, refcount = allocate(refcount, need, groups, head_axis=1)
    m = tables.shape[-1]
    col = jnp.where(need, plan.have[..., None] + jnp.arange(need.shape[-1]), m)  # m -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    new_tables = tables.at[bi, hi, col].set(ids, mode="drop")
    wr = plan.write & ok[:, None, None]
    page = jnp.take_along_axis(new_tables, jnp.clip(plan.target // page_size, 0, m - 1), axis=-1)
    page = jnp.where(wr, page, SINK_PAGE)
    off = jnp.where(wr, plan.target % page_size, 0)
    ok2 = ok[:, None]
    out = (refcount, jnp.where(ok2[..., None], new_tables, tables),
           jnp.where(ok2, plan.new_lengths, lengths), jnp.where(ok2[..., None], plan.ring_slot, ring_slot),
           jnp.where(ok2[..., None], plan.ring_dec, ring_dec))
    return out, (page, off), pre, overflow


def chunk_owner_decisions(dec_at: Array, n_valid: Array) -> Array:
    """Owner decisions for a chunk from the decisions *computed at* its positions: token k's decision is the one
    computed at k + 1 if that token is in the chunk, else pending (keep). dec_at ``[B, H, C]`` bool."""
    c_max = dec_at.shape[-1]
    owner = dms.shift_to_owner(dec_at, False)
    return owner & (jnp.arange(c_max)[None, None, :] + 1 < n_valid[:, None, None])


# ---------------------------------------------------------------------------------------------------------
# DMC: merge into the last slot (policy "dmc")
# ---------------------------------------------------------------------------------------------------------


def _window_in_order(state: dict, num_tokens: Array):
    """The accumulation window of one layer as a time-ordered prefix (oldest first): keys / values ``[B, W, H, D]``
    (float32), importance and alpha ``[B, H, W]``. Token ``p`` sits at ring index ``p % W``; alpha is 1 for the
    entries of the last slot's segment after its first one (``seg_len`` newest entries), 0 elsewhere -- so a chunk
    token that merges continues exactly that segment, and entries that never existed weigh nothing."""
    b, h, w, _ = state["win_k"].shape
    idx = (num_tokens[:, None] - w + jnp.arange(w)[None, :]) % w  # [B, W]
    idx3 = jnp.broadcast_to(idx[:, None, :], (b, h, w))
    k = jnp.take_along_axis(state["win_k"], idx3[..., None], axis=2).astype(jnp.float32)
    v = jnp.take_along_axis(state["win_v"], idx3[..., None], axis=2).astype(jnp.float32)
    imp = jnp.take_along_axis(state["win_w"], idx3, axis=2)
    age = w - 1 - jnp.arange(w)  # 0 = the newest entry (token n - 1)
    alpha = (age[None, None, :] < state["seg_len"][..., None] - 1).astype(jnp.float32)
    return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), imp, alpha


def dmc_chunk_states(state: dict, num_tokens: Array, k: Array, v: Array, importance: Array, merge: Array,
                     dtype) -> tuple[Array, Array]:
    """Every intermediate merged state of a chunk's tokens, float32 ``[B, C, H, D]`` (keys before RoPE), as the
    training-side ``dmc.accumulate`` computes them: a chunk token's segment may have begun in an earlier chunk, so
    the window of the last W tokens (``state``, one layer's rows) goes in front of the chunk.

    k, v ``[B, C, H, D]`` (keys before RoPE, element d-1 zeroed), importance ``[B, H, C]``, merge ``[B, H, C]`` bool
    (hard decisions, False at segment starts and padding), num_tokens ``[B]`` before the chunk. The chunk's k / v
    are rounded to the cache dtype ``dtype`` first, as decode reads them back from the window."""
    w = state["win_k"].shape[2]
    pk, pv, pw, palpha = _window_in_order(state, num_tokens)
    alpha = jnp.concatenate([palpha, merge.astype(jnp.float32)], axis=-1)
    imp = jnp.concatenate([pw, importance.astype(jnp.float32)], axis=-1)

    def acc(prefix, x):
        x = jnp.concatenate([prefix, x.astype(dtype).astype(jnp.float32)], axis=1)
        return dmc.accumulate(x, alpha, imp, w)[:, w:]

    return acc(pk, k), acc(pv, v)


def dmc_plan_chunk(lengths: Array, ring_slot: Array, ring_dec: Array, merge: Array, n_valid: Array,
                   page_size: int) -> ChunkPlan:
    """Where a chunk's merged states go in one layer (for ``insert_chunk(plan=...)``).

    merge ``[B, H, C]`` (False for padding). Chunk token j belongs to slot ``length - 1 + (appends among tokens
    0..j)``; only the state that ends its segment (the next token appends, or j is the chunk's last token) is
    written, so each slot is written once. The first token merging overwrites the head's last cached slot. No
    copy-on-write: prefill fills empty (unforked) sequences, whose pages nobody shares. The ring is unchanged."""
    c = merge.shape[-1]
    valid = jnp.arange(c)[None, None, :] < n_valid[:, None, None]
    append = valid & ~merge
    target = lengths[..., None] + jnp.cumsum(append, axis=-1, dtype=jnp.int32) - 1
    seg_end = valid & ~dms.shift_to_owner(merge, False)
    new_lengths = lengths + jnp.sum(append, axis=-1, dtype=jnp.int32)
    have = pages_for(lengths, page_size)
    want = pages_for(new_lengths, page_size)
    j_max = -(-c // page_size) + 1
    need = jnp.arange(j_max)[None, None, :] < (want - have)[..., None]
    return ChunkPlan(target=target, write=seg_end, new_lengths=new_lengths, have=have, need=need,
                     ring_slot=ring_slot, ring_dec=ring_dec)


def dmc_window_after_chunk(state: dict, num_tokens: Array, n_valid: Array, k: Array, v: Array, importance: Array,
                           merge: Array, ok: Array) -> dict:
    """One layer's window state after a chunk: its last W valid tokens into the ring, and the new ``seg_len`` (the
    tokens since the chunk's last append, or the old segment grown by the chunk when every token merged; capped at
    W). Shapes as ``dmc_chunk_states``; rows not ``ok`` [B] are left unchanged."""
    b, h, w, _ = state["win_k"].shape
    c = k.shape[1]
    kk = jnp.arange(c)
    valid = kk[None, :] < n_valid[:, None]  # [B, C]
    ring = jnp.where(valid & (kk[None, :] >= n_valid[:, None] - w), (num_tokens[:, None] + kk) % w, w)  # w: dropped
    ring = jnp.broadcast_to(ring[:, None, :], (b, h, c))
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    win_k = state["win_k"].at[bi, hi, ring].set(jnp.swapaxes(k, 1, 2).astype(state["win_k"].dtype), mode="drop")
    win_v = state["win_v"].at[bi, hi, ring].set(jnp.swapaxes(v, 1, 2).astype(state["win_v"].dtype), mode="drop")
    win_w = state["win_w"].at[bi, hi, ring].set(importance.astype(jnp.float32), mode="drop")
    append = valid[:, None, :] & ~merge
    last = jnp.max(jnp.where(append, kk, -1), axis=-1)  # [B, H]
    seg = jnp.where(last >= 0, n_valid[:, None] - last, state["seg_len"] + n_valid[:, None])
    new = {"win_k": win_k, "win_v": win_v, "win_w": win_w, "seg_len": jnp.minimum(seg, w)}
    return jax.tree.map(lambda a, o: jnp.where(ok.reshape((b,) + (1,) * (a.ndim - 1)), a, o), new, state)


def dmc_decode_slots(refcount: Array, tables: Array, lengths: Array, merge: Array, active: Array, page_size: int,
                     groups: int = 1):
    """One layer's slot bookkeeping for a DMC decode token: a merge overwrites slot ``length - 1``, an append takes
    slot ``length`` (a fresh page at a page boundary); a write into a shared page (after a fork) goes to a fresh copy.

    tables ``[S, H, M]``, lengths / merge ``[S, H]`` (merge already False for inactive rows and first tokens),
    active ``[S]``. Returns (refcount, tables, lengths, write_page, write_offset, (copy_src, copy_dst)): copy page
    src to dst (``pages.copy_pages``) before writing the slot; inactive heads write to the sink and copy the sink.
    Per head this asks for at most the pages an append would: a merge at a page boundary writes into the full last
    page (a copy only if shared), and off a boundary a merge and an append write into the same page.
    """
    m = tables.shape[-1]
    act = active[:, None]
    target = jnp.where(merge, lengths - 1, lengths)
    page_index = target // page_size
    pidx = jnp.minimum(page_index, m - 1)[..., None]
    fresh = act & ~merge & (lengths % page_size == 0)
    cur = jnp.take_along_axis(tables, pidx, axis=-1)[..., 0]
    cow = act & ~fresh & (refcount[cur] > 1)
    need = fresh | cow
    ids, refcount = allocate(refcount, need, groups)
    src = jnp.where(cow, cur, SINK_PAGE)
    refcount = refcount.at[src].add(-cow.astype(jnp.int32)).at[SINK_PAGE].set(1)
    tables = jnp.where((jnp.arange(m) == page_index[..., None]) & need[..., None], ids[..., None], tables)
    page = jnp.where(act, jnp.take_along_axis(tables, pidx, axis=-1)[..., 0], SINK_PAGE)
    off = jnp.where(act, target % page_size, 0)
    lengths = lengths + (act & ~merge).astype(jnp.int32)
    return refcount, tables, lengths, page, off, (src, jnp.where(cow, ids, SINK_PAGE))
