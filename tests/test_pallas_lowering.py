"""The kernels lower for real hardware, checked on CPU by cross-platform lowering.

`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` runs the Pallas -> Mosaic lowering and
`("cuda",)` the Pallas -> Triton lowering (Triton IR built by jaxlib, no GPU and no jax-triton needed). This
catches block-shape rules, unsupported primitives and Triton's power-of-two/shape rules. It does not run
Mosaic's layout passes or the Triton -> PTX compiler, which happen on the device: those, and every timing
and bandwidth figure, need hardware.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import (
    dms_flash_attention,
    paged_decode_attention_pallas_gpu,
    paged_decode_attention_pallas_tpu,
)
from pallas_kernels.kv_codec import row_width

PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}
CUSTOM_CALL = {"pallas_tpu": "tpu_custom_call", "pallas_gpu": "__gpu$xla.gpu.triton"}


def _custom_calls(fn, *args, platform):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return re.findall(r"custom_call @(\S+?)\(", text)


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("with_mask, pool_dtype", [(False, "bfloat16"), (True, "bfloat16"), (False, "int8")])
def test_decode_lowers(backend, with_mask, pool_dtype):
    """An int8 pool has rows of D + 4 (kv_codec), not a power of two: the Triton kernel loads values and scale
    bytes apart, and neither lowering may meet a primitive it lacks while dequantising."""
    B, H, G, D, ps, M = 8, 8, 4, 128, 16, 64
    dt = jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    pool = sds((B * H * M, ps, row_width(D, pool_dtype)), jnp.dtype(pool_dtype))
    args = [sds((B, H, G, D), dt), pool, pool, sds((B, H, M), jnp.int32), sds((B, H), jnp.int32)]
    if with_mask:
        args.append(sds((B, H, M), jnp.bool_))
    impl = paged_decode_attention_pallas_tpu if backend == "pallas_tpu" else paged_decode_attention_pallas_gpu

    def fn(q, kp, vp, bt, ln, pm=None):
        return impl(q, kp, vp, bt, ln, page_mask=pm, interpret=False)

    calls = _custom_calls(fn, *args, platform=PLATFORM[backend])
    assert calls == [CUSTOM_CALL[backend]]


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_flash_fwd_bwd_lowers(backend):
    B, T, S, Hq, Hkv, D = 1, 512, 512, 8, 2, 128
    dt = jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    args = (sds((B, T, Hq, D), dt), sds((B, S, Hkv, D), dt), sds((B, S, Hkv, D), dt), sds((B, T), jnp.int32),
            sds((B, S), jnp.int32), sds((B, Hkv, S), jnp.float32), sds((B, S), jnp.bool_))

    def fn(q, k, v, q_pos, k_pos, log_keep, k_valid):
        f = lambda q, k, v, lk: dms_flash_attention(q, k, v, q_pos, k_pos, lk, k_valid, window=128,  # noqa: E731
                                                    backend=backend, interpret=False)
        out, vjp = jax.vjp(f, q, k, v, log_keep)
        return out, vjp(out)

    calls = _custom_calls(fn, *args, platform=PLATFORM[backend])
    assert calls == [CUSTOM_CALL[backend]] * 3  # forward, dq, dk/dv/dlog_keep
