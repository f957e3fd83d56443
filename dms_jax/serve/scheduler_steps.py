"""The scheduler's device side: its jitted steps over the paged cache (scheduler.py is the host side).

* ``decode_rows_segment`` -- up to ``steps`` decode steps of the running sequences (a sub-cache of their slots,
  ``pages.take_slots``), each row with its own sampling settings, stop ids and length limit; token ``n`` of a
  request is sampled with the key ``(seed, n)`` (``request_keys``), so its output does not depend on its
  neighbours or on preemptions;
* ``first_tokens`` -- the first token of each request from its prefill's logits, with the same keys;
* ``fork_for_prefill`` / ``writable_count`` -- a copy-on-write fork of a cache entry whose pages a prefill may
  write into are made private first, and how many pages that takes.

``decode.decode_segment`` is the Engine's loop over the same step (``decode.decode_and_count``): it samples from one
``SamplingConfig`` with one key chain for the batch, which the scheduler's per-request keys cannot share without
changing the Engine's sampled streams.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dms_jax.serve.decode import decode_and_count
from dms_jax.serve.pages import (by_group, cond_without_pools, fork, note_high_water, prefill_writable, put_slots,
                                 release, take_slots, unshare)
from dms_jax.serve.sampling import sample_rows


@struct.dataclass
class SegmentBatch:
    """The decode segment's per-slot state ([S] unless noted): the carry of ``decode_rows_segment``."""

    tok: jax.Array  # last emitted token, not yet fed
    running: jax.Array
    n_out: jax.Array  # tokens the request has generated so far
    max_new: jax.Array
    seed: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop: jax.Array  # [S, K] stop ids (-1: none)
    keep: jax.Array  # a finished sequence keeps its pages (a cache entry)
    rank: jax.Array  # arrival order: the highest is preempted first
    out: jax.Array  # [S, steps] tokens emitted in this segment
    n_new: jax.Array
    finished: jax.Array
    stopped: jax.Array
    preempted: jax.Array
    final_live: jax.Array  # live entries when it finished
    reads: jax.Array
    step: jax.Array  # []
    error: jax.Array  # [] a bookkeeping bug (the host raises)


def request_keys(seed, n_out):
    """Request ``seed``'s key for its token number ``n_out`` ([S] each)."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s), n))(seed, n_out)


@jax.jit
def first_tokens(logits, seed, n_out, temperature, top_k, top_p):
    return sample_rows(logits, request_keys(seed, n_out), temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("page_size", "anywhere"))
def writable_count(cache, slot, *, page_size, anywhere):
    """Pages ``fork_for_prefill`` may copy, counted for the scheduler's balanced free-page check
    (``pages.balanced_free_pages``): groups x the most that any KV-head group may copy, since the copies of one
    group come from its own share of the pool."""
    per_head = jnp.sum(prefill_writable(cache, slot, page_size, anywhere), axis=(0, 2), dtype=jnp.int32)
    return cache.kv_groups * jnp.max(by_group(per_head, cache.kv_groups))


@functools.partial(jax.jit, static_argnames=("page_size", "anywhere"), donate_argnames=("cache",))
def fork_for_prefill(cache, src, dst, *, page_size, anywhere):
    """``dst`` becomes a copy-on-write fork of ``src`` whose pages a prefill may write into are its own."""
    cache = fork(cache, src[None], dst[None], page_size)
    return note_high_water(unshare(cache, dst, prefill_writable(cache, dst, page_size, anywhere)))


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "width", "backend",
                                             "interpret", "block_tokens", "steps"), donate_argnames=("cache",))
def decode_rows_segment(layer_gd, layer_params, outer_gd, outer_params, cache, slots, b: SegmentBatch, *, spec,
                        policy, width, backend, interpret, block_tokens, steps):
    """Up to ``steps`` decode steps of the sequences in ``slots`` (``b``'s rows; ``spec.max_seqs`` of them), each
    with its own sampling, stop ids and length limit; a finished sequence frees its pages at once unless it is
    kept."""
    outer = nnx.merge(outer_gd, outer_params)
    full, cache = cache, take_slots(cache, slots)
    ps = spec.page_size

    def cond(carry):
        _, b = carry
        return (b.step < steps) & jnp.any(b.running) & ~b.error

    def body(carry):
        cache, b = carry
        logits, cache, info, n = decode_and_count(layer_gd, layer_params, outer, cache, b.tok, b.running,
                                                  spec=spec, policy=policy, width=width, backend=backend,
                                                  interpret=interpret, on_exhaustion="preempt",
                                                  block_tokens=block_tokens, preempt_rank=b.rank)
        running = n.running
        tok = sample_rows(logits, request_keys(b.seed, b.n_out), b.temperature, b.top_k, b.top_p)
        n_out = b.n_out + running
        is_stop = jnp.any(tok[:, None] == b.stop, axis=-1)
        stop = running & (is_stop | (n_out >= b.max_new))
        drop = stop & ~b.keep
        cache = cond_without_pools(jnp.any(drop), lambda c: release(c, drop, ps), cache)
        b = b.replace(
            tok=jnp.where(running, tok, b.tok), running=running & ~stop, n_out=n_out,
            out=b.out.at[:, b.step].set(jnp.where(running, tok, -1)), n_new=b.n_new + running,
            finished=b.finished | stop, stopped=b.stopped | (stop & is_stop), preempted=b.preempted | info.preempted,
            final_live=jnp.where(stop, n.live, b.final_live),
            reads=b.reads + n.reads,
            step=b.step + 1, error=b.error | info.error)
        return cache, b

    cache, b = jax.lax.while_loop(cond, body, (cache, b))
    return put_slots(full, cache, slots), b
