"""Continuous batching over one paged per-head pool: requests arrive and leave at any time.

    sched = Scheduler(Engine(model, "dms"), max_seqs=8, context=4096, budget_pages=20_000)
    rid = sched.submit(prompt_ids, max_new_tokens=64, on_event=print)   # from any thread
    sched.run()                                                         # or a worker thread calling step()
    sched.result(rid).tokens

An iteration (``step``) takes the submissions and cancellations that arrived, admits waiting requests in arrival
order (FIFO) into free sequence slots, runs one prefill chunk for up to ``prefill_batch`` admitted prompts and one
jitted decode segment of ``segment_steps`` steps for every running sequence, then hands each request its new
tokens (``on_event``). Prefill and decode thus interleave: a long prompt never stalls the running sequences for
more than one chunk.

Memory is what the sequences really hold. A request is admitted when the pool has the pages its next chunk can take
(every head appending every token, in the worst case) on top of a reserve for the running sequences' next segment.
With an evicting policy its whole dense length is never reserved, so a DMS model admits as many requests as its live
entries allow. A policy that evicts nothing (vanilla, Quest) knows what each request will hold -- its dense length,
prompt + ``max_new_tokens`` -- so by default (``reserve_dense``) it admits a request only when the dense lengths of
all admitted requests fit the pool: admitting on the next chunk alone would fill the pool with half-finished
sequences that preempt each other over and over (bench_serve's vanilla run, before this rule: 144 preemptions for 16
requests, docs/results/serve_before_scheduler_fixes.json). A sequence that finishes (a stop id, its
``max_new_tokens``, or a cancellation) frees its pages at once. When a decode step does not fit, cache entries are
dropped first; then the newest running requests by arrival are preempted (``pages.select_preemptions`` with their
arrival rank) and later re-admitted ahead of newer arrivals, once the pool holds their whole context again or
nothing else runs (not as soon as one chunk fits, which would preempt them anew): they prefill their prompt and what
they had generated, and go on. Token ``n`` of a request is sampled with the key ``(seed, n)`` of that request alone,
so its output does not depend on its neighbours, on preemptions or on the batch it ran in.

Multi-turn and shared prefixes: with ``prefix_cache`` a finished sequence keeps its pages as a cache entry (its
cached tokens: the prompt and all generated tokens but the last, which no forward has fed). A new request whose
tokens start with an entry's tokens forks it (copy-on-write, as the engine's chains do) and prefills only the rest
-- prefill into a non-empty slot, the per-head ring and window state carried on -- so a conversation's next turn
costs its new tokens only, and a system prompt added with ``add_prefix`` is prefilled once for all requests.
Entries are dropped least recently used first whenever a slot or pages are needed (pinned prefixes last); a
request that finds none prefills its whole context. Policies that reduce the whole prompt once it is in (TOVA's
prompt mode) do not reuse entries: a reused prefix would have been reduced on its own.

Compiled shapes are bounded: one prefill chunk shape ([prefill_batch, prefill_chunk]), one decode segment per
(running sequences rounded up to a power of two: at most log2(max_seqs) + 2 sizes) x (attention width: one on
CPU's blocked path, a few bucketed widths for the kernels), one first-token sampler, the fork / release helpers
and, for TOVA, its prompt reduction. ``compiled_shapes`` lists them.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from dms_jax.config import check_int
from dms_jax.serve.decode import seq_live_and_pages
from dms_jax.serve.engine import Engine, _finish_prefill_jit, _release_jit
from dms_jax.serve.pages import balanced_free_pages, used_pages
from dms_jax.serve.prefill import prefill_chunk
from dms_jax.serve.requests import Completion, RequestError, TokenEvent, check_request, dense_pages
from dms_jax.serve.sampling import SamplingConfig
from dms_jax.serve.scheduler_steps import (SegmentBatch, decode_rows_segment, first_tokens, fork_for_prefill,
                                           writable_count)
from dms_jax.serve.tensor_parallel import under_mesh

__all__ = ["Scheduler", "RequestError", "TokenEvent", "Completion"]


@dataclasses.dataclass
class _Entry:
    """A cache entry: a slot holding the cached tokens ``tokens`` of a finished sequence or a pinned prefix."""

    slot: int
    tokens: list[int]
    pinned: bool
    last_used: int


class Scheduler:
    """Continuous batching of requests over one cache of ``engine`` (module docstring).

    max_seqs: sequences held at once (running, prefilling or kept as cache entries). context: tokens per head a
    sequence may reach (prompt + answer). budget_pages: the pool (None: the engine's, else every slot dense).
    prefill_batch: prompts advanced per prefill chunk. segment_steps: decode steps per iteration (lower: tokens
    stream out sooner; higher: less host overhead). prefix_cache: keep finished sequences for reuse.
    max_stop_ids: stop ids a request may give (a static shape). reserve_dense: admit a request only when every
    admitted request's dense length fits the pool (None: when the policy evicts nothing; module docstring).
    """

    def __init__(self, engine: Engine, *, max_seqs: int = 8, context: int | None = None, budget_pages=None,
                 prefill_batch: int = 2, segment_steps: int = 8, prefix_cache: bool = True, max_stop_ids: int = 8,
                 reserve_dense: bool | None = None):
        for name, v in (("max_seqs", max_seqs), ("prefill_batch", prefill_batch),
                        ("segment_steps", segment_steps), ("max_stop_ids", max_stop_ids)):
            check_int(name, v)
        context = engine.cfg.max_position_embeddings if context is None else context
        check_int("context", context)
        if context > engine.cfg.max_position_embeddings:
            raise ValueError(f"context={context} exceeds the model's {engine.cfg.max_position_embeddings} tokens")
        self.engine, self.policy = engine, engine.policy
        self.max_seqs, self.pad_slot = int(max_seqs), int(max_seqs)  # one more slot: the padding rows of a chunk
        self.spec = engine.make_spec(self.max_seqs + 1, int(context), budget_pages)
        self.cache = engine.new_cache(self.spec)
        self.prefill_batch, self.segment_steps, self.max_stop_ids = prefill_batch, segment_steps, max_stop_ids
        self.reuse = prefix_cache and not self.policy.reduces_whole_prompt
        self.reserve_dense = (not self.policy.evicts) if reserve_dense is None else bool(reserve_dense)
        lh = self.spec.num_layers * self.spec.num_kv_heads
        self.lh = lh
        # Pages one chunk of one prompt may take: every head appends every token (plus a partly filled page).
        self.chunk_pages = lh * (-(-engine.prefill_chunk // self.spec.page_size) + 1)
        if self.chunk_pages > self.spec.num_pages:
            raise ValueError(f"budget_pages={self.spec.num_pages} cannot hold one prefill chunk "
                             f"({self.chunk_pages} pages); raise it or lower the engine's prefill_chunk")
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._requests: dict[int, Completion] = {}
        self._waiting: list[Completion] = []  # by arrival
        self._prefilling: list[Completion] = []
        self._running: dict[int, Completion] = {}  # slot -> request
        self._entries: list[_Entry] = []
        self._free_slots = list(range(self.max_seqs))
        self._next_rid, self._clock, self._lock = 0, 0, threading.Lock()
        self._shapes: set = set()
        self.counters = dict(iterations=0, generated_tokens=0, prefill_tokens=0, reused_tokens=0, preemptions=0,
                             finished=0, cancelled=0, errors=0, kv_reads=0)

    # ----------------------------------------------------------------------------------------- requests

    def submit(self, prompt: Sequence[int], *, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
               stop_ids: Sequence[int] | None = None, seed: int = 0,
               on_event: Callable[[TokenEvent], None] | None = None) -> int:
        """Queues a request (thread-safe); returns its id. Raises RequestError naming the bad field."""
        prompt = self._check(prompt, max_new_tokens, sampling, stop_ids, seed)
        stop = tuple(int(t) for t in (self.engine.cfg.eos_token_ids if stop_ids is None else stop_ids))
        with self._lock:
            rid, self._next_rid = self._next_rid, self._next_rid + 1
        req = Completion(rid=rid, prompt=prompt, max_new_tokens=int(max_new_tokens), sampling=sampling,
                         stop_ids=stop, seed=int(seed), arrival=rid, on_event=on_event, submitted_at=time.time())
        self._requests[rid] = req
        self._inbox.put(("submit", req))
        return rid

    def cancel(self, rid: int) -> None:
        """Stops a request (thread-safe; e.g. its client went away): its pages are freed at the next iteration."""
        self._inbox.put(("cancel", rid))

    def result(self, rid: int) -> Completion:
        return self._requests[rid]

    def _check(self, prompt, max_new_tokens, sampling, stop_ids, seed) -> list[int]:
        # Without eviction the dense length is what a request will hold: it must fit the whole pool.
        pool = None if self.policy.evicts else (self.spec.num_pages, self.lh, self.spec.page_size)
        return check_request(prompt, max_new_tokens, sampling, stop_ids, seed, cfg=self.engine.cfg,
                             max_tokens=self.spec.max_tokens_per_head, max_stop_ids=self.max_stop_ids, pool=pool)

    @under_mesh
    def add_prefix(self, tokens: Sequence[int]) -> None:
        """Prefills ``tokens`` (e.g. a system prompt) once and pins it as a cache entry that requests starting with
        it fork. Runs at once, on the calling thread: call it before serving."""
        if not self.reuse:
            raise ValueError(f"policy {self.policy.name!r} with prefix_cache={self.reuse}: prefixes are not reused")
        tokens = self._check(tokens, 1, SamplingConfig(), [], 0)
        slot = self._take_slot()
        if slot is None:
            raise ValueError("add_prefix: every sequence slot is in use")
        c = self.engine.prefill_chunk
        for i in range(0, len(tokens), c):
            self._prefill_rows([slot], [tokens[i:i + c]], [i + c >= len(tokens)])
        self._entries.append(_Entry(slot, list(tokens), pinned=True, last_used=self._tick()))

    # ----------------------------------------------------------------------------------------- the loop

    @property
    def idle(self) -> bool:
        return self._inbox.empty() and not (self._waiting or self._prefilling or self._running)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Iterates until nothing is left to do (or ``until()`` is true)."""
        while not self.idle and not (until and until()):
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], **kw) -> list[Completion]:
        """Submits every prompt (same keyword arguments), runs until all are done, returns their completions."""
        rids = [self.submit(p, **kw) for p in prompts]
        self.run()
        return [self.result(r) for r in rids]

    @property
    def mesh(self):
        return self.engine.mesh

    @under_mesh
    def step(self) -> None:
        """One iteration: inbox, admissions, one prefill chunk, one decode segment, events."""
        self._drain_inbox()
        self._admit()
        if self._prefilling:
            self._prefill_step()
        if self._running:
            self._pages_for_chunks(0)  # idle cache entries give way before a running sequence is preempted
            self._decode_step()
        self.counters["iterations"] += 1

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, x = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._waiting.append(x)
            else:
                self._cancel(x)

    def _cancel(self, rid: int) -> None:
        req = self._requests.get(rid)
        if req is None or req.status in ("finished", "cancelled", "error"):
            return
        if req in self._waiting:
            self._waiting.remove(req)
        if req in self._prefilling:
            self._prefilling.remove(req)
        if req.slot is not None:
            self._running.pop(req.slot, None)
            self._free_slot(req.slot)
        self.counters["cancelled"] += 1
        self._finish(req, "cancelled")

    def _finish(self, req: Completion, status: str, error: str | None = None) -> None:
        req.status, req.error, req.slot, req.finished_at = status, error, None, time.time()
        if status == "finished":
            self.counters["finished"] += 1
        self._emit(req, [], done=True)
        req.done.set()

    def _emit(self, req: Completion, tokens: list[int], done: bool = False) -> None:
        if req.on_event is not None and (tokens or done):
            req.on_event(TokenEvent(req.rid, tokens, done, req.status))

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    # ----------------------------------------------------------------------------------------- slots and entries

    def _take_slot(self, spare: _Entry | None = None) -> int | None:
        """A free sequence slot, dropping the least recently used cache entry (but ``spare``) if none is free."""
        if not self._free_slots:
            self._drop_entry(spare)
        return self._free_slots.pop(0) if self._free_slots else None

    def _drop_entry(self, spare: _Entry | None = None) -> bool:
        """Drops the least recently used entry (unpinned ones first) other than ``spare``; False if none is left."""
        entries = [e for e in self._entries if e is not spare]
        if not entries:
            return False
        entry = min(entries, key=lambda e: (e.pinned, e.last_used))
        self._entries.remove(entry)
        self._free_slot(entry.slot)
        return True

    def _free_slot(self, slot: int, *, released: bool = False) -> None:
        """Returns ``slot`` to the free list, releasing its pages unless that happened on the device already."""
        if not released:
            mask = np.zeros(self.spec.max_seqs, bool)
            mask[slot] = True
            self._shapes.add(("release",))
            self.cache = _release_jit(self.cache, jnp.asarray(mask), page_size=self.spec.page_size)
        self._free_slots.append(slot)

    def _best_entry(self, context: list[int]) -> _Entry | None:
        """The entry with the longest cached tokens that start ``context`` (leaving at least one token to
        prefill: the forward that gives the next token's logits)."""
        best = None
        for e in self._entries:
            n = len(e.tokens)
            if n < len(context) and context[:n] == e.tokens and (best is None or n > len(best.tokens)):
                best = e
        return best

    def _free_pages(self) -> int:
        return int(balanced_free_pages(self.cache.refcount, self.spec.kv_groups))

    def _decode_reserve(self) -> int:
        """Pages kept back for the running sequences' next segment (each head may start a page, and a
        copy-on-write of a shared page may add one)."""
        return len(self._running) * self.lh * (-(-self.segment_steps // self.spec.page_size) + 1)

    def _dense_pages(self, num_tokens: int) -> int:
        return dense_pages(num_tokens, self.lh, self.spec.page_size)

    def _dense_fits(self, req: Completion) -> bool:
        """Whether ``req`` and every admitted request fit the pool at their full dense lengths."""
        admitted = self._prefilling + list(self._running.values()) + [req]
        return sum(self._dense_pages(len(r.prompt) + r.max_new_tokens) for r in admitted) <= self.spec.num_pages

    def _pages_for_chunks(self, n_rows: int, extra: int = 0, keep: _Entry | None = None) -> bool:
        """Whether ``n_rows`` more prompt chunks (and ``extra`` pages) fit beside the decode reserve, dropping cache
        entries (but ``keep``) to make room if needed."""
        need = n_rows * self.chunk_pages + extra + self._decode_reserve()
        while self._free_pages() < need:
            if not self._drop_entry(spare=keep):
                return False
        return True

    # ----------------------------------------------------------------------------------------- admission, prefill

    def _admit(self) -> None:
        """Waiting requests in arrival order into free slots, while their first chunk fits; a request whose
        context starts with a cache entry forks it and prefills only the rest."""
        self._waiting.sort(key=lambda r: r.arrival)
        ps, anywhere = self.spec.page_size, self.policy.prefill_frees_any_slot
        while self._waiting:
            req = self._waiting[0]
            entry = self._best_entry(req.context) if self.reuse else None
            copies = 0 if entry is None else int(writable_count(self.cache, entry.slot, page_size=ps,
                                                                anywhere=anywhere))
            if self.reserve_dense and not self._dense_fits(req):
                return
            # A preempted request comes back once its whole context fits (dense, the worst case), or once nothing
            # else holds the pool (a context denser than the whole pool must not wait forever).
            busy = req.preemptions and (self._running or self._prefilling)
            extra = copies + (self._dense_pages(len(req.context)) if busy else 0)
            if not self._pages_for_chunks(len(self._prefilling) + 1, extra, keep=entry):
                return
            slot = self._take_slot(spare=entry)
            if slot is None:
                return
            self._waiting.pop(0)
            req.reused_tokens = 0 if entry is None else len(entry.tokens)
            if entry is not None:
                entry.last_used = self._tick()
                self._shapes.add(("fork", anywhere))
                self.cache = fork_for_prefill(self.cache, jnp.asarray(entry.slot, jnp.int32),
                                              jnp.asarray(slot, jnp.int32), page_size=ps, anywhere=anywhere)
                self.counters["reused_tokens"] += req.reused_tokens
            req.slot, req.todo, req.status = slot, req.context[req.reused_tokens:], "prefill"
            self._prefilling.append(req)

    def _prefill_step(self) -> None:
        """One chunk of the first ``prefill_batch`` prefilling requests that fit; a finished prompt samples its
        first token and starts decoding."""
        rows = self._prefilling[:self.prefill_batch]
        while rows and not self._pages_for_chunks(len(rows)):
            rows = rows[:-1]
        if not rows:
            self._unblock_prefill()
            return
        c = self.engine.prefill_chunk
        chunks = [r.todo[:c] for r in rows]
        logits, failed = self._prefill_rows([r.slot for r in rows], chunks,
                                            [len(r.todo) <= c for r in rows])
        done = []
        for i, (req, chunk) in enumerate(zip(rows, chunks)):
            if failed[i]:  # cannot happen with the page check above, unless the bookkeeping is wrong
                raise RuntimeError("internal error: a prefill chunk failed after its pages were checked")
            req.todo = req.todo[len(chunk):]
            if not req.todo:
                done.append(i)
        if done:
            self._start_decoding([rows[i] for i in done], logits[np.asarray(done)])

    def _unblock_prefill(self) -> None:
        """No prefill chunk fits and no entry is left to drop. While sequences run, their ends free pages; else
        the newest prefilling request gives its pages back (re-admitted later), and a lone request that still
        cannot go on needs more than the whole pool."""
        if self._running:
            return
        if len(self._prefilling) > 1:
            self._preempt(max(self._prefilling, key=lambda r: r.arrival))
            return
        req = self._prefilling.pop(0)
        self._free_slot(req.slot)
        self.counters["errors"] += 1
        self._finish(req, "error", f"the request needs more KV pages than the whole pool "
                                   f"({self.spec.num_pages}) holds")

    def _preempt(self, req: Completion, *, released: bool = False) -> None:
        """Back to the waiting list (ahead of newer arrivals); its slot and pages are freed."""
        if req in self._prefilling:
            self._prefilling.remove(req)
        self._running.pop(req.slot, None)
        self._free_slot(req.slot, released=released)
        req.slot, req.todo, req.status = None, [], "waiting"
        req.preemptions += 1
        self.counters["preemptions"] += 1
        self._waiting.append(req)

    def _prefill_rows(self, slots: list[int], chunks: list[list[int]], prompt_ends: list[bool]):
        """One ``prefill_chunk`` call over ``prefill_batch`` rows (unused rows padded onto the empty padding slot);
        ``prompt_ends``: the row's chunk is the last of its prompt. Returns (the logits after each given row's last
        token [len(slots), V], failed [len(slots)])."""
        b, c = self.prefill_batch, self.engine.prefill_chunk
        toks = np.zeros((b, c), np.int32)
        n_valid = np.zeros(b, np.int32)
        slot_ids = np.full(b, self.pad_slot, np.int32)
        for i, (slot, chunk) in enumerate(zip(slots, chunks)):
            toks[i, :len(chunk)], n_valid[i], slot_ids[i] = chunk, len(chunk), slot
        e = self.engine
        self._shapes.add(("prefill", b, c))
        self.counters["prefill_tokens"] += int(n_valid.sum())
        logits, self.cache, failed, _, overflow = prefill_chunk(
            e._layer_gd, e._layer_params, e._outer_gd, e._outer_params, self.cache, jnp.asarray(slot_ids),
            jnp.asarray(toks), jnp.asarray(n_valid), jnp.asarray(n_valid > 0), spec=self.spec, policy=self.policy,
            all_logits=False, block_tokens=e.block_tokens)
        if bool(overflow):
            raise RuntimeError("internal error: the prefill handed out more pages than were free")
        ends = [slot for slot, last in zip(slots, prompt_ends) if last]
        if self.policy.reduces_whole_prompt and ends:  # TOVA: a prompt is reduced once it is all in
            self._shapes.add(("finish_prefill", b))
            ends_ids = np.full(b, self.pad_slot, np.int32)
            ends_ids[:len(ends)] = ends
            self.cache = _finish_prefill_jit(self.cache, jnp.asarray(ends_ids), spec=self.spec, policy=self.policy)
        n = len(slots)
        return logits[:n], np.asarray(failed)[:n]

    def _sampling_rows(self, reqs: list[Completion], size: int) -> dict:
        """The per-row sampling settings of ``reqs`` in arrays of ``size`` rows (the rest greedy)."""
        seed, n_out, top_k = (np.zeros(size, np.int32) for _ in range(3))
        temperature, top_p = np.zeros(size, np.float32), np.ones(size, np.float32)
        for i, r in enumerate(reqs):
            seed[i], n_out[i], top_k[i] = r.seed, len(r.tokens), r.sampling.top_k
            temperature[i], top_p[i] = r.sampling.temperature, r.sampling.top_p
        return dict(seed=seed, n_out=n_out, temperature=temperature, top_k=top_k, top_p=top_p)

    def _start_decoding(self, reqs: list[Completion], logits) -> None:
        """The first token of each request whose context is all in the cache, sampled from its last logits."""
        b = self.prefill_batch
        rows = self._sampling_rows(reqs, b)
        padded = jnp.zeros((b, logits.shape[-1]), jnp.float32).at[:len(reqs)].set(logits)
        self._shapes.add(("first_tokens", b))
        toks = np.asarray(first_tokens(padded, **{k: jnp.asarray(v) for k, v in rows.items()}))
        now = time.time()
        for req, tok in zip(reqs, toks.tolist()):
            self._prefilling.remove(req)
            req.tokens.append(tok)
            req.first_token_at = req.first_token_at or now
            self.counters["generated_tokens"] += 1
            self._emit(req, [tok])
            stopped = tok in req.stop_ids
            if stopped or len(req.tokens) >= req.max_new_tokens:
                live = int(np.asarray(seq_live_and_pages(self.cache, self.spec.page_size)[0])[req.slot])
                self._end(req, stopped, live, released=False)
            else:
                req.status = "running"
                self._running[req.slot] = req

    def _end(self, req: Completion, stopped: bool, live: int, *, released: bool) -> None:
        """A request that stopped or reached its length: kept as a cache entry or its slot freed."""
        self._running.pop(req.slot, None)
        req.stopped, req.live_entries = stopped, live
        req.dense_entries = self.lh * (len(req.context) - 1)  # the last token was never fed
        if self.reuse:
            self._entries.append(_Entry(req.slot, req.context[:-1], pinned=False, last_used=self._tick()))
        else:
            self._free_slot(req.slot, released=released)
        self._finish(req, "finished")

    # ----------------------------------------------------------------------------------------- decode

    def _decode_step(self) -> None:
        """One jitted segment of every running sequence; their tokens, ends and preemptions.

        The segment runs on the running slots only, padded with the idle padding slot to a power of two (at most
        ``max_seqs``): one compiled segment per such size, and a step of one sequence costs one row, not
        ``max_seqs`` (before, a lone sequence paid for the projections and MLP of every slot, running or not)."""
        k, steps = self.max_stop_ids, self.segment_steps
        reqs = list(self._running.values())
        s = min(1 << (len(reqs) - 1).bit_length(), self.max_seqs)
        rows = self._sampling_rows(reqs, len(reqs))
        slots = np.full(s, self.pad_slot, np.int32)
        slots[:len(reqs)] = [r.slot for r in reqs]
        at = np.arange(len(reqs))

        def per_slot(values, dtype, fill=0):
            a = np.full(s, fill, dtype)
            a[at] = values
            return jnp.asarray(a)

        stop = np.full((s, k), -1, np.int32)
        for i, r in enumerate(reqs):
            stop[i, :len(r.stop_ids)] = r.stop_ids
        zeros = jnp.zeros(s, jnp.int32)
        b = SegmentBatch(
            tok=per_slot([r.tokens[-1] for r in reqs], np.int32), running=per_slot(True, bool, False),
            n_out=per_slot(rows["n_out"], np.int32), max_new=per_slot([r.max_new_tokens for r in reqs], np.int32),
            seed=per_slot(rows["seed"], np.int32), temperature=per_slot(rows["temperature"], np.float32),
            top_k=per_slot(rows["top_k"], np.int32), top_p=per_slot(rows["top_p"], np.float32, 1.0),
            stop=jnp.asarray(stop), keep=jnp.full(s, self.reuse), rank=per_slot([r.arrival for r in reqs], np.int32),
            out=jnp.full((s, steps), -1, jnp.int32), n_new=zeros, finished=jnp.zeros(s, bool),
            stopped=jnp.zeros(s, bool), preempted=jnp.zeros(s, bool), final_live=zeros, reads=zeros,
            step=jnp.zeros((), jnp.int32), error=jnp.zeros((), bool))
        e = self.engine
        width = e.decode_width(self.cache, self.spec, steps)
        self._shapes.add(("segment", s, width, steps))
        self.cache, b = decode_rows_segment(e._layer_gd, e._layer_list, e._outer_gd, e._outer_params, self.cache,
                                 jnp.asarray(slots), b, spec=dataclasses.replace(self.spec, max_seqs=s),
                                 policy=self.policy, width=width, backend=e.backend, interpret=e.interpret,
                                 block_tokens=e.block_tokens, steps=steps)
        if bool(b.error):
            raise RuntimeError("internal error: a decode step handed out more pages than were free after preemption")
        out, n_new, finished, stopped, preempted, final_live, reads = (np.asarray(x) for x in (
            b.out, b.n_new, b.finished, b.stopped, b.preempted, b.final_live, b.reads))
        now = time.time()
        for i, req in enumerate(reqs):
            new = out[i, :n_new[i]].tolist()
            req.tokens.extend(new)
            req.first_token_at = req.first_token_at or now
            self.counters["generated_tokens"] += len(new)
            self.counters["kv_reads"] += int(reads[i])
            self._emit(req, new)
            if preempted[i]:
                self._preempt(req, released=True)
            elif finished[i]:
                self._end(req, bool(stopped[i]), int(final_live[i]), released=True)

    # ----------------------------------------------------------------------------------------- reports

    def compiled_shapes(self) -> list[tuple]:
        """The distinct compiled calls this scheduler has made: (function, static shape arguments...)."""
        return sorted(self._shapes, key=str)

    def metrics(self) -> dict:
        """The pool and the queue now, and the counters since construction."""
        lengths = np.asarray(self.cache.lengths)[:, :self.max_seqs]
        live = int(lengths.sum())
        dense = self.lh * int(np.asarray(self.cache.num_tokens)[:self.max_seqs].sum())
        used = int(used_pages(self.cache.refcount, self.spec.kv_groups))
        return dict(pages_total=self.spec.num_pages, pages_used=used, pages_free=self.spec.num_pages - used,
                    bytes_per_page=self.spec.bytes_per_page, live_entries=live, dense_entries=dense,
                    compression=dense / live if live else 1.0, waiting=len(self._waiting),
                    prefilling=len(self._prefilling), running=len(self._running), cache_entries=len(self._entries),
                    free_slots=len(self._free_slots), **self.counters)

    def fail_all(self, message: str) -> None:
        """Ends every unfinished request with status "error" (the thread driving the scheduler stopped)."""
        for req in list(self._requests.values()):
            if not req.done.is_set():
                self._finish(req, "error", message)

    def drop_cache_entries(self) -> None:
        """Frees every cache entry (pinned prefixes too): afterwards an idle scheduler holds no pages."""
        while self._drop_entry():
            pass
