"""Sampling of the next token, shared by the paged engine (engine.py, decode.py) and the dense reference
generator (reference.py): ``SamplingConfig`` (greedy, temperature, top-k, top-p) and ``sample_next``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample_next(logits, key, sampling: SamplingConfig):
    """Next token [B] from logits [B, V]: argmax when temperature is 0, else temperature / top-k / top-p."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    # Inverse-CDF sampling with one uniform number per row (the first token whose cumulative mass exceeds it):
    # exact, and on CPU ~10x cheaper than jax.random.categorical, which draws a Gumbel number per vocabulary entry
    # (for 8 rows of a 49K vocabulary that cost ~10 ms per decode step, as much as a fifth of the model's weights).
    logits = logits.astype(jnp.float32)
    cdf = jnp.cumsum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), axis=-1)
    u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
    return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)
