"""pallas_kernels.xla_blocked: the blocked XLA paged attention (the engine's CPU backend) equals the jnp
reference of paged_decode_attention for empty heads, one slot, a page and several blocks, whatever the block size,
for one sequence (the einsum form) and several (the fused multiply-reduce form).
(Its deferred-write form -- new_kv / exclude_slot -- is checked through the engine: test_serve_engine.py.)"""

import jax.numpy as jnp
import numpy as np

from pallas_kernels import paged_attention_blocked, paged_decode_attention_reference


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
