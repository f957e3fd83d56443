"""pallas_kernels.kv_codec: int8 rows with a float32 scale each, against a numpy quantiser written here
(symmetric, scale = max|x| / 127, round half to even, an all-zero row stores scale 0); float pools are a cast.
The attention paths that read an int8 pool (the blocked XLA loop and the "xla" reference) equal numpy attention
over the numpy-dequantised keys and values, and so do both Pallas kernels (interpret mode), which dequantise each
tile in the kernel."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention_blocked, paged_decode_attention
from pallas_kernels.kv_codec import decode_rows, encode_rows, head_dim_of, round_trip, row_width, scale_from_bytes


def _np_quantise(x):
    """(int8 values, float32 scale) of rows ``x`` [..., D]."""
    x = np.asarray(x, np.float32)
    scale = (np.abs(x).max(-1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(x / safe[..., None]), -127, 127).astype(np.int8), scale


def test_int8_rows_match_numpy_quantiser():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7, 64)).astype(np.float32) * rng.uniform(0.01, 30.0, size=(5, 7, 1)).astype(np.float32)
    x[1, 2] = 0.0  # an all-zero row
    rows = encode_rows(jnp.asarray(x), "int8")
    chex.assert_shape(rows, (5, 7, row_width(64, "int8")))
    chex.assert_type(rows, jnp.int8)
    assert row_width(64, "int8") == 68 and head_dim_of(rows) == 64
    values, scale = _np_quantise(x)
    # XLA may divide by 127 as a multiply by its reciprocal: the scale agrees to an ulp, and a value may then round
    # the other way when x / scale sits on a half.
    np.testing.assert_allclose(np.asarray(rows[..., 64:]).copy().view(np.float32)[..., 0], scale, rtol=3e-7)
    got = np.asarray(rows[..., :64]).astype(np.int32)
    assert np.abs(got - values).max() <= 1 and np.mean(got == values) > 0.999
    scale = np.asarray(rows[..., 64:]).copy().view(np.float32)[..., 0]
    values = got.astype(np.int8)
    back = np.asarray(decode_rows(rows))
    chex.assert_shape(back, x.shape)
    np.testing.assert_allclose(back, values.astype(np.float32) * scale[..., None], rtol=1e-6, atol=0)
    assert np.all(np.abs(back - x) <= scale[..., None] / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(back[1, 2] == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float_pools_are_a_cast(dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.float32)
    rows = encode_rows(x, dtype)
    assert rows.dtype == jnp.dtype(dtype) and rows.shape == (3, 16) and row_width(16, dtype) == 16
    np.testing.assert_array_equal(np.asarray(round_trip(x, dtype)), np.asarray(x.astype(dtype).astype(jnp.float32)))


def _np_paged_attention(q, k, v, tables, lengths):
    """Numpy paged decode attention over float pools k, v [P, ps, D]: slots 0..length-1 of each head."""
    b, h, g, d = q.shape
    out = np.zeros((b, h, g, d))
    for i in range(b):
        for j in range(h):
            n = lengths[i, j]
            if n == 0:
                continue
            kk = k[tables[i, j]].reshape(-1, d)[:n].astype(np.float64)
            vv = v[tables[i, j]].reshape(-1, d)[:n].astype(np.float64)
            s = q[i, j].astype(np.float64) @ kk.T / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, j] = (p / p.sum(-1, keepdims=True)) @ vv
    return out


def test_scale_bytes_decode_like_numpy_float32():
    """The byte planes of float32 values (numpy's little-endian view, independent of XLA) decode to the values."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=50) * 10.0 ** rng.integers(-30, 30, 50), [0.0, -0.0, 1.0, 2.0 ** -140]])
    x = x.astype(np.float32)
    planes = x.view("<u1").reshape(-1, 4).view(np.int8)
    got = np.asarray(scale_from_bytes(*(jnp.asarray(planes[:, i]) for i in range(4))))
    np.testing.assert_array_equal(got.view(np.uint32), x.view(np.uint32))


def test_int8_pool_attention_matches_numpy():
    rng = np.random.default_rng(2)
    ps, d, b, h, g = 4, 16, 2, 3, 3  # powers of two, as the Triton kernel needs
    lengths = np.array([[0, 1, 4], [5, 77, 30]], np.int32)
    m = -(-lengths.max() // ps) + 1
    pool = 1 + b * h * m
    tables = rng.permutation(np.arange(1, pool)).reshape(b, h, m).astype(np.int32)
    k = rng.normal(size=(pool, ps, d)).astype(np.float32) * 3
    v = rng.normal(size=(pool, ps, d)).astype(np.float32)
    q = rng.normal(size=(b, h, g, d)).astype(np.float32)
    (kq, ks), (vq, vs) = _np_quantise(k), _np_quantise(v)
    want = _np_paged_attention(q, kq * ks[..., None], vq * vs[..., None], tables, lengths)
    k8, v8 = encode_rows(jnp.asarray(k), "int8"), encode_rows(jnp.asarray(v), "int8")
    args = (jnp.asarray(q), k8, v8, jnp.asarray(tables), jnp.asarray(lengths))
    got = {"blocked": paged_attention_blocked(*args), "blocked_8": paged_attention_blocked(*args, block_tokens=8)}
    for backend in ("xla", "pallas_tpu", "pallas_gpu"):
        got[backend] = paged_decode_attention(*args, backend=backend, interpret=True, pages_per_block=4)
    for name, out in got.items():
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5, err_msg=name)
    # ... and differs from attention over the unquantised pools (the int8 path really is taken).
    exact = _np_paged_attention(q, k, v, tables, lengths)
    assert np.max(np.abs(want - exact)) > 1e-4
