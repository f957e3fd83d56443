"""How K / V rows are stored in a page pool: plain (the pool's float dtype) or int8 with a scale per row.

An int8 pool row holds one token of one KV head: D int8 values, then that row's float32 scale as 4 more bytes
(bitcast), so a pool of head dimension D has rows of ``D + 4`` int8 entries. Keeping the scale inside the row means
every page operation (allocation, copy-on-write forks, page copies, compaction, releases) moves values and
scales together without knowing about quantisation; only the writes (``encode_rows``) and the attention reads
(``decode_rows``) do. Symmetric per-row quantisation: scale = max|x| / 127, value = round(x / scale), so the
error of an entry is at most scale / 2. Bytes per stored (token, KV head) entry: 2 * (D + 4) for K and V,
against 2 * 2 * D in bf16 (68 / 128 bytes per K row at D = 64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QUANTIZED_DTYPES = ("int8",)
SCALE_BYTES = 4  # one float32 scale per row, bitcast into the row's last 4 int8 entries
INT8_MAX = 127.0


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype).name in QUANTIZED_DTYPES


def row_width(head_dim: int, dtype) -> int:
    """Entries of one pool row (one token of one KV head) for a pool of ``dtype``."""
    return head_dim + SCALE_BYTES if is_quantized(dtype) else head_dim


def head_dim_of(pool) -> int:
    """The head dimension stored in a pool ``[pages, page_size, row_width]``."""
    return pool.shape[-1] - SCALE_BYTES if is_quantized(pool.dtype) else pool.shape[-1]


def encode_rows(x, dtype):
    """Rows ``[..., D]`` in a pool's storage format ``[..., row_width(D, dtype)]``."""
    if not is_quantized(dtype):
        return x.astype(dtype)
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero row stores zeros with scale 0
    values = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    scale_bytes = jax.lax.bitcast_convert_type(scale, jnp.int8)  # [..., 4]
    return jnp.concatenate([values, scale_bytes], axis=-1)


def scale_from_bytes(b0, b1, b2, b3):
    """The float32 scales ``[...]`` stored as 4 int8 bytes each, given as four planes ``[...]`` (least significant
    byte first, as ``bitcast_convert_type`` writes them), from integer shifts and one same-width bitcast. The
    Pallas kernels decode their tiles with this very function; the Triton lowering has no slice of a loaded tile,
    so a kernel loads each byte plane from the pool rather than cutting it out of a row."""
    u = [b.astype(jnp.int32) & 0xFF for b in (b0, b1, b2, b3)]
    bits = u[0] | (u[1] << 8) | (u[2] << 16) | (u[3] << 24)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def decode_rows(rows, dtype=jnp.float32):
    """Stored rows ``[..., row_width]`` back as values ``[..., D]`` in ``dtype`` (a plain pool: a cast)."""
    if not is_quantized(rows.dtype):
        return rows.astype(dtype)
    d = head_dim_of(rows)
    return dequantize(rows[..., :d], [rows[..., d + i] for i in range(SCALE_BYTES)], dtype)


def dequantize(values, scale_bytes, dtype=jnp.float32):
    """int8 ``values [..., D]`` with their rows' scale bytes (4 planes ``[...]``, see ``scale_from_bytes``) as
    floats ``[..., D]`` in ``dtype``: the parts of stored rows, which a Triton kernel loads apart because a D + 4
    wide tile is not a power of two."""
    return (values.astype(jnp.float32) * scale_from_bytes(*scale_bytes)[..., None]).astype(dtype)


def round_trip(x, dtype):
    """``x`` as it reads back after being stored in a pool of ``dtype`` (float32)."""
    return decode_rows(encode_rows(x, dtype))
