"""dms_jax.serve.pages and spec without a model: allocation hands out distinct free pages (never the sink),
preemption choices, spec sizes, width buckets, clear errors. (Forks, releases and copy-on-write under real
traffic: test_serve_plans.py's Driver.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax.serve.pages import (allocate, balanced_free_pages, bucket, free_pages, put_slots, select_preemptions,
                                 take_slots, used_pages)
from dms_jax.serve.spec import CacheSpec, check_invariants, init_cache

D = 4


def _spec(window=3, page_size=4, seqs=3, layers=2, heads=2, context=64, num_pages=None):
    return CacheSpec.create(num_layers=layers, num_kv_heads=heads, head_dim=D, max_seqs=seqs,
                            max_context=context, window=window, page_size=page_size, num_pages=num_pages)


def test_allocate_distinct_free_pages_never_the_sink():
    rc = jnp.asarray([1, 0, 2, 0, 0, 1, 0], jnp.int32)
    need = jnp.asarray([[True, False], [True, True]])
    ids, rc2 = allocate(rc, need)
    assert np.asarray(ids).tolist() == [[1, 0], [3, 4]]
    assert np.asarray(rc2).tolist() == [1, 1, 2, 1, 1, 1, 0]
    assert int(free_pages(rc2)) == 1 and int(used_pages(rc2)) == 5


def _allocate_reference(rc, need, groups, head_axis):
    """Plain numpy: entry by entry in flattened order, the lowest free page of the entry's head group's share."""
    rc = rc.copy()
    h = need.shape[head_axis]
    heads = np.broadcast_to(np.moveaxis(np.arange(h).reshape((h,) + (1,) * (need.ndim - 1)), 0, head_axis),
                            need.shape).reshape(-1)
    share = len(rc) // groups
    ids = np.zeros(need.size, np.int64)
    for i, want in enumerate(need.reshape(-1)):
        if want:
            g = heads[i] // (h // groups)
            page = next(p for p in range(g * share, (g + 1) * share) if rc[p] == 0)
            ids[i], rc[page] = page, 1
    return ids.reshape(need.shape), rc


@pytest.mark.parametrize("groups, head_axis", [(1, -1), (2, -1), (2, 1), (4, 0)])
def test_allocate_by_head_group_matches_numpy(groups, head_axis):
    """Each entry gets a free page from its KV-head group's share of the pool (fresh random pools and requests)."""
    rng = np.random.default_rng(groups * 10 + head_axis)
    share = 9
    rc = (rng.random(groups * share) < 0.4).astype(np.int32) * rng.integers(1, 3, size=groups * share)
    rc[np.arange(groups) * share] = 1  # the sinks
    shape = [3, 4, 4] if head_axis != 0 else [4, 3, 2]
    need = rng.random(shape) < 0.25
    while True:  # keep the request within every group's free pages, as callers do
        per_group = np.moveaxis(need, head_axis, -1).reshape(-1, groups, shape[head_axis] // groups).sum((0, 2))
        if (per_group <= (rc.reshape(groups, share) == 0).sum(1)).all():
            break
        need[tuple(rng.integers(0, n) for n in shape)] = False
    ids, rc2 = allocate(jnp.asarray(rc), jnp.asarray(need), groups, head_axis)
    want_ids, want_rc = _allocate_reference(rc, need, groups, head_axis)
    np.testing.assert_array_equal(np.where(need, np.asarray(ids), 0), want_ids)
    np.testing.assert_array_equal(np.asarray(rc2), want_rc)
    assert int(used_pages(rc2, groups)) == int((want_rc > 0).sum()) - groups
    assert int(balanced_free_pages(rc2, groups)) == groups * (want_rc.reshape(groups, -1) == 0).sum(1).min()


@pytest.mark.parametrize("need, freeable, cand, free, want", [
    ([[1, 0], [0, 1], [1, 0]], [[0, 0]] * 3, [1, 1, 1], [2, 1], [0, 0, 0]),  # every group fits
    ([[1, 0], [0, 1], [1, 0]], [[0, 0]] * 3, [1, 1, 1], [1, 5], [0, 0, 1]),  # group 0 is short: drop the last
    # group 1 is short and only the first asks there: the others, which ask or free in group 0 only, stay (pooled
    # totals would preempt only the last, which frees 3 pages, all of them in group 0)
    ([[0, 2], [1, 0], [0, 0]], [[0, 0], [0, 0], [3, 0]], [1, 1, 1], [1, 0], [1, 0, 0]),
    ([[0, 2], [1, 0], [0, 0]], [[0, 0], [0, 0], [3, 0]], [1, 1, 1], [1, 2], [0, 0, 0]),
])
def test_select_preemptions_per_group(need, freeable, cand, free, want):
    got = select_preemptions(jnp.asarray(need), jnp.asarray(freeable), jnp.asarray(cand, bool), jnp.asarray(free))
    assert np.asarray(got).astype(int).tolist() == want


def test_grouped_spec_sinks_and_errors():
    spec = CacheSpec.create(num_layers=2, num_kv_heads=4, head_dim=D, max_seqs=2, max_context=32, window=3,
                            page_size=4, num_pages=40, kv_groups=2)
    assert spec.pool_pages == 42 and spec.sink_pages.tolist() == [0, 21]
    cache = init_cache(spec)
    assert cache.kv_groups == 2 and check_invariants(cache, spec)["used_pages"] == 0
    # a head that holds a page of the other group's share is caught
    bad = cache.replace(block_tables=cache.block_tables.at[0, 0, 0, 0].set(30),
                        lengths=cache.lengths.at[0, 0, 0].set(1), refcount=cache.refcount.at[30].set(1))
    with pytest.raises(AssertionError, match="another group"):
        check_invariants(bad, spec)
    with pytest.raises(ValueError, match=r"kv_groups \(3\) must divide num_kv_heads \(4\)"):
        CacheSpec.create(num_layers=2, num_kv_heads=4, head_dim=D, max_seqs=2, max_context=32, window=3,
                         num_pages=42, kv_groups=3)


@pytest.mark.parametrize("need, freeable, cand, free, want", [
    ([1, 1, 1], [0, 0, 0], [1, 1, 1], 3, [0, 0, 0]),  # fits
    ([1, 1, 1], [0, 0, 0], [1, 1, 1], 2, [0, 0, 1]),  # drop the last one
    ([2, 0, 1], [0, 5, 0], [1, 1, 1], 0, [0, 1, 1]),  # highest first, until it fits (3 <= 0 + 1 + 5)
    ([2, 0, 1], [0, 5, 0], [1, 0, 1], 0, [1, 0, 1]),  # non-candidates are never chosen
    ([0, 3, 0], [4, 0, 0], [1, 1, 1], 1, [0, 1, 0]),
])
def test_select_preemptions(need, freeable, cand, free, want):
    got = select_preemptions(jnp.asarray(need), jnp.asarray(freeable), jnp.asarray(cand, bool),
                             jnp.asarray(free))
    assert np.asarray(got).astype(int).tolist() == want


def test_take_and_put_slots_move_only_the_chosen_sequences():
    spec = _spec(seqs=4)
    rng = np.random.default_rng(7)
    cache = init_cache(spec)
    fields = {n: rng.integers(0, 9, size=getattr(cache, n).shape).astype(getattr(cache, n).dtype)
              for n in ("block_tables", "lengths", "ring_slot", "ring_dec", "num_tokens")}
    cache = cache.replace(**{n: jnp.asarray(v) for n, v in fields.items()})
    slots = np.asarray([2, 0, 3, 3])  # a repeated (padding) slot, as the scheduler pads a segment
    sub = take_slots(cache, jnp.asarray(slots))
    for name, v in fields.items():
        axis = 0 if name == "num_tokens" else 1
        np.testing.assert_array_equal(np.asarray(getattr(sub, name)), np.take(v, slots, axis=axis))
    # Change sequences 2 and 0 (rows 0 and 1) and the pool; slot 1 is not taken and must stay as it was.
    sub = sub.replace(lengths=sub.lengths.at[:, :2].add(1), num_tokens=sub.num_tokens.at[:2].add(5),
                      refcount=sub.refcount.at[3].set(7))
    back = put_slots(cache, sub, jnp.asarray(slots))
    want_len, want_num = fields["lengths"].copy(), fields["num_tokens"].copy()
    want_len[:, [2, 0]] += 1
    want_num[[2, 0]] += 5
    np.testing.assert_array_equal(np.asarray(back.lengths), want_len)
    np.testing.assert_array_equal(np.asarray(back.num_tokens), want_num)
    np.testing.assert_array_equal(np.asarray(back.block_tables), fields["block_tables"])
    assert int(back.refcount[3]) == 7


def test_select_preemptions_by_rank():
    """With a rank (the scheduler's arrival order) the highest rank goes first, whatever its slot."""
    need, freeable, cand = jnp.asarray([1, 1, 1]), jnp.zeros(3, jnp.int32), jnp.ones(3, bool)
    got = select_preemptions(need, freeable, cand, jnp.asarray(2), jnp.asarray([7, 2, 5]))
    assert np.asarray(got).astype(int).tolist() == [1, 0, 0]
    got = select_preemptions(need, freeable, cand, jnp.asarray(1), jnp.asarray([7, 2, 5]))
    assert np.asarray(got).astype(int).tolist() == [1, 0, 1]


def test_spec_sizes_and_bucket():
    spec = _spec(window=5, page_size=16, seqs=2, layers=3, heads=4, context=100)
    assert spec.max_pages_per_head == 7 and spec.ring == 6 and spec.pool_pages == spec.num_pages + 1
    assert spec.num_pages == 3 * 2 * 4 * 7 and spec.bytes_per_page == 2 * 16 * D * 4
    assert [bucket(n, 1000) for n in (1, 4, 5, 9, 17, 33, 100, 129)] == [1, 4, 5, 10, 20, 40, 112, 160]
    assert bucket(900, 512) == 512


@pytest.mark.parametrize("call, match", [
    (lambda: _spec(page_size=0), "page_size must be an integer >= 1"),
    (lambda: _spec(context=0), "max_context must be an integer >= 1"),
    (lambda: _spec(num_pages=0), "num_pages must be an integer >= 1"),
    (lambda: _spec(seqs=0, num_pages=8), "max_seqs must be an integer >= 1"),
    (lambda: _spec(window=0), "window must be an integer >= 1"),
    (lambda: CacheSpec(1, 1, 4, 8, 4, 1, 2, 1, dtype="float77"), "float77"),
])
def test_spec_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
