"""Paged KV cache, one paged sequence per (sequence, layer, KV head), with DMS delayed eviction.

Memory layout (DESIGN.md section 1, "Reference cache"):

* ``k_pages``, ``v_pages`` ``[pool_pages, page_size, D]``: one static pool shared by every sequence, layer and KV
  head -- the memory budget. A page holds tokens of exactly one (sequence, layer, KV head). Page 0 is a reserved
  *sink*: masked writes land there and unused block-table entries point at it, so every index is in range and no
  write needs a branch. The budget given by the user (``CacheSpec.num_pages``) excludes the sink.
* ``refcount`` ``[pool_pages]`` int32: how many block-table entries point at each page; 0 = free. Chains forked
  from one prompt share its pages copy-on-write, so a page can have several owners; it returns to the pool when
  the last one lets go. Allocation happens on device inside jit: the first free pages of the pool
  (``jnp.nonzero(refcount == 0, size=...)``) are handed out in head order.
* ``block_tables`` ``[L, S, Hkv, M]`` and ``lengths`` ``[L, S, Hkv]``: slots ``0 .. length-1`` of a head's pages (in
  table order) hold its live tokens, in no particular temporal order (RoPE is applied before caching).
* the ring of the last ``R = dms.ring_size(window) = window + 1`` tokens of each head: ``ring_slot`` (where the
  token lives) and ``ring_dec`` (its eviction decision; "pending" = keep until the next token's logit is known).
  Token ``p`` sits at ring index ``p % R``.
* ``num_tokens`` ``[S]``: tokens written so far per sequence (= the position of the next token).

The DMS update for an incoming token at position ``t`` (identical for every head, vectorised over all of them):
the ring entry ``t % R`` holds token ``t - R = t - window - 1``, the token that leaves the window now. If its
decision is 1 its slot is *overwritten* by the new token (length unchanged, the evicted token is gone); otherwise
the new token is *appended* at slot ``length`` and takes a new page when ``length`` is a multiple of the page
size. The decision for token ``t - 1`` is the logit computed at ``t`` (the one-token shift); it is stored in the
ring after the forward of token ``t``. The invariant: after inserting token ``t`` the head holds exactly the tokens
``{j <= t : t - j <= window or d_j = 0}`` (``dms.visible_if_marked``) -- the visible set of the hard-mode
attention mask -- so live slots equal live tokens and memory is actually freed (not masked).

Eviction policies (`EvictionPolicy`) decide *which* tokens go; this file implements "vanilla" (no eviction),
"dms" (the model's learned decisions) and "fixed" (a position pattern with a chosen compression ratio, for
benchmarks). The baselines (TOVA, H2O, StreamingLLM, Quest; ``dms_jax/baselines.py``) plug in through the same
object (see its docstring); TOVA and H2O choose their victim slots from attention scores kept in
``PagedCache.policy_state`` and overwrite them exactly like DMS does, so their memory is really freed.

DMC (Dynamic Memory Compression, dmc.py; policy "dmc") uses the same pool, tables and lengths but never evicts: per
(sequence, layer, KV head) a token either *appends* a slot (a fresh page when the length is a multiple of the page
size) or *merges* into the head's last slot (the slot is overwritten by the importance-weighted mean of its newest
``W`` tokens, the key rotated at the newest token's position). The hard decision (merge logit > 0) is the token's
own -- no shift, no ring; the first token of a sequence always appends -- so after token ``t`` a head holds one slot
per appended token. What a merge needs from the past -- the raw pre-RoPE keys, values and importance of the last
``W`` tokens and how many of them the last slot averages -- is ``O(W)`` per head, so it lives densely next to the
pool in ``PagedCache.policy_state`` (``DMCPolicy.init_state``; forks copy it, releases clear it). A merge writes into
the last slot, which after a fork may sit in a shared page: it is copied first, like any write into a shared page.
Helpers: ``dmc_chunk_states`` / ``dmc_plan_chunk`` / ``dmc_window_after_chunk`` (prefill), ``dmc_decode_slots``
(decode).

All functions here are pure and jit-compatible; the engine (engine.py) composes them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dms_jax import dmc, dms
from dms_jax.config import DMCConfig, DMSConfig, check_int

Array = jax.Array

SINK_PAGE = 0  # never allocated, never freed: the target of masked writes and unused table entries


# ---------------------------------------------------------------------------------------------------------
# Static description and state
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static shape of a paged cache (hashable: a jit static argument).

    num_pages: the memory budget in pages (the pool holds one more page, the sink). max_seqs: sequence slots.
    max_pages_per_head: block-table width (pages one head may hold: ceil(max tokens / page_size)).
    window: the delay of the ring's evictions (``dms.visible_if_marked``; the ring holds ``dms.ring_size(window)``
    tokens), the policy's ``delay_window``. dtype: K/V storage dtype name.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_pages: int
    page_size: int
    max_seqs: int
    max_pages_per_head: int
    window: int
    dtype: str = "float32"

    def __post_init__(self):
        # Shapes of the arrays init_cache makes (window: the ring's), so each must be a positive integer.
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_pages", "page_size", "max_seqs",
                     "max_pages_per_head", "window"):
            check_int(name, getattr(self, name))
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def pool_pages(self) -> int:
        return self.num_pages + 1

    @property
    def ring(self) -> int:
        return dms.ring_size(self.window)

    @property
    def bytes_per_page(self) -> int:
        """K and V bytes of one page."""
        return 2 * self.page_size * self.head_dim * jnp.dtype(self.dtype).itemsize

    @property
    def max_tokens_per_head(self) -> int:
        return self.max_pages_per_head * self.page_size

    @classmethod
    def create(cls, *, num_layers, num_kv_heads, head_dim, max_seqs, max_context, window, page_size=16,
               num_pages=None, dtype="float32") -> "CacheSpec":
        """num_pages=None: enough for every sequence to keep every token (no eviction, no sharing)."""
        check_int("max_context", max_context)
        check_int("page_size", page_size)
        m = -(-int(max_context) // int(page_size))
        if num_pages is None:
            num_pages = num_layers * max_seqs * num_kv_heads * m
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=int(num_pages),
                   page_size=int(page_size), max_seqs=int(max_seqs), max_pages_per_head=m, window=int(window),
                   dtype=jnp.dtype(dtype).name)


@struct.dataclass
class PagedCache:
    """The cache state: a pytree of device arrays (see the module docstring for each field)."""

    k_pages: Array  # [P, page_size, D]
    v_pages: Array  # [P, page_size, D]
    refcount: Array  # [P] int32
    block_tables: Array  # [L, S, Hkv, M] int32
    lengths: Array  # [L, S, Hkv] int32
    ring_slot: Array  # [L, S, Hkv, R] int32
    ring_dec: Array  # [L, S, Hkv, R] bool
    num_tokens: Array  # [S] int32
    high_water: Array  # [] int32: most pages in use at once (excluding the sink) since creation
    # The eviction policy's own per-slot bookkeeping (``EvictionPolicy.init_state``): None for the policies that
    # need none (vanilla, dms, fixed, streaming); else a pytree whose leaves all have leading dims [L, S] (TOVA /
    # H2O: attention scores and positions per slot; Quest: per-page key bounds). Forks, releases and slot resizes
    # treat it like the tables.
    policy_state: Any = None


def init_cache(spec: CacheSpec, policy: "EvictionPolicy | None" = None) -> PagedCache:
    """An empty cache: every page free, every table pointing at the sink (and the policy's initial state)."""
    L, S, H, M, R = spec.num_layers, spec.max_seqs, spec.num_kv_heads, spec.max_pages_per_head, spec.ring
    shape = (spec.pool_pages, spec.page_size, spec.head_dim)
    return PagedCache(
        k_pages=jnp.zeros(shape, spec.dtype),
        v_pages=jnp.zeros(shape, spec.dtype),
        refcount=jnp.zeros((spec.pool_pages,), jnp.int32).at[SINK_PAGE].set(1),
        block_tables=jnp.full((L, S, H, M), SINK_PAGE, jnp.int32),
        lengths=jnp.zeros((L, S, H), jnp.int32),
        ring_slot=jnp.zeros((L, S, H, R), jnp.int32),
        ring_dec=jnp.zeros((L, S, H, R), bool),
        num_tokens=jnp.zeros((S,), jnp.int32),
        high_water=jnp.zeros((), jnp.int32),
        policy_state=None if policy is None else policy.init_state(spec),
    )


def _state_rows(state: Any, fn) -> Any:
    """Applies ``fn(leaf)`` to every leaf of a policy state (leaves are [L, S, ...]); None stays None."""
    return None if state is None else jax.tree.map(fn, state)


# ---------------------------------------------------------------------------------------------------------
# Eviction policies
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvictionPolicy:
    """Decides which tokens leave the cache. Frozen and hashable: it is a static argument of the jitted engine.

    The engine calls, inside jit:

    * ``decisions(logits, positions)``: ``logits`` ``[B, Hkv, T]`` are the model's decision logits computed at
      ``positions`` ``[B, T]`` (``None`` when ``uses_model_decisions`` is False). Returns the 0/1 (bool) eviction
      decision for the token at ``positions - 1`` (the one-token shift). A marked token stays ``delay_window``
      more positions (``dms.visible_if_marked``), then its slot is reused. Vanilla returns all False.
    * ``victims(ring_victim, lengths, state, num_tokens)``: ``[L, S, Hkv]`` slot the incoming decode token
      overwrites (-1 = append). The default is the ring's answer (the token leaving the window, if marked).
      Score-based policies (TOVA, H2O) return their own victim slot here, chosen from per-slot scores they keep
      in ``state`` (``cache.policy_state``); StreamingLLM is a decision policy (decision = position >= sinks).
    * ``page_mask(q, block_tables, lengths, state, page_size)``: optional ``[S, Hkv, M]`` pages the decode
      attention reads (Quest: top pages by key bounds); None reads every live page.
    * ``observe_decode(state, ...)`` (per layer -- vmapped over the layers after the step's forward, with the pool
      holding the step's tokens): returns the layer's updated state (TOVA / H2O: the current query's attention
      probabilities per slot, from an extra score pass; Quest: the per-page key bounds and the step's reads).
      Default: unchanged.
    * ``prefill_plan(state, ...)`` (per layer and chunk): optionally its own ``ChunkPlan`` -- which cached slots
      to free and which chunk tokens to keep (TOVA / H2O keep the cache within their budget during prefill) --
      and the layer's updated state. Default: (None, state): the ring's plan (``plan_chunk``).
    * ``finish_prefill(cache, slots, spec)`` (once after a prefill's last chunk): the cache reduced as the policy
      wants (TOVA keeps the prompt's top-``budget`` tokens). Default: unchanged.
    * ``decode_reads(cache)``: ``[S]`` KV token reads of the last decode step (default: the live tokens).

    ``uses_model_decisions`` says whether the model computes DMS logits (and zeroes its borrowed query neuron):
    only the "dms" and "dmc" policies do; the others run the model unchanged. ``merges`` (DMC only) switches the
    engine to its merge paths: ``decisions`` are then each token's own merge decisions and the state is the
    accumulation window (``DMCPolicy``). ``init_state(spec)`` builds the policy's
    state (None for the stateless policies; then every hook above is free). ``delay_window`` sizes the cache's
    ring (``CacheSpec.window``).
    """

    name: ClassVar[str] = "base"
    # True only for DMC: tokens merge into slots instead of being evicted (the engine runs its DMC paths).
    merges: ClassVar[bool] = False

    @property
    def delay_window(self) -> int:
        """How many positions a token marked by ``decisions`` stays visible (``dms.visible_if_marked``); the
        cache's ring holds ``dms.ring_size`` of it. 1 (the smallest ring) for the policies that mark nothing,
        whose ring is never read."""
        return 1

    @property
    def uses_model_decisions(self) -> bool:
        return False

    def decisions(self, logits: Array | None, positions: Array, num_kv_heads: int) -> Array:
        raise NotImplementedError

    def victims(self, ring_victim: Array, lengths: Array, state: Any = None, num_tokens: Array | None = None) -> Array:
        return ring_victim

    def init_state(self, spec: "CacheSpec") -> Any:
        return None

    def observe_decode(self, state: Any, *, q: Array, k_new: Array, k_pages: Array, block_tables: Array,
                       lengths: Array, target: Array, positions: Array, active: Array,
                       page_mask: Array | None = None) -> Any:
        """One layer's state after a decode step: q ``[S, Hkv, G, D]``, k_new ``[S, Hkv, D]``, k_pages the pool
        with the new token written, lengths ``[S, Hkv]`` (including the new token), target ``[S, Hkv]`` its slot,
        positions ``[S]`` its position, active ``[S]``, page_mask what ``page_mask`` returned for the step."""
        return state

    def page_mask(self, q, block_tables, lengths, state: Any = None, page_size: int | None = None):
        return None

    def prefill_plan(self, state: Any, *, q: Array, k: Array, chunk_vis: Array, k_pages: Array,
                     block_tables: Array, lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array,
                     n_valid: Array, page_size: int) -> tuple[Any, Any]:
        """(ChunkPlan or None, the layer's new state) for one prefill chunk: q ``[B, C, Hq, D]``, k ``[B, C, Hkv,
        D]`` (RoPE applied), chunk_vis ``[B, Hkv, C, C]``, block_tables ``[B, Hkv, M]``, lengths ``[B, Hkv]`` (before
        the chunk), num_tokens / n_valid ``[B]``."""
        return None, state

    def finish_prefill(self, cache: "PagedCache", slots: Array, spec: "CacheSpec") -> "PagedCache":
        """The cache after the last prefill chunk of the prompts in sequence slots ``slots`` ``[B]`` (TOVA reduces
        the whole prompt here). Default: unchanged."""
        return cache

    def decode_reads(self, cache: "PagedCache") -> Array:
        return jnp.sum(cache.lengths, axis=(0, 2), dtype=jnp.int32)

    def describe(self) -> dict:
        return {"policy": self.name}


@dataclasses.dataclass(frozen=True)
class VanillaPolicy(EvictionPolicy):
    """No eviction: every token stays (a dense cache, paged)."""

    name: ClassVar[str] = "vanilla"

    def decisions(self, logits, positions, num_kv_heads):
        b, t = positions.shape
        return jnp.zeros((b, num_kv_heads, t), bool)

    def describe(self) -> dict:
        return {"policy": self.name}


@dataclasses.dataclass(frozen=True)
class _RingPolicy(EvictionPolicy):
    """A policy that marks tokens with the DMS delay of ``dms_cfg`` (its window; the model's DMSConfig for "dms")."""

    dms_cfg: DMSConfig

    @property
    def delay_window(self) -> int:
        return self.dms_cfg.window


@dataclasses.dataclass(frozen=True)
class DMSPolicy(_RingPolicy):
    """The model's learned hard decisions: token j is evicted iff the logit computed at j + 1 is > 0, with the window
    and ``alpha_per`` of the model's DMSConfig."""

    name: ClassVar[str] = "dms"

    @property
    def uses_model_decisions(self) -> bool:
        return True

    def decisions(self, logits, positions, num_kv_heads):
        if logits is None:
            raise ValueError("the dms policy needs the model's decision logits")
        return dms.hard_decisions(dms.apply_alpha_per(logits, self.dms_cfg.alpha_per)) > 0.5

    def describe(self) -> dict:
        return {"policy": self.name, "window": int(self.delay_window), "alpha_per": self.dms_cfg.alpha_per}


@dataclasses.dataclass(frozen=True)
class FixedRatePolicy(_RingPolicy):
    """Fixed decisions with a chosen compression ratio: token j is kept iff ``j % cr == 0``, else evicted once it
    leaves the window of ``dms_cfg`` (the DMS model it stands in for; only its window is used). Outside the window
    this keeps exactly one token in ``cr``; the model is not consulted (for benchmarks of memory and speed without
    a retrofitted checkpoint)."""

    name: ClassVar[str] = "fixed"
    cr: int = 8

    def __post_init__(self):
        check_int("cr", self.cr)

    def decisions(self, logits, positions, num_kv_heads):
        owner = positions - 1
        d = (owner >= 0) & (owner % self.cr != 0)
        return jnp.broadcast_to(d[:, None, :], (positions.shape[0], num_kv_heads, positions.shape[1]))

    def describe(self) -> dict:
        return {"policy": self.name, "window": int(self.delay_window), "cr": int(self.cr)}


@dataclasses.dataclass(frozen=True)
class DMCPolicy(EvictionPolicy):
    """DMC: nothing is evicted; each token appends a slot or merges into its head's last slot (module docstring).

    ``dmc_cfg`` is the model's DMCConfig: its ``accumulation_window`` W sizes the per-head window state
    (``init_state``); the DMS ring is unused. ``decisions`` returns the hard merge decision of each
    token itself (logit > 0, never for position 0). ``victims`` says "append" for every head: the page check made
    before a decode step's forward, which is what decides the merges, reserves that worst case (a merge never needs
    more pages than an append; see ``dmc_decode_slots``).
    """

    name: ClassVar[str] = "dmc"
    merges: ClassVar[bool] = True
    dmc_cfg: DMCConfig = DMCConfig()

    @property
    def accumulation_window(self) -> int:
        return self.dmc_cfg.accumulation_window

    @property
    def uses_model_decisions(self) -> bool:
        return True

    def decisions(self, logits, positions, num_kv_heads):
        if logits is None:
            raise ValueError("the dmc policy needs the model's merge logits")
        # The first token of a sequence has no slot to merge into.
        return (dms.hard_decisions(logits) > 0.5) & (positions > 0)[:, None, :]

    def victims(self, ring_victim, lengths, state=None, num_tokens=None):
        return jnp.full_like(lengths, -1)

    def init_state(self, spec: "CacheSpec") -> Any:
        L, S, H, W, D = spec.num_layers, spec.max_seqs, spec.num_kv_heads, self.accumulation_window, spec.head_dim
        return {"win_k": jnp.zeros((L, S, H, W, D), spec.dtype), "win_v": jnp.zeros((L, S, H, W, D), spec.dtype),
                "win_w": jnp.zeros((L, S, H, W), jnp.float32), "seg_len": jnp.zeros((L, S, H), jnp.int32)}

    def describe(self) -> dict:
        return {"policy": self.name, "accumulation_window": int(self.accumulation_window)}


POLICIES = ("vanilla", "dms", "fixed", "tova", "h2o", "streaming", "quest", "dmc")


def make_policy(name: str | EvictionPolicy, dms_cfg: DMSConfig | None = None, *, dmc_cfg: DMCConfig | None = None,
                **kw) -> EvictionPolicy:
    """A policy by name: "vanilla"; "dms" and "fixed" (the model's DMSConfig ``dms_cfg``, with ``window`` /
    ``alpha_per`` overriding its fields when given; "fixed" also takes ``cr``); "dmc" (the model's DMCConfig
    ``dmc_cfg``, ``accumulation_window`` overriding it); or a baseline of ``dms_jax.baselines`` ("tova", "h2o",
    "streaming", "quest"; keyword ``budget`` = tokens per KV head)."""
    if isinstance(name, EvictionPolicy):
        return name
    if name == "vanilla":
        return VanillaPolicy()
    if name == "dmc":
        if dmc_cfg is None and "accumulation_window" not in kw:
            raise ValueError("policy 'dmc' needs a model with a DMCConfig (or an explicit accumulation_window)")
        return DMCPolicy(_with_fields(dmc_cfg or DMCConfig(), kw, ("accumulation_window",)), **kw)
    if name in ("dms", "fixed"):
        if dms_cfg is None and "window" not in kw:
            raise ValueError(f"policy {name!r} needs a model with a DMSConfig (or an explicit window)")
        cfg = _with_fields(dms_cfg or DMSConfig(), kw, ("window", "alpha_per"))
        return DMSPolicy(cfg, **kw) if name == "dms" else FixedRatePolicy(cfg, **kw)
    if name in ("tova", "h2o", "streaming", "quest"):
        from dms_jax import baselines  # baselines builds on this module

        return baselines.BASELINES[name](**kw)
    raise ValueError(f"unknown eviction policy {name!r}; known: {POLICIES}")


def _with_fields(cfg, kw: dict, fields: tuple[str, ...]):
    """``cfg`` with the given ``fields`` taken out of ``kw`` (popped) where present and not None; the config
    validates them."""
    given = {f: kw.pop(f) for f in fields if f in kw}
    given = {f: v for f, v in given.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


# ---------------------------------------------------------------------------------------------------------
# Page accounting
# ---------------------------------------------------------------------------------------------------------


def pages_for(lengths: Array, page_size: int) -> Array:
    """Pages a head of ``lengths`` live slots holds (ceil)."""
    return (lengths + page_size - 1) // page_size


def free_pages(refcount: Array) -> Array:
    return jnp.sum(refcount == 0, dtype=jnp.int32)


def used_pages(refcount: Array) -> Array:
    """Pages in use, excluding the sink."""
    return jnp.sum(refcount[1:] > 0, dtype=jnp.int32)


def allocate(refcount: Array, need: Array) -> tuple[Array, Array]:
    """Hands out one free page to every True entry of ``need`` (any shape), in flattened order.

    Returns (page ids with ``need``'s shape, SINK_PAGE where not needed; new refcount). The caller has checked that
    enough pages are free (``sum(need) <= free_pages``); entries past the free pages would get the sink.
    """
    flat = need.reshape(-1)
    n = flat.shape[0]
    free_ids = jnp.nonzero(refcount == 0, size=n, fill_value=SINK_PAGE)[0].astype(jnp.int32)
    rank = jnp.cumsum(flat.astype(jnp.int32)) - 1
    ids = jnp.where(flat, free_ids[jnp.clip(rank, 0, n - 1)], SINK_PAGE)
    refcount = refcount.at[ids].add(flat.astype(jnp.int32))
    refcount = refcount.at[SINK_PAGE].set(1)
    return ids.reshape(need.shape), refcount


def table_refs(cache: PagedCache, page_size: int) -> Array:
    """[L, S, Hkv, M] bool: the table entries that reference a page (below each head's page count)."""
    m = cache.block_tables.shape[-1]
    return jnp.arange(m) < pages_for(cache.lengths, page_size)[..., None]


def release(cache: PagedCache, seqs: Array, page_size: int) -> PagedCache:
    """Lets sequences ``seqs`` ``[S]`` bool go: drops their page references (pages whose count reaches 0 are free
    again) and resets their tables, lengths, ring and token count."""
    refs = table_refs(cache, page_size) & seqs[None, :, None, None]
    refcount = cache.refcount.at[cache.block_tables.reshape(-1)].add(-refs.reshape(-1).astype(jnp.int32))
    refcount = refcount.at[SINK_PAGE].set(1)
    keep3 = ~seqs[None, :, None]
    return cache.replace(
        refcount=refcount,
        block_tables=jnp.where(keep3[..., None], cache.block_tables, SINK_PAGE),
        lengths=jnp.where(keep3, cache.lengths, 0),
        ring_slot=jnp.where(keep3[..., None], cache.ring_slot, 0),
        ring_dec=cache.ring_dec & keep3[..., None],
        num_tokens=jnp.where(seqs, 0, cache.num_tokens),
        policy_state=_state_rows(cache.policy_state, lambda x: jnp.where(
            seqs.reshape((1, -1) + (1,) * (x.ndim - 2)), jnp.zeros_like(x), x)),
    )


def drop_rows(refcount: Array, tables: Array, lengths: Array, ring_slot: Array, ring_dec: Array, rows: Array,
              page_size: int):
    """``release`` for the rows ``rows`` ``[B]`` of one layer's arrays (tables ``[B, H, M]``, lengths ``[B, H]``,
    ring ``[B, H, R]``): their pages in this layer go back to the pool at once. Returns the updated arrays."""
    refs = (jnp.arange(tables.shape[-1]) < pages_for(lengths, page_size)[..., None]) & rows[:, None, None]
    refcount = refcount.at[tables.reshape(-1)].add(-refs.reshape(-1).astype(jnp.int32)).at[SINK_PAGE].set(1)
    keep = ~rows[:, None]
    return (refcount, jnp.where(keep[..., None], tables, SINK_PAGE), jnp.where(keep, lengths, 0),
            jnp.where(keep[..., None], ring_slot, 0), ring_dec & keep[..., None])


def fork(cache: PagedCache, src: Array, dst: Array, page_size: int) -> PagedCache:
    """Copy-on-write fork: sequence ``dst[i]`` becomes a copy of ``src[i]`` sharing all its pages (``[K]`` int32).

    Nothing is copied now; a page is copied the first time a sharer writes into it (see ``plan_decode``). The
    destinations must be empty (freshly released) slots.
    """
    tables = cache.block_tables.at[:, dst].set(cache.block_tables[:, src])
    lengths = cache.lengths.at[:, dst].set(cache.lengths[:, src])
    refs = jnp.arange(tables.shape[-1]) < pages_for(cache.lengths[:, src], page_size)[..., None]
    refcount = cache.refcount.at[cache.block_tables[:, src].reshape(-1)].add(refs.reshape(-1).astype(jnp.int32))
    return cache.replace(
        refcount=refcount.at[SINK_PAGE].set(1),
        block_tables=tables,
        lengths=lengths,
        ring_slot=cache.ring_slot.at[:, dst].set(cache.ring_slot[:, src]),
        ring_dec=cache.ring_dec.at[:, dst].set(cache.ring_dec[:, src]),
        num_tokens=cache.num_tokens.at[dst].set(cache.num_tokens[src]),
        policy_state=_state_rows(cache.policy_state, lambda x: x.at[:, dst].set(x[:, src])),
    )


def resize_slots(cache: PagedCache, max_seqs: int) -> PagedCache:
    """The same pool with ``max_seqs`` sequence slots: existing slots keep their index, new ones are empty.
    Dropped slots must be empty (released). Use with ``dataclasses.replace(spec, max_seqs=...)``."""
    s = cache.num_tokens.shape[0]
    if max_seqs < s and bool(jnp.any(cache.lengths[:, max_seqs:] > 0)):
        raise ValueError(f"slots {max_seqs}..{s - 1} still hold tokens; release them first")

    def fit(x, axis, fill):
        if max_seqs <= s:
            return jax.lax.slice_in_dim(x, 0, max_seqs, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, max_seqs - s)
        return jnp.pad(x, pad, constant_values=fill)

    return cache.replace(
        block_tables=fit(cache.block_tables, 1, SINK_PAGE), lengths=fit(cache.lengths, 1, 0),
        ring_slot=fit(cache.ring_slot, 1, 0), ring_dec=fit(cache.ring_dec, 1, False),
        num_tokens=fit(cache.num_tokens, 0, 0),
        policy_state=_state_rows(cache.policy_state, lambda x: fit(x, 1, 0)))


def exclusive_pages(cache: PagedCache, page_size: int) -> Array:
    """[S] pages only this sequence references (refcount 1): what letting it go frees for sure."""
    refs = table_refs(cache, page_size)
    rc = cache.refcount[cache.block_tables]
    return jnp.sum(refs & (rc == 1), axis=(0, 2, 3), dtype=jnp.int32)


def select_preemptions(need: Array, freeable: Array, candidate: Array, n_free: Array) -> Array:
    """Which sequences to preempt so that the remaining page requests fit: ``[S]`` bool.

    need: pages each sequence asks for now; freeable: pages preempting it returns at once; candidate: may be
    preempted. Candidates go highest slot first (the most recently admitted), and only as many as needed: the
    shortest such prefix with ``n_free + freed >= total need - need of the preempted``. Empty when it fits.
    When every sequence that needs a page is a candidate a solution always exists.
    """
    s = need.shape[0]
    order = jnp.arange(s - 1, -1, -1)
    gain_all = freeable[order] + need[order]
    c = candidate[order] & (gain_all > 0)  # preempting a sequence that neither asks nor frees helps nobody
    gain = jnp.where(c, gain_all, 0)
    total = jnp.sum(need)
    ok = n_free + jnp.cumsum(gain) >= total
    first = jnp.where(jnp.any(ok), jnp.argmax(ok), s - 1)  # no prefix suffices: every candidate goes
    pre = c & (jnp.arange(s) <= first) & (n_free < total)
    return jnp.zeros((s,), bool).at[order].set(pre)


def note_high_water(cache: PagedCache) -> PagedCache:
    return cache.replace(high_water=jnp.maximum(cache.high_water, used_pages(cache.refcount)))


# ---------------------------------------------------------------------------------------------------------
# Decode: one token per sequence
# ---------------------------------------------------------------------------------------------------------


@struct.dataclass
class DecodePlan:
    """Where each head's incoming token goes, decided before the forward (all of it is known then: the token that
    leaves the window was decided at least one step ago)."""

    target: Array  # [L, S, H] slot the token is written to
    new_lengths: Array  # [L, S, H]
    need: Array  # [L, S, H] bool: needs a fresh page (append at a page boundary, or copy-on-write)
    cow: Array  # [L, S, H] bool: the target page is shared and must be copied first
    page_index: Array  # [L, S, H] table index of the target page


def plan_decode(cache: PagedCache, spec: CacheSpec, active: Array, policy: EvictionPolicy,
                policy_state: Any = None) -> DecodePlan:
    ps, r = spec.page_size, spec.ring
    n = cache.num_tokens[None, :, None]  # position of the incoming token
    idx = (cache.num_tokens % r)[None, :, None, None]
    old_slot = jnp.take_along_axis(cache.ring_slot, idx, axis=-1)[..., 0]
    old_dec = jnp.take_along_axis(cache.ring_dec, idx, axis=-1)[..., 0] & (n >= r)
    ring_victim = jnp.where(old_dec, old_slot, -1)
    victim = policy.victims(ring_victim, cache.lengths, cache.policy_state if policy_state is None else policy_state,
                            cache.num_tokens)
    act = active[None, :, None]
    overwrite = (victim >= 0) & act
    target = jnp.where(overwrite, victim, cache.lengths)
    append = act & ~overwrite
    new_lengths = cache.lengths + append.astype(jnp.int32)
    page_index = target // ps
    fresh = append & (cache.lengths % ps == 0)
    cur = jnp.take_along_axis(cache.block_tables, jnp.minimum(page_index, spec.max_pages_per_head - 1)[..., None],
                              axis=-1)[..., 0]
    cow = act & ~fresh & (cache.refcount[cur] > 1)
    return DecodePlan(target=target, new_lengths=new_lengths, need=fresh | cow, cow=cow, page_index=page_index)


def apply_decode_plan(cache: PagedCache, spec: CacheSpec, plan: DecodePlan, active: Array):
    """Allocates the planned pages (the caller made sure they fit), copies shared target pages (copy-on-write),
    records the incoming token in the ring with a pending decision, bumps lengths and token counts.

    Returns (cache, write_page [L, S, H], write_offset [L, S, H]); inactive heads write to the sink.
    """
    ps, r = spec.page_size, spec.ring
    ids, refcount = allocate(cache.refcount, plan.need)
    pidx = jnp.minimum(plan.page_index, spec.max_pages_per_head - 1)[..., None]
    old = jnp.take_along_axis(cache.block_tables, pidx, axis=-1)[..., 0]

    # Copy-on-write, unconditionally (heads without a shared target copy the sink onto itself, which stays in
    # cache): a lax.cond carrying the pools made XLA copy both pools (hundreds of MB) at every step.
    src = jnp.where(plan.cow, old, SINK_PAGE).reshape(-1)
    dst = jnp.where(plan.cow, ids, SINK_PAGE).reshape(-1)
    k_pages = cache.k_pages.at[dst].set(cache.k_pages[src])
    v_pages = cache.v_pages.at[dst].set(cache.v_pages[src])
    refcount = refcount.at[src].add(-plan.cow.reshape(-1).astype(jnp.int32)).at[SINK_PAGE].set(1)
    tables = jnp.where(
        (jnp.arange(spec.max_pages_per_head) == plan.page_index[..., None]) & plan.need[..., None],
        ids[..., None], cache.block_tables)
    write_page = jnp.take_along_axis(tables, pidx, axis=-1)[..., 0]
    act = active[None, :, None]
    write_page = jnp.where(act, write_page, SINK_PAGE)
    write_off = jnp.where(act, plan.target % ps, 0)
    ring_idx = (cache.num_tokens % r)[None, :, None]
    hit = (jnp.arange(r) == ring_idx[..., None]) & act[..., None]
    cache = cache.replace(
        k_pages=k_pages, v_pages=v_pages, refcount=refcount, block_tables=tables,
        lengths=jnp.where(act, plan.new_lengths, cache.lengths),
        ring_slot=jnp.where(hit, plan.target[..., None], cache.ring_slot),
        ring_dec=cache.ring_dec & ~hit,
        num_tokens=cache.num_tokens + active.astype(jnp.int32),
    )
    return note_high_water(cache), write_page, write_off


def write_kv(k_pages: Array, v_pages: Array, page: Array, offset: Array, k: Array, v: Array):
    """Scatters one token per head: page/offset ``[...]``, k/v ``[..., D]``."""
    d = k.shape[-1]
    page, offset = page.reshape(-1), offset.reshape(-1)
    k_pages = k_pages.at[page, offset].set(k.reshape(-1, d).astype(k_pages.dtype))
    v_pages = v_pages.at[page, offset].set(v.reshape(-1, d).astype(v_pages.dtype))
    return k_pages, v_pages


def set_previous_decision(ring_dec: Array, num_tokens_before: Array, decision: Array, active: Array, ring: int):
    """Stores the decision for token ``n - 1`` (computed at the incoming token ``n``) in one layer's ring.

    ring_dec ``[S, H, R]``; num_tokens_before ``[S]`` (n); decision ``[S, H]`` bool; active ``[S]``.
    """
    idx = ((num_tokens_before - 1) % ring)[:, None, None]
    ok = (active & (num_tokens_before >= 1))[:, None, None]
    hit = (jnp.arange(ring) == idx) & ok
    return jnp.where(hit, decision[..., None], ring_dec)


# ---------------------------------------------------------------------------------------------------------
# Prefill: a chunk of tokens per sequence
# ---------------------------------------------------------------------------------------------------------


def ring_positions(num_tokens: Array, ring: int) -> Array:
    """[S, R]: the position of the token each ring entry holds (the latest p < n with p % R == index), -1 if none."""
    e = jnp.arange(ring)
    n = num_tokens[:, None]
    p = n - 1 - jnp.mod(n - 1 - e, ring)
    return jnp.where(p >= 0, p, -1)


def marked_positions(ring_slot: Array, ring_dec: Array, num_tokens: Array, width_tokens: int) -> Array:
    """``[B, H, width_tokens]``: for each cached slot, the position of its token if it is a ring token marked for
    eviction, else -1 (kept for good, or not a live slot). ring ``[B, H, R]``, num_tokens ``[B]``."""
    b, h, r = ring_slot.shape
    pos = ring_positions(num_tokens, r)  # [B, R]
    valid = (pos >= 0)[:, None, :] & ring_dec
    slot = jnp.where(valid, ring_slot, width_tokens)  # out of range -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    return jnp.full((b, h, width_tokens), -1, jnp.int32).at[bi, hi, slot].set(
        jnp.broadcast_to(pos[:, None, :], (b, h, r)), mode="drop")


def marked_gone(marked_pos: Array, q_pos: Array, window: int) -> Array:
    """``[B, H, C, W]``: which cached slots are gone for each chunk query -- those holding a token marked for
    eviction that the query no longer sees (``dms.visible_if_marked``). marked_pos ``[B, H, W]``
    (``marked_positions``: -1 for a slot kept for good), q_pos ``[B, C]``."""
    mp = marked_pos[:, :, None, :]
    return (mp >= 0) & ~dms.visible_if_marked(q_pos[:, None, :, None], mp, window)


def cached_visibility(lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array, q_pos: Array,
                      width_tokens: int, window: int) -> Array:
    """Which cached slots each chunk query may attend to: ``[B, H, C, width_tokens]`` bool.

    lengths ``[B, H]``, ring ``[B, H, R]``, num_tokens ``[B]`` (before the chunk), q_pos ``[B, C]``. A cached slot
    ``< length`` is visible unless it holds a ring token marked for eviction whose window has passed for the
    query (``marked_gone``). Slots outside the ring hold tokens with decision 0 (kept forever): a marked token
    is overwritten the moment it leaves the window.
    """
    mp = marked_positions(ring_slot, ring_dec, num_tokens, width_tokens)
    live = jnp.arange(width_tokens)[None, None, :] < lengths[..., None]  # [B, H, W]
    return live[:, :, None, :] & ~marked_gone(mp, q_pos, window)


def cached_reads(lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array, q_pos: Array, q_valid: Array,
                 window: int) -> Array:
    """``[B]`` cached slots read by the chunk's valid queries, summed over heads: each query reads the head's live
    slots except marked ring tokens already out of its window (the same count as ``cached_visibility``)."""
    r = ring_slot.shape[-1]
    pos = ring_positions(num_tokens, r)  # [B, R]
    marked = (pos >= 0)[:, None, :] & ring_dec  # [B, H, R]
    gone = marked_gone(jnp.where(marked, pos[:, None, :], -1), q_pos, window)  # [B, H, C, R]
    per_q = lengths[:, :, None] - jnp.sum(gone, axis=-1, dtype=jnp.int32)
    return jnp.sum(jnp.where(q_valid[:, None, :], per_q, 0), axis=(1, 2), dtype=jnp.int32)


@struct.dataclass
class ChunkPlan:
    """Where the tokens of one chunk go in one layer (per (sequence, KV head))."""

    target: Array  # [B, H, C] slot of each surviving chunk token (garbage where not written)
    write: Array  # [B, H, C] bool: token is written (valid and still alive at the end of the chunk)
    new_lengths: Array  # [B, H]
    have: Array  # [B, H] pages held before the chunk
    need: Array  # [B, H, J] bool: fresh pages to allocate (table indices have + j)
    ring_slot: Array  # [B, H, R] after the chunk
    ring_dec: Array  # [B, H, R] after the chunk


def plan_chunk(lengths: Array, ring_slot: Array, ring_dec: Array, num_tokens: Array, n_valid: Array,
               dec_chunk: Array, page_size: int) -> ChunkPlan:
    """Vectorised equivalent of inserting the chunk's tokens one by one, writing only the tokens still alive
    after the chunk.

    lengths ``[B, H]``; ring ``[B, H, R]`` with the decision for token n-1 already filled in; num_tokens ``[B]``
    (n, before the chunk); n_valid ``[B]`` (c, tokens of the chunk for each sequence, 0..C); dec_chunk
    ``[B, H, C]`` owner decisions for the chunk's tokens (the last valid one pending = False).

    Chunk token k at position n + k pushes token n + k - R out of the window. If that token is marked it goes:
    when it is an older ring token its slot becomes a *hole*; when it is a chunk token (k >= R) it is simply
    never written. Surviving chunk tokens fill the holes first, in order, then append. Each insertion evicts at
    most one token, so holes <= survivors and no hole is left behind: live slots stay ``0 .. length-1``.
    """
    b, h, c_max = dec_chunk.shape
    r = ring_slot.shape[-1]
    k = jnp.arange(c_max)
    in_chunk = k[None, None, :] < n_valid[:, None, None]  # [B, 1, C]
    # Older ring tokens leaving the window during the chunk (chunk indices k < R).
    kr = min(r, c_max)
    ko = jnp.arange(kr)
    ridx = (num_tokens[:, None] + ko[None, :]) % r  # [B, Kr]: entry of token n + k - R
    leave_valid = (num_tokens[:, None] + ko[None, :] >= r) & (ko[None, :] < n_valid[:, None])  # [B, Kr]
    old_dec = jnp.take_along_axis(ring_dec, jnp.broadcast_to(ridx[:, None, :], (b, h, kr)), axis=-1)
    old_slot = jnp.take_along_axis(ring_slot, jnp.broadcast_to(ridx[:, None, :], (b, h, kr)), axis=-1)
    # Chunk tokens evicted within the chunk: marked and pushed out by a later chunk token.
    evicted = dec_chunk & (k[None, None, :] + r < n_valid[:, None, None])
    surv = in_chunk & ~evicted
    plan = _fill_holes(lengths, old_dec & leave_valid[:, None, :], old_slot, surv, page_size)
    # The ring after the chunk: its last min(c, R) tokens (all alive) replace their entries.
    return _ring_after_chunk(plan, ring_slot, ring_dec, num_tokens, n_valid, plan.target, dec_chunk)


def plan_chunk_explicit(lengths: Array, hole: Array, surv: Array, ring_slot: Array, ring_dec: Array,
                        num_tokens: Array, n_valid: Array, page_size: int) -> ChunkPlan:
    """A chunk plan from explicit choices (score-based policies): ``hole`` ``[B, H, W]`` marks the cached slots
    (``< lengths``) to free, ``surv`` ``[B, H, C]`` the chunk tokens to keep. Survivors fill the holes first (in
    slot order), then append, as in ``plan_chunk``; the caller guarantees ``sum(hole) <= sum(surv)`` per head (a
    policy that keeps ``min(budget, cached + chunk)`` tokens with ``cached <= budget`` does), so live slots stay
    ``0 .. length-1``. The ring gets the last chunk tokens with decision 0 (these policies never use it)."""
    b, h, w = hole.shape
    slots = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32), (b, h, w))
    plan = _fill_holes(lengths, hole, slots, surv, page_size)
    return _ring_after_chunk(plan, ring_slot, ring_dec, num_tokens, n_valid, jnp.where(surv, plan.target, 0),
                             jnp.zeros(surv.shape, bool))


def _fill_holes(lengths: Array, hole: Array, hole_slot: Array, surv: Array, page_size: int) -> ChunkPlan:
    """The slots of a chunk's surviving tokens (both chunk plans): the freed slots first -- ``hole_slot``
    ``[B, H, K]`` where ``hole`` -- in order, then appended after ``lengths`` ``[B, H]``; the new lengths and the
    fresh pages that takes. surv ``[B, H, C]``. The ring fields are left None, for ``_ring_after_chunk``."""
    b, h, kh = hole.shape
    c_max = surv.shape[-1]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    n_holes = jnp.sum(hole, axis=-1, dtype=jnp.int32)
    hrank = jnp.cumsum(hole.astype(jnp.int32), axis=-1) - 1
    holes = jnp.zeros((b, h, kh), jnp.int32).at[bi, hi, jnp.where(hole, hrank, kh)].set(hole_slot, mode="drop")
    n_surv = jnp.sum(surv, axis=-1, dtype=jnp.int32)
    srank = jnp.cumsum(surv.astype(jnp.int32), axis=-1) - 1
    from_hole = jnp.take_along_axis(holes, jnp.clip(srank, 0, kh - 1), axis=-1)
    target = jnp.where(srank < n_holes[..., None], from_hole, lengths[..., None] + srank - n_holes[..., None])
    new_lengths = lengths + n_surv - n_holes
    have = pages_for(lengths, page_size)
    want = pages_for(new_lengths, page_size)
    j_max = -(-c_max // page_size) + 1
    need = jnp.arange(j_max)[None, None, :] < (want - have)[..., None]
    return ChunkPlan(target=target, write=surv, new_lengths=new_lengths, have=have, need=need,
                     ring_slot=None, ring_dec=None)


def _ring_after_chunk(plan: ChunkPlan, ring_slot: Array, ring_dec: Array, num_tokens: Array, n_valid: Array,
                      slot: Array, dec: Array) -> ChunkPlan:
    """``plan`` with the ring after the chunk: the chunk's last ``min(c, R)`` tokens take their entries
    ``(n + k) % R`` with slot ``slot`` and decision ``dec`` (both ``[B, H, C]``)."""
    b, h, c_max = slot.shape
    r = ring_slot.shape[-1]
    k = jnp.arange(c_max)[None, None, :]
    c = n_valid[:, None, None]
    last = (k < c) & (k >= c - r)
    ent = jnp.where(last, (num_tokens[:, None, None] + k) % r, r)  # r -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    return plan.replace(ring_slot=ring_slot.at[bi, hi, ent].set(slot, mode="drop"),
                        ring_dec=ring_dec.at[bi, hi, ent].set(dec, mode="drop"))


def insert_chunk(refcount: Array, tables: Array, lengths: Array, ring_slot: Array, ring_dec: Array,
                 num_tokens: Array, n_valid: Array, dec_chunk: Array, ok: Array, page_size: int,
                 plan: ChunkPlan | None = None):
    """Books one chunk into one layer of sequences ``[B]`` (rows of the layer's tables): allocates pages, updates
    tables, lengths and ring, and says where each chunk token's K/V goes (``write_kv`` does the write, so that a
    caller can write many layers at once).

    tables ``[B, H, M]``, lengths ``[B, H]``, ring ``[B, H, R]`` (decision for token n-1 filled in), num_tokens /
    n_valid / ok ``[B]``, dec_chunk ``[B, H, C]`` (``chunk_owner_decisions``). ``plan``: a policy's own plan
    (``plan_chunk_explicit``) instead of the ring's.
    Sequences not ``ok`` are left untouched. When the free pages do not cover the requests, the highest rows that
    ask for pages are dropped (``select_preemptions``) and reported in ``preempted`` ``[B]``: the caller releases
    them (their pages in other layers are not visible here).

    Returns ((refcount, tables, lengths, ring_slot, ring_dec), (page, offset) ``[B, H, C]`` -- the sink for
    tokens not written --, preempted, overflow). ``overflow`` (scalar bool) would mean more pages were handed
    out than were free -- a bookkeeping bug; callers turn it into an error, never into silent corruption.
    """
    b, h, _ = dec_chunk.shape
    if plan is None:
        plan = plan_chunk(lengths, ring_slot, ring_dec, num_tokens, n_valid, dec_chunk, page_size)
    need_seq = jnp.sum(plan.need & ok[:, None, None], axis=(1, 2), dtype=jnp.int32)
    n_free = free_pages(refcount)
    pre = select_preemptions(need_seq, jnp.zeros_like(need_seq), ok & (n_valid > 0), n_free)
    ok = ok & ~pre
    need = plan.need & ok[:, None, None]
    overflow = jnp.sum(need) > n_free
    ids, refcount = allocate(refcount, need)
    m = tables.shape[-1]
    col = jnp.where(need, plan.have[..., None] + jnp.arange(need.shape[-1]), m)  # m -> dropped
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    new_tables = tables.at[bi, hi, col].set(ids, mode="drop")
    wr = plan.write & ok[:, None, None]
    page = jnp.take_along_axis(new_tables, jnp.clip(plan.target // page_size, 0, m - 1), axis=-1)
    page = jnp.where(wr, page, SINK_PAGE)
    off = jnp.where(wr, plan.target % page_size, 0)
    ok2 = ok[:, None]
    out = (refcount, jnp.where(ok2[..., None], new_tables, tables),
           jnp.where(ok2, plan.new_lengths, lengths), jnp.where(ok2[..., None], plan.ring_slot, ring_slot),
           jnp.where(ok2[..., None], plan.ring_dec, ring_dec))
    return out, (page, off), pre, overflow


def chunk_owner_decisions(dec_at: Array, n_valid: Array) -> Array:
    """Owner decisions for a chunk from the decisions *computed at* its positions: token k's decision is the one
    computed at k + 1 if that token is in the chunk, else pending (keep). dec_at ``[B, H, C]`` bool."""
    c_max = dec_at.shape[-1]
    owner = dms.shift_to_owner(dec_at, False)
    return owner & (jnp.arange(c_max)[None, None, :] + 1 < n_valid[:, None, None])


# ---------------------------------------------------------------------------------------------------------
# DMC: merge into the last slot (policy "dmc")
# ---------------------------------------------------------------------------------------------------------


def _window_in_order(state: dict, num_tokens: Array):
    """The accumulation window of one layer as a time-ordered prefix (oldest first): keys / values ``[B, W, H, D]``
    (float32), importance and alpha ``[B, H, W]``. Token ``p`` sits at ring index ``p % W``; alpha is 1 for the
    entries of the last slot's segment after its first one (``seg_len`` newest entries), 0 elsewhere -- so a chunk
    token that merges continues exactly that segment, and entries that never existed weigh nothing."""
    b, h, w, _ = state["win_k"].shape
    idx = (num_tokens[:, None] - w + jnp.arange(w)[None, :]) % w  # [B, W]
    idx3 = jnp.broadcast_to(idx[:, None, :], (b, h, w))
    k = jnp.take_along_axis(state["win_k"], idx3[..., None], axis=2).astype(jnp.float32)
    v = jnp.take_along_axis(state["win_v"], idx3[..., None], axis=2).astype(jnp.float32)
    imp = jnp.take_along_axis(state["win_w"], idx3, axis=2)
    age = w - 1 - jnp.arange(w)  # 0 = the newest entry (token n - 1)
    alpha = (age[None, None, :] < state["seg_len"][..., None] - 1).astype(jnp.float32)
    return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), imp, alpha


def dmc_chunk_states(state: dict, num_tokens: Array, k: Array, v: Array, importance: Array, merge: Array,
                     dtype) -> tuple[Array, Array]:
    """Every intermediate merged state of a chunk's tokens, float32 ``[B, C, H, D]`` (keys before RoPE), as the
    training-side ``dmc.accumulate`` computes them: a chunk token's segment may have begun in an earlier chunk, so
    the window of the last W tokens (``state``, one layer's rows) goes in front of the chunk.

    k, v ``[B, C, H, D]`` (keys before RoPE, element d-1 zeroed), importance ``[B, H, C]``, merge ``[B, H, C]`` bool
    (hard decisions, False at segment starts and padding), num_tokens ``[B]`` before the chunk. The chunk's k / v
    are rounded to the cache dtype ``dtype`` first, as decode reads them back from the window."""
    w = state["win_k"].shape[2]
    pk, pv, pw, palpha = _window_in_order(state, num_tokens)
    alpha = jnp.concatenate([palpha, merge.astype(jnp.float32)], axis=-1)
    imp = jnp.concatenate([pw, importance.astype(jnp.float32)], axis=-1)

    def acc(prefix, x):
        x = jnp.concatenate([prefix, x.astype(dtype).astype(jnp.float32)], axis=1)
        return dmc.accumulate(x, alpha, imp, w)[:, w:]

    return acc(pk, k), acc(pv, v)


def dmc_plan_chunk(lengths: Array, ring_slot: Array, ring_dec: Array, merge: Array, n_valid: Array,
                   page_size: int) -> ChunkPlan:
    """Where a chunk's merged states go in one layer (for ``insert_chunk(plan=...)``).

    merge ``[B, H, C]`` (False for padding). Chunk token j belongs to slot ``length - 1 + (appends among tokens
    0..j)``; only the state that ends its segment (the next token appends, or j is the chunk's last token) is
    written, so each slot is written once. The first token merging overwrites the head's last cached slot. No
    copy-on-write: prefill fills empty (unforked) sequences, whose pages nobody shares. The ring is unchanged."""
    c = merge.shape[-1]
    valid = jnp.arange(c)[None, None, :] < n_valid[:, None, None]
    append = valid & ~merge
    target = lengths[..., None] + jnp.cumsum(append, axis=-1, dtype=jnp.int32) - 1
    seg_end = valid & ~dms.shift_to_owner(merge, False)
    new_lengths = lengths + jnp.sum(append, axis=-1, dtype=jnp.int32)
    have = pages_for(lengths, page_size)
    want = pages_for(new_lengths, page_size)
    j_max = -(-c // page_size) + 1
    need = jnp.arange(j_max)[None, None, :] < (want - have)[..., None]
    return ChunkPlan(target=target, write=seg_end, new_lengths=new_lengths, have=have, need=need,
                     ring_slot=ring_slot, ring_dec=ring_dec)


def dmc_window_after_chunk(state: dict, num_tokens: Array, n_valid: Array, k: Array, v: Array, importance: Array,
                           merge: Array, ok: Array) -> dict:
    """One layer's window state after a chunk: its last W valid tokens into the ring, and the new ``seg_len`` (the
    tokens since the chunk's last append, or the old segment grown by the chunk when every token merged; capped at
    W). Shapes as ``dmc_chunk_states``; rows not ``ok`` [B] are left unchanged."""
    b, h, w, _ = state["win_k"].shape
    c = k.shape[1]
    kk = jnp.arange(c)
    valid = kk[None, :] < n_valid[:, None]  # [B, C]
    ring = jnp.where(valid & (kk[None, :] >= n_valid[:, None] - w), (num_tokens[:, None] + kk) % w, w)  # w: dropped
    ring = jnp.broadcast_to(ring[:, None, :], (b, h, c))
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
    win_k = state["win_k"].at[bi, hi, ring].set(jnp.swapaxes(k, 1, 2).astype(state["win_k"].dtype), mode="drop")
    win_v = state["win_v"].at[bi, hi, ring].set(jnp.swapaxes(v, 1, 2).astype(state["win_v"].dtype), mode="drop")
    win_w = state["win_w"].at[bi, hi, ring].set(importance.astype(jnp.float32), mode="drop")
    append = valid[:, None, :] & ~merge
    last = jnp.max(jnp.where(append, kk, -1), axis=-1)  # [B, H]
    seg = jnp.where(last >= 0, n_valid[:, None] - last, state["seg_len"] + n_valid[:, None])
    new = {"win_k": win_k, "win_v": win_v, "win_w": win_w, "seg_len": jnp.minimum(seg, w)}
    return jax.tree.map(lambda a, o: jnp.where(ok.reshape((b,) + (1,) * (a.ndim - 1)), a, o), new, state)


def dmc_decode_slots(refcount: Array, tables: Array, lengths: Array, merge: Array, active: Array, page_size: int):
    """One layer's slot bookkeeping for a DMC decode token: a merge overwrites slot ``length - 1``, an append takes
    slot ``length`` (a fresh page at a page boundary); a write into a shared page (after a fork) goes to a fresh copy.

    tables ``[S, H, M]``, lengths / merge ``[S, H]`` (merge already False for inactive rows and first tokens),
    active ``[S]``. Returns (refcount, tables, lengths, write_page, write_offset, (copy_src, copy_dst)): copy page
    src to dst (``copy_pages``) before writing the slot; inactive heads write to the sink and copy the sink.
    Per head this asks for at most the pages an append would: a merge at a page boundary writes into the full last
    page (a copy only if shared), and off a boundary a merge and an append write into the same page.
    """
    m = tables.shape[-1]
    act = active[:, None]
    target = jnp.where(merge, lengths - 1, lengths)
    page_index = target // page_size
    pidx = jnp.minimum(page_index, m - 1)[..., None]
    fresh = act & ~merge & (lengths % page_size == 0)
    cur = jnp.take_along_axis(tables, pidx, axis=-1)[..., 0]
    cow = act & ~fresh & (refcount[cur] > 1)
    need = fresh | cow
    ids, refcount = allocate(refcount, need)
    src = jnp.where(cow, cur, SINK_PAGE)
    refcount = refcount.at[src].add(-cow.astype(jnp.int32)).at[SINK_PAGE].set(1)
    tables = jnp.where((jnp.arange(m) == page_index[..., None]) & need[..., None], ids[..., None], tables)
    page = jnp.where(act, jnp.take_along_axis(tables, pidx, axis=-1)[..., 0], SINK_PAGE)
    off = jnp.where(act, target % page_size, 0)
    lengths = lengths + (act & ~merge).astype(jnp.int32)
    return refcount, tables, lengths, page, off, (src, jnp.where(cow, ids, SINK_PAGE))


def copy_pages(k_pages: Array, v_pages: Array, src: Array, dst: Array):
    """Copies pages ``src`` to ``dst`` (any equal shapes; sink-to-sink entries are no-ops). Every source is read
    before any destination is written, so a page freed and handed out again within one step is still copied from."""
    src, dst = src.reshape(-1), dst.reshape(-1)
    return k_pages.at[dst].set(k_pages[src]), v_pages.at[dst].set(v_pages[src])


# ---------------------------------------------------------------------------------------------------------
# Host-side checks (tests, debugging)
# ---------------------------------------------------------------------------------------------------------


def compact_selected_pages(tables: Array, lengths: Array, page_mask: Array, page_size: int) -> tuple[Array, Array]:
    """A block table ``[B, H, M]`` holding only the live pages that ``page_mask`` ``[B, H, M]`` selects, in logical order, and its
    length in slots: an attention over ``0 .. length-1`` of the compacted table reads exactly the selected tokens
    (only the last live page can be partly filled, and it stays last). Unused entries point at the sink."""
    b, h, m = tables.shape
    j = jnp.arange(m)
    n_pages = pages_for(lengths, page_size)[..., None]
    sel = page_mask.astype(bool) & (j < n_pages)
    rank = jnp.cumsum(sel.astype(jnp.int32), axis=-1) - 1  # a scatter, not a sort: this runs every layer and step
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(h)[None, :, None]
    compact = jnp.full_like(tables, SINK_PAGE).at[bi, hi, jnp.where(sel, rank, m)].set(tables, mode="drop")
    tokens = jnp.clip(lengths[..., None] - j * page_size, 0, page_size)
    return compact, jnp.sum(jnp.where(sel, tokens, 0), axis=-1, dtype=jnp.int32)


def compacted_slot(slot: Array, lengths: Array, page_mask: Array, page_size: int) -> Array:
    """Where slot ``slot`` ``[...]`` lands in ``compact_selected_pages``' table: -1 if its page is not selected."""
    m = page_mask.shape[-1]
    sel = page_mask.astype(bool) & (jnp.arange(m) < pages_for(lengths, page_size)[..., None])
    page = slot // page_size
    before = jnp.sum(sel & (jnp.arange(m) < page[..., None]), axis=-1, dtype=jnp.int32)
    hit = jnp.take_along_axis(sel, jnp.clip(page, 0, m - 1)[..., None], axis=-1)[..., 0] & (slot >= 0)
    return jnp.where(hit, before * page_size + slot % page_size, -1)


def check_invariants(cache: PagedCache, spec: CacheSpec) -> dict:
    """Verifies the pool bookkeeping on the host; raises AssertionError with a reason. Returns a summary.

    * every page's refcount equals the number of table entries referencing it (the sink: pinned at 1);
    * no two heads of one sequence share a page; no head references the sink below its length;
    * lengths fit the table; the ring slots of existing tokens lie below the head's length.
    """
    tables = np.asarray(cache.block_tables)
    lengths = np.asarray(cache.lengths)
    rc = np.asarray(cache.refcount)
    ps = spec.page_size
    held = -(-lengths // ps)
    assert (held <= tables.shape[-1]).all(), "a head holds more pages than its table has entries"
    refs = np.arange(tables.shape[-1]) < held[..., None]
    counted = np.bincount(tables[refs].reshape(-1), minlength=rc.shape[0])
    counted[SINK_PAGE] = 1
    assert rc[SINK_PAGE] == 1, f"sink refcount {rc[SINK_PAGE]}"
    assert (tables[refs] != SINK_PAGE).all(), "a live table entry points at the sink"
    bad = np.nonzero(counted != rc)[0]
    assert bad.size == 0, f"refcount mismatch on pages {bad[:8].tolist()}: counted {counted[bad[:8]].tolist()} " \
                          f"vs stored {rc[bad[:8]].tolist()}"
    for s in range(tables.shape[1]):
        pages = tables[:, s][refs[:, s]]
        assert len(set(pages.tolist())) == pages.size, f"sequence {s} uses a page twice"
    n = np.asarray(cache.num_tokens)
    pos = np.asarray(ring_positions(jnp.asarray(n), spec.ring))
    rs = np.asarray(cache.ring_slot)
    for s in range(tables.shape[1]):
        ok = pos[s] >= 0
        if ok.any():
            assert (rs[:, s][..., ok] < lengths[:, s][..., None]).all(), f"sequence {s}: ring slot beyond length"
    used = int((rc[1:] > 0).sum())
    return {"used_pages": used, "free_pages": int((rc == 0).sum()), "high_water": int(cache.high_water)}


def live_counts(cache: PagedCache) -> np.ndarray:
    """Host copy of the live tokens per (layer, sequence, KV head)."""
    return np.asarray(cache.lengths)


def bucket(n: int, cap: int) -> int:
    """Rounds a page count up to the next of {2^k, 1.25 * 2^k, 1.5 * 2^k, 1.75 * 2^k} (at most 25% waste, few
    distinct values, hence few compilations), capped at ``cap``."""
    n = max(int(n), 1)
    if n <= 4:
        return min(n, cap)
    p = 1 << (n.bit_length() - 1)
    for f in (1.0, 1.25, 1.5, 1.75, 2.0):
        v = int(math.ceil(p * f))
        if v >= n:
            return min(v, cap)
    return min(2 * p, cap)
