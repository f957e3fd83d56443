"""Small helpers shared by the kernels: backend resolution and interpret-mode plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


def default_platform() -> str:
    """Platform of the default JAX device: 'cpu', 'tpu' or 'gpu' (cuda/rocm both map to 'gpu')."""
    platform = jax.devices()[0].platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_backend(backend: str) -> str:
    """Turns "auto" into a concrete backend: the xla reference on CPU, the Pallas lowering on TPU/GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = default_platform()
    if platform == "tpu":
        return "pallas_tpu"
    if platform == "gpu":
        return "pallas_gpu"
    return "xla"


def resolve_interpret(backend: str, interpret: bool | None) -> bool:
    """interpret=None: interpret mode only when the backend's hardware is absent."""
    if interpret is not None:
        return bool(interpret)
    platform = default_platform()
    if backend == "pallas_tpu":
        return platform != "tpu"
    if backend == "pallas_gpu":
        return platform != "gpu"
    return False


def tpu_interpret_arg(interpret: bool):
    """`interpret=` value for TPU-style kernels: TPU interpret mode (simulated DMAs, semaphores, SMEM/VMEM)."""
    if not interpret:
        return False
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.InterpretParams()


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def cdiv(a, b):
    return (a + b - 1) // b


def acc_dtype_for(dtype) -> jnp.dtype:
    """Operand dtype to feed the MXU / tensor cores: bf16/f16 stay, everything else is f32."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return dtype
    return jnp.dtype(jnp.float32)
