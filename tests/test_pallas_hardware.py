"""The Pallas kernels compiled for and run on a real accelerator (GPU: Pallas' Triton backend; TPU: Mosaic), against
independent references; skipped where JAX sees no GPU / TPU (CI and this project's CPU machine).

Everything else about the kernels is tested in interpret mode (test_pallas_decode.py, test_pallas_flash.py) and by
cross-platform lowering (test_pallas_lowering.py); this file is what catches the device compilers (Triton -> PTX,
Mosaic's layout passes) and real memory behaviour. Run it on a GPU / TPU machine with

    pytest -q tests/test_pallas_hardware.py

Tolerances: the decode reference is float64 numpy on the host. f32 inputs get 2e-3 relative because the
accelerators' f32 matrix units may round the dot inputs (TF32 on NVIDIA, bf16 passes on TPU); bf16 gets 2e-2.
The engine checks (DMS and DMC) compare the paged engine on the platform's kernel with the full-sequence hard-mode forward
(both on the device, matmuls at "highest" precision), fp32, 2e-3 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dms_flash_attention, dms_flash_attention_reference, paged_decode_attention
from pallas_kernels.kv_codec import encode_rows

PLATFORM = jax.default_backend()
BACKEND = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(PLATFORM)
pytestmark = pytest.mark.skipif(BACKEND is None, reason="needs a GPU or TPU (the kernels run in interpret mode "
                                                          "elsewhere: test_pallas_decode.py, test_pallas_flash.py)")
TOL = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}


def _rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _decode_reference(q, k_pages, v_pages, tables, lengths, page_mask, page_size):
    """float64 numpy: each (sequence, head) attends to slots 0..length-1 of its pages (only masked-in pages)."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    b, h, g, d = q.shape
    out = np.zeros((b, h, g, d))
    for i in range(b):
        for j in range(h):
            n = int(lengths[i, j])
            slots = np.arange(n)
            keep = np.ones(n, bool) if page_mask is None else page_mask[i, j, slots // page_size]
            if not keep.any():
                continue
            pages = tables[i, j, slots // page_size]
            k = kp[pages, slots % page_size][keep]
            v = vp[pages, slots % page_size][keep]
            s = q[i, j] @ k.T / np.sqrt(d)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[i, j] = (p / p.sum(-1, keepdims=True)) @ v
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group, head_dim", [(3, 64), (8, 128)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_paged_decode_on_device(dtype, group, head_dim, with_mask):
    rng = np.random.default_rng(group * head_dim + with_mask)
    b, h, page_size, max_pages = 4, 3, 16, 80
    lengths = rng.integers(0, max_pages * page_size + 1, (b, h)).astype(np.int32)
    lengths[0, 0], lengths[1, 1] = 0, 1  # an empty head and a single live slot
    num_pages = b * h * max_pages + 5
    tables = rng.permutation(num_pages)[:b * h * max_pages].reshape(b, h, max_pages).astype(np.int32)
    k_pages = rng.standard_normal((num_pages, page_size, head_dim)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, head_dim)).astype(np.float32)
    q = rng.standard_normal((b, h, group, head_dim)).astype(np.float32)
    mask = rng.random((b, h, max_pages)) < 0.5 if with_mask else None
    args = [jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)] + [jnp.asarray(tables), jnp.asarray(lengths)]
    out = paged_decode_attention(*args, page_mask=None if mask is None else jnp.asarray(mask), backend=BACKEND,
                                 interpret=False)
    ref = _decode_reference(*(np.asarray(a, np.float32) for a in args[:3]), tables, lengths, mask, page_size)
    assert out.shape == q.shape and out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel_err(out, ref) <= TOL[dtype], _rel_err(out, ref)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_decode_reads_int8_pools_on_device(head_dim):
    """int8 pools (values + a float32 scale per row, D + 4 wide): the kernel dequantises on the device; the
    reference attends over the same rows dequantised by numpy (bytes viewed as little-endian float32)."""
    rng = np.random.default_rng(head_dim)
    b, h, g, page_size, max_pages = 3, 3, 3, 16, 40
    lengths = rng.integers(0, max_pages * page_size + 1, (b, h)).astype(np.int32)
    lengths[0, 0] = 0
    num_pages = b * h * max_pages + 5
    tables = rng.permutation(num_pages)[:b * h * max_pages].reshape(b, h, max_pages).astype(np.int32)
    pools = [encode_rows(jnp.asarray(rng.standard_normal((num_pages, page_size, head_dim)), jnp.float32), "int8")
             for _ in range(2)]
    q = rng.standard_normal((b, h, g, head_dim)).astype(np.float32)
    out = paged_decode_attention(jnp.asarray(q), *pools, jnp.asarray(tables), jnp.asarray(lengths),
                                 backend=BACKEND, interpret=False)
    k, v = (np.asarray(p)[..., :head_dim].astype(np.float64)
            * np.asarray(p)[..., head_dim:].copy().view("<f4").astype(np.float64) for p in pools)
    ref = _decode_reference(q, k, v, tables, lengths, None, page_size)
    assert np.isfinite(np.asarray(out)).all()
    assert _rel_err(out, ref) <= TOL[jnp.float32], _rel_err(out, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("hard", [False, True])
def test_dms_flash_forward_and_grads_on_device(dtype, hard):
    rng = np.random.default_rng(7 + hard)
    b, t, hq, hkv, d, window = 2, 384, 6, 2, 64, 48
    q = jnp.asarray(rng.standard_normal((b, t, hq, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, t, hkv, d)), dtype)
    pos = jnp.asarray(np.tile(np.arange(t), (b, 1)), jnp.int32)
    if hard:
        log_keep = np.where(rng.random((b, hkv, t)) < 0.7, -np.inf, 0.0)
    else:
        log_keep = np.log1p(-rng.uniform(0.0, 0.95, (b, hkv, t)))
    log_keep = jnp.asarray(log_keep, jnp.float32)
    valid = jnp.asarray(rng.random((b, t)) > 0.05)
    weight = jnp.cos(jnp.arange(b * t * hq * d, dtype=jnp.float32) * 0.37).reshape(b, t, hq, d)

    def loss(fn, q, k, v, lk):
        return jnp.sum(fn(q, k, v, pos, pos, lk, valid, window=window).astype(jnp.float32) * weight)

    kernel = lambda *a, **kw: dms_flash_attention(*a, **kw, backend=BACKEND, interpret=False)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        out = kernel(q, k, v, pos, pos, log_keep, valid, window=window)
        ref = dms_flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                            pos, pos, log_keep, valid, window=window)
        g_ker = jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3))(q, k, v, log_keep)
        g_ref = jax.grad(lambda *a: loss(dms_flash_attention_reference, *a), argnums=(0, 1, 2, 3))(
            *(x.astype(jnp.float32) for x in (q, k, v)), log_keep)
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel_err(out, ref) <= TOL[dtype], ("out", _rel_err(out, ref))
    for name, a, r in zip(["dq", "dk", "dv", "dlog_keep"], g_ker, g_ref):
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _rel_err(a, r) <= 2 * TOL[dtype], (name, _rel_err(a, r))


def test_engine_on_device_equals_hard_forward():
    """The paged engine with the platform's kernel: prefill + decode == the hard-mode forward over the sequence."""
    from test_serve_engine import _hard_forward, _teacher_forced_errors, _tiny_dms_model

    from dms_jax.serve.engine import Engine

    with jax.default_matmul_precision("highest"):
        model = _tiny_dms_model(head_dim=16)  # Triton's dot needs 16+ along every dimension
        rng = np.random.default_rng(4)
        prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (37, 13)]
        conts = [list(map(int, rng.integers(3, 97, size=6))) for _ in range(2)]
        ref, _ = _hard_forward(model, [p + c for p, c in zip(prompts, conts)])
        eng = Engine(model, "dms", page_size=16, prefill_chunk=16, attention_backend=BACKEND)
        assert max(_teacher_forced_errors(eng, prompts, conts, ref, 64)) <= 2e-3


def test_dmc_engine_on_device_equals_hard_forward():
    """DMC (merge into the last slot) through the paged engine with the platform's kernel, as above."""
    import dataclasses

    from flax import nnx
    from test_serve_engine import _hard_forward, _teacher_forced_errors
    from test_serve_engine_dmc import CFG, WINDOW

    from dms_jax.config import DMCConfig
    from dms_jax.model import create_model
    from dms_jax.serve.engine import Engine

    with jax.default_matmul_precision("highest"):
        cfg = dataclasses.replace(CFG, head_dim=16)  # Triton's dot needs 16+ along every dimension
        model = create_model(cfg, dmc_cfg=DMCConfig(accumulation_window=WINDOW, logit_offset=0.3), seed=1)
        nnx.update(model, jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, nnx.state(model, nnx.Param)))
        rng = np.random.default_rng(5)
        prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (37, 13)]
        conts = [list(map(int, rng.integers(3, 97, size=6))) for _ in range(2)]
        ref, dec = _hard_forward(model, [p + c for p, c in zip(prompts, conts)])
        assert 0.2 < float(dec.mean()) < 0.8, "the tiny model should mix merges and appends"
        eng = Engine(model, "dmc", page_size=16, prefill_chunk=16, attention_backend=BACKEND)
        assert max(_teacher_forced_errors(eng, prompts, conts, ref, 64)) <= 2e-3
