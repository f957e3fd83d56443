"""Page accounting of the paged cache (spec.py): on-device allocation, releases, copy-on-write forks, slot
resizes, preemption choices, page copies and writes, the compaction of a page selection, and the bucketing of
table widths.

Pages are handed out inside jit: the first free pages of the pool (refcount 0) in flattened head order. Chains
forked from one prompt share its pages (refcount > 1); a page is copied the first time a sharer writes into it
(``plans.plan_decode``, ``plans.dmc_decode_slots``) and returns to the pool when its last owner lets go. When the
free pages do not cover a step's requests, ``select_preemptions`` picks the sequences to let go (most recently
admitted first). All functions are pure and jit-compatible.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dms_jax.serve.spec import SINK_PAGE, PagedCache, ring_positions, state_rows
from pallas_kernels.kv_codec import encode_rows

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Allocation, release, fork, preemption
# ---------------------------------------------------------------------------------------------------------


def pages_for(lengths: Array, page_size: int) -> Array:
    """Pages a head of ``lengths`` live slots holds (ceil)."""
    return (lengths + page_size - 1) // page_size


def free_pages(refcount: Array) -> Array:
    return jnp.sum(refcount == 0, dtype=jnp.int32)


def used_pages(refcount: Array, groups: int = 1) -> Array:
    """Pages in use, excluding the sinks (one per KV-head group)."""
    return jnp.sum(refcount > 0, dtype=jnp.int32) - groups


# KV-head groups (``CacheSpec.kv_groups``): the pool is split into ``groups`` equal shares, group g owning pages
# [g * P / groups, (g + 1) * P / groups) with its own sink first (``CacheSpec.sink_pages``), and heads h of group
# h // (Hkv / groups) take their pages only from their group's share. A tensor-parallel engine places each share
# on the device that holds those heads. Every rule below reduces to the single pool's when groups == 1.


def by_group(x: Array, groups: int, head_axis: int = -1) -> Array:
    """Sums ``x`` (e.g. pages asked for) over the heads of each group: the head axis becomes a last axis
    [groups]; everything else is kept."""
    x = jnp.moveaxis(x.astype(jnp.int32), head_axis, -1)
    return jnp.sum(x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups)), axis=-1, dtype=jnp.int32)


def group_free_pages(refcount: Array, groups: int) -> Array:
    """[groups] free pages in each group's share of the pool."""
    return jnp.sum((refcount == 0).reshape(groups, -1), axis=-1, dtype=jnp.int32)


def balanced_free_pages(refcount: Array, groups: int) -> Array:
    """Free pages for a request that asks the same of every group (a chunk or a decode reserve, counted as every
    head appending): groups x the fewest free in any group."""
    return groups * jnp.min(group_free_pages(refcount, groups))


def fits(need: Array, refcount: Array, groups: int, head_axis: int = -1) -> Array:
    """[] bool: pages asked for per head (``need``, any shape with a head axis) fit every group's free pages."""
    total = by_group(need, groups, head_axis).reshape(-1, groups).sum(0)
    return jnp.all(total <= group_free_pages(refcount, groups))


def allocate(refcount: Array, need: Array, groups: int = 1, head_axis: int = -1) -> tuple[Array, Array]:
    """Hands out one free page to every True entry of ``need`` (any shape; ``head_axis`` its KV-head axis), in
    flattened order, from the share of the pool of each entry's head group.

    Returns (page ids with ``need``'s shape, SINK_PAGE where not needed; new refcount). The caller has checked that
    enough pages are free in every group (``fits``); entries past a group's free pages would get the sink.
    """
    flat = need.reshape(-1)
    n, h, p = flat.shape[0], need.shape[head_axis], refcount.shape[0]
    head_group = jnp.arange(h) // (h // groups)
    entry_group = jnp.broadcast_to(jnp.moveaxis(head_group.reshape((h,) + (1,) * (need.ndim - 1)), 0, head_axis),
                                   need.shape).reshape(-1)
    page_group = jnp.arange(p) // (p // groups)
    ids = jnp.full((n,), SINK_PAGE, jnp.int32)
    for g in range(groups):  # static and small (the tensor-parallel degree)
        mine = flat & (entry_group == g)
        free_ids = jnp.nonzero((refcount == 0) & (page_group == g), size=n, fill_value=SINK_PAGE)[0]
        rank = jnp.cumsum(mine.astype(jnp.int32)) - 1
        ids = jnp.where(mine, free_ids[jnp.clip(rank, 0, n - 1)].astype(jnp.int32), ids)
    refcount = refcount.at[ids].add(flat.astype(jnp.int32))
    refcount = refcount.at[SINK_PAGE].set(1)
    return ids.reshape(need.shape), refcount


def table_refs(cache: PagedCache, page_size: int) -> Array:
    """[L, S, Hkv, M] bool: the table entries that reference a page (below each head's page count)."""
    m = cache.block_tables.shape[-1]
    return jnp.arange(m) < pages_for(cache.lengths, page_size)[..., None]


def release(cache: PagedCache, seqs: Array, page_size: int) -> PagedCache:
    """Lets sequences ``seqs`` ``[S]`` bool go: drops their page references (pages whose count reaches 0 are free
    again) and resets their tables, lengths, ring and token count."""
    refs = table_refs(cache, page_size) & seqs[None, :, None, None]
    refcount = cache.refcount.at[cache.block_tables.reshape(-1)].add(-refs.reshape(-1).astype(jnp.int32))
    refcount = refcount.at[SINK_PAGE].set(1)
    keep3 = ~seqs[None, :, None]
    return cache.replace(
        refcount=refcount,
        block_tables=jnp.where(keep3[..., None], cache.block_tables, SINK_PAGE),
        lengths=jnp.where(keep3, cache.lengths, 0),
        ring_slot=jnp.where(keep3[..., None], cache.ring_slot, 0),
        ring_dec=cache.ring_dec & keep3[..., None],
        num_tokens=jnp.where(seqs, 0, cache.num_tokens),
        policy_state=state_rows(cache.policy_state, lambda x: jnp.where(
            seqs.reshape((1, -1) + (1,) * (x.ndim - 2)), jnp.zeros_like(x), x)),
    )


def drop_rows(refcount: Array, tables: Array, lengths: Array, ring_slot: Array, ring_dec: Array, rows: Array,
              page_size: int):
    """``release`` for the rows ``rows`` ``[B]`` of one layer's arrays (tables ``[B, H, M]``, lengths ``[B, H]``,
    ring ``[B, H, R]``): their pages in this layer go back to the pool at once. Returns the updated arrays."""
    refs = (jnp.arange(tables.shape[-1]) < pages_for(lengths, page_size)[..., None]) & rows[:, None, None]
    refcount = refcount.at[tables.reshape(-1)].add(-refs.reshape(-1).astype(jnp.int32)).at[SINK_PAGE].set(1)
    keep = ~rows[:, None]
    return (refcount, jnp.where(keep[..., None], tables, SINK_PAGE), jnp.where(keep, lengths, 0),
            jnp.where(keep[..., None], ring_slot, 0), ring_dec & keep[..., None])


def fork(cache: PagedCache, src: Array, dst: Array, page_size: int) -> PagedCache:
    """Copy-on-write fork: sequence ``dst[i]`` becomes a copy of ``src[i]`` sharing all its pages (``[K]`` int32).

    Nothing is copied now; a page is copied the first time a sharer writes into it (see ``plan_decode``). The
    destinations must be empty (freshly released) slots.
    """
    tables = cache.block_tables.at[:, dst].set(cache.block_tables[:, src])
    lengths = cache.lengths.at[:, dst].set(cache.lengths[:, src])
    refs = jnp.arange(tables.shape[-1]) < pages_for(cache.lengths[:, src], page_size)[..., None]
    refcount = cache.refcount.at[cache.block_tables[:, src].reshape(-1)].add(refs.reshape(-1).astype(jnp.int32))
    return cache.replace(
        refcount=refcount.at[SINK_PAGE].set(1),
        block_tables=tables,
        lengths=lengths,
        ring_slot=cache.ring_slot.at[:, dst].set(cache.ring_slot[:, src]),
        ring_dec=cache.ring_dec.at[:, dst].set(cache.ring_dec[:, src]),
        num_tokens=cache.num_tokens.at[dst].set(cache.num_tokens[src]),
        policy_state=state_rows(cache.policy_state, lambda x: x.at[:, dst].set(x[:, src])),
    )


def prefill_writable(cache: PagedCache, slot: Array, page_size: int, anywhere: bool) -> Array:
    """``[L, Hkv, M]`` bool: the held pages of sequence ``slot`` that a prefill chunk may write into.

    A chunk appends to the last page (a DMC merge rewrites the head's last slot, also there) and reuses the slots
    of ring tokens whose marked decisions take them out of the window; every other slot it writes is on a fresh
    page. ``anywhere``: every held page, for policies whose prefill frees any cached slot (TOVA's chunk mode,
    H2O)."""
    tables, lengths = cache.block_tables[:, slot], cache.lengths[:, slot]
    m = tables.shape[-1]
    held = pages_for(lengths, page_size)
    cols = jnp.arange(m)
    if anywhere:
        return cols < held[..., None]
    ring = cache.ring_slot[:, slot]  # [L, H, R]
    valid = (ring_positions(cache.num_tokens[slot][None], ring.shape[-1])[0] >= 0) & (ring < lengths[..., None])
    ring_page = jnp.where(valid, ring // page_size, -1)
    in_ring = jnp.any(cols[None, None, None, :] == ring_page[..., None], axis=-2)
    return (in_ring | (cols == (held - 1)[..., None])) & (cols < held[..., None])


def unshare(cache: PagedCache, slot: Array, writable: Array) -> PagedCache:
    """Copy-on-write ahead of a prefill into a forked sequence ``slot``: each ``writable`` ``[L, Hkv, M]`` page
    that is shared gets a private copy (the caller checked that enough pages are free)."""
    tables = cache.block_tables[:, slot]
    shared = writable & (cache.refcount[tables] > 1)
    ids, refcount = allocate(cache.refcount, shared, cache.kv_groups, head_axis=-2)
    src = jnp.where(shared, tables, SINK_PAGE).reshape(-1)
    k_pages, v_pages = copy_pages(cache.k_pages, cache.v_pages, src, ids.reshape(-1))
    refcount = refcount.at[src].add(-shared.reshape(-1).astype(jnp.int32)).at[SINK_PAGE].set(1)
    return cache.replace(k_pages=k_pages, v_pages=v_pages, refcount=refcount,
                         block_tables=cache.block_tables.at[:, slot].set(jnp.where(shared, ids, tables)))


# The per-sequence fields of a PagedCache: (slot axis, value of an empty slot). policy_state's leaves have their
# slot on axis 1 and are empty at 0; the pools and the refcounts are shared by every sequence.
_SLOT_FIELDS = dict(block_tables=(1, SINK_PAGE), lengths=(1, 0), ring_slot=(1, 0), ring_dec=(1, False),
                    num_tokens=(0, 0))


def _map_slot_fields(cache: PagedCache, fn) -> PagedCache:
    """``cache`` with ``fn(x, axis, fill)`` applied to every per-sequence field and policy_state leaf."""
    fields = {name: fn(getattr(cache, name), axis, fill) for name, (axis, fill) in _SLOT_FIELDS.items()}
    return cache.replace(policy_state=state_rows(cache.policy_state, lambda x: fn(x, 1, 0)), **fields)


def resize_slots(cache: PagedCache, max_seqs: int) -> PagedCache:
    """The same pool with ``max_seqs`` sequence slots: existing slots keep their index, new ones are empty.
    Dropped slots must be empty (released). Use with ``dataclasses.replace(spec, max_seqs=...)``."""
    s = cache.num_tokens.shape[0]
    if max_seqs < s and bool(jnp.any(cache.lengths[:, max_seqs:] > 0)):
        raise ValueError(f"slots {max_seqs}..{s - 1} still hold tokens; release them first")

    def fit(x, axis, fill):
        if max_seqs <= s:
            return jax.lax.slice_in_dim(x, 0, max_seqs, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, max_seqs - s)
        return jnp.pad(x, pad, constant_values=fill)

    return _map_slot_fields(cache, fit)


def take_slots(cache: PagedCache, slots: Array) -> PagedCache:
    """A cache whose sequence ``i`` is ``cache``'s sequence ``slots[i]``, over the same pool: a decode step of a
    few running sequences then costs what they need, not what every slot would. Write it back with
    ``put_slots``; a slot may repeat only if the step leaves it unchanged (an idle padding slot)."""
    return _map_slot_fields(cache, lambda x, axis, fill: jnp.take(x, slots, axis=axis))


def put_slots(cache: PagedCache, sub: PagedCache, slots: Array) -> PagedCache:
    """``cache`` with the pool, refcounts and high-water mark of ``sub`` and its sequences written back to
    ``slots`` (the inverse of ``take_slots``)."""
    def put(x, y, axis):
        return x.at[(slice(None),) * axis + (slots,)].set(y)

    fields = {name: put(getattr(cache, name), getattr(sub, name), axis) for name, (axis, _) in _SLOT_FIELDS.items()}
    state = None if cache.policy_state is None else jax.tree.map(lambda x, y: put(x, y, 1), cache.policy_state,
                                                                  sub.policy_state)
    return sub.replace(policy_state=state, **fields)


def exclusive_pages(cache: PagedCache, page_size: int, by_groups: bool = False) -> Array:
    """[S] pages only this sequence references (refcount 1): what letting it go frees for sure; [S, groups] per
    KV-head group with ``by_groups``."""
    refs = table_refs(cache, page_size)
    rc = cache.refcount[cache.block_tables]
    per_head = jnp.sum(refs & (rc == 1), axis=(0, 3), dtype=jnp.int32)  # [S, Hkv]
    return by_group(per_head, cache.kv_groups) if by_groups else jnp.sum(per_head, axis=-1, dtype=jnp.int32)


def select_preemptions(need: Array, freeable: Array, candidate: Array, n_free: Array,
                       rank: Array | None = None) -> Array:
    """Which sequences to preempt so that the remaining page requests fit: ``[S]`` bool.

    need: pages each sequence asks for now; freeable: pages preempting it returns at once; candidate: may be
    preempted. Candidates go highest ``rank`` first (default: the slot index; the scheduler passes arrival order,
    so the newest request goes first), and only as many as needed: the shortest such prefix with
    ``n_free + freed >= total need - need of the preempted``. Empty when it fits. When every sequence that needs a
    page is a candidate a solution always exists. With KV-head groups, need and freeable are ``[S, groups]`` and
    n_free ``[groups]``: the prefix must make every group fit.
    """
    s = need.shape[0]
    need, freeable, n_free = need.reshape(s, -1), freeable.reshape(s, -1), jnp.reshape(n_free, (-1,))
    order = jnp.arange(s - 1, -1, -1) if rank is None else jnp.argsort(-rank, stable=True)
    gain_all = freeable[order] + need[order]
    total = jnp.sum(need, axis=0)
    # Preempting a sequence helps only if it asks or frees pages in a group that is short.
    c = candidate[order] & jnp.any((gain_all > 0) & (n_free < total), axis=-1)
    gain = jnp.where(c[:, None], gain_all, 0)
    ok = jnp.all(n_free + jnp.cumsum(gain, axis=0) >= total, axis=-1)
    first = jnp.where(jnp.any(ok), jnp.argmax(ok), s - 1)  # no prefix suffices: every candidate goes
    pre = c & (jnp.arange(s) <= first) & jnp.any(n_free < total)
    return jnp.zeros((s,), bool).at[order].set(pre)


def note_high_water(cache: PagedCache) -> PagedCache:
    return cache.replace(high_water=jnp.maximum(cache.high_water, used_pages(cache.refcount, cache.kv_groups)))


# ---------------------------------------------------------------------------------------------------------
# Page contents: token writes and page copies
# ---------------------------------------------------------------------------------------------------------


def write_kv(k_pages: Array, v_pages: Array, page: Array, offset: Array, k: Array, v: Array):
    """Scatters one token per head: page/offset ``[...]``, k/v ``[..., D]`` values (stored in the pool's format:
    ``kv_codec.encode_rows``)."""
    return write_rows(k_pages, v_pages, page, offset, encode_rows(k, k_pages.dtype), encode_rows(v, v_pages.dtype))


def write_rows(k_pages: Array, v_pages: Array, page: Array, offset: Array, k_rows: Array, v_rows: Array):
    """``write_kv`` for rows already in the pool's format ``[..., row_width]`` (a move within the pool)."""
    rw = k_pages.shape[-1]
    page, offset = page.reshape(-1), offset.reshape(-1)
    k_pages = k_pages.at[page, offset].set(k_rows.reshape(-1, rw))
    v_pages = v_pages.at[page, offset].set(v_rows.reshape(-1, rw))
    return k_pages, v_pages


def copy_pages(k_pages: Array, v_pages: Array, src: Array, dst: Array):
    """Copies pages ``src`` to ``dst`` (any equal shapes; sink-to-sink entries are no-ops). Every source is read
    before any destination is written, so a page freed and handed out again within one step is still copied from."""
    src, dst = src.reshape(-1), dst.reshape(-1)
    return k_pages.at[dst].set(k_pages[src]), v_pages.at[dst].set(v_pages[src])


# ---------------------------------------------------------------------------------------------------------
# Page selections (Quest): a compacted table of the selected pages
# ---------------------------------------------------------------------------------------------------------


def compact_selected_pages(tables: Array, lengths: Array, page_mask: Array, page_size: int) -> tuple[Array, Array]:
    """A block table ``[B, H, M]`` holding only the live pages that ``page_mask`` ``[B, H, M]`` selects, in
    logical order, and its length in slots: an attention over ``0 .. length-1`` of the compacted table reads
    exactly the selected tokens (only the last live page can be partly filled, and it stays last). Unused entries
    point at the sink."""
    b, h, m = tables.shape
    j = jnp.arange(m)
    n_pages = pages_for(lengths, page_size)[..., None]
    sel = page_mask.astype(bool) & (j < n_pages)
    rank = jnp.cumsum(sel.astype(jnp.int32), axis=-1) - 1  # a scatter, not a sort: this runs every layer and step
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    compact = jnp.full_like(tables, SINK_PAGE).at[bi, hi, jnp.where(sel, rank, m)].set(tables, mode="drop")
    tokens = jnp.clip(lengths[..., None] - j * page_size, 0, page_size)
    return compact, jnp.sum(jnp.where(sel, tokens, 0), axis=-1, dtype=jnp.int32)


def compacted_slot(slot: Array, lengths: Array, page_mask: Array, page_size: int) -> Array:
    """Where slot ``slot`` ``[...]`` lands in ``compact_selected_pages``' table: -1 if its page is not selected."""
    m = page_mask.shape[-1]
    sel = page_mask.astype(bool) & (jnp.arange(m) < pages_for(lengths, page_size)[..., None])
    page = slot // page_size
    before = jnp.sum(sel & (jnp.arange(m) < page[..., None]), axis=-1, dtype=jnp.int32)
    hit = jnp.take_along_axis(sel, jnp.clip(page, 0, m - 1)[..., None], axis=-1)[..., 0] & (slot >= 0)
    return jnp.where(hit, before * page_size + slot % page_size, -1)


# ---------------------------------------------------------------------------------------------------------
# Keeping the pools out of control flow, and few compiled widths
# ---------------------------------------------------------------------------------------------------------


def without_pools(cache: PagedCache) -> PagedCache:
    """The cache's bookkeeping without its page pools (None in their place)."""
    return cache.replace(k_pages=None, v_pages=None)


def cond_without_pools(pred, fn, cache: PagedCache) -> PagedCache:
    """``lax.cond(pred, fn, identity, cache)`` for an ``fn`` that only touches the bookkeeping (release, ...): the
    pools stay out of the cond, because on CPU a cond that carries them makes XLA copy both (hundreds of MB) at
    every decode step."""
    out = jax.lax.cond(pred, fn, lambda c: c, without_pools(cache))
    return out.replace(k_pages=cache.k_pages, v_pages=cache.v_pages)


def bucket(n: int, cap: int) -> int:
    """Rounds a page count up to the next of {2^k, 1.25 * 2^k, 1.5 * 2^k, 1.75 * 2^k} (at most 25% waste, few
    distinct values, hence few compilations), capped at ``cap``."""
    n = max(int(n), 1)
    if n <= 4:
        return min(n, cap)
    p = 1 << (n.bit_length() - 1)
    for f in (1.0, 1.25, 1.5, 1.75, 2.0):
        v = int(math.ceil(p * f))
        if v >= n:
            return min(v, cap)
    return min(2 * p, cap)
