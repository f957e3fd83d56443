"""Dynamic Memory Sparsification (DMS): the per-token eviction math, as pure jit-compatible functions.

Everything here is a function of `jnp` arrays with no Flax state, so the model, the trainer, the prefill
path and the tests all share one definition of the algorithm (DESIGN.md section 1).

Layout conventions (project-wide):

* activations are ``[B, T, H, D]``; q has ``Hq`` heads, k/v have ``Hkv`` heads, ``G = Hq // Hkv`` and query
  head ``h`` belongs to KV group ``h // G`` (the first query head of group ``g`` is ``h = g * G``);
* per-token DMS quantities (logits, alpha, decisions, log-keep) are ``[B, Hkv, T]``; stacked over layers
  they are ``[L, B, Hkv, T]``.

Timing of a decision ("one-token shift"): the logit computed *at* position ``t`` is the eviction decision
*for* token ``t - 1``.  After :func:`shift_to_owner`, index ``j`` of a per-token array refers to the token
whose K/V may be evicted.  A token ``j`` whose (shifted) decision is 1 stays visible to queries
``i <= j + window`` and is gone for every query ``i >= j + window + 1``; a token with decision 0 is kept
forever.  The training mask (soft), the prefill mask (hard) and the delayed-eviction cache all implement
exactly this rule; :func:`visible_if_marked` is the single place that states it and
:func:`dms_attention_bias` the single place that builds the bias from it.

Facts confirmed in the public PyTorch reference (NVIDIA Model-Optimizer, ``experimental/dms``):

* neuron variant: logit = ``scale * q[:, g*G, t, D-1] - offset`` read after q-norm and before RoPE; the
  same element ``D-1`` of the first query head of each group is set to 0 before RoPE *and again* after
  RoPE (see :func:`zero_reused_neuron`);
* training noise: two Gumbel(0, 1) samples ``a - b`` (logistic noise) of shape ``[L, B, Hkv, T]``, added to
  the logits *before* dividing by tau: ``z = (logit + noise) / tau``, ``alpha = sigmoid(z)``;
* straight-through decision ``1[alpha > 0.5]`` with the gradient of alpha;
* soft mask ``log(1 - alpha) = log_sigmoid(-z)`` for keys more than ``window`` positions behind the query;
* the shift pads the last position with "do not evict" (prefill pads the shifted decisions with 0);
* compression loss: per layer the mean of the straight-through decisions over heads and (non-padded)
  positions, averaged over layers -> one fraction per sequence; ``mean_batch(relu(target - frac))``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dms_jax.config import check_int

Array = jax.Array

# A large *finite* negative used instead of -inf in additive attention biases.  Why finite: a row whose
# keys are all masked (a padded query, or a query whose keys are all invalid) would otherwise be
# softmax(-inf, ..., -inf) = 0/0 = NaN, and NaN poisons gradients even when the row is later discarded.
# With -1e30 such a row becomes a harmless uniform distribution (callers zero padded outputs anyway).
# -1e30 is representable in float32 and bfloat16 (same exponent range) and a few of them can be added
# without overflowing to -inf; exp(-1e30 - max) underflows to exactly 0 whenever one key is visible.
# float16 cannot hold it (max 65504), so :func:`mask_value` picks a smaller magnitude there.
MASK_VALUE = -1e30

# The logit that means "never evict".  The reference uses -1000 for the teacher / eviction-off mode;
# sigmoid(-1000 / tau) is exactly 0 and log_sigmoid(+1000 / tau) is exactly 0 in float32.
KEEP_LOGIT = -1000.0

ALPHA_PER = ("head", "layer")


def mask_value(dtype: Any = jnp.float32) -> float:
    """The finite "minus infinity" used for masking in ``dtype`` (see :data:`MASK_VALUE` for why finite).

    -1e30 for float32/bfloat16/float64; a quarter of the most negative value for narrower float types
    (float16), so that adding a few masks together still does not overflow to -inf.
    """
    finfo = jnp.finfo(dtype)
    return float(max(MASK_VALUE, float(finfo.min) / 4))


# ---------------------------------------------------------------------------------------------------
# The window rule
# ---------------------------------------------------------------------------------------------------


def visible_if_marked(query_pos: Any, key_pos: Any, window: Any) -> Any:
    """Whether a query at ``query_pos`` still sees a key at ``key_pos <= query_pos`` marked for eviction:
    ``query_pos - key_pos <= window``.  A key that is not marked is seen by every later query.

    This is the one statement of DMS's delay: a marked token ``j`` stays visible to queries ``i <= j + window``
    and is gone from ``i = j + window + 1`` on.  The training bias, the dense and paged caches, the engine's
    prefill masks, the flash kernels and the cache statistics all decide visibility with it.  It is the
    reference's *training* rule; its inference cache drops a marked token one step earlier, which we do not follow
    (docs/algorithm.md, section 5, "One deviation from the reference").  Works on Python numbers and on (traced)
    arrays, which broadcast.
    """
    return query_pos - key_pos <= window


def ring_size(window: Any) -> Any:
    """How many consecutive queries see a marked token -- its own position and the ``window`` after it --
    hence how many recent tokens a cache must keep with their decisions pending: ``window + 1``
    (:func:`visible_if_marked` holds for ``query_pos - key_pos`` in ``0 .. window``)."""
    return window + 1


# ---------------------------------------------------------------------------------------------------
# Decision logits
# ---------------------------------------------------------------------------------------------------


def _check_gqa(num_q_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_kv_heads must be >= 1 and divide the number of query heads ({num_q_heads}), got {num_kv_heads}"
        )
    return num_q_heads // num_kv_heads


def neuron_decision_logits(q: Array, num_kv_heads: int, scale: float, offset: float) -> Array:
    """Decision logits of the neuron-reuse variant: ``[B, T, Hq, D] -> [B, Hkv, T]``.

    ``logit[b, g, t] = scale * q[b, t, g*G, D-1] - offset``.  ``q`` must be taken after the q-norm and
    *before* RoPE (position-independent).  Why this neuron: DMS adds no parameters; it borrows one query
    element per KV group and trains it to predict eviction.  ``scale`` (100) makes the small q-norm'd
    value able to reach large logits; ``offset`` (5) puts every logit near -5 at step 0, so nothing is
    evicted before training starts.  Gradients flow into ``q`` through this read.
    """
    g = _check_gqa(q.shape[2], num_kv_heads)
    x = q[:, :, ::g, -1]  # [B, T, Hkv]: last element of the first query head of each group
    return jnp.swapaxes(x * scale - offset, 1, 2)


def zero_reused_neuron(q: Array, num_kv_heads: int) -> Array:
    """Set element ``D-1`` of the first query head of every KV group to 0 (q is ``[B, T, Hq, D]``).

    The model calls this twice, as the reference does, and the element is the same both times:

    * before RoPE, so the decision neuron does not leak into attention: rotate-half RoPE mixes element
      ``D-1`` into element ``D/2-1`` (``out[D/2-1] = x[D/2-1] cos - x[D-1] sin``);
    * after RoPE, element ``D-1`` again, because RoPE has written ``x[D/2-1] * sin`` into it.

    After both, that head's pair ``(D/2-1, D-1)`` contributes only ``x[D/2-1] cos * k'[D/2-1]`` to the
    score.  Element ``D/2-1`` itself is *not* zeroed, k is untouched and the head dim is not reduced.
    The write is functional (``.at[].set``) so the gradient of the zeroed element is cut only here; the
    logit read by :func:`neuron_decision_logits` before the first call keeps its gradient.
    """
    g = _check_gqa(q.shape[2], num_kv_heads)
    return q.at[:, :, ::g, -1].set(0)


def adapter_decision_logits(proj_out: Array, scale: float, offset: float) -> Array:
    """Decision logits of the adapter variant: ``[B, T, Hkv] -> [B, Hkv, T]``.

    ``proj_out`` is ``Linear(RMSNorm(x))`` of the residual stream (weight zero-initialised, so every
    logit starts at exactly ``-offset`` and nothing is evicted at step 0).
    """
    return jnp.swapaxes(proj_out * scale - offset, -1, -2)


def apply_alpha_per(x: Array, alpha_per: str) -> Array:
    """Share decisions across heads or not; the head axis is ``-2`` (``[..., Hkv, T]``).

    ``"head"``: identity, every KV head decides for itself.  ``"layer"``: every head copies head 0, so a
    layer evicts the same tokens in all heads (cheaper bookkeeping; the paper's ablation).
    Apply it to the logits before noise, or to any per-token quantity; the result has the input's shape.
    """
    if alpha_per == "head":
        return x
    if alpha_per == "layer":
        return jnp.broadcast_to(x[..., :1, :], x.shape)
    raise ValueError(f"alpha_per must be one of {ALPHA_PER}, got {alpha_per!r}")


# ---------------------------------------------------------------------------------------------------
# The one-token shift
# ---------------------------------------------------------------------------------------------------


def shift_to_owner(x: Array, pad_value: float | int | bool, next_value: Array | None = None) -> Array:
    """Move per-token quantities from the producing position to the token they decide about.

    ``out[..., j] = x[..., j + 1]`` for ``j < T - 1``; the last position gets ``next_value[...]`` (the
    first element of the next chunk, for chunked prefill) or, if that is unknown yet, ``pad_value``.

    Why a pad exists: the decision for token ``T-1`` is only computed when token ``T`` arrives.  Until
    then the token must *not* be evicted, so the pad must mean "keep":

    * hard decisions / straight-through decisions: ``0``;
    * alpha (eviction probability): ``0.0``;
    * log-keep (``log(1 - alpha)``): ``0.0``;
    * logits (raw or noisy ``z``): :data:`KEEP_LOGIT` (a large negative logit).

    (The reference pads its noisy training logits with 0.0, i.e. alpha = 0.5; that value is never read,
    because the last token is always inside every query's window, but "keep" is the meaning its prefill
    uses when it pads shifted decisions with 0, so we use "keep" everywhere.)
    ``next_value`` has ``x``'s shape without the last axis.
    """
    if next_value is None:
        last = jnp.full(x.shape[:-1] + (1,), pad_value, dtype=x.dtype)
    else:
        last = jnp.asarray(next_value, dtype=x.dtype)[..., None]
    return jnp.concatenate([x[..., 1:], last], axis=-1)


def has_decision(valid: Array) -> Array:
    """``[B, T]``: token ``j`` has a decision of its own iff it and its producer ``j + 1`` are both real.

    The last real token of a sequence has none yet (its logit comes with the next token), and with right
    padding the producer of the last real token is a pad, whose logit must not be lent to it.
    """
    return valid & shift_to_owner(valid, False)


def owner_logits(logits: Array, valid: Array | None) -> Array:
    """Decision logits ``[B, Hkv, T]`` moved to the token they decide about (:func:`shift_to_owner`), with
    :data:`KEEP_LOGIT` wherever the token has no decision of its own (:func:`has_decision`)."""
    shifted = shift_to_owner(logits, KEEP_LOGIT)
    if valid is None:
        return shifted
    return jnp.where(has_decision(valid)[:, None, :], shifted, jnp.asarray(KEEP_LOGIT, shifted.dtype))


# ---------------------------------------------------------------------------------------------------
# Training (soft, noisy) and inference (hard) decisions
# ---------------------------------------------------------------------------------------------------


def logistic_noise(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Logistic(0, 1) noise as the difference of two independent Gumbel(0, 1) samples.

    Why Gumbel-minus-Gumbel: for a binary choice the Gumbel-max trick reduces to comparing
    ``logit + g1 - g2`` with 0, so ``sigmoid((logit + g1 - g2) / tau)`` is the binary Gumbel-softmax
    (concrete) relaxation.  The reference draws the noise once per training step with shape
    ``[L, B, Hkv, T]`` (one independent value per layer, sequence, KV head and token; bf16 there).
    """
    k1, k2 = jax.random.split(key)
    g1 = jax.random.gumbel(k1, shape, dtype=jnp.float32)
    g2 = jax.random.gumbel(k2, shape, dtype=jnp.float32)
    return (g1 - g2).astype(dtype)


def noisy_logits(logits: Array, noise: Array | None, tau: float) -> Array:
    """``z = (logits + noise) / tau``: the argument of the sigmoid in training (noise ``None`` = no noise).

    Feed ``z`` to :func:`soft_log_keep`; recomputing it next to :func:`gumbel_sigmoid` costs nothing under
    jit.  The noise is added before the temperature, as in the reference.
    """
    if noise is not None:
        logits = logits + noise.astype(logits.dtype)
    return logits / tau


def _straight_through(hard: Array, soft: Array) -> Array:
    # hard + (soft - sg(soft)): the bracket is exactly 0 in the forward pass, so the value is exactly the
    # 0/1 hard decision (hard - sg(soft) + soft can round to 0.99999994); the gradient is that of soft.
    return hard + (soft - jax.lax.stop_gradient(soft))


def gumbel_sigmoid(logits: Array, noise: Array | None, tau: float) -> tuple[Array, Array]:
    """Training-time decisions: returns ``(alpha, decision_st)``.

    ``alpha = sigmoid((logits + noise) / tau)`` is the soft eviction probability (it enters attention as
    ``log(1 - alpha)``); ``decision_st = 1[alpha > 0.5]`` with a straight-through gradient: its forward
    value is exactly 0 or 1 and its gradient is the gradient of alpha.  ``decision_st`` feeds the
    compression loss.
    """
    alpha = jax.nn.sigmoid(noisy_logits(logits, noise, tau))
    hard = (alpha > 0.5).astype(alpha.dtype)
    return alpha, _straight_through(hard, alpha)


def hard_decisions(logits: Array) -> Array:
    """Inference-time decisions, noise-free: ``logits > 0`` as 0/1 in the logits' dtype.

    Equal to ``1[sigmoid(logits / tau) > 0.5]`` for any tau > 0, i.e. the noise-free limit of training.
    """
    return (logits > 0).astype(logits.dtype)


def soft_log_keep(z: Array) -> Array:
    """``log(1 - alpha) = log(1 - sigmoid(z)) = log_sigmoid(-z)``, stable for any ``z``.

    Why not ``log(1 - alpha)``: with tau = 0.1 the noisy logits are large, ``alpha`` rounds to 1 and the log
    becomes -inf (and its gradient NaN); ``log_sigmoid(-z)`` stays ``~ -z`` with gradient ``~ -1``.
    """
    return jax.nn.log_sigmoid(-z)


def hard_log_keep(decisions: Array, dtype: Any = jnp.float32) -> Array:
    """Log-keep for hard decisions: 0 for kept tokens, the finite mask value for evicted ones."""
    return jnp.where(decisions > 0.5, mask_value(dtype), 0.0).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# Attention bias
# ---------------------------------------------------------------------------------------------------


def dms_attention_bias(
    log_keep: Array | None,
    q_pos: Array,
    k_pos: Array,
    window: int | Array,
    k_valid: Array | None = None,
    dtype: Any = jnp.float32,
    *,
    masked: float | None = None,
) -> Array:
    """Additive DMS attention bias ``[B, Hkv, Tq, Tk]``, to add to the (scaled) scores before softmax.

    For query position ``i = q_pos[b, qi]`` and key position ``j = k_pos[b, kj]`` (absolute positions,
    so chunked prefill with ``Tq < Tk`` and left/right padded batches work unchanged):

    * ``j > i`` or key invalid (``k_valid`` False):   ``masked``;
    * ``i - j <= window``:                            0 (every token in the window is visible);
    * ``i - j >  window``:                            ``log_keep[b, h, kj]``.

    ``log_keep`` ``[B, Hkv, Tk]`` is already shifted to its owner token (:func:`shift_to_owner`): in
    training ``soft_log_keep(z)``, in hard mode ``hard_log_keep(decisions)``; ``None`` means 0 (plain causal
    attention; the head axis is then 1).  The hard version equals the delayed-eviction cache
    (:func:`visible_if_marked`).  ``masked`` defaults to the finite :func:`mask_value` of ``dtype``, so that a
    row whose keys are all masked softmaxes to a uniform row (finite, no NaN; the caller zeroes the output of
    padded queries); ``log_keep`` is clamped from below at it so that -inf inputs cannot produce NaN either.
    The flash kernels' reference passes ``masked=-inf``: its rows that see nothing return zeros.
    GQA: broadcast the bias over the G query heads of a group.
    """
    neg = mask_value(dtype) if masked is None else masked
    dist_ok = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, Tq, Tk]: causal
    if k_valid is not None:
        dist_ok = dist_ok & k_valid[:, None, :].astype(bool)
    in_window = visible_if_marked(q_pos[:, :, None], k_pos[:, None, :], window)[:, None]  # [B, 1, Tq, Tk]
    if log_keep is None:
        far = jnp.zeros(in_window.shape, dtype)
    else:
        log_keep = jnp.maximum(log_keep.astype(dtype), neg)
        far = jnp.where(in_window, jnp.zeros((), dtype), log_keep[:, :, None, :])  # [B, Hkv, Tq, Tk]
    return jnp.where(dist_ok[:, None], far, jnp.asarray(neg, dtype))


# ---------------------------------------------------------------------------------------------------
# Compression loss and schedule
# ---------------------------------------------------------------------------------------------------


def _as_layers(decisions: Array) -> Array:
    if decisions.ndim == 3:
        return decisions[None]
    if decisions.ndim != 4:
        raise ValueError(f"decisions must be [B, Hkv, T] or [L, B, Hkv, T], got shape {decisions.shape}")
    return decisions


def eviction_fraction(decisions: Array, valid: Array | None = None, shifted: bool = True) -> Array:
    """Per-sequence fraction of evicted tokens ``[B]``: mean over layers, heads and the tokens that have a
    decision (:func:`has_decision`: real, and not the last real token, whose decision is still to come).

    ``decisions`` is ``[L, B, Hkv, T]`` (or ``[B, Hkv, T]`` for one layer), shifted to their owners, ``valid``
    ``[B, T]``.  The reference averages the *unshifted* decisions (one per computed logit, position t deciding
    about token t-1) with the padded positions removed, which counts the same decisions.  ``shifted=False``
    (DMC's merge decisions, one per token, none pending): every real token counts.  A sequence with no
    decided token gets 0.
    """
    d = _as_layers(decisions).astype(jnp.float32)
    num_layers, batch, heads, t = d.shape
    if valid is None:
        valid = jnp.ones((batch, t), bool)
    v = (has_decision(valid) if shifted else valid).astype(jnp.float32)
    total = jnp.einsum("lbht,bt->b", d, v)
    count = jnp.sum(v, axis=-1) * (num_layers * heads)
    return total / jnp.maximum(count, 1.0)


def compression_loss(decision_st: Array, valid: Array | None, target_fraction: float | Array,
                     shifted: bool = True) -> Array:
    """One-sided hinge ``mean_batch(max(0, target_fraction - frac_b))`` (scalar, float32).

    ``frac_b`` is :func:`eviction_fraction` of the straight-through decisions (``[L, B, Hkv, T]``), so the
    forward value counts hard evictions and the gradient flows through alpha.  Why one-sided: the loss
    only pushes towards *more* eviction while the model is below the target; once a sequence evicts at
    least the target fraction its gradient is exactly 0 (the distillation loss then pulls back).  Weight
    1, not a KL.
    """
    frac = eviction_fraction(decision_st, valid, shifted)
    return jnp.mean(jax.nn.relu(jnp.asarray(target_fraction, jnp.float32) - frac))


def target_compression_ratio(step: int | Array, cr_initial: float, cr_final: float, final_step: int) -> Array:
    """Linear compression-ratio schedule ``CR0 + (CRf - CR0) * clip(step / final_step, 0, 1)`` (float32).

    ``step`` may be a traced array.  The paper's rule of thumb is about 100 steps per unit of CR; the
    reference recipe goes 1 -> 16 in 510 steps.
    """
    check_int("final_step", final_step)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / final_step, 0.0, 1.0)
    return jnp.float32(cr_initial) + (jnp.float32(cr_final) - jnp.float32(cr_initial)) * progress


def target_eviction_fraction(cr: float | Array) -> Array:
    """Fraction of tokens to evict for compression ratio ``cr``: ``1 - 1/cr`` (CR 1 -> 0, CR 4 -> 0.75)."""
    return 1.0 - 1.0 / jnp.asarray(cr, jnp.float32)


# ---------------------------------------------------------------------------------------------------
# KV statistics from hard decisions
# ---------------------------------------------------------------------------------------------------


def kv_stats(decisions: Array, valid: Array | None, window: int) -> dict[str, Array]:
    """Exact KV-cache statistics per sequence from hard, owner-shifted decisions.

    ``decisions`` ``[L, B, Hkv, T]`` (or ``[B, Hkv, T]``) are 0/1 decisions already shifted to their owner
    token (:func:`shift_to_owner` with pad 0); ``valid`` ``[B, T]`` marks real tokens (any padding
    pattern).  Time is counted in valid tokens: for valid token ``j`` of sequence ``b`` let ``r_j`` be its
    rank among the valid tokens (0-based) and ``n_b`` the number of valid tokens.  At the query of rank
    ``r`` token ``j`` (``r_j <= r``) is *live* iff ``r - r_j <= window`` or ``d_j = 0`` -- exactly the
    visible set of :func:`dms_attention_bias` / the delayed-eviction cache.  All counts are summed over
    layers and KV heads, so one token in one head of one layer counts 1.  Returned arrays are ``[B]``:

    * ``n_tokens``: ``L * Hkv * n_b`` (what a dense cache holds at the end);
    * ``n_live``: live (token, head, layer) entries after the last token = tokens in the DMS cache at the end
      of the sequence; the live count never decreases, so this is also the *peak tokens in memory*;
    * ``n_old``: entries older than the window at the end (``n_b - 1 - r_j > window``);
    * ``n_old_kept``: those of ``n_old`` with ``d_j = 0`` (still live);
    * ``cr_outside_window = n_old / n_old_kept`` -- the compression achieved where DMS may act
      (1 when ``n_old = 0``; +inf when every old token was evicted);
    * ``cache_ratio = n_tokens / n_live`` -- dense cache size over DMS cache size at the end (1 if empty);
    * ``token_reads``: sum over all valid queries of the live entries they attend to (the paper's
      "KV-cache token reads", a runtime proxy), ``token_reads_dense``: the same for a dense cache
      (``L * Hkv * n_b (n_b + 1) / 2``).

    Counts are float32 (exact up to 2**24; ``token_reads`` of very long runs may round in the last digits).
    To aggregate over sequences divide sums of counts, not means of ratios.
    """
    d = _as_layers(decisions)
    num_layers, batch, heads, t = d.shape
    if valid is None:
        valid = jnp.ones((batch, t), bool)
    v = valid.astype(bool)
    vf = v.astype(jnp.float32)
    n = jnp.sum(vf, axis=-1)  # [B]
    rank = jnp.cumsum(vf, axis=-1) - 1.0  # [B, T], meaningful at valid positions
    later = n[:, None] - rank  # number of valid queries at or after token j (itself included)
    kept = (~(d > 0.5)) & v[None, :, None, :]
    # Old: a marked token there would be gone for the last query (rank n - 1).
    old = v[None, :, None, :] & ~visible_if_marked((n - 1.0)[:, None], rank, window)[None, :, None, :]

    def total(x):
        return jnp.sum(x.astype(jnp.float32), axis=(0, 2, 3))

    scale = float(num_layers * heads)
    n_tokens = n * scale
    n_old = total(jnp.broadcast_to(old, d.shape))
    n_old_kept = total(old & kept)
    n_live = n_tokens - (n_old - n_old_kept)
    # A marked token is read by at most ring_size(window) queries (its own and the window after it).
    reads_per_token = jnp.where(kept, later[None, :, None, :],
                                jnp.minimum(later, ring_size(window))[None, :, None, :])
    token_reads = jnp.sum(jnp.where(v[None, :, None, :], reads_per_token, 0.0), axis=(0, 2, 3))
    return kv_stats_from_counts(n_tokens, n_live, n_old, n_old_kept, token_reads, scale * n * (n + 1.0) / 2.0)


def kv_stats_from_counts(n_tokens: Array, n_live: Array, n_old: Array, n_old_kept: Array, token_reads: Array,
                         token_reads_dense: Array) -> dict[str, Array]:
    """The statistics dict of :func:`kv_stats` (and ``dmc.kv_stats``, which uses the same keys so that the
    evaluation code can sum either) from its counts ``[B]``, adding the two ratios:
    ``cr_outside_window = n_old / n_old_kept`` (1 when ``n_old = 0``, +inf when every old entry went) and
    ``cache_ratio = n_tokens / n_live`` (1 when nothing is live)."""
    cr_outside = jnp.where(
        n_old == 0, 1.0, jnp.where(n_old_kept == 0, jnp.inf, n_old / jnp.maximum(n_old_kept, 1.0))
    )
    cache_ratio = jnp.where(n_live > 0, n_tokens / jnp.maximum(n_live, 1.0), 1.0)
    return {
        "n_tokens": n_tokens,
        "n_live": n_live,
        "n_old": n_old,
        "n_old_kept": n_old_kept,
        "cr_outside_window": cr_outside,
        "cache_ratio": cache_ratio,
        "token_reads": token_reads,
        "token_reads_dense": token_reads_dense,
    }
