"""Paged KV cache state, one paged sequence per (sequence, layer, KV head): its static spec and its arrays.

Memory layout (DESIGN.md section 1, "Reference cache"):

* ``k_pages``, ``v_pages`` ``[pool_pages, page_size, row_width]`` (row_width = D, or D + 4 for an int8 pool whose
  rows carry their scale: ``pallas_kernels.kv_codec``): one static pool shared by every sequence, layer and KV
  head -- the memory budget. A page holds tokens of exactly one (sequence, layer, KV head). Page 0 is a reserved
  *sink*: masked writes land there and unused block-table entries point at it, so every index is in range and no
  write needs a branch. The budget given by the user (``CacheSpec.num_pages``) excludes the sink. With
  ``kv_groups`` > 1 (tensor parallelism over KV heads, ``tensor_parallel.py``) the pool is split in equal shares,
  one per group of heads, each starting with a sink of its own; a head's pages come from its group's share.
* ``refcount`` ``[pool_pages]`` int32: how many block-table entries point at each page; 0 = free. Chains forked
  from one prompt share its pages copy-on-write, so a page can have several owners; it returns to the pool when
  the last one lets go. Allocation happens on device inside jit: the first free pages of the pool
  (``jnp.nonzero(refcount == 0, size=...)``) are handed out in head order (``pages.allocate``).
* ``block_tables`` ``[L, S, Hkv, M]`` and ``lengths`` ``[L, S, Hkv]``: slots ``0 .. length-1`` of a head's pages (in
  table order) hold its live tokens, in no particular temporal order (RoPE is applied before caching).
* the ring of the last ``R = dms.ring_size(window) = window + 1`` tokens of each head: ``ring_slot`` (where the
  token lives) and ``ring_dec`` (its eviction decision; "pending" = keep until the next token's logit is known).
  Token ``p`` sits at ring index ``p % R`` (``ring_positions``).
* ``num_tokens`` ``[S]``: tokens written so far per sequence (= the position of the next token).

How tokens get in and out is in ``plans.py`` (the DMS update, chunk and decode plans, DMC slots) and
``pages.py`` (allocation, forks, releases); which tokens go is the eviction policy's choice (``policies.py``,
``baselines.py``). All functions here are pure and jit-compatible, except the host-side checks at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dms_jax import dms
from dms_jax.config import check_int
from pallas_kernels.kv_codec import is_quantized, row_width
from pallas_kernels.xla_blocked import SINK_PAGE  # one sink for the cache and its XLA attention (page 0)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static shape of a paged cache (hashable: a jit static argument).

    num_pages: the memory budget in pages (the pool holds one more page per KV-head group, its sink). max_seqs:
    sequence slots. kv_groups: shares of the pool, one per group of KV heads (1 unless tensor parallel); it must
    divide num_kv_heads and num_pages.
    max_pages_per_head: block-table width (pages one head may hold: ceil(max tokens / page_size)).
    window: the delay of the ring's evictions (``dms.visible_if_marked``; the ring holds ``dms.ring_size(window)``
    tokens), the policy's ``delay_window``. dtype: K/V storage dtype name ("int8": quantised rows with a scale
    each, ``pallas_kernels.kv_codec``).
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
    kv_groups: int = 1

    def __post_init__(self):
        # Shapes of the arrays init_cache makes (window: the ring's), so each must be a positive integer.
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_pages", "page_size", "max_seqs",
                     "max_pages_per_head", "window", "kv_groups"):
            check_int(name, getattr(self, name))
        if self.num_kv_heads % self.kv_groups or self.num_pages % self.kv_groups:
            raise ValueError(f"kv_groups ({self.kv_groups}) must divide num_kv_heads ({self.num_kv_heads}) and "
                             f"num_pages ({self.num_pages})")
        jnp.dtype(self.dtype)  # raises on an unknown dtype name

    @property
    def pool_pages(self) -> int:
        return self.num_pages + self.kv_groups

    @property
    def sink_pages(self) -> np.ndarray:
        """The sinks: the first page of each KV-head group's share of the pool (page 0 alone for one group)."""
        return np.arange(self.kv_groups) * (self.pool_pages // self.kv_groups)

    @property
    def ring(self) -> int:
        return dms.ring_size(self.window)

    @property
    def row_width(self) -> int:
        """Entries of one stored (token, KV head) row: head_dim, plus its scale for an int8 pool (kv_codec)."""
        return row_width(self.head_dim, self.dtype)

    @property
    def state_dtype(self) -> str:
        """Dtype of float side state kept beside the pool (DMC's accumulation window): the pool's, or float32 for
        an int8 pool (the window accumulates; only pool rows are quantised)."""
        return "float32" if is_quantized(self.dtype) else self.dtype

    @property
    def bytes_per_entry(self) -> int:
        """K and V bytes of one live (token, layer, KV head) entry."""
        return 2 * self.row_width * jnp.dtype(self.dtype).itemsize

    @property
    def bytes_per_page(self) -> int:
        """K and V bytes of one page."""
        return self.page_size * self.bytes_per_entry

    @property
    def max_tokens_per_head(self) -> int:
        return self.max_pages_per_head * self.page_size

    @classmethod
    def create(cls, *, num_layers, num_kv_heads, head_dim, max_seqs, max_context, window, page_size=16,
               num_pages=None, dtype="float32", kv_groups=1) -> "CacheSpec":
        """num_pages=None: enough for every sequence to keep every token (no eviction, no sharing)."""
        check_int("max_context", max_context)
        check_int("page_size", page_size)
        m = -(-int(max_context) // int(page_size))
        if num_pages is None:
            num_pages = num_layers * max_seqs * num_kv_heads * m
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pages=int(num_pages),
                   page_size=int(page_size), max_seqs=int(max_seqs), max_pages_per_head=m, window=int(window),
                   dtype=jnp.dtype(dtype).name, kv_groups=int(kv_groups))


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
    # KV-head groups (static; ``CacheSpec.kv_groups``): the pool is split into this many equal shares, one per group
    # of heads, each with its own sink (``pages.group_sinks``), so that a tensor-parallel engine keeps each group's
    # pages on its own device (``tensor_parallel.py``). 1: one pool for all heads.
    kv_groups: int = struct.field(pytree_node=False, default=1)


def init_cache(spec: CacheSpec, policy=None) -> PagedCache:
    """An empty cache: every page free, every table pointing at the sink (and the initial state of ``policy``, an
    ``EvictionPolicy`` of policies.py, when given)."""
    L, S, H, M, R = spec.num_layers, spec.max_seqs, spec.num_kv_heads, spec.max_pages_per_head, spec.ring
    shape = (spec.pool_pages, spec.page_size, spec.row_width)
    return PagedCache(
        k_pages=jnp.zeros(shape, spec.dtype),
        v_pages=jnp.zeros(shape, spec.dtype),
        refcount=jnp.zeros((spec.pool_pages,), jnp.int32).at[spec.sink_pages].set(1),
        block_tables=jnp.full((L, S, H, M), SINK_PAGE, jnp.int32),
        lengths=jnp.zeros((L, S, H), jnp.int32),
        ring_slot=jnp.zeros((L, S, H, R), jnp.int32),
        ring_dec=jnp.zeros((L, S, H, R), bool),
        num_tokens=jnp.zeros((S,), jnp.int32),
        high_water=jnp.zeros((), jnp.int32),
        policy_state=None if policy is None else policy.init_state(spec),
        kv_groups=spec.kv_groups,
    )


def state_rows(state: Any, fn) -> Any:
    """Applies ``fn(leaf)`` to every leaf of a policy state (leaves are [L, S, ...]); None stays None."""
    return None if state is None else jax.tree.map(fn, state)


def ring_positions(num_tokens: Array, ring: int) -> Array:
    """[S, R]: the position of the token each ring entry holds (the latest p < n with p % R == index), -1 if none."""
    e = jnp.arange(ring)
    n = num_tokens[:, None]
    p = n - 1 - jnp.mod(n - 1 - e, ring)
    return jnp.where(p >= 0, p, -1)


# ---------------------------------------------------------------------------------------------------------
# Host-side checks (tests, debugging)
# ---------------------------------------------------------------------------------------------------------


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
    sinks = spec.sink_pages
    counted[sinks] = 1
    assert (rc[sinks] == 1).all(), f"sink refcounts {rc[sinks].tolist()}"
    assert not np.isin(tables[refs], sinks).any(), "a live table entry points at a sink"
    group_pages = spec.pool_pages // spec.kv_groups  # head h's pages lie in its group's share of the pool
    head_group = np.arange(spec.num_kv_heads) // (spec.num_kv_heads // spec.kv_groups)
    page_group = np.broadcast_to(head_group[None, None, :, None], tables.shape)
    assert (tables[refs] // group_pages == page_group[refs]).all(), "a head holds a page of another group"
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
    used = int((rc > 0).sum()) - spec.kv_groups
    return {"used_pages": used, "free_pages": int((rc == 0).sum()), "high_water": int(cache.high_water)}


def live_counts(cache: PagedCache) -> np.ndarray:
    """Host copy of the live tokens per (layer, sequence, KV head)."""
    return np.asarray(cache.lengths)
