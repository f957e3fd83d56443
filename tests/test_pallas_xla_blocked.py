"""pallas_kernels.xla_blocked: the blocked XLA paged attention (the engine's CPU backend) equals the jnp
reference of paged_decode_attention for empty heads, one slot, a page and several blocks, whatever the block size,
for one sequence (the einsum form) and several (the fused multiply-reduce form); with chains that share pages, the
cascade form (shared span read once per group) equals a plain numpy attention, deferred writes included.
(The deferred-write form alone -- new_kv / exclude_slot -- is checked through the engine: test_serve_engine.py.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention_blocked, paged_decode_attention_reference
from pallas_kernels.xla_blocked import shared_prefix_slots


def test_paged_attention_blocked_matches_reference():
    rng = np.random.default_rng(0)
    ps, d = 4, 16
    # Heads that are empty, hold one slot, a page or several blocks; head (0, 0) is empty in both cases.
    several = np.array([[0, 1, 4], [5, 333, 130]], np.int32)
    one = np.array([[0, 5, 333]], np.int32)
    for g, lengths in ((1, several), (3, several), (3, one)):
        b, h = lengths.shape
        m = -(-lengths.max() // ps) + 2
        pool = 1 + b * h * m
        tables = rng.permutation(np.arange(1, pool))[:b * h * m].reshape(b, h, m).astype(np.int32)
        k = jnp.asarray(rng.normal(size=(pool, ps, d)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(pool, ps, d)), jnp.float32)
        q = jnp.asarray(rng.normal(size=(b, h, g, d)), jnp.float32)
        want = paged_decode_attention_reference(q, k, v, jnp.asarray(tables), jnp.asarray(lengths))
        for block_tokens in (None, 4, 12, 64):  # one block, many blocks, a block that is not a page multiple
            got = paged_attention_blocked(q, k, v, jnp.asarray(tables), jnp.asarray(lengths),
                                          block_tokens=block_tokens)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
            assert np.all(np.asarray(got)[0, 0] == 0)


def _numpy_attention(q, k_pool, v_pool, tables, lengths, k_new, v_new, exclude):
    """Per (sequence, KV head): softmax over the live slots but the excluded one, plus the incoming key."""
    b, h, g, d = q.shape
    ps = k_pool.shape[1]
    out = np.zeros((b, h, g, d))
    for i in range(b):
        for j in range(h):
            slots = [s for s in range(lengths[i, j]) if s != exclude[i, j]]
            keys = [k_pool[tables[i, j, s // ps], s % ps] for s in slots] + [k_new[i, j]]
            vals = [v_pool[tables[i, j, s // ps], s % ps] for s in slots] + [v_new[i, j]]
            logits = q[i, j] @ np.stack(keys).T / np.sqrt(d)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[i, j] = (w / w.sum(-1, keepdims=True)) @ np.stack(vals)
    return out


def _chain_tables(rng, prompts, chains, heads, shared_pages, private_pages, pool):
    """Tables whose first ``shared_pages[p, h]`` entries are one set of pages for every chain of prompt p."""
    free = iter(rng.permutation(np.arange(1, pool)))
    width = int(shared_pages.max()) + private_pages
    tables = np.zeros((prompts * chains, heads, width), np.int32)
    for p in range(prompts):
        for h in range(heads):
            common = [next(free) for _ in range(shared_pages[p, h])]
            for c in range(chains):
                tables[p * chains + c, h] = common + [next(free) for _ in range(width - len(common))]
    return tables


def test_chains_read_their_shared_span_once_and_equal_numpy():
    rng = np.random.default_rng(1)
    ps, d, g, heads, chains = 4, 8, 2, 2, 3
    shared_pages = np.array([[5, 0], [3, 7]])  # prompt 0 head 1: nothing shared (all its pages copied)
    lengths = np.array([[[22, 9], [20, 9], [25, 9]],  # prompt 0: chain 1 ends at 20 = 5 whole shared pages
                        [[14, 30], [0, 0], [15, 29]]], np.int32)  # prompt 1: chain 1 finished (released)
    # Slots the incoming token takes (below the length: an evicted slot is overwritten), else -1 (append).
    exclude = np.array([[[21, -1], [-1, 3], [-1, -1]], [[-1, 25], [-1, -1], [6, -1]]], np.int32)
    lengths, exclude = lengths.reshape(-1, heads), exclude.reshape(-1, heads)
    b, pool = lengths.shape[0], 200
    tables = _chain_tables(rng, 2, chains, heads, shared_pages, 3, pool)

    shared, _ = shared_prefix_slots(jnp.asarray(tables), jnp.asarray(lengths), chains, ps, jnp.asarray(exclude))
    # Prompt 0 head 0: 5 pages (20 slots), all chains at least that long; head 1: none. Prompt 1 head 0: 3 pages,
    # but chain 2 overwrites slot 6 this step; head 1: 7 pages and chains of 30 and 29 slots, but chain 0 overwrites
    # slot 25. (The engine's copy-on-write never leaves a written slot in a shared page; the cut is a safeguard.)
    np.testing.assert_array_equal(np.asarray(shared), [[20, 0], [6, 25]])

    k, v = rng.normal(size=(2, pool, ps, d)).astype(np.float32)
    q = rng.normal(size=(b, heads, g, d)).astype(np.float32)
    k_new, v_new = rng.normal(size=(2, b, heads, d)).astype(np.float32)
    want = _numpy_attention(q, k, v, tables, lengths, k_new, v_new, exclude)
    for block_tokens in (None, 4, 12):
        for w in (1, chains):  # 1: every sequence reads its whole span (the reference path of the engine)
            got = paged_attention_blocked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(tables),
                                          jnp.asarray(lengths), block_tokens=block_tokens, chains=w,
                                          new_kv=(jnp.asarray(k_new), jnp.asarray(v_new)),
                                          exclude_slot=jnp.asarray(exclude))
            live = lengths.reshape(-1) > 0  # a released chain's output is never used
            np.testing.assert_allclose(np.asarray(got).reshape(-1, g, d)[live], want.reshape(-1, g, d)[live],
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chains must be a positive divisor of the 6 sequences"):
        paged_attention_blocked(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(tables),
                                jnp.asarray(lengths), chains=4)
