"""Which KV heads need their far tokens: the distillation loss when one head keeps only its window.

Retrieval in a small model runs through a few heads (DuoAttention, Xiao et al. 2024, calls them retrieval
heads); the others read mostly their recent tokens. DMS can express that split -- its decisions are per token
*and per head*, and a head whose adapter marks every token keeps only its window -- but a short distillation
rarely finds it (docs/algorithm.md, section 4b). This module measures it directly: for each (layer, KV head), the
KL(head restricted || original) of the original model when only that head marks every token but its first
``sink`` ones (the window rule of ``dms.visible_if_marked`` then hides the rest), on rows whose answers need far
facts. The heads that hurt least are the ones to mark; ``head_labels`` turns a choice of heads into per-token
labels for the adapter fit (``dms_jax.train.importance.fit_adapter``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import dms
from dms_jax.model import CausalLM, attend
from dms_jax.train.losses import kl_student_teacher

__all__ = ["marked_head_damage", "heads_to_keep", "head_labels"]


def _forward_with_marks(model: CausalLM, tokens, valid, marks, window: int):
    """Logits of the original weights when token j of head h of layer l is marked iff ``marks[l, h, j]``
    ([L, Hkv, T] bool, the same for every row)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = model.embed_tokens(tokens)
    for layer, m in zip(model.layers, marks):
        decisions = jnp.broadcast_to(m[None], (b,) + m.shape) & dms.has_decision(valid)[:, None, :]
        bias = dms.dms_attention_bias(dms.hard_log_keep(decisions), positions, positions, window, valid)

        def attention(p, bias=bias):
            return attend(p.q, p.k, p.v, bias), None

        x, _ = layer(x, positions, attention, False)
    return model.unembed(x).astype(jnp.float32)


def marked_head_damage(model: CausalLM, tokens: np.ndarray, valid: np.ndarray, window: int, *, sink: int = 4,
                       loss_weight: np.ndarray | None = None, batch_size: int = 2, on_head=None) -> np.ndarray:
    """[L, Hkv] float: per head, the (``loss_weight``-weighted) KL to the original model when that head alone marks
    every token from ``sink`` on, averaged over the rows ``tokens`` / ``valid`` [N, T] in batches."""
    cfg = model.cfg
    n, t = tokens.shape
    marks_of = jnp.arange(t) >= sink

    @nnx.jit
    def teacher_logits(model, tok, val):
        return model(tok, valid=val)[0]

    @nnx.jit
    def damage(model, tok, val, weight, teacher, layer, head):
        sel = (jnp.arange(cfg.num_layers)[:, None] == layer) & (jnp.arange(cfg.num_kv_heads)[None, :] == head)
        student = _forward_with_marks(model, tok, val, sel[:, :, None] & marks_of[None, None, :], window)
        return kl_student_teacher(student, teacher, val, weight)

    batches = []
    for i in range(0, n, batch_size):
        tok, val = jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(valid[i:i + batch_size])
        w = None if loss_weight is None else jnp.asarray(loss_weight[i:i + batch_size])
        batches.append((tok, val, w, teacher_logits(model, tok, val)))  # one teacher forward per batch
    out = np.zeros((cfg.num_layers, cfg.num_kv_heads))
    for layer in range(cfg.num_layers):
        for head in range(cfg.num_kv_heads):
            out[layer, head] = np.mean([float(damage(model, *b, layer, head)) for b in batches])
            if on_head is not None:
                on_head(layer, head, out[layer, head])
    return out


def heads_to_keep(damage: np.ndarray, keep: int) -> np.ndarray:
    """[L, Hkv] bool: the ``keep`` heads whose marking hurts most (they keep every token)."""
    if not 0 <= keep <= damage.size:
        raise ValueError(f"keep must be in [0, {damage.size}], got {keep}")
    order = np.argsort(-damage, axis=None, kind="stable")[:keep]
    out = np.zeros(damage.size, bool)
    out[order] = True
    return out.reshape(damage.shape)


def head_labels(keep_heads, valid, sink: int):
    """(labels [L, B, Hkv, T] float, mask [L, B, Hkv, T] bool) for the adapter fit: 1 (mark) at every decided token
    from ``sink`` on in the heads not kept, 0 elsewhere; every decided token is labelled."""
    keep_heads = jnp.asarray(keep_heads)
    b, t = valid.shape
    decided = dms.has_decision(valid)  # [B, T]
    marked = (~keep_heads)[:, None, :, None] & (jnp.arange(t) >= sink)[None, None, None, :] & decided[None, :, None]
    mask = jnp.broadcast_to(decided[None, :, None, :], marked.shape)
    return marked.astype(jnp.float32), mask
