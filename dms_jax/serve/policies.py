"""Eviction policies: which tokens leave the paged cache (spec.py), as frozen, hashable objects that the jitted
engine takes as static arguments.

This file holds the interface (``EvictionPolicy``; its docstring says what the engine calls) and the built-in
policies: "vanilla" (no eviction), "dms" (the model's learned decisions), "fixed" (a position pattern with a
chosen compression ratio, for benchmarks) and "dmc". The baselines (TOVA, H2O, StreamingLLM, Quest;
``baselines.py``) plug in through the same object; TOVA and H2O choose their victim slots from attention scores
kept in ``PagedCache.policy_state`` and overwrite them exactly like DMS does, so their memory is really freed.
``registry.make_policy`` builds any of them by name.

The DMS rule the ring implements (``plans.py``): the decision for token ``t - 1`` is the logit computed at ``t``
(the one-token shift); a marked token stays ``delay_window`` more positions (``dms.visible_if_marked``), then the
incoming token overwrites its slot, so after inserting token ``t`` a head holds exactly the tokens
``{j <= t : t - j <= window or d_j = 0}`` -- the visible set of the hard-mode attention mask.

DMC (Dynamic Memory Compression, dmc.py; policy "dmc") uses the same pool, tables and lengths but never evicts: per
(sequence, layer, KV head) a token either *appends* a slot (a fresh page when the length is a multiple of the page
size) or *merges* into the head's last slot (the slot is overwritten by the importance-weighted mean of its newest
``W`` tokens, the key rotated at the newest token's position). The hard decision (merge logit > 0) is the token's
own -- no shift, no ring; the first token of a sequence always appends -- so after token ``t`` a head holds one slot
per appended token. What a merge needs from the past -- the raw pre-RoPE keys, values and importance of the last
``W`` tokens and how many of them the last slot averages -- is ``O(W)`` per head, so it lives densely next to the
pool in ``PagedCache.policy_state`` (``DMCPolicy.init_state``; forks copy it, releases clear it). A merge writes into
the last slot, which after a fork may sit in a shared page: it is copied first, like any write into a shared page
(``plans.dmc_decode_slots``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from dms_jax import dms
from dms_jax.config import DMCConfig, DMSConfig, check_int
from dms_jax.serve.spec import CacheSpec, PagedCache

Array = jax.Array


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
    * ``prefill_plan(state, ...)`` (per layer and chunk): optionally its own ``plans.ChunkPlan`` -- which cached
      slots to free and which chunk tokens to keep (TOVA / H2O keep the cache within their budget during prefill)
      -- and the layer's updated state. Default: (None, state): the ring's plan (``plans.plan_chunk``).
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
    # False for the policies that hold every token (vanilla; Quest, which only reads fewer): a request's dense
    # length is then what it will hold (the scheduler's admission check).
    evicts: ClassVar[bool] = True
    # True for the policies whose prefill may free any cached slot (TOVA's chunk mode, H2O), not only the ring's:
    # a prefill into a forked sequence must then copy every shared page first (``pages.prefill_writable``).
    prefill_frees_any_slot: ClassVar[bool] = False

    @property
    def reduces_whole_prompt(self) -> bool:
        """True when ``finish_prefill`` changes the cache (TOVA's prompt mode): a prefix reduced on its own would
        differ from the same tokens inside a longer prompt, so the scheduler does not reuse cached prefixes."""
        return False

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

    def init_state(self, spec: CacheSpec) -> Any:
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

    def finish_prefill(self, cache: PagedCache, slots: Array, spec: CacheSpec) -> PagedCache:
        """The cache after the last prefill chunk of the prompts in sequence slots ``slots`` ``[B]`` (TOVA reduces
        the whole prompt here). Default: unchanged."""
        return cache

    def decode_reads(self, cache: PagedCache) -> Array:
        return jnp.sum(cache.lengths, axis=(0, 2), dtype=jnp.int32)

    def describe(self) -> dict:
        return {"policy": self.name}


@dataclasses.dataclass(frozen=True)
class VanillaPolicy(EvictionPolicy):
    """No eviction: every token stays (a dense cache, paged)."""

    name: ClassVar[str] = "vanilla"
    evicts: ClassVar[bool] = False

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
    more pages than an append; see ``plans.dmc_decode_slots``).
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

    def init_state(self, spec: CacheSpec) -> Any:
        L, S, H, W, D = spec.num_layers, spec.max_seqs, spec.num_kv_heads, self.accumulation_window, spec.head_dim
        win = jnp.zeros((L, S, H, W, D), spec.state_dtype)
        return {"win_k": win, "win_v": win,
                "win_w": jnp.zeros((L, S, H, W), jnp.float32), "seg_len": jnp.zeros((L, S, H), jnp.int32)}

    def describe(self) -> dict:
        return {"policy": self.name, "accumulation_window": int(self.accumulation_window)}
