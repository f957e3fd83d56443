"""Distillation losses in float32: KL(student || teacher) per token and over valid tokens, next-token NLL."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_kl", "kl_student_teacher", "next_token_nll"]


def token_kl(student_logits, teacher_logits):
    """KL(student || teacher) per token [B, T], in float32."""
    log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_pt = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_ps) * (log_ps - log_pt), axis=-1)


def kl_student_teacher(student_logits, teacher_logits, valid, weight=None):
    """Mean over valid tokens of KL(student || teacher) = sum_v p_s (log p_s - log p_t), temperature 1; with
    ``weight`` [B, T], the weighted mean (sum w * kl / sum w over valid tokens)."""
    kl = token_kl(student_logits, teacher_logits)
    w = valid.astype(jnp.float32)
    if weight is not None:
        w = w * weight.astype(jnp.float32)
    return jnp.sum(kl * w) / jnp.maximum(jnp.sum(w), 1.0)


def next_token_nll(logits, tokens, valid):
    """Mean negative log-likelihood of tokens[1:] given their prefix, over pairs where both tokens are valid."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = (valid[:, 1:] & valid[:, :-1]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)
