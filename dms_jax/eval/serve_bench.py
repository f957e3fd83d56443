"""Serving under a fixed KV byte budget: one workload of Poisson arrivals through our scheduler (vanilla, DMS with
fixed decisions, a DMS retrofit, DMS + int8) and through transformers' own continuous batching
(``benchmarks/bench_serve.py``).

The workload is real text: each prompt asks for a summary of a passage of Python's documentation cut to a length
drawn uniformly from ``[min_tokens, max_tokens]``; every request generates exactly ``answer_tokens`` tokens
(greedy, no stop id), so every configuration does the same work. Requests arrive as a Poisson process of
``rate`` per second and are submitted when their time comes; a configuration's clock starts at its first arrival,
after a warm-up request that compiles its shapes.

Per configuration: throughput (generated tokens / seconds from the first arrival to the last token), time to first
token and time per output token (mean and p90 over requests), the most sequences decoding at once
(``max_concurrent``; ``max_admitted`` also counts prompts being prefilled), preemptions, and the pool: pages and
bytes. The budget is bytes: each configuration gets ``budget_bytes // bytes_per_page`` pages of
its own page size and entry size (int8 entries are 3.8x smaller, so the same bytes hold more pages).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from dms_jax.chat import chat_prompt
from dms_jax.data.corpus import builtin_documents

INSTRUCTION = "Summarise this passage of documentation in a few sentences:\n\n"

__all__ = ["Workload", "make_workload", "run_scheduler", "run_transformers", "summarize", "summary", "strip_outputs",
           "plot"]


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: tuple[tuple[int, ...], ...]
    arrivals: tuple[float, ...]  # seconds after the first arrival, increasing
    answer_tokens: int


def make_workload(tokenizer, n_requests: int, min_tokens: int, max_tokens: int, answer_tokens: int, rate: float,
                  seed: int = 0) -> Workload:
    """``n_requests`` chat prompts of ``min_tokens``-``max_tokens`` tokens of real text, Poisson arrivals at
    ``rate`` per second (the first at 0), deterministic in ``seed``."""
    for name, v in (("n_requests", n_requests), ("min_tokens", min_tokens), ("answer_tokens", answer_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(max_tokens, int) and max_tokens >= min_tokens):
        raise ValueError(f"max_tokens must be an integer >= min_tokens={min_tokens}, got {max_tokens!r}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (requests per second), got {rate!r}")
    rng = np.random.default_rng(seed)
    docs = builtin_documents()
    overhead = len(chat_prompt(tokenizer, INSTRUCTION))
    prompts = []
    for _ in range(n_requests):
        target = int(rng.integers(min_tokens, max_tokens + 1))
        ids: list[int] = []
        i = int(rng.integers(len(docs)))
        while len(ids) < target - overhead:
            ids.extend(tokenizer(docs[i % len(docs)] + "\n\n", add_special_tokens=False)["input_ids"])
            i += 1
        passage = tokenizer.decode(ids[: max(target - overhead, 1)])
        prompts.append(tuple(chat_prompt(tokenizer, INSTRUCTION + passage)))
    gaps = rng.exponential(1.0 / rate, size=n_requests)
    gaps[0] = 0.0
    return Workload(tuple(prompts), tuple(float(t) for t in np.cumsum(gaps)), int(answer_tokens))


def summarize(records: list[dict], seconds: float) -> dict:
    """Throughput and latency figures from per-request records {submitted, first_token, finished, tokens}."""
    ttft = np.array([r["first_token"] - r["submitted"] for r in records])
    tpot = np.array([(r["finished"] - r["first_token"]) / max(r["tokens"] - 1, 1) for r in records])
    generated = sum(r["tokens"] for r in records)
    return {"requests": len(records), "generated_tokens": generated, "seconds": seconds,
            "throughput_tokens_per_s": generated / seconds,
            "ttft_mean_s": float(ttft.mean()), "ttft_p90_s": float(np.quantile(ttft, 0.9)),
            "tpot_mean_s": float(tpot.mean()), "tpot_p90_s": float(np.quantile(tpot, 0.9))}


def _drive(workload: Workload, submit, step, idle, clock) -> float:
    """Submits each request when its arrival time comes and steps the server meanwhile; returns ``clock()`` at the
    first arrival (``clock``: the one the server stamps its requests with)."""
    start = clock()
    pending = list(range(len(workload.prompts)))
    while pending or not idle():
        now = clock() - start
        while pending and workload.arrivals[pending[0]] <= now:
            submit(pending.pop(0))
        if idle():
            time.sleep(min(0.05, max(0.0, workload.arrivals[pending[0]] - now)) if pending else 0.0)
            continue
        step()
    return start


def run_scheduler(engine, workload: Workload, budget_bytes: int, *, max_seqs: int, context: int,
                  segment_steps: int = 8, prefill_batch: int = 2) -> dict:
    """One configuration on our scheduler (``dms_jax.serve.scheduler``): figures of :func:`summarize` plus
    concurrency, preemptions and the pool."""
    from dms_jax.serve.scheduler import Scheduler

    page_bytes = engine.make_spec(1, context, budget_pages=1).bytes_per_page
    pages = int(budget_bytes // page_bytes)
    sched = Scheduler(engine, max_seqs=max_seqs, context=context, budget_pages=pages, prefill_batch=prefill_batch,
                      segment_steps=segment_steps, prefix_cache=False)
    # Warm-up: compile the prefill chunk and the decode segment (not timed).
    warm = list(workload.prompts[0][: engine.prefill_chunk + 8])
    sched.generate([warm], max_new_tokens=2 * segment_steps, stop_ids=[])
    base = dict(sched.counters)
    rids, peak = {}, {"decoding": 0, "admitted": 0, "pages": 0}

    def submit(i):
        rids[i] = sched.submit(list(workload.prompts[i]), max_new_tokens=workload.answer_tokens, stop_ids=[])

    def step():
        sched.step()
        m = sched.metrics()
        # Decoding sequences are what the pool really holds at once; an admitted prompt may still be preempted.
        peak["decoding"] = max(peak["decoding"], m["running"])
        peak["admitted"] = max(peak["admitted"], m["running"] + m["prefilling"])
        peak["pages"] = max(peak["pages"], m["pages_used"])

    start = _drive(workload, submit, step, lambda: sched.idle, time.time)  # Completion stamps with time.time
    done = [sched.result(rids[i]) for i in range(len(workload.prompts))]
    bad = [c.rid for c in done if c.status != "finished" or len(c.tokens) != workload.answer_tokens]
    if bad:
        raise RuntimeError(f"requests {bad} did not finish with {workload.answer_tokens} tokens")
    records = [{"submitted": c.submitted_at, "first_token": c.first_token_at, "finished": c.finished_at,
                "tokens": len(c.tokens)} for c in done]
    out = summarize(records, max(c.finished_at for c in done) - start)
    out.update(max_concurrent=peak["decoding"], max_admitted=peak["admitted"],
               preemptions=sched.counters["preemptions"] - base["preemptions"],
               pool_pages=pages, page_bytes=page_bytes, pool_bytes=pages * page_bytes,
               peak_pages_used=peak["pages"], compression_mean=float(np.mean([c.compression for c in done])),
               compiled_shapes=len(sched.compiled_shapes()), outputs=[list(c.tokens) for c in done])
    return out


def run_transformers(hf_model, workload: Workload, budget_bytes: int, *, page_size: int = 16,
                     max_seqs: int = 8) -> dict:
    """transformers' continuous batching (``init_continuous_batching``: paged cache, FIFO) on the same workload and
    KV bytes: ``num_blocks`` = budget / bytes of one block (``page_size`` tokens of K and V in every layer)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    block_bytes = page_size * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * hf_model.dtype.itemsize
    blocks = int(budget_bytes // block_bytes)
    gen = GenerationConfig(max_new_tokens=workload.answer_tokens, do_sample=False, eos_token_id=-1)
    cb = ContinuousBatchingConfig(page_size=page_size, num_blocks=blocks, max_requests_per_batch=max_seqs)
    manager = hf_model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.start()
    try:
        with torch.inference_mode():
            warm = list(workload.prompts[0][:64])
            manager.add_request(warm, request_id="warm", max_new_tokens=4)
            deadline = time.perf_counter() + 600
            while (r := manager.get_result(request_id="warm", timeout=1.0)) is None or not r.is_finished():
                if time.perf_counter() > deadline:  # get_result also returns None at once if its thread died
                    raise RuntimeError("transformers: the warm-up request did not finish in 600 s")
            submitted, results = {}, {}

            def submit(i):
                submitted[i] = time.perf_counter()
                manager.add_request(list(workload.prompts[i]), request_id=f"r{i}",
                                    max_new_tokens=workload.answer_tokens, record_timestamps=True)

            def step():
                r = manager.get_result(timeout=0.05)
                if r is not None and r.is_finished():
                    results[int(r.request_id[1:])] = r

            # transformers stamps tokens with time.perf_counter
            start = _drive(workload, submit, step,
                           lambda: len(results) == len(submitted) == len(workload.prompts), time.perf_counter)
    finally:
        manager.stop(block=True)
    bad = [i for i, r in results.items() if r.error or len(r.generated_tokens) != workload.answer_tokens]
    if bad:
        raise RuntimeError(f"transformers: requests {bad} did not finish with {workload.answer_tokens} tokens")
    records = [{"submitted": submitted[i], "first_token": results[i].timestamps[0],
                "finished": results[i].timestamps[-1], "tokens": len(results[i].generated_tokens)}
               for i in range(len(workload.prompts))]
    out = summarize(records, max(r["finished"] for r in records) - start)
    out.update(pool_blocks=blocks, block_bytes=block_bytes, pool_bytes=blocks * block_bytes,
               outputs=[list(results[i].generated_tokens) for i in range(len(workload.prompts))])
    return out


def strip_outputs(runs: dict) -> dict:
    """The runs without their generated tokens (kept apart: they only serve the agreement check)."""
    return {k: {f: v for f, v in r.items() if f != "outputs"} for k, r in runs.items()}


def _ratio(runs: dict, a: str, b: str, field: str):
    return runs[a][field] / runs[b][field] if a in runs and b in runs and runs[b][field] else None


def summary(runs: dict) -> dict:
    """The issue's ratios, measured in one run, and how often greedy outputs agree with vanilla's."""
    out = {"throughput_dms_over_vanilla": _ratio(runs, "dms-fixed8", "vanilla", "throughput_tokens_per_s"),
           "concurrency_dms_over_vanilla": _ratio(runs, "dms-fixed8", "vanilla", "max_concurrent"),
           "throughput_retrofit_over_vanilla": _ratio(runs, "dms-retrofit", "vanilla", "throughput_tokens_per_s"),
           "concurrency_retrofit_over_vanilla": _ratio(runs, "dms-retrofit", "vanilla", "max_concurrent"),
           "throughput_int8_over_vanilla": _ratio(runs, "dms-fixed8-int8", "vanilla", "throughput_tokens_per_s"),
           "throughput_vanilla_over_transformers": _ratio(runs, "vanilla", "transformers",
                                                          "throughput_tokens_per_s")}
    if "vanilla" in runs and "transformers" in runs:
        pairs = list(zip(runs["vanilla"]["outputs"], runs["transformers"]["outputs"]))
        out["transformers_outputs_equal_vanilla"] = sum(a == b for a, b in pairs) / len(pairs)
    return out


def plot(result: dict, png) -> None:
    """Throughput, most concurrent sequences and mean time to first token per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    panels = (("throughput_tokens_per_s", "generated tokens / s"), ("max_concurrent", "most sequences decoding"),
              ("ttft_mean_s", "mean time to first token (s)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (field, label) in zip(axes, panels):
        values = [runs[n].get(field) for n in names]
        ax.bar(range(len(names)), [v or 0 for v in values], color=[f"C{i}" for i in range(len(names))])
        for i, v in enumerate(values):
            if v is None:  # transformers does not report how many sequences it runs at once
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    w = result["workload"]
    fig.suptitle(f"{w['requests']} requests, {min(w['prompt_tokens'])}-{max(w['prompt_tokens'])} prompt tokens, "
                 f"{w['answer_tokens']} answer tokens, KV budget {w['budget_bytes'] / 2**20:.0f} MiB", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
