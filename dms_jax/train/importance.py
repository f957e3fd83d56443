"""The decision adapter fitted to the teacher's own attention: which tokens are still read after the window.

DMS learns its decisions from the distillation loss alone. A token that matters only far outside the window (a
passkey, a variable's value) moves that loss at the few positions that read it again, so a short retrofit sees
almost no such evidence (recipes v1-v4: passkey and variable tracking fall well behind the original model at
CR 4). The original model's attention shows it directly, at every token of every row: this module labels each
(layer, KV head, token) with its *future read weight*, the largest attention weight that any query more than
``window`` positions later (in any query head of the KV group) gives it -- the queries that would no longer see
the token if it were marked -- and fits the adapter to predict it, on the residual stream the adapter reads
(one-token shift included), by logistic regression: "evict" where the read weight is among the lowest
``evict_fraction`` of the batch, over all layers and heads (so layers and heads share one budget, as DMS's
compression loss does). The idea of predicting future attention at write time is Locret's (Huang et al. 2024,
"retaining heads"); the decisions, the delayed eviction and the cache are DMS's, unchanged.

The fitted logits rank tokens; the DMSConfig's ``alpha_offset`` sets the threshold, so one fit serves every
compression ratio: :func:`calibrate_offset` finds the offset that gives a target whole-cache compression on
held-out rows. A DMS distillation can then start from the fitted adapter (``experiments.distill
--init-adapter``).

    fit_adapter(model, tokens, valid, FitConfig(...))   # model: built with an adapter DMSConfig, base frozen
    offset, ratio = calibrate_offset(model, heldout_tokens, heldout_valid, target_cache_ratio=4.0)

Everything is a pure function of arrays except the loop, which is deterministic in its seed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dms_jax import dms
from dms_jax.data.batches import batch_indices
from dms_jax.model import CausalLM, attention_probs, causal_bias, weighted_values
from dms_jax.train.step import trainable_filter

__all__ = ["FitConfig", "future_read_weight", "teacher_reads", "evict_labels", "fit_loss", "fit_adapter",
           "adapter_cache_ratio", "calibrate_offset", "save_fitted"]


@dataclasses.dataclass(frozen=True)
class FitConfig:
    steps: int = 200  # batches (one teacher forward each)
    batch_size: int = 2
    inner_steps: int = 4  # Adam steps on each batch's labels (the teacher forward costs far more than they do)
    evict_fraction: float = 0.85  # labelled "evict": this lowest fraction of the batch's read weights
    lr: float = 3e-4
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "inner_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.evict_fraction < 1.0:
            raise ValueError(f"evict_fraction must be in (0, 1), got {self.evict_fraction!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def future_read_weight(probs, positions, valid, window: int):
    """(read [B, Hkv, S], labelled [B, S]) from attention weights ``probs`` [B, Hkv, G, T, S] (queries = keys).

    ``read[b, h, j]``: the largest weight any head of group ``h`` gives key ``j`` from a valid query ``i`` that
    would no longer see ``j`` if it were marked (``dms.visible_if_marked`` false). ``labelled[b, j]``: ``j`` is
    a real token with a decision of its own (``dms.has_decision``) and at least one such query exists.
    """
    after_window = (positions[:, None, :] <= positions[:, :, None]) & ~dms.visible_if_marked(
        positions[:, :, None], positions[:, None, :], window) & valid[:, :, None]  # [B, T(query), S(key)]
    read = jnp.max(jnp.where(after_window[:, None, None], probs, 0.0), axis=(2, 3))
    labelled = dms.has_decision(valid) & jnp.any(after_window, axis=1)
    return read, labelled


def teacher_reads(model: CausalLM, tokens, valid, window: int):
    """One forward of the original model (no eviction): (residuals [L, B, T, hidden], the adapter's inputs;
    read [L, B, Hkv, T]; labelled [B, T]) -- see :func:`future_read_weight`."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bias = causal_bias(positions, positions, valid)
    x = model.embed_tokens(tokens)
    residuals, reads = [], []
    labelled = None
    for layer in model.layers:
        def attention(p):
            nonlocal labelled
            probs = attention_probs(p.q, p.k, bias)
            read, labelled = future_read_weight(probs, positions, valid, window)
            reads.append(read)
            return weighted_values(probs, p.v, p.q.dtype), None

        residuals.append(x)
        x, _ = layer(x, positions, attention, False)
    return jnp.stack(residuals), jnp.stack(reads), labelled


def evict_labels(read, labelled, evict_fraction: float):
    """(labels [L, B, Hkv, T] float 0/1, mask [L, B, Hkv, T] bool): 1 = evict where ``read`` lies below the
    ``evict_fraction`` quantile of all labelled reads of the batch (every layer and head together)."""
    mask = jnp.broadcast_to(labelled[None, :, None, :], read.shape)
    # The quantile over labelled entries only: the others go to +inf and sort above every real read.
    flat = jnp.where(mask, read, jnp.inf).reshape(-1)
    count = jnp.sum(mask)
    k = jnp.clip(jnp.floor(evict_fraction * count).astype(jnp.int32), 0, flat.size - 1)
    threshold = jnp.sort(flat)[k]
    return (read < threshold).astype(jnp.float32), mask


def _owner_adapter_logits(model: CausalLM, residuals, valid):
    """The adapter's decision logits [L, B, Hkv, T] on ``residuals`` [L, B, T, hidden], moved to their owners."""
    return jnp.stack([dms.owner_logits(layer.self_attn.adapter_logits(x), valid)
                      for layer, x in zip(model.layers, residuals)])


def fit_loss(model: CausalLM, residuals, valid, labels, mask):
    """(mean binary cross-entropy of the adapter's owner-shifted logits against ``labels`` over ``mask``, the
    logits [L, B, Hkv, T])."""
    logits = _owner_adapter_logits(model, residuals, valid)
    per_entry = optax.sigmoid_binary_cross_entropy(logits, labels)
    m = mask.astype(jnp.float32)
    return jnp.sum(per_entry * m) / jnp.maximum(jnp.sum(m), 1.0), logits


def _check_model(model: CausalLM) -> None:
    if model.dms_cfg is None or model.dms_cfg.variant != "adapter":
        raise ValueError("model: fitting the decision adapter needs a model built with DMSConfig(variant='adapter')")


def fit_adapter(model: CausalLM, tokens: np.ndarray, valid: np.ndarray, cfg: FitConfig,
                on_step: Callable[[int, dict], None] | None = None, start_step: int = 0,
                labels_fn: Callable | None = None) -> CausalLM:
    """Fits the adapter of ``model`` in place (base frozen) on rows ``tokens`` / ``valid`` [N, T] and returns it.

    Batches are ``dms_jax.data.batches.batch_indices`` of ``cfg.seed`` (a pure function of the step);
    ``on_step(step, metrics)`` is called after each batch (metrics: loss, label_evict (the labelled fraction,
    ~evict_fraction), predicted_evict, agreement, keep_recall, seconds). ``start_step`` continues a fit whose
    adapter ``model`` already holds (fresh Adam moments). ``labels_fn(read, labelled, valid) -> (labels, mask)``
    replaces the read-weight labels (:func:`evict_labels`), e.g. with ``dms_jax.train.heads.head_labels``.
    """
    _check_model(model)
    n = tokens.shape[0]
    if n < cfg.batch_size:
        raise ValueError(f"tokens: {n} rows, fewer than batch_size={cfg.batch_size}")
    window = model.dms_cfg.window
    adapter = trainable_filter("adapter")
    optimizer = nnx.Optimizer(model, optax.adam(cfg.lr), wrt=adapter)

    @nnx.jit
    def labels_of(model, tok, val):
        residuals, read, labelled = teacher_reads(model, tok, val, window)
        if labels_fn is None:
            labels, mask = evict_labels(read, labelled, cfg.evict_fraction)
        else:
            labels, mask = labels_fn(read, labelled, val)
        return jax.lax.stop_gradient(residuals), labels, mask

    @nnx.jit
    def update(model, optimizer, residuals, val, labels, mask):
        grad_fn = nnx.value_and_grad(fit_loss, argnums=nnx.DiffState(0, adapter), has_aux=True)
        (loss, logits), grads = grad_fn(model, residuals, val, labels, mask)
        optimizer.update(model, grads)
        m = mask.astype(jnp.float32)
        evict = (logits > 0).astype(jnp.float32)
        total = jnp.maximum(jnp.sum(m), 1.0)
        return {"loss": loss, "label_evict": jnp.sum(labels * m) / total,
                "predicted_evict": jnp.sum(evict * m) / total,
                "agreement": jnp.sum((evict == labels) * m) / total,
                # Of the entries the teacher still reads after the window, the share the adapter keeps.
                "keep_recall": jnp.sum((1 - evict) * (1 - labels) * m) / jnp.maximum(jnp.sum((1 - labels) * m), 1.0)}

    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        idx = batch_indices(n, step, cfg.batch_size, cfg.seed)
        tok, val = jnp.asarray(tokens[idx]), jnp.asarray(valid[idx])
        residuals, labels, mask = labels_of(model, tok, val)
        for _ in range(cfg.inner_steps):
            metrics = update(model, optimizer, residuals, val, labels, mask)
        metrics = {k: float(v) for k, v in metrics.items()}  # the last inner step's
        metrics["seconds"] = time.perf_counter() - t0
        if on_step is not None:
            on_step(step + 1, metrics)
    return model


def adapter_cache_ratio(model: CausalLM, tokens, valid, offset: float) -> float:
    """Whole-cache compression (dense entries / live entries, summed over rows) at the end of each row when the
    adapter's logits are thresholded at ``offset`` instead of the model's ``alpha_offset``, on the original
    model's residual stream."""
    _check_model(model)
    raw = _raw_logits(model, jnp.asarray(tokens), jnp.asarray(valid))
    return _ratio_at(raw, jnp.asarray(valid), model.dms_cfg.window, offset)


@nnx.jit
def _raw_logits(model, tokens, valid):
    """Owner-shifted adapter logits [L, B, Hkv, T] plus the model's offset (so thresholds at 0 + offset), on the
    original residual stream; "keep" where there is no decision."""
    residuals, _, _ = teacher_reads(model, tokens, valid, model.dms_cfg.window)
    return _owner_adapter_logits(model, residuals, valid) + model.dms_cfg.alpha_offset


def _ratio_at(raw, valid, window: int, offset: float) -> float:
    stats = dms.kv_stats(dms.hard_decisions(raw - offset), valid, window)
    return float(jnp.sum(stats["n_tokens"]) / jnp.maximum(jnp.sum(stats["n_live"]), 1.0))


def calibrate_offset(model: CausalLM, tokens, valid, target_cache_ratio: float,
                     tol: float = 0.01) -> tuple[float, float]:
    """(offset, ratio): the ``alpha_offset`` at which the adapter's hard decisions compress ``tokens`` [B, T]
    (whole cache, at the end of each row) by ``target_cache_ratio`` (within ``tol``, relative, where the logits
    allow), found by bisection (the ratio falls as the offset rises), and the ratio it gives.

    ValueError if the target is out of reach: at most T / (window + 1) for rows of T tokens (the window is
    always live), and the fitted logits may not spread that far.
    """
    _check_model(model)
    if not target_cache_ratio >= 1.0:
        raise ValueError(f"target_cache_ratio must be >= 1, got {target_cache_ratio!r}")
    valid = jnp.asarray(valid)
    raw = _raw_logits(model, jnp.asarray(tokens), valid)
    window = model.dms_cfg.window
    decided = raw[jnp.broadcast_to(dms.has_decision(valid)[None, :, None, :], raw.shape)]
    lo, hi = float(jnp.min(decided)) - 1.0, float(jnp.max(decided)) + 1.0  # evict all / evict none
    best = _ratio_at(raw, valid, window, lo)
    if best < target_cache_ratio:
        raise ValueError(f"target_cache_ratio: {target_cache_ratio} is out of reach on these rows; evicting every "
                         f"decided token outside the window gives {best:.2f}")
    closest = (abs(best - target_cache_ratio), lo, best)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        ratio = _ratio_at(raw, valid, window, mid)
        closest = min(closest, (abs(ratio - target_cache_ratio), mid, ratio))
        if closest[0] <= tol * target_cache_ratio:
            break
        lo, hi = (mid, hi) if ratio > target_cache_ratio else (lo, mid)
    # Equal logits (repeated tokens) make the ratio jump: the closest offset met, not always within tol.
    return closest[1], closest[2]


def save_fitted(model: CausalLM, path: Path, provenance: dict, offset: float | None = None) -> Path:
    """The adapter, written atomically; thresholded at ``offset`` instead of ``alpha_offset`` when given.

    A positive ``offset`` is folded into the weights: ``s * Wn > offset`` iff ``s * (c W) n > alpha_offset`` with
    ``c = alpha_offset / offset``, so the file keeps the model's DMSConfig and a distillation can start from it
    (``--init-adapter`` checks the config)."""
    from dms_jax import adapter, weights

    cfg = model.dms_cfg
    tensors = weights.to_hf_state_dict(model, only=adapter.ADAPTER_PARAM)
    if offset is not None and offset > 0:
        c = cfg.alpha_offset / offset
        tensors = {k: v * c if k.endswith(f"{adapter.ADAPTER_PARAM}.weight") else v for k, v in tensors.items()}
    elif offset is not None:
        cfg = dataclasses.replace(cfg, alpha_offset=float(offset))
    tmp = path.with_name(path.name + ".tmp")
    adapter.write_adapter_file(tmp, tensors, cfg, adapter.model_config_dict(model.cfg),
                               adapter.base_fingerprint(model), provenance)
    tmp.replace(path)
    return path
