"""Inference engine over the paged per-head cache (spec.py, pages.py, plans.py): chunked prefill with exact
hard-decision masking, jit-compiled decode for a batch of sequences of different lengths, W parallel chains sharing
one prefill, sampling, stop tokens, per-request memory / read metrics and pool exhaustion handling.

How a call runs (`Engine.generate`):

1. **Prefill**, chunk by chunk (``prefill_chunk`` tokens of every prompt per call, right-padded; prefill.py). Per
   layer, the chunk's queries attend to the head's cached live slots plus the chunk itself with the exact hard DMS
   mask, then the chunk is inserted: tokens evicted within the chunk are never written, the survivors fill the
   slots freed by older ring tokens leaving the window, the rest are appended (pages allocated on device).
2. **Fork**: chain ``i`` of a prompt shares the prompt's pages copy-on-write (no copy now; a page is copied the
   first time a chain writes into it, which for DMS means the slot of an evicted token or the partly filled last
   page). The prompt is prefilled once.
3. **Decode** (decode.py): the first token of every chain is sampled from the prefill's logits
   (``sampling.sample_next``); then segments of ``segment_steps`` steps, each a jitted ``lax.while_loop`` that
   runs while a sequence is running. A step plans every head's write, allocates, runs the layers and writes every
   layer's new K/V into the pool at once, then samples the next tokens; a sequence that emits a stop id or reaches
   the length limit returns its pages at once.

Attention backends: "auto" = "xla_blocked" on CPU (``pallas_kernels.xla_blocked.paged_attention_blocked``: an
online softmax over blocks of cached pages whose trip count is the longest live head, so the cost follows the live
cache; prefill uses the same blocked loop for its cached keys) and the platform's Pallas kernel on TPU / GPU;
"xla", "pallas_tpu" and "pallas_gpu" go through ``pallas_kernels.paged_decode_attention``, compiled for a static
block-table width bucketed from the fullest head (``decode_width``). All layers are one ``lax.scan`` over stacked
layer weights in prefill, so compile time does not grow with depth (the decode unrolls its layers instead: see
``layers.over_layers``). Inside a step the page pool is only read, then written in place once, and no
``lax.cond`` carries it (decode.py's docstring says why).

**DMC** (policy "dmc", a model built with a DMCConfig; policies.py's docstring): the same three phases, but a
token merges into its head's last slot or appends one instead of being evicted (prefill.py, decode.py). Forked
chains share pages copy-on-write as for DMS: a merge into a shared last slot copies its page first.

Pool exhaustion is never silent. ``on_exhaustion="preempt"`` (default): when a step's page requests do not fit,
the most recently admitted running sequences (highest slot first) are preempted -- their pages are freed, their
output so far is returned with ``status="preempted"`` -- and every other sequence continues exactly as it would
have. ``"error"``: the step is not applied and ``PoolExhaustedError`` explains what was needed and what was
free. A prefill that does not fit preempts (or, in "error" mode, fails with) the prompts being prefilled.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dms_jax.config import check_int
from dms_jax.model import CausalLM
from dms_jax.serve.decode import GenState, decode_segment, decode_step_jit, first_emit, seq_live_and_pages
from dms_jax.serve.layers import split_model
from dms_jax.serve.pages import bucket, fork, free_pages, note_high_water, pages_for, release, used_pages
from dms_jax.serve.policies import EvictionPolicy
from dms_jax.serve.prefill import prefill_chunk
from dms_jax.serve.registry import make_policy
from dms_jax.serve.results import DecodeOutput, GenerationResult, PoolExhaustedError, RequestMetrics, RequestResult
from dms_jax.serve.sampling import SamplingConfig
from dms_jax.serve.spec import CacheSpec, PagedCache, init_cache
from dms_jax.serve.tensor_parallel import check_mesh, place_cache, place_model, under_mesh
from pallas_kernels._common import BACKENDS, resolve_backend

ON_EXHAUSTION = ("preempt", "error")
# K/V storage: a float dtype, or int8 rows with a float32 scale each (pallas_kernels.kv_codec).
CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")
ATTENTION_BACKENDS = ("auto", "xla_blocked") + tuple(b for b in BACKENDS if b != "auto")


def resolve_attention_backend(backend: str) -> str:
    """"auto": the blocked XLA path on CPU, the platform's Pallas kernel on TPU / GPU."""
    if backend != "auto":
        return backend
    resolved = resolve_backend("auto")
    return "xla_blocked" if resolved == "xla" else resolved


# Smallest attention width (block-table columns) a compiled call reads: below it, one compilation serves all.
MIN_WIDTH_PAGES = 32


@functools.partial(jax.jit, static_argnames=("page_size",), donate_argnames=("cache",))
def _fork_jit(cache, src, dst, *, page_size):
    return note_high_water(fork(cache, src, dst, page_size))


@functools.partial(jax.jit, static_argnames=("page_size",), donate_argnames=("cache",))
def _release_jit(cache, seqs, *, page_size):
    return release(cache, seqs, page_size)


@functools.partial(jax.jit, static_argnames=("spec", "policy"), donate_argnames=("cache",))
def _finish_prefill_jit(cache, slots, *, spec, policy):
    return policy.finish_prefill(cache, slots, spec)


@functools.partial(jax.jit, static_argnames=("spec", "policy"))
def _init_jit(spec, policy=None):
    return init_cache(spec, policy)


# ---------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------


class Engine:
    """Serves a model over the paged cache with an eviction policy.

    policy: "vanilla" | "dms" | "dmc" | "fixed" | "tova" | "h2o" | "streaming" | "quest" or an ``EvictionPolicy``
    ("dms" holds the model's DMSConfig (window, alpha_per), "dmc" -- merging instead of evicting, for a model
    built with a DMCConfig -- the model's DMCConfig (accumulation window); a policy that does not fit the
    model's config raises ValueError; extra keyword arguments go to ``registry.make_policy``, e.g.
    ``cr=8, window=64`` for "fixed", ``budget=256`` (tokens per KV head) for the baselines of baselines.py).
    budget_pages: the page pool (memory budget) per call; None = enough for every request to keep every token.
    page_size: tokens per page (16: small enough that the half-empty last page of each of the L x Hkv heads wastes
    little, large enough for few table entries; the Triton kernel needs a power of two, Mosaic a multiple of 8).
    prefill_chunk: prompt tokens per prefill call. attention_backend: "auto" | "xla_blocked" | "xla" |
    "pallas_tpu" | "pallas_gpu"; interpret: Pallas interpret mode (None: when the hardware is absent).
    on_exhaustion: "preempt" | "error". segment_steps: decode steps per compiled loop call. cache_dtype: K/V
    storage, one of CACHE_DTYPES (default: the model's compute dtype; "int8": per-token, per-head scaled rows,
    ``pallas_kernels.kv_codec``, with any policy and attention backend). attention_block_tokens: cached
    tokens per block of the blocked XLA attention (default: 512 in prefill, ~0.5 MB of K+V (at least 256 tokens)
    per block in decode). mesh: a ``jax.sharding.Mesh`` whose devices are all on its "tensor" axis: tensor
    parallelism over KV heads (``tensor_parallel.py``; each device holds ``budget_pages / T`` pages).

    The model's weights are captured at construction (layers stacked for the scan, plus a transposed copy of a tied
    embedding); build a new Engine after changing them.
    """

    def __init__(self, model: CausalLM, policy: str | EvictionPolicy = "vanilla", *, budget_pages=None,
                 page_size: int = 16, prefill_chunk: int = 256, attention_backend: str = "auto",
                 interpret: bool | None = None, on_exhaustion: str = "preempt", segment_steps: int = 32,
                 cache_dtype=None, attention_block_tokens: int | None = None, mesh=None, **policy_kw):
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
        self.policy = make_policy(policy, model.dms_cfg, dmc_cfg=model.dmc_cfg, **policy_kw)
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
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        self.mesh = mesh
        self.kv_groups = 1
        if mesh is not None:  # tensor parallel over KV heads (tensor_parallel.py)
            self.kv_groups = check_mesh(mesh, self.cfg.num_kv_heads)
            model = place_model(model, mesh)
        (self._layer_gd, self._layer_params, self._layer_list, self._outer_gd,
         self._outer_params) = split_model(model)

    # ----------------------------------------------------------------------------------------- low level

    def make_spec(self, max_seqs: int, max_context: int, budget_pages=None) -> CacheSpec:
        cfg = self.cfg
        return CacheSpec.create(
            num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_seqs=max_seqs,
            max_context=max_context, window=self.policy.delay_window, page_size=self.page_size,
            num_pages=budget_pages if budget_pages is not None else self.budget_pages, dtype=self.cache_dtype,
            kv_groups=self.kv_groups)

    def new_cache(self, spec: CacheSpec) -> PagedCache:
        cache = _init_jit(spec, self.policy)
        return cache if self.mesh is None else place_cache(cache, self.mesh)

    def _check_tokens(self, seqs):
        vocab = self.cfg.vocab_size
        bad = [t for p in seqs for t in p if not (isinstance(t, (int, np.integer)) and 0 <= int(t) < vocab)]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab}), got {bad[:5]}")

    @under_mesh
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
            logits, cache, failed, r, overflow = prefill_chunk(
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
                    free = int(free_pages(cache.refcount))
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
        held = int(jnp.max(pages_for(cache.lengths, spec.page_size)))
        return min(max(bucket(held + -(-steps // spec.page_size) + 1, spec.max_pages_per_head),
                       MIN_WIDTH_PAGES), spec.max_pages_per_head)

    @under_mesh
    def step(self, cache, spec, tokens, active=None):
        """One teacher-forced decode step: feeds ``tokens`` [S] to the ``active`` [S] sequences.

        Returns (logits [S, V], cache, preempted [S] bool). Raises PoolExhaustedError in "error" mode.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
        width = self.decode_width(cache, spec, 1)
        logits, cache, info = decode_step_jit(
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

    @under_mesh
    def decode(self, cache, spec, last_logits, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
               stop_ids: Sequence[int] | None = None, seed: int = 0, running=None, chains: int = 1) -> "DecodeOutput":
        """Samples up to ``max_new_tokens`` tokens for every ``running`` [S] slot of a prefilled cache, starting
        from ``last_logits`` [S, V] (the logits after each slot's last cached token).

        chains: the slots are W chains per prompt, prompt-major, forked from the prompt's pages (as ``generate``
        lays them out); on the blocked XLA path each prompt's shared pages are then read once per step for all
        its chains instead of once per chain. The tokens do not depend on it (pages that are not shared are read
        per chain, whatever the layout); it only reads less.

        Runs jitted segments of ``segment_steps`` steps. Returns a DecodeOutput (tokens, status, metrics, the final
        cache, wall time per segment); the cache holds what is left (finished sequences have been released).
        """
        check_int("max_new_tokens", max_new_tokens)
        s = spec.max_seqs
        check_int("chains", chains)
        if s % chains:
            raise ValueError(f"chains={chains} must divide the cache's {s} sequence slots")
        stop = list(self.cfg.eos_token_ids if stop_ids is None else stop_ids) or [-1]
        running = np.ones(s, bool) if running is None else np.asarray(running, bool)
        live0, pages0 = seq_live_and_pages(cache, spec.page_size)
        run_a = jnp.asarray(running)
        st = GenState(
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
        cache, st = first_emit(cache, st, jnp.asarray(last_logits, jnp.float32), stop_arr, sampling=sampling,
                               max_new_tokens=max_new_tokens, page_size=spec.page_size)
        while bool(jnp.any(st.running)):
            width = self.decode_width(cache, spec, seg)
            t0 = time.perf_counter()
            cache, st = decode_segment(
                self._layer_gd, self._layer_list, self._outer_gd, self._outer_params, cache, st, stop_arr,
                spec=spec, policy=self.policy, width=width, backend=self.backend, interpret=self.interpret,
                on_exhaustion=self.on_exhaustion, sampling=sampling, max_steps=seg, max_new_tokens=max_new_tokens,
                block_tokens=self.block_tokens, chains=chains)
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

    @under_mesh
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
                          sampling=sampling, stop_ids=stop_ids, seed=seed, running=~np.repeat(failed, w), chains=w)
        preempted = dec.preempted | np.repeat(failed, w)
        requests = _request_results(spec, prompts, owner, w, failed, prefill_reads, dec, preempted)
        hw = int(dec.cache.high_water)
        leftover = int(used_pages(dec.cache.refcount, spec.kv_groups))
        return GenerationResult(
            requests=requests, policy=self.policy.describe(), page_size=spec.page_size, budget_pages=spec.num_pages,
            bytes_per_page=spec.bytes_per_page, pool_high_water_pages=hw,
            pool_high_water_bytes=hw * spec.bytes_per_page, prefill_seconds=prefill_seconds,
            decode_seconds=dec.seconds, decode_steps=dec.forwards, preempted=[i for i in range(s) if preempted[i]],
            pages_in_use_at_end=leftover, segments=dec.segments)


def _request_results(spec: CacheSpec, prompts, owner, chains: int, failed, prefill_reads, dec: DecodeOutput,
                     preempted) -> list[RequestResult]:
    """One RequestResult per sequence slot of a ``generate`` call (slot i: chain ``i % chains`` of prompt
    ``owner[i]``), with its metrics from the prefill reads and the DecodeOutput ``dec``."""
    lh = spec.num_layers * spec.num_kv_heads
    requests = []
    for i in range(len(owner)):
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
            prompt_index=int(owner[i]), chain=i % chains, tokens=dec.tokens[i],
            status="preempted" if preempted[i] else "finished", stopped=bool(dec.stopped[i]), metrics=m))
    return requests
