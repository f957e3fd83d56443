"""Inference engine over the paged per-head cache (cache.py): chunked prefill with exact hard-decision masking,
jit-compiled decode for a batch of sequences of different lengths, W parallel chains sharing one prefill, sampling,
stop tokens, per-request memory / read metrics and pool exhaustion handling.

How a call runs (`Engine.generate`):

1. **Prefill**, chunk by chunk (``prefill_chunk`` tokens of every prompt per call, right-padded). Per layer, the
   chunk's queries attend to the head's cached live slots plus the chunk itself with the exact hard DMS mask
   (cached ring tokens marked for eviction vanish once the query is more than ``window`` behind; chunk keys use
   the usual delayed-eviction bias). Then the chunk is inserted: tokens evicted within the chunk are never
   written, the survivors fill the slots freed by older ring tokens leaving the window, the rest are appended
   (pages allocated on device). The one-token shift across chunks: the first logit of a chunk is the decision for
   the previous chunk's last token, which waits in the ring as "pending" (kept) until then.
2. **Fork**: chain ``i`` of a prompt shares the prompt's pages copy-on-write (no copy now; a page is copied the
   first time a chain writes into it, which for DMS means the slot of an evicted token or the partly filled last
   page). The prompt is prefilled once.
3. **Decode**: the first token of every chain is sampled from the prefill's logits (generate.py's ``sample_next``);
   then segments of ``segment_steps`` steps, each a jitted ``lax.while_loop`` that runs while a sequence is
   running. A step is one forward of the last emitted tokens -- plan every head's write (overwrite the slot of
   the marked token leaving the window, else append; copy-on-write), allocate, go through the layers (record the
   decision for the previous token in the ring, paged decode attention over the cached slots plus the new token),
   then write every layer's new K/V into the pool at once -- followed by sampling the next tokens; a sequence
   that emits a stop id or reaches the length limit returns its pages at once.

Attention backends: "auto" = "xla_blocked" on CPU (`paged_attention_blocked`: an online softmax over blocks of
cached pages whose trip count is the longest live head, so the cost follows the live cache; prefill uses the same
blocked loop for its cached keys) and the platform's Pallas kernel on TPU / GPU; "xla", "pallas_tpu" and
"pallas_gpu" go through ``pallas_kernels.paged_decode_attention``, compiled for a static block-table width
bucketed from the fullest head. All layers are one ``lax.scan`` over stacked layer weights, so compile time does
not grow with depth (the decode unrolls its layers instead: see ``_over_layers``). Inside a step the page pool is
only read, then written in place once (prefill and decode both collect the K/V of every layer and write them
after the layers), and no ``lax.cond`` carries it: on CPU, XLA copies a 200 MB pool whenever a cond or a loop
leaves it with two live users (before: 4 whole-pool copies, 1.6 GB of memory traffic, per step at 8K x 8 chains);
see ``_cond_without_pools`` and ``_online_blocks(thread_pools=...)``.

**DMC** (policy "dmc", a model built with a DMCConfig; cache.py's module docstring): the same three phases, but
a token merges into its head's last slot or appends one instead of being evicted. Prefill attends a chunk's queries
to the cached slots (minus the last one when the chunk's first token merges into it) and to the chunk's
intermediate merged states, continued from the per-head window state, with the training-side visibility; only the
states that end a segment are written (``_dmc_prefill_layer``). Decode decides the merges inside each layer, so the
slot bookkeeping and page allocation run layer by layer; the step's page check reserves the worst case (every head
appending), which a merge never exceeds (``_dmc_decode_forward``). Forked chains share pages copy-on-write as for
DMS: a merge into a shared last slot copies its page first.

Pool exhaustion is never silent. ``on_exhaustion="preempt"`` (default): when a step's page requests do not fit,
the most recently admitted running sequences (highest slot first) are preempted -- their pages are freed, their
output so far is returned with ``status="preempted"`` -- and every other sequence continues exactly as it would
have. ``"error"``: the step is not applied and ``PoolExhaustedError`` explains what was needed and what was
free. A prefill that does not fit preempts (or, in "error" mode, fails with) the prompts being prefilled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dms_jax import cache as kvc
from dms_jax import dmc, dms
from dms_jax.config import check_int
from dms_jax.generate import SamplingConfig, sample_next
from dms_jax.model import CausalLM, apply_rope, rope_cos_sin
from pallas_kernels import paged_decode_attention
from pallas_kernels._common import BACKENDS, resolve_backend

Array = jax.Array
ON_EXHAUSTION = ("preempt", "error")
ATTENTION_BACKENDS = ("auto", "xla_blocked") + tuple(b for b in BACKENDS if b != "auto")


def resolve_attention_backend(backend: str) -> str:
    """"auto": the blocked XLA path on CPU, the platform's Pallas kernel on TPU / GPU."""
    if backend != "auto":
        return backend
    resolved = resolve_backend("auto")
    return "xla_blocked" if resolved == "xla" else resolved
# Smallest attention width (block-table columns) a compiled call reads: below it, one compilation serves all.
MIN_WIDTH_PAGES = 32


class PoolExhaustedError(RuntimeError):
    """The page pool cannot hold what a step needs (``on_exhaustion="error"``)."""


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RequestMetrics:
    """Per-request (one chain of one prompt) cache metrics. Token counts are summed over layers and KV heads."""

    prompt_tokens: int
    new_tokens: int
    kv_token_reads: int  # sum over decode steps of the live tokens the step's attention read
    kv_token_reads_dense: int  # the same for a dense cache (every token of every head)
    kv_token_reads_prefill: int  # keys visible to the prompt's queries during prefill
    peak_live_tokens: int  # most live (token, layer, head) entries at once
    final_live_tokens: int
    dense_tokens: int  # what a dense cache holds at the end: layers * kv_heads * tokens in the cache
    peak_pages: int  # most pages this request's tables referenced at once (shared prefix pages included)
    peak_bytes: int
    compression_ratio: float  # dense_tokens / final_live_tokens
    read_ratio: float  # kv_token_reads_dense / kv_token_reads


@dataclasses.dataclass
class RequestResult:
    prompt_index: int
    chain: int
    tokens: list[int]
    status: str  # "finished" (stop token or length limit) | "preempted"
    stopped: bool  # ended with a stop token
    metrics: RequestMetrics


@dataclasses.dataclass
class GenerationResult:
    requests: list[RequestResult]  # prompt-major: prompt 0 chain 0, prompt 0 chain 1, ...
    policy: dict
    page_size: int
    budget_pages: int
    bytes_per_page: int
    pool_high_water_pages: int
    pool_high_water_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    preempted: list[int]  # indices into requests
    pages_in_use_at_end: int = 0  # 0: every page went back to the pool
    segments: list = dataclasses.field(default_factory=list)  # per compiled decode call: width, forwards, seconds

    def tokens(self) -> list[list[int]]:
        return [r.tokens for r in self.requests]


@dataclasses.dataclass
class DecodeOutput:
    """What ``Engine.decode`` returns, per sequence slot."""

    tokens: list[list[int]]
    preempted: np.ndarray  # [S] bool
    stopped: np.ndarray  # [S] bool: ended with a stop id
    reads: np.ndarray  # [S] KV-cache token reads over the decode forwards
    peak_live: np.ndarray  # [S]
    peak_pages: np.ndarray  # [S]
    forwards: int  # decode forwards run (one token for every running slot each)
    seconds: float
    segments: list  # per compiled call: {"width_pages", "forwards", "seconds"} (the first includes compilation)
    cache: Any  # the cache afterwards


# ---------------------------------------------------------------------------------------------------------
# Model plumbing: layers stacked for lax.scan (compile time independent of depth)
# ---------------------------------------------------------------------------------------------------------


class _Outer(nnx.Module):
    """Embedding, final norm and unembedding of a model. With tied embeddings it keeps a transposed copy of the
    embedding ([hidden, vocab], made once): ``x @ E.T`` inside a jitted loop otherwise re-transposes the whole
    embedding matrix at every decode step on CPU (a 113 MB copy per token for SmolLM2)."""

    def __init__(self, model: CausalLM):
        self.embed_tokens = model.embed_tokens
        self.norm = model.norm
        self.tie = model.cfg.tie_word_embeddings
        if self.tie:
            self.unembed_t = nnx.Variable(jnp.array(jnp.swapaxes(model.embed_tokens.embedding[...], 0, 1)))
        else:
            self.lm_head = model.lm_head

    def unembed(self, x):
        x = self.norm(x)
        if self.tie:
            x, w = self.embed_tokens.promote_dtype((x, self.unembed_t[...]), dtype=self.embed_tokens.dtype)
            return jnp.dot(x, w).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)


def _split_model(model: CausalLM):
    """(layer graphdef, stacked layer weights [L, ...] for the prefill's scan, per-layer weights (a tuple) for the
    unrolled decode, outer graphdef, outer state)."""
    splits = [nnx.split(layer) for layer in model.layers]
    layer_gd = splits[0][0]
    per_layer = tuple(s for _, s in splits)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    outer_gd, outer_state = nnx.split(_Outer(model))
    return layer_gd, stacked, per_layer, outer_gd, outer_state


def _over_layers(body, carry, layer_params, xs):
    """``lax.scan(body, carry, (layer_params, *xs))`` when layer_params is stacked; unrolled in Python when it is a
    tuple of per-layer weights. The unrolled form is the decode's: a scan slices each layer's weights out of the
    stacked arrays, and on CPU those dynamic slices are copies -- every weight copied once per token, which
    doubles the weight traffic of a decode step. The prefill keeps the scan (its matmuls dwarf the copies and it
    compiles in a fraction of the time)."""
    if not isinstance(layer_params, tuple):
        return jax.lax.scan(body, carry, (layer_params,) + tuple(xs))
    ys = []
    for i, params in enumerate(layer_params):
        carry, y = body(carry, (params,) + tuple(jax.tree.map(lambda a: a[i], x) for x in xs))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


# ---------------------------------------------------------------------------------------------------------
# Blocked paged attention in plain XLA (the CPU path)
# ---------------------------------------------------------------------------------------------------------

BLOCK_TOKENS = 512  # cached tokens per block of the prefill's blocked attention (its queries make blocks big)
DECODE_BLOCK_BYTES = 1 << 19  # decode: ~0.5 MB of K+V gathered per block (see _decode_block_tokens)


def _block_pages(page_size: int, tokens: int = BLOCK_TOKENS) -> int:
    return max(1, tokens // page_size)


def _decode_block_tokens(rows: int, head_dim: int, itemsize: int) -> int:
    """Cached tokens per block of the decode attention: ~DECODE_BLOCK_BYTES of K and V over the ``rows``
    (sequence, KV head) pairs, a power of two in [256, 8192]. Small blocks waste little past the longest head
    (the last block is masked) and stay in cache; measured on SmolLM2 shapes (30 layers, 2-core CPU), 256-token
    blocks beat 512 / 1024 / 2048 for 3 and 24 rows, at ~1K (2x faster) and ~8K live tokens per head alike."""
    t = DECODE_BLOCK_BYTES // max(rows * head_dim * itemsize * 2, 1)
    return int(min(max(1 << (max(t, 1).bit_length() - 1), 256), 8192))


def _online_blocks(q, k_pages, v_pages, tables, num_blocks, visible, carry, scale, bp=None, thread_pools=False):
    """Online softmax over blocks of pages, stopping after ``num_blocks`` (traced) blocks.

    q ``[B, H, G, Q, D]`` (Q queries per head); tables ``[B, H, M]`` (M a multiple of the block); visible(i) ->
    ``[B, H, Q, T]`` bool for block i (T tokens); carry = (m, l, acc) ``[B, H, G, Q]``, ``[B, H, G, Q]``,
    ``[B, H, G, Q, D]`` in f32. Pages are gathered one block at a time, so no full copy of the head's K/V is ever
    materialised and blocks past the longest head are never touched.

    Returns ((m, l, acc), k_pages, v_pages). The pools go through the loop carry unchanged, except with
    ``thread_pools``: then every trip writes one element of its result into the sink page (whose contents never
    matter), so that the returned pools are a genuine loop value. A caller that reads the pools in a chain of
    loops and writes them afterwards (the decode: 30 layers, then one scatter) must thread them through the loops
    this way: a loop that merely passes them through lets XLA forward its input around it, after which the input
    has several users and XLA copies the whole pool (hundreds of MB) to let the write happen in place.
    """
    b, h, g, nq, d = q.shape
    ps = k_pages.shape[1]
    bp = bp or _block_pages(ps)
    t = bp * ps

    n_pages = k_pages.shape[0]

    def body(i, carry):
        (m, l, acc), k_pages, v_pages = carry
        idx = jax.lax.dynamic_slice_in_dim(tables, i * bp, bp, axis=2)
        # Gather pages as rows of a [pages, page_size * D] view: on CPU this is several times faster than
        # gathering [page_size, D] slices of the 3-D pool (the view is free).
        k = k_pages.reshape(n_pages, ps * d)[idx].reshape(b, h, t, d)
        v = v_pages.reshape(n_pages, ps * d)[idx].reshape(b, h, t, d)
        if nq == 1:
            # Decode (a handful of query rows): multiply-and-reduce, which XLA fuses with the page gathers, so the
            # gathered K / V block is never written out; 1.3-1.4x faster than two einsums on CPU (SmolLM2 shapes).
            s = jnp.sum(k[:, :, None].astype(jnp.float32) * q[:, :, :, 0, None].astype(jnp.float32), axis=-1)
            s = s[:, :, :, None] * scale
        else:
            s = jnp.einsum("bhgqd,bhtd->bhgqt", q, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        s = jnp.where(visible(i)[:, :, None], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + jnp.sum(p, axis=-1)
        if nq == 1:
            pv = jnp.sum(p[:, :, :, 0, :, None] * v[:, :, None].astype(jnp.float32), axis=3)[:, :, :, None]
        else:
            pv = jnp.einsum("bhgqt,bhtd->bhgqd", p, v.astype(jnp.float32))
        acc = alpha[..., None] * acc + pv
        if thread_pools:
            # One element of the result into the sink page, with a plain in-place dynamic-update-slice. It must
            # depend on everything this trip reads from both pools (acc does), or XLA cannot order the write
            # after the reads and copies the pool instead.
            at = (kvc.SINK_PAGE, 0, 0)
            mark = acc[:1, :1, :1, :1, :1].reshape(1, 1, 1)
            k_pages = jax.lax.dynamic_update_slice(k_pages, mark.astype(k_pages.dtype), at)
            v_pages = jax.lax.dynamic_update_slice(v_pages, mark.astype(v_pages.dtype), at)
        return (m_new, l, acc), k_pages, v_pages

    return jax.lax.fori_loop(0, num_blocks, body, (carry, k_pages, v_pages))


def _pad_tables(tables, bp):
    m = tables.shape[-1]
    pad = (-m) % bp
    return jnp.pad(tables, ((0, 0), (0, 0), (0, pad)), constant_values=kvc.SINK_PAGE) if pad else tables


def paged_attention_blocked(q, k_pages, v_pages, block_tables, lengths, *, scale=None, block_tokens=None,
                            return_pools=False, new_kv=None, exclude_slot=None, thread_pools=False):
    """Paged decode attention, same contract as ``pallas_kernels.paged_decode_attention`` (q ``[B, Hkv, G, D]``,
    slots ``0..length-1`` of each head's pages are live, no causal mask), in plain XLA for the CPU: an online
    softmax over blocks of ``BLOCK_TOKENS`` cached tokens whose trip count is the longest head's, so the cost
    follows the live cache and no gathered copy of all K/V is made. A head of length 0 returns zeros.
    block_tokens: cached tokens per block (default: ~0.5 MB of K+V, at least 256 tokens: ``_decode_block_tokens``).

    new_kv: optional (k, v) ``[B, Hkv, D]`` of the incoming token, attended to as one more key that is not in the
    pool yet, and exclude_slot ``[B, Hkv]``: a slot below ``length`` to skip (the one the incoming token will
    take: stale or an evicted token). With both, the caller can write the token into the pool after the attention
    (the decode does, for all layers at once), so the pool is only read here. thread_pools (with return_pools):
    see ``_online_blocks``; only for a caller whose pools nothing else reads before it writes them."""
    b, h, g, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ps = k_pages.shape[1]
    bp = _block_pages(ps, block_tokens or _decode_block_tokens(b * h, d, jnp.dtype(k_pages.dtype).itemsize))
    bp = min(bp, max(1, block_tables.shape[-1]))  # never more than the table holds
    tables = _pad_tables(block_tables, bp)
    t = bp * ps
    num_blocks = (jnp.max(lengths) + t - 1) // t
    if new_kv is None:
        carry = (jnp.full((b, h, g, 1), -jnp.inf, jnp.float32), jnp.zeros((b, h, g, 1), jnp.float32),
                 jnp.zeros((b, h, g, 1, d), jnp.float32))
    else:  # the incoming token opens the online softmax (rounded to the pool's dtype, as if read from it)
        k_new, v_new = (a.astype(k_pages.dtype).astype(jnp.float32) for a in new_kv)
        s_new = jnp.einsum("bhgd,bhd->bhg", q.astype(jnp.float32), k_new)[..., None] * scale
        carry = (s_new, jnp.ones((b, h, g, 1), jnp.float32),
                 jnp.broadcast_to(v_new[:, :, None, None, :], (b, h, g, 1, d)))

    def visible(i):
        slot = (i * t + jnp.arange(t))[None, None, None, :]
        vis = slot < lengths[:, :, None, None]
        return vis if exclude_slot is None else vis & (slot != exclude_slot[:, :, None, None])

    (_, l, acc), k_pages, v_pages = _online_blocks(q[:, :, :, None], k_pages, v_pages, tables, num_blocks,
                                                   visible, carry, scale, bp, thread_pools=thread_pools)
    out = (acc / jnp.where(l == 0.0, 1.0, l)[..., None])[:, :, :, 0].astype(q.dtype)
    return (out, k_pages, v_pages) if return_pools else out


def _without_pools(cache: kvc.PagedCache) -> kvc.PagedCache:
    """The cache's bookkeeping without its page pools (None in their place)."""
    return cache.replace(k_pages=None, v_pages=None)


def _cond_without_pools(pred, fn, cache: kvc.PagedCache) -> kvc.PagedCache:
    """``lax.cond(pred, fn, identity, cache)`` for an ``fn`` that only touches the bookkeeping (release, ...): the
    pools stay out of the cond, because on CPU a cond that carries them makes XLA copy both (hundreds of MB) at
    every decode step."""
    out = jax.lax.cond(pred, fn, lambda c: c, _without_pools(cache))
    return out.replace(k_pages=cache.k_pages, v_pages=cache.v_pages)


# ---------------------------------------------------------------------------------------------------------
# Prefill of one chunk (all layers)
# ---------------------------------------------------------------------------------------------------------


def _prefill_attention(q, k_chunk, v_chunk, chunk_vis, k_pages, v_pages, tables, lengths, marked_pos, q_pos,
                       window, bp, exclude_slot=None):  # -> (out, k_pages, v_pages): see _online_blocks
    """Attention of a chunk's queries to the cached live slots (blocked, exact DMS visibility) and to the chunk.

    q [B, C, Hq, D]; chunk keys [B, C, Hkv, D] with chunk_vis [B, Hkv, C, C]; cached: tables [B, Hkv, M] (M a
    multiple of the block), lengths [B, Hkv], marked_pos [B, Hkv, M * page_size] (position of a slot's token if it
    is a marked ring token, else -1; see cache.marked_positions; None: no marked tokens), q_pos [B, C].
    exclude_slot [B, Hkv]: a cached slot hidden from every query (DMC: the last slot, when the chunk's first token
    merges into it), -1 for none. Returns [B, C, Hq, D].
    """
    b, c, hq, d = q.shape
    hkv = k_chunk.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    qg = jnp.transpose(q.reshape(b, c, hkv, g, d), (0, 2, 3, 1, 4))  # [B, H, G, C, D]
    s_chunk = jnp.einsum("bhgcd,bshd->bhgcs", qg, k_chunk, preferred_element_type=jnp.float32) * scale
    s_chunk = jnp.where(chunk_vis[:, :, None], s_chunk, -jnp.inf)
    m = jnp.max(s_chunk, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s_chunk - m_safe[..., None])
    carry = (m, jnp.sum(p, axis=-1), jnp.einsum("bhgcs,bshd->bhgcd", p, v_chunk.astype(jnp.float32)))
    ps = k_pages.shape[1]
    t = bp * ps

    def visible(i):
        slot = i * t + jnp.arange(t)
        live = slot[None, None, :] < lengths[..., None]  # [B, H, T]
        if exclude_slot is not None:
            live = live & (slot[None, None, :] != exclude_slot[..., None])
        if marked_pos is None:
            return jnp.broadcast_to(live[:, :, None, :], (b, hkv, c, t))
        mp = jax.lax.dynamic_slice_in_dim(marked_pos, i * t, t, axis=2)
        return live[:, :, None, :] & ~kvc.marked_gone(mp, q_pos, window)

    num_blocks = (jnp.max(lengths) + t - 1) // t
    (_, l, acc), k_pages, v_pages = _online_blocks(qg, k_pages, v_pages, tables, num_blocks, visible, carry,
                                                   scale, bp)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]  # [B, H, G, C, D]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, c, hq, d).astype(q.dtype), k_pages, v_pages


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "all_logits",
                                             "block_tokens"), donate_argnames=("cache",))
def _prefill_chunk(layer_gd, layer_params, outer_gd, outer_params, cache: kvc.PagedCache, slots, tokens, n_valid,
                   alive, *, spec: kvc.CacheSpec, policy: kvc.EvictionPolicy, all_logits: bool,
                   block_tokens: int | None = None):
    """One chunk of prompts into sequence slots ``slots`` [B]. tokens [B, C] (right-padded), n_valid [B] real
    tokens of the chunk per sequence, alive [B] (False: the prompt was preempted earlier; skipped).

    Returns (logits [B, C, V] if all_logits else the logits of each sequence's last valid token [B, V], cache,
    failed [B] (preempted now for lack of pages), prefill reads [B], overflow (a bookkeeping bug if True))."""
    outer = nnx.merge(outer_gd, outer_params)
    b, c = tokens.shape
    ps, r, w, hkv = spec.page_size, spec.ring, spec.window, spec.num_kv_heads
    n_valid = jnp.where(alive, n_valid, 0)
    n = cache.num_tokens[slots]
    positions = n[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    qvalid = jnp.arange(c)[None, :] < n_valid[:, None]  # [B, C]
    dms_on = policy.uses_model_decisions
    kk = jnp.arange(c)
    x = outer.embed_tokens(tokens)
    pstate = None if cache.policy_state is None else jax.tree.map(lambda a: a[:, slots], cache.policy_state)
    xs = (layer_params, cache.block_tables[:, slots], cache.lengths[:, slots], cache.ring_slot[:, slots],
          cache.ring_dec[:, slots], pstate)

    k_pages, v_pages = cache.k_pages, cache.v_pages  # read-only inside the layer scan

    def body(carry, per_layer):
        x, refcount, failed, reads, bad = carry
        params, tables, lengths, ring_slot, ring_dec, pst = per_layer
        layer = nnx.merge(layer_gd, params)

        # A sequence preempted at an earlier layer of this chunk gives its pages of this layer back right away,
        # so that the other sequences can use them in this and the later layers (its pages of the earlier layers
        # go back after the scan).
        refcount, tables, lengths, ring_slot, ring_dec = kvc.drop_rows(refcount, tables, lengths, ring_slot,
                                                                       ring_dec, failed, ps)

        def attention_fn(p):
            ok = ~failed
            if policy.merges:
                out, (refcount2, pre, layer_reads, overflow, new, kv, pst2) = _dmc_prefill_layer(
                    p, layer.self_attn.cfg, refcount, tables, lengths, ring_slot, ring_dec, pst, n, n_valid,
                    positions, qvalid, ok, k_pages, v_pages, policy, spec, block_tokens)
                return out, (refcount2, failed | pre, reads + layer_reads, overflow, new, kv, pst2)
            dec_at = policy.decisions(p.decision_logits, positions, hkv) & qvalid[:, None, :]
            ring_dec1 = kvc.set_previous_decision(ring_dec, n, dec_at[..., 0], (n_valid > 0) & ok, r)
            dec_chunk = kvc.chunk_owner_decisions(dec_at, n_valid)
            # Chunk keys: causal, valid, and the delayed-eviction rule with the chunk's own decisions.
            causal = kk[None, :] <= kk[:, None]  # [query, key]
            in_window = dms.visible_if_marked(kk[:, None], kk[None, :], w)
            chunk_vis = (causal[None, None] & qvalid[:, None, None, :]
                         & (in_window[None, None] | ~dec_chunk[:, :, None, :]))
            chunk_vis = chunk_vis & qvalid[:, None, :, None]
            layer_reads = (jnp.sum(chunk_vis, axis=(1, 2, 3), dtype=jnp.int32)
                           + kvc.cached_reads(lengths, ring_slot, ring_dec1, n, positions, qvalid, w))
            bp = _block_pages(ps, block_tokens or BLOCK_TOKENS)
            tpad = _pad_tables(tables, bp)
            marked = kvc.marked_positions(ring_slot, ring_dec1, n, tpad.shape[-1] * ps)
            out, _, _ = _prefill_attention(p.q, p.k, p.v, chunk_vis, k_pages, v_pages, tpad, lengths, marked,
                                           positions, w, bp)
            # A policy may plan the chunk itself (TOVA / H2O keep their budget; see baselines.py).
            plan, pst2 = policy.prefill_plan(
                pst, q=p.q, k=p.k, chunk_vis=chunk_vis, k_pages=k_pages, block_tables=tables, lengths=lengths,
                ring_slot=ring_slot, ring_dec=ring_dec1, num_tokens=n, n_valid=n_valid, page_size=ps)
            # Book the chunk: only tokens still alive at its end get a slot. The K/V writes of all layers happen
            # after the scan (layers never read each other's pages), so the pool is read-only in here and XLA
            # never copies it.
            (refcount2, *new), (page, off), pre, overflow = kvc.insert_chunk(
                refcount, tables, lengths, ring_slot, ring_dec1, n, n_valid, dec_chunk, ok, ps, plan=plan)
            refcount2, *new = kvc.drop_rows(refcount2, *new, pre, ps)  # preempted here: this layer's pages go now
            kv = (page, off, jnp.swapaxes(p.k, 1, 2), jnp.swapaxes(p.v, 1, 2))
            return out, (refcount2, failed | pre, reads + layer_reads, overflow, tuple(new), kv, pst2)

        x, (refcount, failed, reads, overflow, new, kv, pst2) = layer(x, positions, attention_fn, dms_on)
        return (x, refcount, failed, reads, bad | overflow), (new, kv, pst2)

    init = (x, cache.refcount, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((), bool))
    (x, refcount, failed, reads, overflow), ((tables, lengths, ring_slot, ring_dec), (page, off, k_new, v_new),
                                             pstate) = jax.lax.scan(body, init, xs)
    # Sequences preempted at a later layer have pages written by earlier layers: those writes are harmless (the
    # sequence is released below), but send them to the sink anyway.
    drop = failed[None, :, None, None]
    page = jnp.where(drop, kvc.SINK_PAGE, page)
    off = jnp.where(drop, 0, off)
    k_pages, v_pages = kvc.write_kv(k_pages, v_pages, page, off, k_new, v_new)
    cache = cache.replace(
        k_pages=k_pages, v_pages=v_pages, refcount=refcount,
        block_tables=cache.block_tables.at[:, slots].set(tables),
        lengths=cache.lengths.at[:, slots].set(lengths),
        ring_slot=cache.ring_slot.at[:, slots].set(ring_slot),
        ring_dec=cache.ring_dec.at[:, slots].set(ring_dec),
        num_tokens=cache.num_tokens.at[slots].add(jnp.where(failed, 0, n_valid)),
        policy_state=None if pstate is None else jax.tree.map(lambda a, u: a.at[:, slots].set(u),
                                                              cache.policy_state, pstate),
    )
    cache = kvc.note_high_water(cache)
    failed_s = jnp.zeros((spec.max_seqs,), bool).at[slots].set(failed)
    cache = _cond_without_pools(jnp.any(failed), lambda cc: kvc.release(cc, failed_s, ps), cache)
    if all_logits:
        logits = outer.unembed(x)
    else:
        last = jnp.take_along_axis(x, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = outer.unembed(last)
    return logits, cache, failed, jnp.where(failed, 0, reads), overflow


def _dmc_prefill_layer(p, cfg, refcount, tables, lengths, ring_slot, ring_dec, win, n, n_valid, positions, qvalid,
                       ok, k_pages, v_pages, policy, spec, block_tokens):
    """One layer of a DMC prefill chunk (policy "dmc"; the DMS path of ``_prefill_chunk`` in DMC's terms).

    The chunk's keys are its tokens' intermediate merged states (``cache.dmc_chunk_states``: the training-side
    parallel form, continued from the window state), RoPE'd at each token's position; query i sees chunk state
    j <= i iff j == i or token j + 1 appends (state j survives), and every cached slot except the last one when the
    chunk's first token merges into it. Then the states that end a segment are booked (``cache.dmc_plan_chunk``,
    ``insert_chunk``) and the window state moves on. Returns what ``_prefill_chunk``'s attention_fn returns, with
    this layer's reads instead of the running sum."""
    ps, hkv = spec.page_size, spec.num_kv_heads
    c = positions.shape[1]
    merge = policy.decisions(p.decision_logits, positions, hkv) & qvalid[:, None, :]  # [B, H, C]
    k_states, v_states = kvc.dmc_chunk_states(win, n, p.k_unrotated, p.v, p.importance, merge, spec.dtype)
    cos, sin = rope_cos_sin(cfg, positions)
    k_states = dmc.scale_borrowed_neurons(apply_rope(k_states, cos, sin), 0.0)
    kk = jnp.arange(c)
    dist = kk[:, None] - kk[None, :]  # query - key
    survives = ~dms.shift_to_owner(merge, False)  # state j stays iff token j + 1 does not merge into it
    chunk_vis = (((dist == 0)[None, None] | ((dist > 0)[None, None] & survives[:, :, None, :]))
                 & qvalid[:, None, :, None] & qvalid[:, None, None, :])
    hidden = jnp.where(merge[..., 0], lengths - 1, -1)  # [B, H]
    per_q = jnp.where(qvalid[:, None, :], (lengths - (hidden >= 0))[..., None], 0)
    layer_reads = jnp.sum(chunk_vis, axis=(1, 2, 3), dtype=jnp.int32) + jnp.sum(per_q, axis=(1, 2), dtype=jnp.int32)
    bp = _block_pages(ps, block_tokens or BLOCK_TOKENS)
    out, _, _ = _prefill_attention(p.q, k_states.astype(p.q.dtype), v_states.astype(p.q.dtype), chunk_vis, k_pages,
                                   v_pages, _pad_tables(tables, bp), lengths, None, positions, 0, bp,
                                   exclude_slot=hidden)
    plan = kvc.dmc_plan_chunk(lengths, ring_slot, ring_dec, merge, n_valid, ps)
    (refcount2, *new), (page, off), pre, overflow = kvc.insert_chunk(
        refcount, tables, lengths, ring_slot, ring_dec, n, n_valid, merge, ok, ps, plan=plan)
    refcount2, *new = kvc.drop_rows(refcount2, *new, pre, ps)
    win2 = kvc.dmc_window_after_chunk(win, n, n_valid, p.k_unrotated, p.v, p.importance, merge, ok & ~pre)
    kv = (page, off, jnp.swapaxes(k_states, 1, 2), jnp.swapaxes(v_states, 1, 2))
    return out, (refcount2, pre, layer_reads, overflow, tuple(new), kv, win2)


# ---------------------------------------------------------------------------------------------------------
# Decode: one token for every active sequence
# ---------------------------------------------------------------------------------------------------------


@struct.dataclass
class _StepInfo:
    preempted: Array  # [S] bool
    error: Array  # [] bool: pages did not fit and on_exhaustion == "error" (step not applied), or overflow
    need: Array  # [] int32 pages the step asked for
    free: Array  # [] int32 free pages before the step


def _decode_forward(layer_gd, layer_params, outer, cache, tokens, active, spec, policy, width, backend, interpret,
                    block_tokens=None):
    """The forward of one decode step for ``active`` sequences, after the plan fits. Returns (logits, cache)."""
    if policy.merges:
        return _dmc_decode_forward(layer_gd, layer_params, outer, cache, tokens, active, spec, policy, width, backend,
                                   interpret, block_tokens)
    r, hkv = spec.ring, spec.num_kv_heads
    s = tokens.shape[0]
    plan = kvc.plan_decode(cache, spec, active, policy)
    n = cache.num_tokens
    cache, write_page, write_off = kvc.apply_decode_plan(cache, spec, plan, active)
    positions = n[:, None]
    x = outer.embed_tokens(tokens[:, None])
    dms_on = policy.uses_model_decisions
    xs = (cache.block_tables[..., :width], cache.lengths, write_page, write_off, cache.ring_dec, plan.target,
          cache.policy_state)
    # Deferred writes (the CPU path of the stateless policies): each layer attends to its cached slots minus the
    # one the new token takes, plus the new token itself (``paged_attention_blocked(new_kv=...)``), and the K/V of
    # all layers go into the pool in one scatter after the layers. The pool is then only read inside the layer
    # loop: written in between, XLA copied the whole pool around some layers' attention loops (4 copies of a
    # 200 MB pool per step at 8K x 8 chains). Stateful policies (TOVA / H2O / Quest) observe the pool after the
    # layers, once every token is written. The kernel backends read the new token from the pool: they write first.
    deferred = backend == "xla_blocked"

    def body(carry, per_layer):
        x, k_pages, v_pages = carry
        params, tables, lengths, page, off, ring_dec, target, pst = per_layer
        layer = nnx.merge(layer_gd, params)

        def deferred_attention_fn(p):
            dec = policy.decisions(p.decision_logits, positions, hkv)[..., 0]
            ring_dec2 = kvc.set_previous_decision(ring_dec, n, dec, active, r)
            q = p.q[:, 0].reshape(s, hkv, -1, p.q.shape[-1])
            k_new, v_new = p.k[:, 0], p.v[:, 0]
            page_mask = policy.page_mask(q, tables, lengths, pst, page_size=spec.page_size)
            tab, lens, excl = tables, lengths, target
            if page_mask is not None:  # Quest: the table compacted to the selected pages, the loop reads only those
                tab, lens = kvc.compact_selected_pages(tables, lengths, page_mask, spec.page_size)
                excl = kvc.compacted_slot(target, lengths, page_mask, spec.page_size)
            out, kp, vp = paged_attention_blocked(q, k_pages, v_pages, tab, lens, block_tokens=block_tokens,
                                                  new_kv=(k_new, v_new), exclude_slot=excl, return_pools=True,
                                                  thread_pools=True)
            # What a stateful policy observes after the layers (see below): this layer's query, new key, mask.
            obs = None if pst is None else (q, k_new, page_mask)
            return out.reshape(s, 1, -1, p.q.shape[-1]), (kp, vp, ring_dec2, obs, (page, off, k_new, v_new))

        def attention_fn(p):
            dec = policy.decisions(p.decision_logits, positions, hkv)[..., 0]
            ring_dec2 = kvc.set_previous_decision(ring_dec, n, dec, active, r)
            k_pages2, v_pages2 = kvc.write_kv(k_pages, v_pages, page, off, p.k[:, 0], p.v[:, 0])
            q = p.q[:, 0].reshape(s, hkv, -1, p.q.shape[-1])
            page_mask = policy.page_mask(q, tables, lengths, pst, page_size=spec.page_size)
            if backend == "xla_blocked":
                # A page mask (Quest) compacts the table to the selected pages: the blocked loop reads only those.
                tab, lens = (tables, lengths) if page_mask is None else kvc.compact_selected_pages(
                    tables, lengths, page_mask, spec.page_size)
                out, k_pages2, v_pages2 = paged_attention_blocked(q, k_pages2, v_pages2, tab, lens,
                                                                  block_tokens=block_tokens, return_pools=True)
            else:
                out = paged_decode_attention(q, k_pages2, v_pages2, tables, lengths, page_mask=page_mask,
                                             backend=backend, interpret=interpret)
            # What a stateful policy observes after the layers (see below): this layer's query, new key, mask.
            obs = None if pst is None else (q, p.k[:, 0], page_mask)
            return out.reshape(s, 1, -1, p.q.shape[-1]), (k_pages2, v_pages2, ring_dec2, obs)

        if deferred:  # the pools are threaded through the layers' attention loops (see _online_blocks)
            x, (k_pages, v_pages, ring_dec, obs, kv) = layer(x, positions, deferred_attention_fn, dms_on)
            return (x, k_pages, v_pages), (ring_dec, obs, kv)
        x, (k_pages, v_pages, ring_dec, obs) = layer(x, positions, attention_fn, dms_on)
        return (x, k_pages, v_pages), (ring_dec, obs, None)

    (x, k_pages, v_pages), (ring_dec, obs, kv) = _over_layers(body, (x, cache.k_pages, cache.v_pages),
                                                              layer_params, xs)
    if deferred:  # every layer's new K/V in one scatter (inactive heads write to the sink)
        k_pages, v_pages = kvc.write_kv(k_pages, v_pages, *kv)
    pstate = cache.policy_state
    if pstate is not None:
        # The policy's bookkeeping (TOVA / H2O: a score pass over the pool; Quest: page bounds, reads), for all
        # layers at once after the last write of the step: reading the pool between a layer's write and the next
        # layer's (in place) write made XLA copy the whole pool at every layer.
        q_all, k_new_all, mask_all = obs
        pstate = jax.vmap(lambda st, q, k_new, tables, lengths, target, mask: policy.observe_decode(
            st, q=q, k_new=k_new, k_pages=k_pages, block_tables=tables, lengths=lengths, target=target, positions=n,
            active=active, page_mask=mask))(pstate, q_all, k_new_all, cache.block_tables[..., :width],
                                            cache.lengths, plan.target, mask_all)
    cache = cache.replace(k_pages=k_pages, v_pages=v_pages, ring_dec=ring_dec, policy_state=pstate)
    return outer.unembed(x[:, 0]), cache


def _dmc_decode_forward(layer_gd, layer_params, outer, cache, tokens, active, spec, policy, width, backend,
                        interpret, block_tokens=None):
    """``_decode_forward`` for DMC (policy "dmc"). A head's merge decision comes from the token's own key, so
    it is known only inside its layer: the slot bookkeeping (merge into the last slot or append, page allocation,
    copy-on-write; ``cache.dmc_decode_slots``) runs layer by layer with the refcount threaded through the layers.
    The page check before the forward reserved the worst case (every head appends), so the allocations fit.

    On the blocked XLA path the attention reads the head's slots minus the one being merged into, plus the new
    merged state (``new_kv`` / ``exclude_slot``), and the page copies and slot writes of all layers happen after
    the layers (one scatter each), as in the DMS decode; the kernel backends read the new state from the pool, so
    each layer copies and writes first."""
    ps, hkv = spec.page_size, spec.num_kv_heads
    s = tokens.shape[0]
    n = cache.num_tokens
    positions = n[:, None]
    x = outer.embed_tokens(tokens[:, None])
    deferred = backend == "xla_blocked"

    def body(carry, per_layer):
        x, k_pages, v_pages, refcount = carry
        params, tables, lengths, win = per_layer
        layer = nnx.merge(layer_gd, params)

        def attention_fn(p):
            d = p.q.shape[-1]
            merge = policy.decisions(p.decision_logits, positions, hkv)[..., 0] & active[:, None]  # [S, H]
            win_k, win_v, win_w, seg_len, state_k, state_v = dmc.window_update(
                win["win_k"], win["win_v"], win["win_w"], win["seg_len"], n, p.k_unrotated[:, 0], p.v[:, 0],
                p.importance[..., 0], merge, active)
            cos, sin = rope_cos_sin(layer.self_attn.cfg, positions)
            state_k = dmc.scale_borrowed_neurons(apply_rope(state_k[:, None], cos, sin), 0.0)[:, 0]
            refcount2, tables2, lengths2, page, off, cow = kvc.dmc_decode_slots(refcount, tables, lengths, merge,
                                                                                active, ps)
            q = p.q[:, 0].reshape(s, hkv, -1, d)
            if deferred:
                out, kp, vp = paged_attention_blocked(
                    q, k_pages, v_pages, tables, lengths, block_tokens=block_tokens, new_kv=(state_k, state_v),
                    exclude_slot=jnp.where(merge, lengths - 1, -1), return_pools=True, thread_pools=True)
            else:
                kp, vp = kvc.copy_pages(k_pages, v_pages, *cow)
                kp, vp = kvc.write_kv(kp, vp, page, off, state_k, state_v)
                out = paged_decode_attention(q, kp, vp, tables2[..., :width], lengths2, backend=backend,
                                             interpret=interpret)
            win2 = {"win_k": win_k, "win_v": win_v, "win_w": win_w, "seg_len": seg_len}
            return out.reshape(s, 1, -1, d), (kp, vp, refcount2, (tables2, lengths2, win2,
                                                                  (cow, page, off, state_k, state_v)))

        x, (k_pages, v_pages, refcount, ys) = layer(x, positions, attention_fn, True)
        return (x, k_pages, v_pages, refcount), ys

    (x, k_pages, v_pages, refcount), (tables, lengths, win, kv) = _over_layers(
        body, (x, cache.k_pages, cache.v_pages, cache.refcount), layer_params,
        (cache.block_tables, cache.lengths, cache.policy_state))
    if deferred:  # copy-on-write copies, then every layer's slot write (inactive heads: the sink)
        cow, page, off, k_new, v_new = kv
        k_pages, v_pages = kvc.copy_pages(k_pages, v_pages, *cow)
        k_pages, v_pages = kvc.write_kv(k_pages, v_pages, page, off, k_new, v_new)
    cache = cache.replace(k_pages=k_pages, v_pages=v_pages, refcount=refcount, block_tables=tables, lengths=lengths,
                          policy_state=win, num_tokens=n + active.astype(jnp.int32))
    return outer.unembed(x[:, 0]), kvc.note_high_water(cache)


def _decode_step(layer_gd, layer_params, outer, cache, tokens, active, *, spec, policy, width, backend, interpret,
                 on_exhaustion, block_tokens=None):
    """Plans the step, handles pool exhaustion, runs the forward. Returns (logits [S, V], cache, _StepInfo)."""
    ps = spec.page_size
    plan = kvc.plan_decode(cache, spec, active, policy)
    need_seq = jnp.sum(plan.need, axis=(0, 2), dtype=jnp.int32)
    total = jnp.sum(need_seq)
    n_free = kvc.free_pages(cache.refcount)
    short = total > n_free
    freeable = jax.lax.cond(short, lambda c: kvc.exclusive_pages(c, ps), lambda c: jnp.zeros_like(need_seq),
                            _without_pools(cache))
    pre = kvc.select_preemptions(need_seq, freeable, active, n_free)
    vocab = outer.embed_tokens.num_embeddings
    if on_exhaustion == "error":
        error = short

        def run(c):
            return _decode_forward(layer_gd, layer_params, outer, c, tokens, active, spec, policy, width, backend,
                                   interpret, block_tokens)

        if cache.policy_state is None or policy.merges:  # a step that does not fit runs with nothing active: a
            # no-op (no cond; DMC's window state is left alone by inactive rows)
            logits, cache = _decode_forward(layer_gd, layer_params, outer, cache, tokens, active & ~error, spec,
                                            policy, width, backend, interpret, block_tokens)
            logits = jnp.where(error, 0.0, logits)
        else:
            logits, cache = jax.lax.cond(error, lambda c: (jnp.zeros((tokens.shape[0], vocab), jnp.float32), c),
                                         run, cache)
        pre = jnp.zeros_like(pre)
    else:
        cache = _cond_without_pools(jnp.any(pre), lambda c: kvc.release(c, pre, ps), cache)
        # After the preemptions the requests fit; if they did not (a bookkeeping bug) the host raises.
        error = jnp.sum(kvc.plan_decode(cache, spec, active & ~pre, policy).need) > kvc.free_pages(cache.refcount)
        logits, cache = _decode_forward(layer_gd, layer_params, outer, cache, tokens, active & ~pre, spec, policy,
                                        width, backend, interpret, block_tokens)
    return logits, cache, _StepInfo(preempted=pre, error=error, need=total, free=n_free)


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "width", "backend",
                                             "interpret", "on_exhaustion", "block_tokens"), donate_argnames=("cache",))
def _decode_step_jit(layer_gd, layer_params, outer_gd, outer_params, cache, tokens, active, *, spec, policy, width,
                     backend, interpret, on_exhaustion, block_tokens=None):
    outer = nnx.merge(outer_gd, outer_params)
    return _decode_step(layer_gd, layer_params, outer, cache, tokens, active, spec=spec, policy=policy, width=width,
                        backend=backend, interpret=interpret, on_exhaustion=on_exhaustion, block_tokens=block_tokens)


@struct.dataclass
class _GenState:
    out: Array  # [S, T] generated tokens
    n_out: Array  # [S]
    tok: Array  # [S] the last emitted token, fed by the next forward of the running sequences
    running: Array  # [S] bool: emitted a token that a forward has not fed yet
    finished: Array  # [S] bool
    preempted: Array  # [S] bool
    stopped: Array  # [S] bool
    key: Array
    reads: Array  # [S] int32, this segment
    steps: Array  # [] int32, forwards this segment
    peak_live: Array  # [S] int32
    peak_pages: Array  # [S] int32
    error: Array  # [] bool
    err_need: Array
    err_free: Array


def _seq_live_and_pages(cache, ps):
    live = jnp.sum(cache.lengths, axis=(0, 2), dtype=jnp.int32)
    pages = jnp.sum(kvc.pages_for(cache.lengths, ps), axis=(0, 2), dtype=jnp.int32)
    return live, pages


def _emit(cache, st: _GenState, logits, stop_ids, *, sampling, max_new_tokens, page_size):
    """Samples the next token of every running sequence from ``logits`` [S, V] and emits it; a sequence that emits
    a stop id or reaches ``max_new_tokens`` stops and returns its pages at once."""
    s = st.running.shape[0]
    rows = jnp.arange(s)
    key, sub = jax.random.split(st.key)
    tok = sample_next(logits, sub, sampling)
    emit = st.running
    col = jnp.minimum(st.n_out, max_new_tokens - 1)
    out = st.out.at[rows, col].set(jnp.where(emit, tok, st.out[rows, col]))
    n_out = st.n_out + emit.astype(jnp.int32)
    is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    stop = emit & (is_stop | (n_out >= max_new_tokens))
    cache = _cond_without_pools(jnp.any(stop), lambda c: kvc.release(c, stop, page_size), cache)
    return cache, st.replace(out=out, n_out=n_out, key=key, tok=jnp.where(emit, tok, st.tok),
                             running=st.running & ~stop, finished=st.finished | stop,
                             stopped=st.stopped | (emit & is_stop))


@functools.partial(jax.jit, static_argnames=("sampling", "max_new_tokens", "page_size"),
                   donate_argnames=("cache", "state"))
def _first_emit(cache, state: _GenState, logits, stop_ids, *, sampling, max_new_tokens, page_size):
    return _emit(cache, state, logits, stop_ids, sampling=sampling, max_new_tokens=max_new_tokens,
                 page_size=page_size)


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "width", "backend",
                                             "interpret", "on_exhaustion", "sampling", "max_steps",
                                             "max_new_tokens", "block_tokens"), donate_argnames=("cache", "state"))
def _decode_segment(layer_gd, layer_params, outer_gd, outer_params, cache, state: _GenState, stop_ids, *, spec,
                    policy, width, backend, interpret, on_exhaustion, sampling, max_steps, max_new_tokens,
                    block_tokens=None):
    """Up to ``max_steps`` decode steps: each feeds the running sequences' last emitted token through one forward,
    then emits the next (``_emit``; the first token comes from the prefill's logits, ``_first_emit``). The loop
    runs only while a sequence is running, so every trip does a forward and no cond is needed around it -- a cond
    carrying the page pools makes XLA copy them at every step."""
    outer = nnx.merge(outer_gd, outer_params)
    ps = spec.page_size

    def cond(carry):
        _, st = carry
        return (st.steps < max_steps) & jnp.any(st.running) & ~st.error

    def body(carry):
        cache, st = carry
        logits, cache, info = _decode_step(layer_gd, layer_params, outer, cache, st.tok, st.running, spec=spec,
                                           policy=policy, width=width, backend=backend, interpret=interpret,
                                           on_exhaustion=on_exhaustion, block_tokens=block_tokens)
        running = st.running & ~info.preempted & ~info.error
        live, pages = _seq_live_and_pages(cache, ps)
        step_reads = live if cache.policy_state is None else policy.decode_reads(cache)  # Quest reads fewer
        st = st.replace(
            running=running, preempted=st.preempted | info.preempted,
            reads=st.reads + jnp.where(running, step_reads, 0),
            steps=st.steps + (~info.error).astype(jnp.int32),
            peak_live=jnp.maximum(st.peak_live, jnp.where(running, live, 0)),
            peak_pages=jnp.maximum(st.peak_pages, jnp.where(running, pages, 0)),
            error=info.error, err_need=jnp.where(info.error, info.need, st.err_need),
            err_free=jnp.where(info.error, info.free, st.err_free),
        )
        # After an error no sequence runs, so nothing is emitted (the host raises).
        return _emit(cache, st, logits, stop_ids, sampling=sampling, max_new_tokens=max_new_tokens, page_size=ps)

    return jax.lax.while_loop(cond, body, (cache, state))


@functools.partial(jax.jit, static_argnames=("page_size",), donate_argnames=("cache",))
def _fork_jit(cache, src, dst, *, page_size):
    return kvc.note_high_water(kvc.fork(cache, src, dst, page_size))


@functools.partial(jax.jit, static_argnames=("page_size",), donate_argnames=("cache",))
def _release_jit(cache, seqs, *, page_size):
    return kvc.release(cache, seqs, page_size)


@functools.partial(jax.jit, static_argnames=("spec", "policy"), donate_argnames=("cache",))
def _finish_prefill_jit(cache, slots, *, spec, policy):
    return policy.finish_prefill(cache, slots, spec)


@functools.partial(jax.jit, static_argnames=("spec", "policy"))
def _init_jit(spec, policy=None):
    return kvc.init_cache(spec, policy)


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


class Engine:
    """Serves a model over the paged cache with an eviction policy.

    policy: "vanilla" | "dms" | "dmc" | "fixed" | "tova" | "h2o" | "streaming" | "quest" or an ``EvictionPolicy``
    ("dms" holds the model's DMSConfig (window, alpha_per), "dmc" -- merging instead of evicting, for a model
    built with a DMCConfig -- the model's DMCConfig (accumulation window); a policy that does not fit the
    model's config raises ValueError; extra keyword arguments go to ``cache.make_policy``, e.g.
    ``cr=8, window=64`` for "fixed", ``budget=256`` (tokens per KV head) for the baselines of baselines.py).
    budget_pages: the page pool (memory budget) per call; None = enough for every request to keep every token.
    page_size: tokens per page (16: small enough that the half-empty last page of each of the L x Hkv heads wastes
    little, large enough for few table entries; the Triton kernel needs a power of two, Mosaic a multiple of 8).
    prefill_chunk: prompt tokens per prefill call. attention_backend: "auto" | "xla_blocked" | "xla" |
    "pallas_tpu" | "pallas_gpu"; interpret: Pallas interpret mode (None: when the hardware is absent).
    on_exhaustion: "preempt" | "error". segment_steps: decode steps per compiled loop call. cache_dtype: K/V
    storage (default: the model's compute dtype). attention_block_tokens: cached tokens per block of the blocked
    XLA attention (default: 512 in prefill, ~0.5 MB of K+V (at least 256 tokens) per block in decode).

    The model's weights are captured at construction (layers stacked for the scan, plus a transposed copy of a tied
    embedding); build a new Engine after changing them.
    """

    def __init__(self, model: CausalLM, policy: str | kvc.EvictionPolicy = "vanilla", *, budget_pages=None,
                 page_size: int = 16, prefill_chunk: int = 256, attention_backend: str = "auto",
                 interpret: bool | None = None, on_exhaustion: str = "preempt", segment_steps: int = 32,
                 cache_dtype=None, attention_block_tokens: int | None = None, **policy_kw):
        check_int("page_size", page_size)
        check_int("prefill_chunk", prefill_chunk)
        check_int("segment_steps", segment_steps)
        if budget_pages is not None:
            check_int("budget_pages", budget_pages)
        if attention_block_tokens is not None:
            check_int("attention_block_tokens", attention_block_tokens)
        if on_exhaustion not in ON_EXHAUSTION:
            raise ValueError(f"on_exhaustion must be one of {ON_EXHAUSTION}, got {on_exhaustion!r}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {attention_backend!r}")
        self.policy = kvc.make_policy(policy, model.dms_cfg, dmc_cfg=model.dmc_cfg, **policy_kw)
        if self.policy.merges:
            if model.dmc_cfg is None:
                raise ValueError(f"policy {self.policy.name!r} needs a model with a DMCConfig (merge decisions)"
                                 + ("; this model has a DMSConfig: use policy 'dms'" if model.dms_cfg else ""))
            if self.policy.accumulation_window != model.dmc_cfg.accumulation_window:
                raise ValueError(f"the dmc policy's accumulation_window ({self.policy.accumulation_window}) differs "
                                 f"from the model's DMCConfig.accumulation_window "
                                 f"({model.dmc_cfg.accumulation_window})")
        elif self.policy.uses_model_decisions and model.dms_cfg is None:
            raise ValueError(f"policy {self.policy.name!r} needs a model with a DMSConfig (decision logits)"
                             + ("; this model has a DMCConfig: use policy 'dmc'" if model.dmc_cfg else ""))
        self.model = model
        self.cfg = model.cfg
        self.page_size = int(page_size)
        self.budget_pages = budget_pages
        self.prefill_chunk = int(prefill_chunk)
        self.backend = resolve_attention_backend(attention_backend)
        self.interpret = interpret
        self.on_exhaustion = on_exhaustion
        self.segment_steps = int(segment_steps)
        self.block_tokens = attention_block_tokens
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype).name
        (self._layer_gd, self._layer_params, self._layer_list, self._outer_gd,
         self._outer_params) = _split_model(model)

    # ----------------------------------------------------------------------------------------- low level

    def make_spec(self, max_seqs: int, max_context: int, budget_pages=None) -> kvc.CacheSpec:
        cfg = self.cfg
        return kvc.CacheSpec.create(
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_seqs=max_seqs,
            max_context=max_context, window=self.policy.delay_window, page_size=self.page_size,
            num_pages=budget_pages if budget_pages is not None else self.budget_pages, dtype=self.cache_dtype)

    def new_cache(self, spec: kvc.CacheSpec) -> kvc.PagedCache:
        return _init_jit(spec, self.policy)

    def _check_tokens(self, seqs):
        vocab = self.cfg.vocab_size
        bad = [t for p in seqs for t in p if not (isinstance(t, (int, np.integer)) and 0 <= int(t) < vocab)]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab}), got {bad[:5]}")

    def prefill(self, cache, spec, slots: Sequence[int], prompts: Sequence[Sequence[int]], *,
                all_logits: bool = False):
        """Prefills ``prompts`` into empty sequence slots ``slots`` chunk by chunk.

        Returns (logits, cache, failed, reads): logits is a list of [len_i, V] arrays (all_logits) or [B, V] (the
        last token of each prompt); failed [B] bool marks prompts preempted for lack of pages (already released;
        in "error" mode a PoolExhaustedError is raised instead); reads [B] the prefill token reads.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        if len(slots) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(slots)} slots")
        self._check_tokens(prompts)
        lens = np.array([len(p) for p in prompts])
        start = np.asarray(cache.num_tokens)[np.asarray(slots)]
        if (start != 0).any():
            raise ValueError(f"prefill needs empty slots; slots {np.asarray(slots)[start != 0].tolist()} hold tokens")
        if lens.max() > spec.max_tokens_per_head:
            raise ValueError(f"prompt of {lens.max()} tokens exceeds the cache's {spec.max_tokens_per_head} tokens")
        c = self.prefill_chunk
        n_chunks = -(-int(lens.max()) // c)
        toks = np.zeros((len(prompts), n_chunks * c), np.int32)
        for i, p in enumerate(prompts):
            toks[i, :len(p)] = p
        slots_a = jnp.asarray(np.asarray(slots, np.int32))
        alive = np.ones(len(prompts), bool)
        reads = np.zeros(len(prompts), np.int64)
        outs, last = [], None
        for ci in range(n_chunks):
            n_valid = np.clip(lens - ci * c, 0, c).astype(np.int32)
            logits, cache, failed, r, overflow = _prefill_chunk(
                self._layer_gd, self._layer_params, self._outer_gd, self._outer_params, cache, slots_a,
                jnp.asarray(toks[:, ci * c:(ci + 1) * c]), jnp.asarray(n_valid), jnp.asarray(alive), spec=spec,
                policy=self.policy, all_logits=all_logits, block_tokens=self.block_tokens)
            if bool(overflow):
                raise RuntimeError("internal error: the prefill handed out more pages than were free")
            failed = np.asarray(failed)
            reads += np.asarray(r)
            if failed.any():
                alive &= ~failed
                if self.on_exhaustion == "error":
                    free = int(kvc.free_pages(cache.refcount))
                    raise PoolExhaustedError(
                        f"KV page pool exhausted during prefill (chunk {ci}, tokens {ci * c}..{ci * c + c - 1}) of "
                        f"prompt(s) {np.nonzero(failed)[0].tolist()}: {free} of {spec.num_pages} pages free "
                        f"({spec.num_pages * spec.bytes_per_page} bytes budget). Those prompts were released; the "
                        f"others are untouched. Raise budget_pages or use on_exhaustion='preempt'.")
            if all_logits:
                outs.append(np.asarray(logits))
            else:
                last = logits if last is None else jnp.where(jnp.asarray(n_valid > 0)[:, None], logits, last)
        # A policy may reduce the prompt once it is all in (TOVA, as in its paper: once after the whole prompt).
        cache = _finish_prefill_jit(cache, slots_a, spec=spec, policy=self.policy)
        if all_logits:
            full = np.concatenate(outs, axis=1)
            return [full[i, :lens[i]] for i in range(len(prompts))], cache, ~alive, reads
        return last, cache, ~alive, reads

    def fork(self, cache, spec, src: Sequence[int], dst: Sequence[int]):
        """Copy-on-write: each ``dst[i]`` (empty slot) becomes a chain sharing ``src[i]``'s pages."""
        if len(src) != len(dst):
            raise ValueError("src and dst must have the same length")
        if not len(dst):
            return cache
        used = np.asarray(cache.num_tokens)[np.asarray(dst)]
        if (used != 0).any():
            raise ValueError(f"fork needs empty destination slots; {np.asarray(dst)[used != 0].tolist()} hold tokens")
        return _fork_jit(cache, jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32), page_size=spec.page_size)

    def release(self, cache, spec, slots: Sequence[int]):
        mask = np.zeros(spec.max_seqs, bool)
        mask[list(slots)] = True
        return _release_jit(cache, jnp.asarray(mask), page_size=spec.page_size)

    def decode_width(self, cache, spec, steps: int) -> int:
        """Block-table columns a compiled decode call reads: enough for the fullest head after ``steps`` more
        tokens, bucketed (few compilations)."""
        if self.backend == "xla_blocked":
            return spec.max_pages_per_head  # the blocked loop stops at the longest head by itself
        held = int(jnp.max(kvc.pages_for(cache.lengths, spec.page_size)))
        return min(max(kvc.bucket(held + -(-steps // spec.page_size) + 1, spec.max_pages_per_head),
                       MIN_WIDTH_PAGES), spec.max_pages_per_head)

    def step(self, cache, spec, tokens, active=None):
        """One teacher-forced decode step: feeds ``tokens`` [S] to the ``active`` [S] sequences.

        Returns (logits [S, V], cache, preempted [S] bool). Raises PoolExhaustedError in "error" mode.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
        width = self.decode_width(cache, spec, 1)
        logits, cache, info = _decode_step_jit(
            self._layer_gd, self._layer_list, self._outer_gd, self._outer_params, cache, tokens, active,
            spec=spec, policy=self.policy, width=width, backend=self.backend, interpret=self.interpret,
            on_exhaustion=self.on_exhaustion, block_tokens=self.block_tokens)
        if bool(info.error):
            self._raise_step_error(spec, int(info.need), int(info.free), None)
        return logits, cache, np.asarray(info.preempted)

    def _raise_step_error(self, spec, need, free, step):
        if self.on_exhaustion != "error":
            raise RuntimeError("internal error: a decode step handed out more pages than were free after preemption")
        raise PoolExhaustedError(self._decode_error(spec, need, free, step))

    def _decode_error(self, spec, need, free, step):
        at = f" at decode step {step}" if step is not None else ""
        return (f"KV page pool exhausted{at}: the step needs {need} new page(s) but only {free} of "
                f"{spec.num_pages} are free ({spec.num_pages * spec.bytes_per_page} bytes budget, page_size "
                f"{spec.page_size}). The step was not applied. Raise budget_pages, lower the number of chains or "
                f"use on_exhaustion='preempt'.")

    # ----------------------------------------------------------------------------------------- generation

    def decode(self, cache, spec, last_logits, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
               stop_ids: Sequence[int] | None = None, seed: int = 0, running=None) -> "DecodeOutput":
        """Samples up to ``max_new_tokens`` tokens for every ``running`` [S] slot of a prefilled cache, starting
        from ``last_logits`` [S, V] (the logits after each slot's last cached token).

        Runs jitted segments of ``segment_steps`` steps. Returns a DecodeOutput (tokens, status, metrics, the final
        cache, wall time per segment); the cache holds what is left (finished sequences have been released).
        """
        check_int("max_new_tokens", max_new_tokens)
        s = spec.max_seqs
        stop = list(self.cfg.eos_token_ids if stop_ids is None else stop_ids) or [-1]
        running = np.ones(s, bool) if running is None else np.asarray(running, bool)
        live0, pages0 = _seq_live_and_pages(cache, spec.page_size)
        run_a = jnp.asarray(running)
        st = _GenState(
            out=jnp.zeros((s, max_new_tokens), jnp.int32), n_out=jnp.zeros((s,), jnp.int32),
            tok=jnp.zeros((s,), jnp.int32), running=run_a,
            finished=jnp.zeros((s,), bool), preempted=jnp.zeros((s,), bool), stopped=jnp.zeros((s,), bool),
            key=jax.random.key(seed), reads=jnp.zeros((s,), jnp.int32), steps=jnp.zeros((), jnp.int32),
            peak_live=jnp.where(run_a, live0, 0), peak_pages=jnp.where(run_a, pages0, 0),
            error=jnp.zeros((), bool), err_need=jnp.zeros((), jnp.int32), err_free=jnp.zeros((), jnp.int32))
        reads = np.zeros(s, np.int64)
        steps = 0
        segments = []
        stop_arr = jnp.asarray(stop, jnp.int32)
        # Keep the per-segment int32 read counters far from overflow.
        per_step = spec.num_layers * spec.num_kv_heads * spec.max_tokens_per_head * s
        seg = max(1, min(self.segment_steps, (2 ** 31 - 1) // max(per_step, 1)))
        t_start = time.perf_counter()
        # The first token of every running slot comes from the prefill's logits; each forward then emits the next.
        cache, st = _first_emit(cache, st, jnp.asarray(last_logits, jnp.float32), stop_arr, sampling=sampling,
                                max_new_tokens=max_new_tokens, page_size=spec.page_size)
        while bool(jnp.any(st.running)):
            width = self.decode_width(cache, spec, seg)
            t0 = time.perf_counter()
            cache, st = _decode_segment(
                self._layer_gd, self._layer_list, self._outer_gd, self._outer_params, cache, st, stop_arr,
                spec=spec, policy=self.policy, width=width, backend=self.backend, interpret=self.interpret,
                on_exhaustion=self.on_exhaustion, sampling=sampling, max_steps=seg, max_new_tokens=max_new_tokens,
                block_tokens=self.block_tokens)
            n_fwd = int(st.steps)
            segments.append({"width_pages": width, "forwards": n_fwd, "seconds": time.perf_counter() - t0})
            reads += np.asarray(st.reads)
            steps += n_fwd
            if bool(st.error):
                self._raise_step_error(spec, int(st.err_need), int(st.err_free), steps)
            st = st.replace(reads=jnp.zeros_like(st.reads), steps=jnp.zeros_like(st.steps))
        jax.block_until_ready(st)
        n_out = np.asarray(st.n_out)
        out = np.asarray(st.out)
        return DecodeOutput(
            tokens=[out[i, :n_out[i]].tolist() for i in range(s)], preempted=np.asarray(st.preempted),
            stopped=np.asarray(st.stopped), reads=reads, peak_live=np.asarray(st.peak_live),
            peak_pages=np.asarray(st.peak_pages), forwards=steps, seconds=time.perf_counter() - t_start,
            segments=segments, cache=cache)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] | None = None, seed: int = 0,
                 chains: int = 1, context: int | None = None) -> GenerationResult:
        """Generates ``chains`` continuations of each prompt (prompts of any lengths, one batch).

        stop_ids: a sequence ends after emitting one (included in its tokens); default the model's EOS ids.
        The chains of a prompt share its prefill (copy-on-write pages) and sample independently. The pool (budget)
        is created for the call; every page is back in it at the end. context: tokens per head the cache is sized
        for (default and minimum: the longest prompt + max_new_tokens; a smaller one raises ValueError).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        check_int("max_new_tokens", max_new_tokens)
        check_int("chains", chains)
        if not isinstance(sampling, SamplingConfig):
            raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if sampling.top_k > self.cfg.vocab_size:
            raise ValueError(f"top_k={sampling.top_k} exceeds the vocabulary size {self.cfg.vocab_size}")
        self._check_tokens(prompts)
        longest = max(len(p) for p in prompts)
        needed = longest + max_new_tokens
        if needed > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                             f"context of {self.cfg.max_position_embeddings} tokens")
        if context is None:
            context = needed
        else:
            check_int("context", context)
            if context < needed:
                raise ValueError(f"context={context} is too small: the longest prompt ({longest} tokens) + "
                                 f"max_new_tokens={max_new_tokens} need {needed} tokens per head")
        n_p, w = len(prompts), int(chains)
        s = n_p * w
        # context: cache capacity per head (a fixed value lets prompts of different lengths share one compilation).
        spec = self.make_spec(s, int(context))
        cache = self.new_cache(spec)

        t0 = time.perf_counter()
        heads = [i * w for i in range(n_p)]
        last, cache, failed, prefill_reads = self.prefill(cache, spec, heads, prompts)
        src = [i * w for i in range(n_p) for _ in range(1, w) if not failed[i]]
        dst = [i * w + j for i in range(n_p) for j in range(1, w) if not failed[i]]
        cache = self.fork(cache, spec, src, dst)
        jax.block_until_ready(cache)
        prefill_seconds = time.perf_counter() - t0

        owner = np.repeat(np.arange(n_p), w)
        dec = self.decode(cache, spec, jnp.asarray(last)[jnp.asarray(owner)], max_new_tokens=max_new_tokens,
                          sampling=sampling, stop_ids=stop_ids, seed=seed, running=~np.repeat(failed, w))
        preempted = dec.preempted | np.repeat(failed, w)
        lh = spec.num_layers * spec.num_kv_heads
        requests = []
        for i in range(s):
            p_len, n_new = len(prompts[owner[i]]), len(dec.tokens[i])
            # Tokens fed through decode forwards: every generated token but the last (its logits are not needed).
            # A preempted request loses the forward of its last sampled token too; its figures run up to then.
            fed = max(n_new - 1, 0)
            in_cache = 0 if failed[owner[i]] else p_len + fed
            dense_reads = lh * sum(p_len + k + 1 for k in range(fed))
            # Live tokens never decrease (each token overwrites at most one evicted slot): the final count is the peak.
            final_live = int(dec.peak_live[i]) if in_cache else 0
            r = int(dec.reads[i])
            m = RequestMetrics(
                prompt_tokens=p_len, new_tokens=n_new, kv_token_reads=r, kv_token_reads_dense=int(dense_reads),
                kv_token_reads_prefill=int(prefill_reads[owner[i]]), peak_live_tokens=int(dec.peak_live[i]),
                final_live_tokens=final_live, dense_tokens=lh * in_cache, peak_pages=int(dec.peak_pages[i]),
                peak_bytes=int(dec.peak_pages[i]) * spec.bytes_per_page,
                compression_ratio=(lh * in_cache / final_live) if final_live else 1.0,
                read_ratio=(dense_reads / r) if r else 1.0)
            requests.append(RequestResult(
                prompt_index=int(owner[i]), chain=i % w, tokens=dec.tokens[i],
                status="preempted" if preempted[i] else "finished", stopped=bool(dec.stopped[i]), metrics=m))
        hw = int(dec.cache.high_water)
        leftover = int(kvc.used_pages(dec.cache.refcount))
        return GenerationResult(
            requests=requests, policy=self.policy.describe(), page_size=spec.page_size, budget_pages=spec.num_pages,
            bytes_per_page=spec.bytes_per_page, pool_high_water_pages=hw,
            pool_high_water_bytes=hw * spec.bytes_per_page, prefill_seconds=prefill_seconds,
            decode_seconds=dec.seconds, decode_steps=dec.forwards, preempted=[i for i in range(s) if preempted[i]],
            pages_in_use_at_end=leftover, segments=dec.segments)
