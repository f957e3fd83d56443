"""dms_jax.serve.plans without a model: the paged per-head cache holds exactly the tokens the hard DMS mask keeps,
after chunked prefill (any chunk size) and after every decode step; pages are allocated, shared copy-on-write,
returned; visibility of cached slots; chunk plans; DMC's decode slots. (Allocation, preemption choices and specs:
test_serve_pages.py; policies: test_serve_policies.py.)

K vectors encode (position + 1, layer, head, sequence), so the live token set of every head can be read back from
the pages and compared with the set implied by the decisions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax import dms
from dms_jax.config import DMSConfig
from dms_jax.serve.pages import fork, free_pages, note_high_water, pages_for, release, write_kv
from dms_jax.serve.plans import (apply_decode_plan, cached_reads, cached_visibility, chunk_owner_decisions,
                                 dmc_decode_slots, insert_chunk, plan_chunk, plan_chunk_explicit, plan_decode,
                                 set_previous_decision)
from dms_jax.serve.policies import DMSPolicy
from dms_jax.serve.spec import CacheSpec, check_invariants, init_cache

D = 4


def _spec(window=3, page_size=4, seqs=3, layers=2, heads=2, context=64, num_pages=None):
    return CacheSpec.create(num_layers=layers, num_kv_heads=heads, head_dim=D, max_seqs=seqs,
                            max_context=context, window=window, page_size=page_size, num_pages=num_pages)


def _kv(pos, layer, head, seq):
    """[..., D] K (and V = -K) carrying the token's identity."""
    pos = np.asarray(pos, np.float32)
    k = np.stack(np.broadcast_arrays(pos + 1, np.float32(layer), np.float32(head), np.float32(seq)), axis=-1)
    return jnp.asarray(k), jnp.asarray(-k)


def _live_positions(cache, spec, l, s, h, owners=None):
    n = int(cache.lengths[l, s, h])
    slots = np.arange(n)
    pages = np.asarray(cache.block_tables[l, s, h])[slots // spec.page_size]
    k = np.asarray(cache.k_pages)[pages, slots % spec.page_size]
    owners = {s} if owners is None else owners
    assert (k[:, 1] == l).all() and (k[:, 2] == h).all() and np.isin(k[:, 3], list(owners)).all(), \
        "a slot holds another head's token"
    assert (np.asarray(cache.v_pages)[pages, slots % spec.page_size] == -k).all()
    return sorted((k[:, 0] - 1).astype(int).tolist())


def _expected_live(d_at, n, window):
    """Tokens 0..n-1 written; d_at[t] is the decision computed at t (for token t-1). Live set after token n-1."""
    t = n - 1
    owner = lambda j: bool(d_at[j + 1]) if j + 1 <= t else False  # noqa: E731 (pending = keep)
    return [j for j in range(n) if dms.visible_if_marked(t, j, window) or not owner(j)]


@functools.partial(jax.jit, static_argnames=("page_size", "ring"))
def _prefill_layer(c_l, n, n_valid, d, k, page_size, ring):
    """One layer of a chunk, as the engine does it: c_l = (refcount, tables, lengths, ring_slot, ring_dec, pools)."""
    refcount, tables, lengths, ring_slot, ring_dec, k_pages, v_pages = c_l
    ring_dec = set_previous_decision(ring_dec, n, d[..., 0], n_valid > 0, ring)
    dec_chunk = chunk_owner_decisions(d, n_valid)
    (refcount, tables, lengths, ring_slot, ring_dec), (page, off), pre, overflow = insert_chunk(
        refcount, tables, lengths, ring_slot, ring_dec, n, n_valid, dec_chunk, jnp.ones(n.shape, bool), page_size)
    k_pages, v_pages = write_kv(k_pages, v_pages, page, off, k, -k)
    return (refcount, tables, lengths, ring_slot, ring_dec, k_pages, v_pages), pre | overflow


@functools.partial(jax.jit, static_argnames=("spec",))
def _decode(cache, active, k, dec, spec):
    """One decode step for all layers: plan, allocate / copy-on-write, write K/V, record the previous decisions."""
    plan = plan_decode(cache, spec, active, DMSPolicy(DMSConfig(window=spec.window)))
    fits = jnp.sum(plan.need) <= free_pages(cache.refcount)
    n = cache.num_tokens
    cache, page, off = apply_decode_plan(cache, spec, plan, active)
    k_pages, v_pages = write_kv(cache.k_pages, cache.v_pages, page, off, k, -k)
    ring = jax.vmap(lambda r, d: set_previous_decision(r, n, d, active, spec.ring))(cache.ring_dec, dec)
    return cache.replace(k_pages=k_pages, v_pages=v_pages, ring_dec=ring), fits


class Driver:
    """Runs the cache API the way the engine does, with random decisions d_at [L, S, H, T]."""

    def __init__(self, spec, d_at):
        self.spec, self.d_at = spec, d_at
        self.cache = init_cache(spec)
        self.owners = {s: {s} for s in range(spec.max_seqs)}

    def prefill(self, slots, lengths, chunk):
        spec, c = self.spec, self.cache
        slots_a = jnp.asarray(slots, jnp.int32)
        lengths = np.asarray(lengths)
        b, L, H = len(slots), spec.num_layers, spec.num_kv_heads
        for start in range(0, int(lengths.max()), chunk):
            n = c.num_tokens[slots_a]
            n_valid = jnp.asarray(np.clip(lengths - start, 0, chunk), jnp.int32)
            pos = np.asarray(n)[:, None] + np.arange(chunk)[None]  # [B, C]
            qvalid = np.arange(chunk)[None] < np.asarray(n_valid)[:, None]
            for l in range(L):
                d = self.d_at[l, np.asarray(slots)[:, None], :, np.minimum(pos, self.d_at.shape[-1] - 1)]  # [B,C,H]
                d = jnp.asarray(np.swapaxes(d, 1, 2) & qvalid[:, None, :])
                k = np.zeros((b, H, chunk, D), np.float32)
                k[..., 0] = pos[:, None, :] + 1
                k[..., 1] = l
                k[..., 2] = np.arange(H)[None, :, None]
                k[..., 3] = np.asarray(slots)[:, None, None]
                c_l = (c.refcount, c.block_tables[l, slots_a], c.lengths[l, slots_a], c.ring_slot[l, slots_a],
                       c.ring_dec[l, slots_a], c.k_pages, c.v_pages)
                (refcount, tables, lengths_l, ring_slot, ring_dec, k_pages, v_pages), pre = _prefill_layer(
                    c_l, n, n_valid, d, jnp.asarray(k), page_size=spec.page_size, ring=spec.ring)
                assert not np.asarray(pre).any()
                c = c.replace(k_pages=k_pages, v_pages=v_pages, refcount=refcount,
                              block_tables=c.block_tables.at[l, slots_a].set(tables),
                              lengths=c.lengths.at[l, slots_a].set(lengths_l),
                              ring_slot=c.ring_slot.at[l, slots_a].set(ring_slot),
                              ring_dec=c.ring_dec.at[l, slots_a].set(ring_dec))
            c = note_high_water(c.replace(num_tokens=c.num_tokens.at[slots_a].add(n_valid)))
        self.cache = c

    def fork(self, src, dst):
        self.cache = fork(self.cache, jnp.asarray(src), jnp.asarray(dst), self.spec.page_size)
        for a, b in zip(src, dst):
            self.owners[b] = self.owners[b] | self.owners[a]

    def step(self, active):
        spec, c = self.spec, self.cache
        L, S, H = spec.num_layers, spec.max_seqs, spec.num_kv_heads
        n = np.asarray(c.num_tokens)
        k = np.zeros((L, S, H, D), np.float32)
        k[..., 0] = n[None, :, None] + 1
        k[..., 1] = np.arange(L)[:, None, None]
        k[..., 2] = np.arange(H)[None, None, :]
        k[..., 3] = np.arange(S)[None, :, None]
        dec = np.take_along_axis(self.d_at, np.minimum(n, self.d_at.shape[-1] - 1)[None, :, None, None], -1)[..., 0]
        self.cache, fits = _decode(c, jnp.asarray(active, bool), jnp.asarray(k), jnp.asarray(dec), spec=spec)
        assert bool(fits)

    def check(self, active_seqs):
        spec, c = self.spec, self.cache
        check_invariants(c, spec)
        for s in active_seqs:
            n = int(c.num_tokens[s])
            for l in range(spec.num_layers):
                for h in range(spec.num_kv_heads):
                    want = _expected_live(self.d_at[l, s, h], n, spec.window)
                    assert _live_positions(c, spec, l, s, h, self.owners[s]) == want, (l, s, h, n)


@pytest.mark.parametrize("chunk, window, page_size", [(1, 3, 4), (5, 3, 4), (64, 3, 4), (4, 1, 2), (7, 8, 4)])
def test_cache_holds_exactly_the_hard_mask_tokens(chunk, window, page_size):
    rng = np.random.default_rng(chunk * 10 + window)
    spec = _spec(window=window, page_size=page_size)
    d_at = rng.random((spec.num_layers, spec.max_seqs, spec.num_kv_heads, 64)) < 0.6
    drv = Driver(spec, d_at)
    lengths = [11, 20, 1]  # different lengths; one a single token
    drv.prefill([0, 1, 2], lengths, chunk)
    drv.check([0, 1, 2])
    active_per_step = [[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]
    for act in active_per_step:
        drv.step(act)
        drv.check([0, 1, 2])
    # Lengths equal the live counts: memory is freed, not masked.
    for s, n in enumerate(np.asarray(drv.cache.num_tokens)):
        for l in range(spec.num_layers):
            for h in range(spec.num_kv_heads):
                assert int(drv.cache.lengths[l, s, h]) == len(_expected_live(d_at[l, s, h], int(n), window))


def test_no_eviction_appends_every_token():
    spec = _spec(window=2)
    d_at = np.zeros((2, 3, 2, 64), bool)
    drv = Driver(spec, d_at)
    drv.prefill([0, 1, 2], [9, 3, 5], 4)
    for _ in range(3):
        drv.step([1, 1, 1])
    drv.check([0, 1, 2])
    lengths = np.asarray(drv.cache.lengths)
    assert (lengths[:, 0] == 12).all() and (lengths[:, 1] == 6).all() and (lengths[:, 2] == 8).all()


def test_everything_evicted_keeps_the_window_only():
    spec = _spec(window=3, page_size=2)
    d_at = np.ones((2, 3, 2, 64), bool)
    drv = Driver(spec, d_at)
    drv.prefill([0, 1, 2], [30, 2, 4], 8)
    for _ in range(5):
        drv.step([1, 1, 1])
    drv.check([0, 1, 2])
    assert (np.asarray(drv.cache.lengths)[:, 0] == dms.ring_size(spec.window)).all()
    # A head of 4 live tokens holds 2 pages of 2: everything else went back to the pool.
    assert check_invariants(drv.cache, spec)["used_pages"] == 2 * 2 * 3 * 2


def test_fork_is_copy_on_write_and_release_returns_pages():
    spec = _spec(window=2, page_size=4, seqs=3)
    rng = np.random.default_rng(0)
    d_at = rng.random((2, 3, 2, 64)) < 0.5
    # Chains must see the same decisions for the shared prompt; they differ afterwards.
    d_at[:, 1:, :, :11] = d_at[:, :1, :, :11]
    drv = Driver(spec, d_at)
    drv.prefill([0], [10], 4)
    before = check_invariants(drv.cache, spec)["used_pages"]
    snapshot = [_live_positions(drv.cache, spec, l, 0, h) for l in range(2) for h in range(2)]
    drv.fork([0, 0], [1, 2])
    info = check_invariants(drv.cache, spec)
    assert info["used_pages"] == before, "forking copies nothing"
    assert int(jnp.max(drv.cache.refcount[1:])) == 3
    drv.check([0, 1, 2])
    for _ in range(4):
        drv.step([1, 1, 1])
        drv.check([0, 1, 2])  # every chain sees its own tokens only
    assert check_invariants(drv.cache, spec)["used_pages"] < 3 * before + 3 * 2 * 2 * 2
    # The shared prompt pages are untouched by the chains' writes: chain 0's prompt tokens are still there.
    for i, (l, h) in enumerate([(l, h) for l in range(2) for h in range(2)]):
        live = _live_positions(drv.cache, spec, l, 0, h, drv.owners[0])
        assert set(live) >= {p for p in snapshot[i] if d_at[l, 0, h, p + 1] == 0 or p >= 14 - 2 - 1}
    used = check_invariants(drv.cache, spec)["used_pages"]
    drv.cache = release(drv.cache, jnp.asarray([False, True, False]), spec.page_size)
    mid = check_invariants(drv.cache, spec)["used_pages"]
    assert mid < used
    drv.check([0, 2])
    drv.cache = release(drv.cache, jnp.asarray([True, False, True]), spec.page_size)
    info = check_invariants(drv.cache, spec)
    assert info["used_pages"] == 0 and info["free_pages"] == spec.num_pages
    assert info["high_water"] >= used


def test_cached_visibility_and_reads_match_brute_force():
    spec = _spec(window=3, page_size=4, seqs=2)
    rng = np.random.default_rng(3)
    d_at = rng.random((2, 2, 2, 64)) < 0.5
    drv = Driver(spec, d_at)
    drv.prefill([0, 1], [13, 6], 5)
    c = drv.cache
    l, chunk = 1, 6
    n = c.num_tokens
    q_pos = np.asarray(n)[:, None] + np.arange(chunk)[None]
    first = jnp.asarray(np.stack([d_at[l, s][:, int(n[s])] for s in range(2)]))
    ring_dec = set_previous_decision(c.ring_dec[l], n, first, jnp.ones((2,), bool), spec.ring)
    width = spec.max_tokens_per_head
    vis = np.asarray(cached_visibility(c.lengths[l], c.ring_slot[l], ring_dec, n, jnp.asarray(q_pos), width,
                                       spec.window))
    qvalid = jnp.ones((2, chunk), bool)
    reads = np.asarray(cached_reads(c.lengths[l], c.ring_slot[l], ring_dec, n, jnp.asarray(q_pos), qvalid,
                                    spec.window))
    for s in range(2):
        for h in range(2):
            ln = int(c.lengths[l, s, h])
            slots = np.arange(ln)
            pages = np.asarray(c.block_tables[l, s, h])[slots // 4]
            pos = (np.asarray(c.k_pages)[pages, slots % 4, 0] - 1).astype(int)
            for qi, q in enumerate(q_pos[s]):
                owner = d_at[l, s, h][pos + 1]  # all decisions of cached tokens are known at the chunk
                want = dms.visible_if_marked(q, pos, spec.window) | ~owner
                assert vis[s, h, qi, :ln].tolist() == want.tolist()
                assert not vis[s, h, qi, ln:].any()
        assert reads[s] == vis[s].sum()


def test_plan_chunk_writes_only_survivors():
    # One head, window 1, empty cache; decisions for tokens 0..5 (owner): 1 0 1 1 0 0 (last pending).
    dec = jnp.asarray([[[1, 0, 1, 1, 0, 0]]], bool)
    plan = plan_chunk(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1, 2), bool),
                      jnp.zeros((1,), jnp.int32), jnp.asarray([6]), dec, page_size=4)
    # Tokens 0, 2, 3 are marked and pushed out by tokens 2, 4, 5 (window 1): only 1, 4, 5 are written.
    assert np.asarray(plan.write[0, 0]).tolist() == [False, True, False, False, True, True]
    assert np.asarray(plan.target[0, 0])[[1, 4, 5]].tolist() == [0, 1, 2]
    assert int(plan.new_lengths[0, 0]) == 3 and int(plan.need[0, 0].sum()) == 1


def test_plan_chunk_explicit_fills_holes_then_appends():
    """A score policy's plan: freed slots are refilled first, in slot order, then the rest is appended; the ring
    takes the chunk's last tokens (slot of the survivors, decision 0)."""
    lengths = jnp.asarray([[5]], jnp.int32)
    hole = jnp.asarray([[[False, True, False, True, False, False, False, False]]])  # free slots 1 and 3
    surv = jnp.asarray([[[True, False, True, True]]])  # chunk tokens 0, 2, 3 stay
    ring_slot = jnp.full((1, 1, 3), 7, jnp.int32)
    ring_dec = jnp.ones((1, 1, 3), bool)
    plan = plan_chunk_explicit(lengths, hole, surv, ring_slot, ring_dec, jnp.asarray([5]), jnp.asarray([4]),
                               page_size=4)
    assert np.asarray(plan.target[0, 0])[[0, 2, 3]].tolist() == [1, 3, 5]
    assert np.asarray(plan.write[0, 0]).tolist() == [True, False, True, True]
    assert int(plan.new_lengths[0, 0]) == 6 and int(plan.have[0, 0]) == 2 and int(plan.need[0, 0].sum()) == 0
    # Chunk tokens 1, 2, 3 (positions 6, 7, 8) are the last R = 3: entries 0, 1, 2; token 1 was dropped (slot 0).
    assert np.asarray(plan.ring_slot[0, 0]).tolist() == [0, 3, 5]
    assert not np.asarray(plan.ring_dec).any()


def test_decode_slots_copy_on_write_and_worst_case():
    """plans.dmc_decode_slots on one layer: row 1 is a fork of row 0 (shared pages, refcount 2). A merge overwrites
    the last slot, an append takes the next one; a write into a shared page goes to a fresh copy (refcount moves);
    and no head ever takes more pages than the worst case the engine reserves before the step (an append)."""
    ps, m = 4, 3
    lengths = jnp.asarray([[1, 4, 5, 8], [1, 4, 5, 8], [0, 4, 6, 3]], jnp.int32)
    held = np.asarray(pages_for(lengths, ps))
    tables = np.zeros((3, 4, m), np.int32)
    nxt = 1
    for s in (0, 2):
        for h in range(4):
            tables[s, h, :held[s, h]] = np.arange(nxt, nxt + held[s, h])
            nxt += held[s, h]
    tables[1] = tables[0]
    refcount = np.zeros(40, np.int32)
    refcount[0] = 1
    np.add.at(refcount, tables[np.arange(m)[None, None] < held[..., None]], 1)
    shared_last = refcount[np.take_along_axis(tables, (lengths[..., None] - 1) // ps, -1)[..., 0]] > 1
    worst = (np.asarray(lengths) % ps == 0) | (refcount[np.take_along_axis(
        tables, np.minimum(np.asarray(lengths) // ps, m - 1)[..., None], -1)[..., 0]] > 1)
    rng = np.random.default_rng(0)
    active = jnp.asarray([True, True, True])
    for _ in range(8):
        merge = rng.random((3, 4)) < 0.5
        merge[np.asarray(lengths) == 0] = False
        rc2, tab2, len2, page, off, (src, dst) = dmc_decode_slots(
            jnp.asarray(refcount), jnp.asarray(tables), lengths, jnp.asarray(merge), active, ps)
        rc2, tab2, page, src, dst = map(np.asarray, (rc2, tab2, page, src, dst))
        np.testing.assert_array_equal(np.asarray(len2), np.asarray(lengths) + ~merge)
        target = np.where(merge, np.asarray(lengths) - 1, np.asarray(lengths))
        np.testing.assert_array_equal(np.asarray(off), target % ps)
        np.testing.assert_array_equal(page, np.take_along_axis(tab2, (target // ps)[..., None], -1)[..., 0])
        taken = (tab2 != tables).sum(-1)  # pages handed out, per head
        assert (taken <= worst).all()
        # A merge into a shared last slot copies its page; so does an append into a partly filled shared page.
        cow = shared_last & (merge | (np.asarray(lengths) % ps != 0))
        assert (src[cow] == np.take_along_axis(tables, ((np.asarray(lengths) - 1) // ps)[..., None], -1)[..., 0][cow]
                ).all()
        assert (dst[cow] == page[cow]).all() and (src[~cow] == 0).all()
        assert len(set(page[cow].tolist())) == cow.sum()  # every chain gets its own copy
        # Refcounts: new pages counted once, each copied page loses the copier's reference.
        want = refcount.copy()
        np.add.at(want, tab2[tab2 != tables], 1)
        np.add.at(want, src[cow], -1)
        np.testing.assert_array_equal(rc2, want)
    assert (merge & shared_last).any() and (~merge & (np.asarray(lengths) % ps == 0)).any()
