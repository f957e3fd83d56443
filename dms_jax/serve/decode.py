"""Decode over the paged cache: one token for every active sequence per step, jit-compiled segments of steps.

A step is one forward of the last emitted tokens -- plan every head's write (overwrite the slot of the marked
token leaving the window, else append; copy-on-write; ``plans.plan_decode``), allocate, go through the layers
(record the decision for the previous token in the ring, paged decode attention over the cached slots plus the
new token), then write every layer's new K/V into the pool at once -- followed by sampling the next tokens
(``sampling.sample_next``); a sequence that emits a stop id or reaches the length limit returns its pages at once.
A segment (``decode_segment``) is a ``lax.while_loop`` of such steps that runs while a sequence is running; the
first token of every chain is sampled from the prefill's logits (``first_emit``).

The layers are unrolled (``layers.over_layers``: a scan would copy every layer's weights per token on CPU).
Inside a step the page pool is only read, then written in place once, and no ``lax.cond`` carries it (see
``pages.cond_without_pools`` and ``pallas_kernels.xla_blocked.online_blocks(thread_pools=...)``).

**DMC** (policy "dmc"): a head's merge decision comes from the token's own key, so it is known only inside its
layer; the slot bookkeeping and page allocation run layer by layer, and the step's page check reserves the worst
case (every head appending), which a merge never exceeds (``_dmc_decode_forward``).

Pool exhaustion (``on_exhaustion``): "preempt" lets the most recently admitted running sequences go (highest
slot first) until the step fits, and every other sequence continues exactly as it would have; "error" does not
apply the step and reports what was needed and what was free (the engine raises ``PoolExhaustedError``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dms_jax import dmc
from dms_jax.model import apply_rope, rope_cos_sin
from dms_jax.serve.layers import over_layers
from dms_jax.serve.pages import (by_group, compact_selected_pages, compacted_slot, cond_without_pools, copy_pages,
                                 exclusive_pages, fits, group_free_pages, note_high_water, pages_for, release,
                                 select_preemptions, without_pools, write_kv)
from dms_jax.serve.plans import apply_decode_plan, dmc_decode_slots, plan_decode, set_previous_decision
from dms_jax.serve.sampling import sample_next
from dms_jax.serve.tensor_parallel import over_kv_heads
from pallas_kernels import paged_decode_attention
from pallas_kernels.xla_blocked import paged_attention_blocked

Array = jax.Array


@struct.dataclass
class _StepInfo:
    preempted: Array  # [S] bool
    error: Array  # [] bool: pages did not fit and on_exhaustion == "error" (step not applied), or overflow
    need: Array  # [] int32 pages the step asked for
    free: Array  # [] int32 free pages before the step


def _kernel_attention(q, k_pages, v_pages, tables, lengths, page_mask, backend, interpret):
    """``pallas_kernels.paged_decode_attention`` (the "xla" reference or a Pallas kernel) of q [S, Hkv, G, D]. Under a
    tensor-parallel mesh each device runs it on its own share of the pools for its own KV heads
    (``tensor_parallel.over_kv_heads``): a kernel cannot be split by XLA, and the reference's gather of every table
    entry would otherwise read pages across devices."""
    def attend(kp, vp, tab, q_, lens, mask):
        return paged_decode_attention(q_, kp, vp, tab, lens, page_mask=mask, backend=backend, interpret=interpret)

    return over_kv_heads(attend, (k_pages, v_pages), tables, ((q, 1), (lengths, 1), (page_mask, 1)), out_axis=1)


def _decode_forward(layer_gd, layer_params, outer, cache, tokens, active, spec, policy, width, backend, interpret,
                    block_tokens=None, chains=1):
    """The forward of one decode step for ``active`` sequences, after the plan fits. Returns (logits, cache).

    Longer than most: the layer body's two attention closures (deferred writes on the blocked XLA path, write
    first for the kernel backends) read the step's traced plan, positions and pools, which they share."""
    if policy.merges:
        return _dmc_decode_forward(layer_gd, layer_params, outer, cache, tokens, active, spec, policy, width, backend,
                                   interpret, block_tokens, chains)
    r, hkv = spec.ring, spec.num_kv_heads
    s = tokens.shape[0]
    plan = plan_decode(cache, spec, active, policy)
    n = cache.num_tokens
    cache, write_page, write_off = apply_decode_plan(cache, spec, plan, active)
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
            ring_dec2 = set_previous_decision(ring_dec, n, dec, active, r)
            q = p.q[:, 0].reshape(s, hkv, -1, p.q.shape[-1])
            k_new, v_new = p.k[:, 0], p.v[:, 0]
            page_mask = policy.page_mask(q, tables, lengths, pst, page_size=spec.page_size)
            tab, lens, excl, groups = tables, lengths, target, chains
            if page_mask is not None:  # Quest: the table compacted to the selected pages, the loop reads only those
                tab, lens = compact_selected_pages(tables, lengths, page_mask, spec.page_size)
                excl = compacted_slot(target, lengths, page_mask, spec.page_size)
                groups = 1  # each chain's compacted table is its own
            out, kp, vp = paged_attention_blocked(q, k_pages, v_pages, tab, lens, block_tokens=block_tokens,
                                                  new_kv=(k_new, v_new), exclude_slot=excl, return_pools=True,
                                                  thread_pools=True, chains=groups)
            # What a stateful policy observes after the layers (see below): this layer's query, new key, mask.
            obs = None if pst is None else (q, k_new, page_mask)
            return out.reshape(s, 1, -1, p.q.shape[-1]), (kp, vp, ring_dec2, obs, (page, off, k_new, v_new))

        def attention_fn(p):  # the kernel backends: they read the new token from the pool, so it is written first
            dec = policy.decisions(p.decision_logits, positions, hkv)[..., 0]
            ring_dec2 = set_previous_decision(ring_dec, n, dec, active, r)
            k_pages2, v_pages2 = write_kv(k_pages, v_pages, page, off, p.k[:, 0], p.v[:, 0])
            q = p.q[:, 0].reshape(s, hkv, -1, p.q.shape[-1])
            page_mask = policy.page_mask(q, tables, lengths, pst, page_size=spec.page_size)
            out = _kernel_attention(q, k_pages2, v_pages2, tables, lengths, page_mask, backend, interpret)
            # What a stateful policy observes after the layers (see below): this layer's query, new key, mask.
            obs = None if pst is None else (q, p.k[:, 0], page_mask)
            return out.reshape(s, 1, -1, p.q.shape[-1]), (k_pages2, v_pages2, ring_dec2, obs)

        if deferred:  # the pools are threaded through the layers' attention loops (see online_blocks)
            x, (k_pages, v_pages, ring_dec, obs, kv) = layer(x, positions, deferred_attention_fn, dms_on)
            return (x, k_pages, v_pages), (ring_dec, obs, kv)
        x, (k_pages, v_pages, ring_dec, obs) = layer(x, positions, attention_fn, dms_on)
        return (x, k_pages, v_pages), (ring_dec, obs, None)

    (x, k_pages, v_pages), (ring_dec, obs, kv) = over_layers(body, (x, cache.k_pages, cache.v_pages),
                                                             layer_params, xs)
    if deferred:  # every layer's new K/V in one scatter (inactive heads write to the sink)
        k_pages, v_pages = write_kv(k_pages, v_pages, *kv)
    pstate = _observe_decode(policy, cache, obs, k_pages, plan.target, n, active, width)
    cache = cache.replace(k_pages=k_pages, v_pages=v_pages, ring_dec=ring_dec, policy_state=pstate)
    return outer.unembed(x[:, 0]), cache


def _observe_decode(policy, cache, obs, k_pages, target, n, active, width):
    """The policy state after a decode step (None for the stateless policies): ``policy.observe_decode`` of
    every layer's (query, new key, page mask) ``obs``, with the pool ``k_pages`` holding the step's tokens."""
    pstate = cache.policy_state
    if pstate is None:
        return None
    # The policy's bookkeeping (TOVA / H2O: a score pass over the pool; Quest: page bounds, reads), for all
    # layers at once after the last write of the step: reading the pool between a layer's write and the next
    # layer's (in place) write made XLA copy the whole pool at every layer.
    q_all, k_new_all, mask_all = obs
    return jax.vmap(lambda st, q, k_new, tables, lengths, target, mask: policy.observe_decode(
        st, q=q, k_new=k_new, k_pages=k_pages, block_tables=tables, lengths=lengths, target=target, positions=n,
        active=active, page_mask=mask))(pstate, q_all, k_new_all, cache.block_tables[..., :width],
                                        cache.lengths, target, mask_all)


def _dmc_decode_forward(layer_gd, layer_params, outer, cache, tokens, active, spec, policy, width, backend,
                        interpret, block_tokens=None, chains=1):
    """``_decode_forward`` for DMC (policy "dmc"). A head's merge decision comes from the token's own key, so
    it is known only inside its layer: the slot bookkeeping (merge into the last slot or append, page allocation,
    copy-on-write; ``plans.dmc_decode_slots``) runs layer by layer with the refcount threaded through the layers.
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
            refcount2, tables2, lengths2, page, off, cow = dmc_decode_slots(refcount, tables, lengths, merge,
                                                                            active, ps, spec.kv_groups)
            q = p.q[:, 0].reshape(s, hkv, -1, d)
            if deferred:
                out, kp, vp = paged_attention_blocked(
                    q, k_pages, v_pages, tables, lengths, block_tokens=block_tokens, new_kv=(state_k, state_v),
                    exclude_slot=jnp.where(merge, lengths - 1, -1), return_pools=True, thread_pools=True,
                    chains=chains)
            else:
                kp, vp = copy_pages(k_pages, v_pages, *cow)
                kp, vp = write_kv(kp, vp, page, off, state_k, state_v)
                out = _kernel_attention(q, kp, vp, tables2[..., :width], lengths2, None, backend, interpret)
            win2 = {"win_k": win_k, "win_v": win_v, "win_w": win_w, "seg_len": seg_len}
            return out.reshape(s, 1, -1, d), (kp, vp, refcount2, (tables2, lengths2, win2,
                                                                  (cow, page, off, state_k, state_v)))

        x, (k_pages, v_pages, refcount, ys) = layer(x, positions, attention_fn, True)
        return (x, k_pages, v_pages, refcount), ys

    (x, k_pages, v_pages, refcount), (tables, lengths, win, kv) = over_layers(
        body, (x, cache.k_pages, cache.v_pages, cache.refcount), layer_params,
        (cache.block_tables, cache.lengths, cache.policy_state))
    if deferred:  # copy-on-write copies, then every layer's slot write (inactive heads: the sink)
        cow, page, off, k_new, v_new = kv
        k_pages, v_pages = copy_pages(k_pages, v_pages, *cow)
        k_pages, v_pages = write_kv(k_pages, v_pages, page, off, k_new, v_new)
    cache = cache.replace(k_pages=k_pages, v_pages=v_pages, refcount=refcount, block_tables=tables, lengths=lengths,
                          policy_state=win, num_tokens=n + active.astype(jnp.int32))
    return outer.unembed(x[:, 0]), note_high_water(cache)


def _decode_step(layer_gd, layer_params, outer, cache, tokens, active, *, spec, policy, width, backend, interpret,
                 on_exhaustion, block_tokens=None, preempt_rank=None, chains=1):
    """Plans the step, handles pool exhaustion, runs the forward. Returns (logits [S, V], cache, _StepInfo).
    preempt_rank [S]: who goes first when the pool runs short (``pages.select_preemptions``; default the slot)."""
    ps, groups = spec.page_size, spec.kv_groups
    plan = plan_decode(cache, spec, active, policy)
    need_seq = by_group(jnp.sum(plan.need, axis=0), groups)  # [S, groups]: pages each sequence asks for per group
    total = jnp.sum(need_seq)
    n_free = group_free_pages(cache.refcount, groups)
    short = jnp.any(jnp.sum(need_seq, axis=0) > n_free)
    freeable = jax.lax.cond(short, lambda c: exclusive_pages(c, ps, by_groups=True),
                            lambda c: jnp.zeros_like(need_seq), without_pools(cache))
    pre = select_preemptions(need_seq, freeable, active, n_free, preempt_rank)
    vocab = outer.embed_tokens.num_embeddings
    if on_exhaustion == "error":
        error = short

        def run(c):
            return _decode_forward(layer_gd, layer_params, outer, c, tokens, active, spec, policy, width, backend,
                                   interpret, block_tokens, chains)

        if cache.policy_state is None or policy.merges:  # a step that does not fit runs with nothing active: a
            # no-op (no cond; DMC's window state is left alone by inactive rows)
            logits, cache = _decode_forward(layer_gd, layer_params, outer, cache, tokens, active & ~error, spec,
                                            policy, width, backend, interpret, block_tokens, chains)
            logits = jnp.where(error, 0.0, logits)
        else:
            logits, cache = jax.lax.cond(error, lambda c: (jnp.zeros((tokens.shape[0], vocab), jnp.float32), c),
                                         run, cache)
        pre = jnp.zeros_like(pre)
    else:
        cache = cond_without_pools(jnp.any(pre), lambda c: release(c, pre, ps), cache)
        # After the preemptions the requests fit; if they did not (a bookkeeping bug) the host raises.
        error = ~fits(plan_decode(cache, spec, active & ~pre, policy).need, cache.refcount, groups)
        logits, cache = _decode_forward(layer_gd, layer_params, outer, cache, tokens, active & ~pre, spec, policy,
                                        width, backend, interpret, block_tokens, chains)
    return logits, cache, _StepInfo(preempted=pre, error=error, need=total, free=jnp.sum(n_free))


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "width", "backend",
                                             "interpret", "on_exhaustion", "block_tokens"), donate_argnames=("cache",))
def decode_step_jit(layer_gd, layer_params, outer_gd, outer_params, cache, tokens, active, *, spec, policy, width,
                    backend, interpret, on_exhaustion, block_tokens=None):
    """One decode step (``Engine.step``): returns (logits [S, V], cache, _StepInfo)."""
    outer = nnx.merge(outer_gd, outer_params)
    return _decode_step(layer_gd, layer_params, outer, cache, tokens, active, spec=spec, policy=policy, width=width,
                        backend=backend, interpret=interpret, on_exhaustion=on_exhaustion, block_tokens=block_tokens)


@struct.dataclass
class GenState:
    """The decode loop's state, per sequence slot (the carry of ``decode_segment``)."""

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


def step_reads(policy, cache, live):
    """[S] KV entries the last step's attention read: the ``live`` ones, or fewer for a policy that reads only
    some pages (Quest)."""
    return live if cache.policy_state is None else policy.decode_reads(cache)


def seq_live_and_pages(cache, ps):
    """[S] live tokens and [S] pages held per sequence, summed over layers and KV heads."""
    live = jnp.sum(cache.lengths, axis=(0, 2), dtype=jnp.int32)
    pages = jnp.sum(pages_for(cache.lengths, ps), axis=(0, 2), dtype=jnp.int32)
    return live, pages


@struct.dataclass
class StepCount:
    """What both decode loops (``decode_segment`` and the scheduler's) count after a step, per sequence slot."""

    running: Array  # [S] bool: still running (neither preempted nor stopped by a pool error)
    live: Array  # [S] int32 live entries held after the step
    pages: Array  # [S] int32 pages held after the step
    reads: Array  # [S] int32 KV entries the step's attention read (0 for rows not running)


def decode_and_count(layer_gd, layer_params, outer, cache, tokens, running, *, spec, policy, width, backend,
                     interpret, on_exhaustion, block_tokens=None, preempt_rank=None, chains=1):
    """One decode step of the ``running`` rows (``_decode_step``) and its ``StepCount``: the one home of how a
    step's survivors, live entries and reads are counted. Returns (logits, cache, _StepInfo, StepCount)."""
    logits, cache, info = _decode_step(layer_gd, layer_params, outer, cache, tokens, running, spec=spec,
                                       policy=policy, width=width, backend=backend, interpret=interpret,
                                       on_exhaustion=on_exhaustion, block_tokens=block_tokens,
                                       preempt_rank=preempt_rank, chains=chains)
    running = running & ~info.preempted & ~info.error
    live, pages = seq_live_and_pages(cache, spec.page_size)
    reads = jnp.where(running, step_reads(policy, cache, live), 0)
    return logits, cache, info, StepCount(running=running, live=live, pages=pages, reads=reads)


def _emit(cache, st: GenState, logits, stop_ids, *, sampling, max_new_tokens, page_size):
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
    cache = cond_without_pools(jnp.any(stop), lambda c: release(c, stop, page_size), cache)
    return cache, st.replace(out=out, n_out=n_out, key=key, tok=jnp.where(emit, tok, st.tok),
                             running=st.running & ~stop, finished=st.finished | stop,
                             stopped=st.stopped | (emit & is_stop))


@functools.partial(jax.jit, static_argnames=("sampling", "max_new_tokens", "page_size"),
                   donate_argnames=("cache", "state"))
def first_emit(cache, state: GenState, logits, stop_ids, *, sampling, max_new_tokens, page_size):
    return _emit(cache, state, logits, stop_ids, sampling=sampling, max_new_tokens=max_new_tokens,
                 page_size=page_size)


@functools.partial(jax.jit, static_argnames=("layer_gd", "outer_gd", "spec", "policy", "width", "backend",
                                             "interpret", "on_exhaustion", "sampling", "max_steps",
                                             "max_new_tokens", "block_tokens", "chains"),
                   donate_argnames=("cache", "state"))
def decode_segment(layer_gd, layer_params, outer_gd, outer_params, cache, state: GenState, stop_ids, *, spec,
                   policy, width, backend, interpret, on_exhaustion, sampling, max_steps, max_new_tokens,
                   block_tokens=None, chains=1):
    """Up to ``max_steps`` decode steps: each feeds the running sequences' last emitted token through one forward,
    then emits the next (``_emit``; the first token comes from the prefill's logits, ``first_emit``). The loop
    runs only while a sequence is running, so every trip does a forward and no cond is needed around it -- a cond
    carrying the page pools makes XLA copy them at every step. chains: ``Engine.decode``'s (W chains per prompt,
    prompt-major, sharing the prompt's pages: the blocked attention reads each shared span once per prompt)."""
    outer = nnx.merge(outer_gd, outer_params)
    ps = spec.page_size

    def cond(carry):
        _, st = carry
        return (st.steps < max_steps) & jnp.any(st.running) & ~st.error

    def body(carry):
        cache, st = carry
        logits, cache, info, n = decode_and_count(layer_gd, layer_params, outer, cache, st.tok, st.running,
                                                  spec=spec, policy=policy, width=width, backend=backend,
                                                  interpret=interpret, on_exhaustion=on_exhaustion,
                                                  block_tokens=block_tokens, chains=chains)
        st = st.replace(
            running=n.running, preempted=st.preempted | info.preempted, reads=st.reads + n.reads,
            steps=st.steps + (~info.error).astype(jnp.int32),
            peak_live=jnp.maximum(st.peak_live, jnp.where(n.running, n.live, 0)),
            peak_pages=jnp.maximum(st.peak_pages, jnp.where(n.running, n.pages, 0)),
            error=info.error, err_need=jnp.where(info.error, info.need, st.err_need),
            err_free=jnp.where(info.error, info.free, st.err_free),
        )
        # After an error no sequence runs, so nothing is emitted (the host raises).
        return _emit(cache, st, logits, stop_ids, sampling=sampling, max_new_tokens=max_new_tokens, page_size=ps)

    return jax.lax.while_loop(cond, body, (cache, state))
