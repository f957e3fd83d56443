"""Dynamic Memory Compression (DMC): merge-into-the-last-slot KV compression, as pure jit-compatible functions.

DMC (Nawrot et al. 2024, arXiv 2403.09636) is DMS's predecessor.  Instead of evicting a token, every
(layer, KV head) decides per token whether to *append* its key/value as a new cache slot or to *merge* it
into the head's last slot by a weighted running mean.  Facts below come from the public reference code,
NVIDIA/Megatron-LM ``megatron/contrib/dmc/`` (``dmc.py``: ``DynamicPooler``, ``_poolsum``,
``forward_decay_decision_neuron``; ``triton.py``: ``update_inference_params_faster_kernel``), and from the
paper's method section (inference update and training relaxation).

Layout conventions are those of :mod:`dms_jax.dms`: activations ``[B, T, H, D]``, per-token quantities
``[B, Hkv, T]``, query head ``h`` belongs to KV group ``h // G``.

Per token ``t`` of a KV head (``k_t``, ``q_t`` read after the q/k norm and *before* RoPE):

* merge logit ``k_t[D-1] - c`` (``c = 5``; no scale in the reference, optional ``s * k_t[D-1] - c`` here), so ``alpha_t = 1`` means "merge token t into the
  previous slot".  The decision belongs to token ``t`` itself -- there is no one-token shift as in DMS --
  and the first token of a sequence always appends;
* importance ``omega_t = sigmoid(mean_{query heads of the group} q_t[D-1] + c) + floor`` (``~1`` at start);
* element ``D-1`` of every query and key head is zeroed before RoPE and again after RoPE (rotate-half RoPE
  writes ``x[D/2-1] * sin`` into it), so the two borrowed neurons never act as attention features.

Accumulation (reference ``_poolsum``), over pre-RoPE keys and values, limited to the last ``W`` tokens
(``W = 12`` by default, for training cost; the inference kernel drops the oldest token the same way)::

    state_t = sum_{m=0}^{W-1} c_{t,m} x_{t-m} / sum_{m=0}^{W-1} c_{t,m},
    c_{t,m} = omega_{t-m} * prod_{i=t-m+1}^{t} alpha_i

which, while a segment is shorter than ``W``, is the recurrence ``acc_t = alpha_t acc_{t-1} + omega_t x_t``,
``z_t = alpha_t z_{t-1} + omega_t``, ``state_t = acc_t / z_t`` -- i.e. with hard decisions
``state_t = (z_{t-1} state_{t-1} + omega_t x_t) / (z_{t-1} + omega_t)`` when merging, ``x_t`` when appending.
The state's key is then rotated with RoPE at token ``t``'s position (the slot's position is that of the
newest token merged into it).

Training keeps every intermediate state ``state_j`` in the sequence and hides those that inference would
overwrite: query ``i`` sees key ``j < i`` with additive bias ``log(1 - alpha_{j+1})`` (state ``j`` survives iff
token ``j+1`` does not merge into it) and its own state ``j = i`` with bias 0.  With hard decisions this is
exactly the set of slots the token-by-token cache holds when token ``i`` attends.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dms_jax import dms

Array = jax.Array

# Added to every importance weight so that a weighted mean never divides by zero (sigmoid underflows to 0
# for arguments below about -100 in float32).  2**-7 is bfloat16's epsilon, what the reference adds both in
# its bfloat16 training and in its inference kernel.
IMPORTANCE_FLOOR = 2.0 ** -7

# The reference's stage one decays the borrowed neurons to zero over this fraction of its steps and trains
# the remaining steps with them at zero.
DECAY_FRACTION = 0.8


# ---------------------------------------------------------------------------------------------------
# The borrowed neurons
# ---------------------------------------------------------------------------------------------------


def merge_logits(k: Array, offset: float, scale: float = 1.0) -> Array:
    """Merge logits ``[B, T, Hkv, D] -> [B, Hkv, T]``: ``scale * k[..., D-1] - offset``, in float32.

    ``k`` is taken after the k-norm and before RoPE.  ``offset`` (5) puts every logit near -5 once the
    neuron has been zeroed, so a retrofit starts from "append everything".  ``scale`` is 1 in the reference;
    under Adam a scale s acts like an s times larger learning rate for the borrowed row alone (see
    ``DMCConfig.logit_scale``).
    """
    return jnp.swapaxes(scale * k[..., -1].astype(jnp.float32) - offset, 1, 2)


def importance_weights(q: Array, num_kv_heads: int, offset: float, scale: float = 1.0) -> Array:
    """Importance ``omega`` ``[B, T, Hq, D] -> [B, Hkv, T]``: ``sigmoid(scale * mean_g q[..., D-1] + offset) + floor``.

    The mean runs over the query heads of each KV group (as the reference's training code does), because the
    merged slot is shared by the whole group.  (The reference's inference kernel reads the query head whose index
    equals the KV head's, which agrees with its training only without GQA; we use the training form in both.)
    ``q`` is taken after the q-norm and before RoPE.
    """
    b, t, hq, _ = q.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide the number of query heads ({hq}), got {num_kv_heads}")
    per_group = q[..., -1].astype(jnp.float32).reshape(b, t, num_kv_heads, hq // num_kv_heads).mean(-1)
    return jnp.swapaxes(jax.nn.sigmoid(scale * per_group + offset), 1, 2) + IMPORTANCE_FLOOR


def scale_borrowed_neurons(x: Array, scale: float | Array) -> Array:
    """Multiply element ``D-1`` of every head of ``x`` (``[B, T, H, D]``) by ``scale``.

    ``scale = 0`` is DMC's zeroing of the borrowed neuron (apply it before and after RoPE); a scale falling
    from 1 to 0 is the reference's first training stage, which lets the model stop relying on the neuron as
    an attention feature before it is repurposed (:func:`neuron_decay_scale`).
    """
    if isinstance(scale, (int, float)) and scale == 0:
        return x.at[..., -1].set(0)
    return x.at[..., -1].multiply(jnp.asarray(scale, x.dtype))


def neuron_decay_scale(step: int | Array, decay_steps: int) -> Array:
    """Stage-one multiplier of the borrowed neurons: ``max(0, 1 - step / (0.8 * decay_steps))`` (float32).

    It falls linearly from 1 at step 0 to 0 at 80% of the decay stage and stays 0 for the rest of it, as
    in the reference's ``forward_decay_decision_neuron``.  ``decay_steps = 0`` gives 0 (no decay stage).
    """
    if decay_steps <= 0:
        return jnp.float32(0.0)
    return jnp.maximum(0.0, 1.0 - jnp.asarray(step, jnp.float32) / (DECAY_FRACTION * decay_steps))


# ---------------------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------------------


def segment_starts(valid: Array) -> Array:
    """``[B, T]`` True where a token must append (cannot merge): the first position, a token whose
    predecessor is padding (left padding), and padding itself."""
    v = valid.astype(bool)
    prev = jnp.concatenate([jnp.zeros_like(v[:, :1]), v[:, :-1]], axis=1)
    return ~(v & prev)


def force_append(x: Array, starts: Array, append_value: float) -> Array:
    """Per-token ``x`` ``[B, Hkv, T]`` with ``append_value`` where ``starts`` ``[B, T]`` is True.

    ``append_value`` must mean "append": 0 for alpha / decisions, :data:`dms.KEEP_LOGIT` for logits.
    """
    return jnp.where(starts[:, None, :], jnp.asarray(append_value, x.dtype), x)


# ---------------------------------------------------------------------------------------------------
# Training-side parallel form
# ---------------------------------------------------------------------------------------------------


def _delay(x: Array, m: int, axis: int) -> Array:
    """``out[..., t, ...] = x[..., t - m, ...]`` along ``axis`` with zeros for ``t < m``."""
    if m == 0:
        return x
    size = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (m, 0)
    return jax.lax.slice_in_dim(jnp.pad(x, pad), 0, size, axis=axis)


def accumulate(x: Array, alpha: Array, importance: Array, accumulation_window: int) -> Array:
    """Every intermediate DMC state of a sequence: ``x`` ``[B, T, H, D]`` -> states ``[B, T, H, D]``.

    ``alpha`` ``[B, H, T]`` in ``[0, 1]`` (soft in training, 0/1 in hard mode; 0 where a segment starts),
    ``importance`` ``[B, H, T]`` > 0.  ``state_t = sum_m c_{t,m} x_{t-m} / sum_m c_{t,m}`` over the last
    ``accumulation_window`` (W, ``DMCConfig.accumulation_window``) tokens, ``c_{t,m} = importance_{t-m} *
    prod_{i=t-m+1}^{t} alpha_i`` (module docstring).  Computed in float32 by W shifted multiply-adds
    (``O(W * T * D)``, no ``T x T`` matrix); returned in ``x``'s dtype.  Feed it the keys *before* RoPE and the
    values.  W is validated where it is set (``DMCConfig``).
    """
    xf = x.astype(jnp.float32)
    a = jnp.swapaxes(alpha.astype(jnp.float32), 1, 2)[..., None]  # [B, T, H, 1]
    w = jnp.swapaxes(importance.astype(jnp.float32), 1, 2)[..., None]
    carry = jnp.ones_like(a)  # prod_{i=t-m+1}^{t} alpha_i, built up one factor per lag
    num = w * xf
    den = w
    for m in range(1, int(accumulation_window)):
        carry = carry * _delay(a, m - 1, axis=1)
        coeff = carry * _delay(w, m, axis=1)  # 0 before the sequence start (zero padding)
        num = num + coeff * _delay(xf, m, axis=1)
        den = den + coeff
    return (num / den).astype(x.dtype)


def attention_bias(
    log_keep: Array,
    q_pos: Array,
    k_pos: Array,
    k_valid: Array | None = None,
    dtype: Any = jnp.float32,
) -> Array:
    """Additive DMC attention bias ``[B, Hkv, Tq, Tk]`` (add to the scaled scores before softmax).

    For query position ``i`` and key (state) position ``j``:

    * ``j > i`` or key invalid: masked (finite :func:`dms.mask_value`);
    * ``j == i``: 0 (a query always sees its own, possibly partial, state -- the cache's last slot);
    * ``j < i``: ``log_keep[b, h, kj]``.

    ``log_keep`` ``[B, Hkv, Tk]`` is already shifted to the state it concerns with :func:`dms.shift_to_owner`
    (pad 0): ``log(1 - alpha_{j+1})`` (``dms.soft_log_keep`` of the noisy logits in training,
    ``dms.hard_log_keep`` of the decisions in hard mode).  Unlike DMS there is no window: a state that the
    next token merges into is gone for every later query.
    """
    neg = dms.mask_value(dtype)
    log_keep = jnp.maximum(log_keep.astype(dtype), neg)
    dist = q_pos[:, :, None] - k_pos[:, None, :]  # [B, Tq, Tk]
    visible = dist >= 0
    if k_valid is not None:
        visible = visible & k_valid[:, None, :].astype(bool)
    own = (dist == 0)[:, None]
    past = jnp.where(own, jnp.zeros((), dtype), log_keep[:, :, None, :])
    return jnp.where(visible[:, None], past, jnp.asarray(neg, dtype))


# ---------------------------------------------------------------------------------------------------
# Token-by-token cache (inference, hard decisions)
# ---------------------------------------------------------------------------------------------------


def window_update(win_k: Array, win_v: Array, win_w: Array, seg_len: Array, n_seen: Array, k: Array,
                  v: Array, importance: Array, merge: Array, valid: Array):
    """One token's update of the accumulation window; returns ``(win_k, win_v, win_w, seg_len, state_k,
    state_v)``.

    Per (sequence, KV head) the window keeps the last ``W`` tokens' pre-RoPE keys and values and their
    importance in a ring indexed by ``n_seen % W`` (``n_seen`` ``[B]``: valid tokens seen before this one),
    and ``seg_len`` ``[B, H]``: how many of the newest ring entries belong to the current slot (at most W).
    Shapes: ``win_k, win_v`` ``[B, H, W, D]``, ``win_w`` ``[B, H, W]``, ``k, v`` ``[B, H, D]``,
    ``importance`` ``[B, H]``, ``merge`` ``[B, H]`` bool (already False where a segment must start),
    ``valid`` ``[B]`` (an invalid token changes nothing).  ``state_*`` ``[B, H, D]`` is the importance-weighted
    mean of the current slot's entries -- the new value of the slot, before RoPE.  Summing the ring
    entries directly (instead of the reference kernel's running sum minus the oldest entry) keeps no
    round-off from earlier tokens.
    """
    window = win_k.shape[2]
    idx = n_seen % window  # [B]
    onehot = jax.nn.one_hot(idx, window, dtype=bool)[:, None, :]  # [B, 1, W]
    new_k = jnp.where(onehot[..., None], k[:, :, None, :].astype(win_k.dtype), win_k)
    new_v = jnp.where(onehot[..., None], v[:, :, None, :].astype(win_v.dtype), win_v)
    new_w = jnp.where(onehot, importance[:, :, None].astype(win_w.dtype), win_w)
    new_len = jnp.where(merge, jnp.minimum(seg_len + 1, window), 1)
    age = (idx[:, None] - jnp.arange(window)[None, :]) % window  # [B, W]: 0 = the entry just written
    member = age[:, None, :] < new_len[:, :, None]  # [B, H, W]
    weight = jnp.where(member, new_w, 0.0).astype(jnp.float32)
    state_k = jnp.einsum("bhw,bhwd->bhd", weight, new_k.astype(jnp.float32)) / weight.sum(-1, keepdims=True)
    state_v = jnp.einsum("bhw,bhwd->bhd", weight, new_v.astype(jnp.float32)) / weight.sum(-1, keepdims=True)
    keep = valid[:, None, None, None]
    return (jnp.where(keep, new_k, win_k), jnp.where(keep, new_v, win_v), jnp.where(keep[..., 0], new_w, win_w),
            jnp.where(valid[:, None], new_len, seg_len), state_k.astype(k.dtype), state_v.astype(v.dtype))


def slot_write(slots_k: Array, slots_v: Array, n_slots: Array, state_k: Array, state_v: Array, merge: Array,
               valid: Array):
    """Write a slot value: overwrite the last slot when merging, else append; returns ``(slots_k, slots_v,
    n_slots)``.

    ``slots_*`` ``[B, H, S, D]`` (keys already rotated), ``n_slots`` ``[B, H]``, ``state_*`` ``[B, H, D]``,
    ``merge`` ``[B, H]`` bool, ``valid`` ``[B]``.  The caller sizes ``S`` for the worst case (every token
    appends); a write past ``S`` would be clamped by XLA onto the last slot.
    """
    write = jnp.broadcast_to(valid[:, None], merge.shape)
    target = jnp.where(merge, n_slots - 1, n_slots)  # [B, H]
    onehot = (jnp.arange(slots_k.shape[2])[None, None, :] == target[..., None]) & write[..., None]
    slots_k = jnp.where(onehot[..., None], state_k[:, :, None, :].astype(slots_k.dtype), slots_k)
    slots_v = jnp.where(onehot[..., None], state_v[:, :, None, :].astype(slots_v.dtype), slots_v)
    n_slots = jnp.where(write & ~merge, n_slots + 1, n_slots)
    return slots_k, slots_v, n_slots


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def kv_stats(decisions: Array, valid: Array | None) -> dict[str, Array]:
    """KV-cache statistics per sequence ``[B]`` from hard merge decisions ``[L, B, Hkv, T]`` (or ``[B, Hkv, T]``).

    ``decisions`` are 0/1 per token (1 = merged into the previous slot, already 0 where a segment starts).
    The cache of a head holds one slot per appended valid token.  Keys match :func:`dms.kv_stats` so the
    evaluation code can sum either; DMC has no delay window, so every token counts as "old":

    * ``n_tokens``: ``L * Hkv * n_b``; ``n_live``: slots at the end (= peak, slots never disappear);
    * ``n_old = n_tokens``, ``n_old_kept = n_live``, ``cr_outside_window = cache_ratio = n_tokens / n_live``
      (built by :func:`dms.kv_stats_from_counts`; a sequence of tokens but no slot, which hard merge decisions
      never give since a first token appends, would have ``cr_outside_window`` +inf and ``cache_ratio`` 1);
    * ``token_reads``: over all valid queries, the slots they attend to (the slots appended up to and
      including that query); ``token_reads_dense`` the same for a dense cache.
    """
    d = decisions if decisions.ndim == 4 else decisions[None]
    num_layers, batch, heads, t = d.shape
    if valid is None:
        valid = jnp.ones((batch, t), bool)
    v = valid.astype(bool)[None, :, None, :]
    appended = (v & ~(d > 0.5)).astype(jnp.float32)
    n = jnp.sum(valid.astype(jnp.float32), axis=-1)
    scale = float(num_layers * heads)
    n_tokens = n * scale
    n_live = jnp.sum(appended, axis=(0, 2, 3))
    slots_seen = jnp.cumsum(appended, axis=-1)  # slots in the cache when each query attends
    token_reads = jnp.sum(jnp.where(v, slots_seen, 0.0), axis=(0, 2, 3))
    return dms.kv_stats_from_counts(n_tokens, n_live, n_tokens, n_live, token_reads, scale * n * (n + 1.0) / 2.0)
