"""Baseline KV-cache policies on the same paged engine as DMS: TOVA, H2O, StreamingLLM and Quest.

Every baseline is an ``EvictionPolicy`` (policies.py) with a *budget*: tokens kept (TOVA, H2O, StreamingLLM) or read
(Quest) per (sequence, layer, KV head). Evicting policies really free memory: a decode token that finds its head
full overwrites the slot of the victim (as DMS overwrites the slot of a token leaving its window), so a head never
holds more than ``budget`` live slots, and the engine's metrics (KV token reads, peak live tokens, pages) see the
budget. With a compression ratio ``r`` (all tokens / kept tokens) over a context of ``T`` tokens the budget is
``T / r`` (``budget_for_ratio``).

* **TOVA** (Oren et al. 2024, "Transformers are Multi-State RNNs"): when a head is full, drop the token with the
  lowest attention weight of the current query. ``scope="layer"`` (default, the paper's): the weight is the mean
  of the softmax probabilities of *all* query heads of the layer, one kept set shared by its KV heads;
  ``scope="group"``: the mean over each KV head's query group. ``prefill="prompt"`` (default, the paper's): the
  prompt is encoded densely and reduced once after its last token; ``prefill="chunk"``: once per chunk (below). The victim for step ``t`` is the argmin of step ``t - 1``'s probabilities (query ``t - 1``
  over the head's ``budget`` slots, token ``t - 1`` included), chosen before token ``t`` is written into it: this
  is TOVA's "attend over the kept tokens plus the new one, then drop the argmin" with ``budget`` physical slots.
* **H2O** (Zhang et al. 2023, "Heavy-Hitter Oracle"): keep the ``recent`` most recent tokens plus the ``heavy``
  tokens with the largest *accumulated* attention (the sum over all past queries of the token's probability,
  group mean for GQA); the victim is the lowest accumulated score outside the recent window. ``heavy = budget //
  2`` and ``recent = budget - heavy`` by default (the paper's equal split).
* **StreamingLLM** (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): keep the first
  ``sinks`` tokens (4) plus the ``recent = budget - sinks`` most recent tokens; the oldest non-sink token goes.
  It is a *decision* policy on the DMS ring: token ``j >= sinks`` is marked for eviction and leaves after a delay
  of ``recent - 1`` positions (the ring's window), so its slot is reused by the incoming token. Keys are cached
  after RoPE with their original positions (the paper re-indexes positions inside the cache, which matters only
  beyond the pre-trained context length, which we never exceed).
* **Quest** (Tang et al. 2024, "Query-Aware Sparsity for Efficient Long-Context LLM Inference"): nothing is
  evicted (memory is dense); each page keeps the elementwise min and max of its keys, and each decode query reads
  only the ``budget // page_size`` pages with the highest upper bound of ``q . k`` (``sum_d max(q_d min_d, q_d
  max_d)``) plus the current (last) page, through the engine's ``page_mask`` hook. With GQA a KV head's page bound
  is the max over the group's query heads (a page is read when any of them may attend to it strongly), so every
  KV head reads exactly its budget. It saves reads, not memory: its ``kv_reads`` count the tokens of the selected
  pages plus one token-equivalent per live page for the min / max metadata (2 x D values, the size of one token's
  K and V). The first ``dense_layers`` layers (2, as in the paper) skip the selection and read every page.

Prefill (how a prompt longer than the budget is brought within it):

* TOVA with ``prefill="prompt"`` keeps every prompt token until the prompt ends, then ``finish_prefill`` keeps
  the ``budget`` with the highest weights under the last prompt query (the same set however the prompt is
  chunked). The rest of this item is TOVA with ``prefill="chunk"`` and H2O.
* TOVA and H2O process the prompt chunk by chunk (``Engine(prefill_chunk=...)``) and apply their rule at the end
  of every chunk: the chunk's queries attend to the head's cached slots plus the chunk (causally), an extra score
  pass computes those queries' probabilities, and of the cached tokens and the chunk's tokens the policy keeps
  ``budget`` -- TOVA by the probabilities of the chunk's *last* query (its rule applied once per chunk instead of
  once per token), H2O by the accumulated probabilities (summed over all prompt queries so far) plus the recent
  window. Evicted cached slots are refilled by surviving chunk tokens; evicted chunk tokens are never written. So
  the cache never holds more than ``budget`` slots, even during prefill (the chunk's own K/V live only in the
  forward's activations), and a chunk size of 1 would be the exact per-token algorithm.
* StreamingLLM prefills with the exact sink + window attention pattern (the DMS ring evicts as it goes).
* Quest prefills densely (as in the paper) and records the page bounds.

The extra score passes (TOVA, H2O) recompute ``q . k`` over the head's ``budget`` slots (after the step's forward,
for all layers at once): a fused kernel would emit those probabilities from the attention itself, so the engine's
read metrics do not count them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from dms_jax.config import check_int
from dms_jax.serve.pages import pages_for, write_rows
from dms_jax.serve.plans import plan_chunk_explicit
from dms_jax.serve.policies import EvictionPolicy
from dms_jax.serve.spec import SINK_PAGE, CacheSpec, PagedCache
from dms_jax.serve.tensor_parallel import over_kv_heads
from pallas_kernels.kv_codec import decode_rows

Array = jax.Array
_BIG = float(np.finfo(np.float32).max) / 4  # "no key yet" bound of a page; finite, so 0 * bound is 0, not NaN


def budget_for_ratio(context_tokens: int, ratio: float) -> int:
    """Tokens kept per KV head for a compression ratio ``ratio`` = all tokens / kept tokens over a context of
    ``context_tokens`` tokens: ``round(context / ratio)``, at least 1."""
    if not ratio >= 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio!r}")
    return max(1, round(context_tokens / ratio))


def gather_keys(k_pages: Array, block_tables: Array, width_pages: int) -> Array:
    """``[B, H, width_pages * page_size, D]`` f32: the keys in the first ``width_pages`` table entries of each
    head (an int8 pool's rows dequantised); each device gathers its own heads under a tensor-parallel mesh."""

    def gather(k_pages, idx):
        n_pages, ps, rw = k_pages.shape
        b, h = idx.shape[:2]
        return decode_rows(k_pages.reshape(n_pages, ps * rw)[idx].reshape(b, h, width_pages * ps, rw))

    return over_kv_heads(gather, (k_pages,), block_tables[..., :width_pages], (), out_axis=1)


def group_probs(scores: Array, valid: Array) -> Array:
    """Softmax over the last axis of ``scores`` ``[B, H, G, ..., T]`` restricted to ``valid`` (broadcastable),
    then the mean over the G query heads of each KV head (axis 2). A row with nothing valid gives zeros."""
    s = jnp.where(valid, scores, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    den = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.mean(p / jnp.where(den == 0.0, 1.0, den), axis=2)


def _rank_desc(key: Array) -> Array:
    """Rank of each entry along the last axis in descending order of ``key`` (ties: lower index first)."""
    order = jnp.argsort(-key, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).astype(jnp.int32)  # the inverse permutation


@dataclasses.dataclass(frozen=True)
class _BudgetPolicy(EvictionPolicy):
    """A baseline with a token budget per (sequence, layer, KV head): kept (TOVA, H2O, StreamingLLM) or read
    (Quest)."""

    budget: int = 256

    def __post_init__(self):
        check_int("budget", self.budget, self._min_budget())

    def _min_budget(self) -> int:
        return 1

    def describe(self) -> dict:
        return {"policy": self.name, "budget": int(self.budget)}


# ---------------------------------------------------------------------------------------------------------
# TOVA and H2O: score-based eviction
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ScoredPolicy(_BudgetPolicy):
    """Common machinery of TOVA and H2O: per-slot scores and positions in ``cache.policy_state``
    (``{"score": [L, S, H, W] f32, "pos": [L, S, H, W] int32}``, W = the budget rounded up to whole pages), a
    victim chosen from them when a head is full, an extra score pass per decode step and per prefill chunk."""

    prefill_frees_any_slot: ClassVar[bool] = True

    def decisions(self, logits, positions, num_kv_heads):
        b, t = positions.shape
        return jnp.zeros((b, num_kv_heads, t), bool)

    def state_width_pages(self, spec: CacheSpec) -> int:
        return min(-(-self.budget // spec.page_size), spec.max_pages_per_head)

    def init_state(self, spec):
        w = self.state_width_pages(spec) * spec.page_size
        shape = (spec.num_layers, spec.max_seqs, spec.num_kv_heads, w)
        return {"score": jnp.zeros(shape, jnp.float32), "pos": jnp.zeros(shape, jnp.int32)}

    # Policy specifics --------------------------------------------------------------------------------------

    def _candidates(self, pos: Array, num_tokens: Array) -> Array | bool:
        """Which slots may be evicted for the incoming token at ``num_tokens`` (broadcast to ``pos``)."""
        return True

    def _decode_score(self, score, probs, fresh):
        """New per-slot score after a decode step: probs ``[S, H, W]`` of the current query, fresh: the slot
        just (over)written."""
        raise NotImplementedError

    def _prefill_scores(self, score, probs, qvalid, n_valid):
        """Scores of [cached slots | chunk tokens] ``[B, H, W + C]`` after a chunk, from the chunk's probabilities
        probs ``[B, H, C, W + C]`` and the cached scores ``[B, H, W]``."""
        raise NotImplementedError

    def _protect(self, pos_all, num_tokens, n_valid):
        """Tokens kept regardless of their score at the end of a chunk (H2O: the recent window)."""
        return jnp.zeros(pos_all.shape, bool)

    # Hooks -------------------------------------------------------------------------------------------------

    def victims(self, ring_victim, lengths, state=None, num_tokens=None):
        score, pos = state["score"], state["pos"]
        w = score.shape[-1]
        live = jnp.arange(w) < lengths[..., None]
        cand = live & self._candidates(pos, num_tokens[None, :, None, None])
        v = jnp.argmin(jnp.where(cand, score, jnp.inf), axis=-1).astype(jnp.int32)
        return jnp.where(lengths >= self.budget, v, -1)

    def observe_decode(self, state, *, q, k_new, k_pages, block_tables, lengths, target, positions, active,
                       page_mask=None):
        score, pos = state["score"], state["pos"]
        w = score.shape[-1]
        ps, d = k_pages.shape[1], q.shape[-1]
        wp = min(w // ps, block_tables.shape[-1])
        keys = gather_keys(k_pages, block_tables, wp)  # [S, H, wp * ps, D]
        s = jnp.einsum("shgd,shtd->shgt", q.astype(jnp.float32), keys) / math.sqrt(d)
        live = jnp.arange(wp * ps)[None, None, None, :] < lengths[:, :, None, None]
        probs = group_probs(s, live)  # [S, H, wp * ps]
        probs = jnp.pad(probs, ((0, 0), (0, 0), (0, w - wp * ps)))
        fresh = jnp.arange(w)[None, None, :] == target[..., None]
        act = active[:, None, None]
        return dict(state, score=jnp.where(act, self._decode_score(score, probs, fresh), score),
                    pos=jnp.where(act & fresh, positions[:, None, None], pos))

    def prefill_plan(self, state, *, q, k, chunk_vis, k_pages, block_tables, lengths, ring_slot, ring_dec,
                     num_tokens, n_valid, page_size):
        score, pos = state["score"], state["pos"]
        b, c, hq, d = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        w = score.shape[-1]
        wp = w // page_size
        qg = jnp.transpose(q.reshape(b, c, hkv, g, d), (0, 2, 3, 1, 4)).astype(jnp.float32)  # [B, H, G, C, D]
        keys = gather_keys(k_pages, block_tables, wp)  # [B, H, W, D]
        s_cached = jnp.einsum("bhgqd,bhtd->bhgqt", qg, keys)
        s_chunk = jnp.einsum("bhgqd,bkhd->bhgqk", qg, k.astype(jnp.float32))
        live = jnp.arange(w)[None, None, :] < lengths[..., None]  # [B, H, W]
        valid = jnp.concatenate([jnp.broadcast_to(live[:, :, None, None, :], (b, hkv, 1, c, w)),
                                 chunk_vis[:, :, None]], axis=-1)
        probs = group_probs(jnp.concatenate([s_cached, s_chunk], axis=-1) / math.sqrt(d), valid)  # [B,H,C,W+C]
        kk = jnp.arange(c)
        qvalid = kk[None, :] < n_valid[:, None]  # [B, C]
        new_score = self._prefill_scores(score, probs, qvalid, n_valid)  # [B, H, W + C]
        pos_chunk = jnp.broadcast_to((num_tokens[:, None] + kk[None, :])[:, None, :], (b, hkv, c))
        pos_all = jnp.concatenate([pos, pos_chunk], axis=-1)
        valid_all = jnp.concatenate([live, jnp.broadcast_to(qvalid[:, None, :], (b, hkv, c))], axis=-1)
        key = jnp.where(valid_all, jnp.where(self._protect(pos_all, num_tokens, n_valid), jnp.inf, new_score),
                        -jnp.inf)
        keep = valid_all & (_rank_desc(key) < self.budget)  # min(budget, cached + chunk) tokens
        hole = live & ~keep[..., :w]
        surv = qvalid[:, None, :] & keep[..., w:]
        plan = plan_chunk_explicit(lengths, hole, surv, ring_slot, ring_dec, num_tokens, n_valid, page_size)
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(hkv)[None, :, None]
        col = jnp.where(surv, plan.target, w)  # survivors' slots (< budget <= W); others dropped
        score2 = new_score[..., :w].at[bi, hi, col].set(new_score[..., w:], mode="drop")
        pos2 = pos.at[bi, hi, col].set(pos_chunk, mode="drop")
        has = (n_valid > 0)[:, None, None]
        return plan, dict(state, score=jnp.where(has, score2, score), pos=jnp.where(has, pos2, pos))


TOVA_SCOPES = ("layer", "group")
TOVA_PREFILLS = ("prompt", "chunk")


def _check_choice(name, v, allowed):
    if v not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {v!r}")


def _top_budget_slots(score: Array, lengths: Array, budget: int, width: int) -> tuple[Array, Array]:
    """The ``min(budget, length)`` live slots with the highest ``score`` ``[..., T]``, as (slot of the j-th kept
    token in slot order ``[..., width]``, j < kept ``[..., width]``)."""
    t = score.shape[-1]
    live = jnp.arange(t) < lengths[..., None]
    keep = live & (_rank_desc(jnp.where(live, score, -jnp.inf)) < budget)
    src = jnp.argsort(~keep, axis=-1, stable=True)[..., :width].astype(jnp.int32)  # kept slots first, in order
    return src, jnp.arange(width) < jnp.sum(keep, axis=-1, dtype=jnp.int32)[..., None]


def _compact_heads(cache: PagedCache, slots: Array, src: Array, valid: Array, page_size: int):
    """Moves the tokens of slots ``src`` ``[L, B, H, W]`` of sequences ``slots`` to slots ``0 .. W-1`` (where
    ``valid``) and frees the pages left beyond. ``src`` is increasing, so a move never overwrites a token that is
    still to move; all reads happen before the writes anyway. The heads' pages are not shared (fresh prompt)."""
    tables = cache.block_tables[:, slots]  # [L, B, H, M]
    w = src.shape[-1]
    src_page = jnp.take_along_axis(tables, src // page_size, axis=-1)
    k = cache.k_pages[src_page, src % page_size]
    v = cache.v_pages[src_page, src % page_size]
    dst = jnp.broadcast_to(jnp.arange(w), src.shape)
    dst_page = jnp.where(valid, jnp.take_along_axis(tables, dst // page_size, axis=-1), SINK_PAGE)
    k_pages, v_pages = write_rows(cache.k_pages, cache.v_pages, dst_page, jnp.where(valid, dst % page_size, 0),
                                  k, v)
    old_len = cache.lengths[:, slots]
    new_len = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    j = jnp.arange(tables.shape[-1])
    drop = (j >= pages_for(new_len, page_size)[..., None]) & (j < pages_for(old_len, page_size)[..., None])
    refcount = cache.refcount.at[tables.reshape(-1)].add(-drop.reshape(-1).astype(jnp.int32))
    # The ring is unused by score-based policies (no decisions); slot 0 keeps its entries below the length.
    return cache.replace(
        k_pages=k_pages, v_pages=v_pages, refcount=refcount.at[SINK_PAGE].set(1),
        block_tables=cache.block_tables.at[:, slots].set(jnp.where(drop, SINK_PAGE, tables)),
        lengths=cache.lengths.at[:, slots].set(new_len),
        ring_slot=cache.ring_slot.at[:, slots].set(0), ring_dec=cache.ring_dec.at[:, slots].set(False))


@dataclasses.dataclass(frozen=True)
class TOVAPolicy(_ScoredPolicy):
    """TOVA: evict the slot with the lowest attention probability of the latest query.

    ``scope="layer"`` (the paper's): the weight of a token is the mean over *all* query heads of the layer, so one
    kept set per layer, shared by its KV heads (their slots hold the same tokens in the same order, since every
    head of the layer makes the same choices). ``scope="group"``: the mean over each KV head's query group, a
    kept set per KV head.

    ``prefill="prompt"`` (the paper's): the prompt is encoded densely and reduced once after its last token, to
    the ``budget`` tokens with the highest weights under the last prompt query (``finish_prefill``); each chunk
    only records that chunk's last query's weights over the whole prompt so far (``prompt_score`` ``[L, S, H,
    max tokens]``), so chunked and unchunked prefill keep the same set. ``prefill="chunk"``: the rule at the end of
    every chunk, the cache never above the budget (see the module docstring)."""

    name: ClassVar[str] = "tova"
    scope: str = "layer"
    prefill: str = "prompt"

    def __post_init__(self):
        super().__post_init__()
        _check_choice("scope", self.scope, TOVA_SCOPES)
        _check_choice("prefill", self.prefill, TOVA_PREFILLS)

    def init_state(self, spec):
        state = super().init_state(spec)
        if self.prefill == "prompt":
            t = spec.max_pages_per_head * spec.page_size
            state["prompt_score"] = jnp.zeros(state["score"].shape[:3] + (t,), jnp.float32)
        return state

    def _pool_heads(self, probs):
        """Weights ``[B, H, ...]`` -> the layer mean over the KV heads (``scope="layer"``; with equal groups that
        is the mean over all query heads), broadcast back to every KV head."""
        if self.scope == "group":
            return probs
        return jnp.broadcast_to(jnp.mean(probs, axis=1, keepdims=True), probs.shape)

    def _decode_score(self, score, probs, fresh):
        return self._pool_heads(probs)

    def _prefill_scores(self, score, probs, qvalid, n_valid):
        last = jnp.maximum(n_valid - 1, 0)[:, None, None, None]  # the chunk's last valid query
        last_probs = jnp.take_along_axis(probs, jnp.broadcast_to(last, probs.shape[:2] + (1, probs.shape[-1])),
                                         axis=2)[:, :, 0]
        return self._pool_heads(last_probs)

    def prefill_plan(self, state, *, q, k, chunk_vis, k_pages, block_tables, lengths, ring_slot, ring_dec,
                     num_tokens, n_valid, page_size):
        if self.prefill == "chunk":
            return super().prefill_plan(state, q=q, k=k, chunk_vis=chunk_vis, k_pages=k_pages,
                                        block_tables=block_tables, lengths=lengths, ring_slot=ring_slot,
                                        ring_dec=ring_dec, num_tokens=num_tokens, n_valid=n_valid,
                                        page_size=page_size)
        # Nothing is evicted before the prompt's end (the ring's plan appends every token: no decisions).
        return None, self._note_prompt_scores(state, q, k, k_pages, block_tables, lengths, n_valid, page_size)

    def _note_prompt_scores(self, state, q, k, k_pages, block_tables, lengths, n_valid, page_size):
        """``prompt_score`` after a chunk: the weights of the chunk's last valid query over every prompt token so
        far (cached + the chunk), per slot; the chunk's token i lands in slot ``lengths + i``."""
        b, c, hq, d = q.shape
        hkv = k.shape[2]
        t = state["prompt_score"].shape[-1]
        last = jnp.maximum(n_valid - 1, 0)[:, None, None, None]
        q_last = jnp.take_along_axis(q, last, axis=1)[:, 0].reshape(b, hkv, hq // hkv, d).astype(jnp.float32)
        keys = gather_keys(k_pages, block_tables, t // page_size)  # [B, H, T, D]
        s = jnp.concatenate([jnp.einsum("bhgd,bhtd->bhgt", q_last, keys),
                             jnp.einsum("bhgd,bchd->bhgc", q_last, k.astype(jnp.float32))], axis=-1)
        in_chunk = jnp.arange(c)[None, :] < n_valid[:, None]  # [B, C]: the last query sees the whole chunk
        valid = jnp.concatenate([jnp.arange(t)[None, None, :] < lengths[..., None],
                                 jnp.broadcast_to(in_chunk[:, None, :], (b, hkv, c))], axis=-1)
        probs = self._pool_heads(group_probs(s / math.sqrt(d), valid[:, :, None, :]))  # [B, H, T + C]
        col = jnp.where(in_chunk[:, None, :], lengths[..., None] + jnp.arange(c), t)
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(hkv)[None, :, None]
        score = probs[..., :t].at[bi, hi, col].set(probs[..., t:], mode="drop")
        has = (n_valid > 0)[:, None, None]
        return dict(state, prompt_score=jnp.where(has, score, state["prompt_score"]))

    @property
    def reduces_whole_prompt(self) -> bool:
        return self.prefill == "prompt"

    def finish_prefill(self, cache, slots, spec):
        """The paper's prompt reduction: each head keeps the ``budget`` prompt tokens with the highest weights
        under the last prompt query, compacted to slots ``0 .. budget-1``; their weights become the decode
        scores (the first decode step's victim is their argmin)."""
        if self.prefill == "chunk":
            return cache
        st = cache.policy_state
        prompt = st["prompt_score"][:, slots]
        w = st["score"].shape[-1]
        src, valid = _top_budget_slots(prompt, cache.lengths[:, slots], self.budget, w)
        cache = _compact_heads(cache, slots, src, valid, spec.page_size)
        # A fresh prompt has slot == position (nothing was evicted before its end).
        score = jnp.where(valid, jnp.take_along_axis(prompt, src, axis=-1), 0.0)
        return cache.replace(policy_state=dict(st, score=st["score"].at[:, slots].set(score),
                                               pos=st["pos"].at[:, slots].set(jnp.where(valid, src, 0))))

    def describe(self) -> dict:
        return {**super().describe(), "scope": self.scope, "prefill": self.prefill}


@dataclasses.dataclass(frozen=True)
class H2OPolicy(_ScoredPolicy):
    """H2O: keep the ``recent`` latest tokens and the heavy hitters by accumulated attention (``heavy`` =
    ``budget - recent``); evict the lowest accumulated score outside the recent window. ``recent=None``: half
    the budget (rounded up), as in the paper's equal split."""

    name: ClassVar[str] = "h2o"
    recent: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.recent is None:
            object.__setattr__(self, "recent", self.budget - self.budget // 2)
        check_int("recent", self.recent)
        if self.recent > self.budget:
            raise ValueError(f"recent ({self.recent}) must not exceed the budget ({self.budget})")

    @property
    def heavy(self) -> int:
        return self.budget - self.recent

    def _candidates(self, pos, num_tokens):
        # The incoming token t's recent window is t - recent + 1 .. t: the victim is older.
        return pos <= num_tokens - self.recent

    def _decode_score(self, score, probs, fresh):
        return jnp.where(fresh, 0.0, score) + probs

    def _prefill_scores(self, score, probs, qvalid, n_valid):
        add = jnp.sum(jnp.where(qvalid[:, None, :, None], probs, 0.0), axis=2)  # [B, H, W + C]
        w = score.shape[-1]
        return jnp.concatenate([score + add[..., :w], add[..., w:]], axis=-1)

    def _protect(self, pos_all, num_tokens, n_valid):
        latest = (num_tokens + n_valid - 1)[:, None, None]
        return pos_all > latest - self.recent

    def describe(self) -> dict:
        return {**super().describe(), "heavy": int(self.heavy), "recent": int(self.recent)}


# ---------------------------------------------------------------------------------------------------------
# StreamingLLM: attention sinks + a sliding window, as ring decisions
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StreamingPolicy(_BudgetPolicy):
    """StreamingLLM: the first ``sinks`` tokens plus the ``recent = budget - sinks`` latest tokens. Implemented as
    DMS-style decisions (token ``j >= sinks`` marked) with a delay of ``recent - 1`` positions
    (``delay_window``): the marked token leaving it is the oldest non-sink token, and the incoming token takes its
    slot."""

    name: ClassVar[str] = "streaming"
    sinks: int = 4

    def __post_init__(self):
        check_int("sinks", self.sinks, 0)
        super().__post_init__()

    def _min_budget(self) -> int:
        return self.sinks + 2  # at least two recent tokens: a delay of >= 1 position

    @property
    def recent(self) -> int:
        """The span of latest tokens kept besides the sinks (the query's own included)."""
        return self.budget - self.sinks

    @property
    def delay_window(self) -> int:
        # A marked token is seen by ring_size(delay) = recent queries: its own and the recent - 1 after it.
        return self.recent - 1

    def decisions(self, logits, positions, num_kv_heads):
        d = positions - 1 >= self.sinks  # the decision computed at p is for token p - 1 (the one-token shift)
        return jnp.broadcast_to(d[:, None, :], (positions.shape[0], num_kv_heads, positions.shape[1]))

    def describe(self) -> dict:
        return {**super().describe(), "sinks": int(self.sinks), "recent": int(self.recent)}


# ---------------------------------------------------------------------------------------------------------
# Quest: query-aware page selection (reads, not memory)
# ---------------------------------------------------------------------------------------------------------


def quest_page_bounds(q: Array, kmin: Array, kmax: Array) -> Array:
    """Upper bound of ``q . k`` over each page: q ``[S, H, G, D]``, kmin / kmax ``[S, H, M, D]`` -> ``[S, H, M]``,
    ``sum_d max(q_d kmin_d, q_d kmax_d)``, the max over the G query heads of each KV head."""
    qf = q.astype(jnp.float32)[:, :, :, None, :]
    b = jnp.sum(jnp.maximum(qf * kmin[:, :, None], qf * kmax[:, :, None]), axis=-1)  # [S, H, G, M]
    return jnp.max(b, axis=2)


def quest_select(bounds: Array, lengths: Array, page_size: int, top_pages: int) -> Array:
    """``[S, H, M]`` bool: the ``top_pages`` full pages (all live pages but the last) with the highest bounds, plus
    the last (current) page."""
    m = bounds.shape[-1]
    n_pages = pages_for(lengths, page_size)[..., None]
    j = jnp.arange(m)
    cand = j < n_pages - 1
    k = min(int(top_pages), m)
    top = jnp.zeros(bounds.shape, bool)
    if k:  # top_k, not a full sort: this runs every layer and step
        _, idx = jax.lax.top_k(jnp.where(cand, bounds, -jnp.inf), k)
        top = jnp.any(idx[..., :, None] == j, axis=-2)
    return (cand & top) | (j == n_pages - 1)


@dataclasses.dataclass(frozen=True)
class QuestPolicy(_BudgetPolicy):
    """Quest: no eviction; each decode query reads the ``budget // page_size`` pages with the highest key-bound
    plus the current page. State: ``kmin`` / ``kmax`` ``[L, S, H, M, D]`` per logical page, ``reads`` ``[L, S,
    H]`` the last step's token reads (selected tokens + metadata), ``dense`` ``[L, S]`` whether the layer reads
    every page.

    ``dense_layers``: the first layers that skip page selection and read densely (the paper keeps 2; 0: every
    layer selects). The engine's layer loop does not tell a hook its layer index, so the layer's flag lives in
    the state (``dense``), stamped per row by ``init_state`` and again by ``finish_prefill``: releasing a slot
    zeroes its rows, and a slot is always prefilled before it decodes."""

    name: ClassVar[str] = "quest"
    evicts: ClassVar[bool] = False
    dense_layers: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_int("dense_layers", self.dense_layers, 0)

    def _dense_rows(self, num_layers: int, rows: int) -> Array:
        return jnp.broadcast_to((jnp.arange(num_layers) < self.dense_layers)[:, None], (num_layers, rows))

    def decisions(self, logits, positions, num_kv_heads):
        b, t = positions.shape
        return jnp.zeros((b, num_kv_heads, t), bool)

    def init_state(self, spec):
        lsh = (spec.num_layers, spec.max_seqs, spec.num_kv_heads)
        m = spec.max_pages_per_head
        return {"kmin": jnp.zeros(lsh + (m, spec.head_dim), jnp.float32),
                "kmax": jnp.zeros(lsh + (m, spec.head_dim), jnp.float32), "reads": jnp.zeros(lsh, jnp.int32),
                "dense": self._dense_rows(spec.num_layers, spec.max_seqs)}

    def finish_prefill(self, cache, slots, spec):
        st = cache.policy_state
        return cache.replace(policy_state=dict(st, dense=st["dense"].at[:, slots].set(
            self._dense_rows(spec.num_layers, slots.shape[0]))))

    def prefill_plan(self, state, *, q, k, chunk_vis, k_pages, block_tables, lengths, ring_slot, ring_dec,
                     num_tokens, n_valid, page_size):
        # Nothing is evicted: chunk token i goes to slot lengths + i. Pages beyond the held ones start afresh.
        kmin, kmax = state["kmin"], state["kmax"]
        b, c, h, _ = k.shape
        m = kmin.shape[2]
        fresh = (jnp.arange(m)[None, None, :] >= pages_for(lengths, page_size)[..., None])[..., None]
        kmin = jnp.where(fresh, _BIG, kmin)
        kmax = jnp.where(fresh, -_BIG, kmax)
        target = lengths[..., None] + jnp.arange(c)[None, None, :]  # [B, H, C]
        col = jnp.where(jnp.arange(c)[None, None, :] < n_valid[:, None, None], target // page_size, m)
        bi = jnp.arange(b)[:, None, None]
        hi = jnp.arange(h)[None, :, None]
        kt = jnp.swapaxes(k, 1, 2).astype(jnp.float32)  # [B, H, C, D]
        kmin = kmin.at[bi, hi, col].min(kt, mode="drop")
        kmax = kmax.at[bi, hi, col].max(kt, mode="drop")
        return None, dict(state, kmin=kmin, kmax=kmax)

    def page_mask(self, q, block_tables, lengths, state=None, page_size=None):
        # The bounds of every full page are complete (the new token is in the current page, which is always read;
        # observe_decode adds it to the bounds after the attention).
        if page_size is None:
            raise ValueError("Quest's page_mask needs the cache's page_size")
        sel = quest_select(quest_page_bounds(q, state["kmin"], state["kmax"]), lengths, page_size,
                           self.budget // page_size)
        live = jnp.arange(sel.shape[-1]) < pages_for(lengths, page_size)[..., None]
        sel = jnp.where(state["dense"][:, None, None], live, sel)  # a dense layer reads every live page
        return sel[..., :block_tables.shape[-1]]

    def observe_decode(self, state, *, q, k_new, k_pages, block_tables, lengths, target, positions, active,
                       page_mask=None):
        ps = k_pages.shape[1]
        kmin, kmax = state["kmin"], state["kmax"]
        s, h, m, _ = kmin.shape
        pi = jnp.minimum(target // ps, m - 1)
        fresh = (target % ps == 0)[..., None]
        k = k_new.astype(jnp.float32)
        cur_min = jnp.take_along_axis(kmin, pi[..., None, None], axis=2)[:, :, 0]
        cur_max = jnp.take_along_axis(kmax, pi[..., None, None], axis=2)[:, :, 0]
        act = active[:, None, None]
        new_min = jnp.where(act, jnp.where(fresh, k, jnp.minimum(cur_min, k)), cur_min)
        new_max = jnp.where(act, jnp.where(fresh, k, jnp.maximum(cur_max, k)), cur_max)
        si = jnp.arange(s)[:, None]
        hi = jnp.arange(h)[None, :]
        n_pages = pages_for(lengths, ps)
        wm = page_mask.shape[-1]
        tokens_in_page = jnp.clip(lengths[..., None] - jnp.arange(wm) * ps, 0, ps)
        meta = jnp.where(state["dense"][:, None], 0, n_pages)  # a dense layer reads no min / max metadata
        reads = jnp.sum(jnp.where(page_mask, tokens_in_page, 0), axis=-1, dtype=jnp.int32) + meta
        return dict(state, kmin=kmin.at[si, hi, pi].set(new_min), kmax=kmax.at[si, hi, pi].set(new_max),
                    reads=jnp.where(active[:, None], reads, 0))

    def decode_reads(self, cache):
        return jnp.sum(cache.policy_state["reads"], axis=(0, 2), dtype=jnp.int32)

    def describe(self) -> dict:
        return {**super().describe(), "dense_layers": int(self.dense_layers)}


BASELINES = {"tova": TOVAPolicy, "h2o": H2OPolicy, "streaming": StreamingPolicy, "quest": QuestPolicy}
