"""Inference-time hyper-scaling: majority voting over W sampled chains at equal memory (``--sweep hyperscale``)."""

from __future__ import annotations

import time
from pathlib import Path

from dms_jax.eval import tasks
from dms_jax.eval.report import _panel, _series, log_x_if_positive, markdown_header, panel_figure, save_results
from dms_jax.eval.stats import ci95
from dms_jax.eval.sweep import BASELINES, TASK_SEEDS, Job, _key

# ---------------------------------------------------------------------------------------------------------
#
# Per (method / checkpoint, task, length) "group" and per case: the prompt is prefilled once and forked into
# ``chains`` chains (the engine shares the prompt's pages copy-on-write) that sample independently. The chains are
# scored by majority vote over nested prefixes: W = 1, 2, 4, ..., chains uses the first W chains, so one run of
# ``chains`` samples gives every point (``accuracy_blocks`` also averages the vote over the disjoint blocks of W
# chains: same expectation, less variance). Memory is counted as the paper does, without prefix sharing: a point's
# ``peak_tokens`` is the sum over its W chains of each chain's peak live (token, layer, KV head) entries, prompt
# included; ``kv_reads`` the sum over its W chains of the decode steps' KV-cache token reads; both averaged over
# the cases. ``cr`` is the measured ratio per chain (dense tokens / peak live tokens).


def vote_widths(chains: int) -> list[int]:
    """W = 1, 2, 4, ... up to ``chains`` (``chains`` itself included)."""
    ws = [1]
    while ws[-1] * 2 <= chains:
        ws.append(ws[-1] * 2)
    if ws[-1] != chains:
        ws.append(chains)
    return ws


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def nested_vote_scores(task: str, extracted, answer: str, ws) -> dict[int, float]:
    """{W: score of the majority vote over the first W chains' extracted answers} (``tasks.score_answer``)."""
    ext = [_hashable(x) for x in extracted]
    if max(ws) > len(ext):
        raise ValueError(f"W up to {max(ws)} but only {len(ext)} chains")
    return {w: tasks.score_answer(task, tasks.majority_vote(ext[:w]), answer) for w in ws}


def block_vote_score(task: str, extracted, answer: str, w: int) -> float:
    """Mean score of the majority votes over the disjoint blocks of ``w`` consecutive chains."""
    ext = [_hashable(x) for x in extracted]
    n = len(ext) // w
    if n == 0:
        raise ValueError(f"W={w} but only {len(ext)} chains")
    return sum(tasks.score_answer(task, tasks.majority_vote(ext[k * w:(k + 1) * w]), answer) for k in range(n)) / n


def chains_total(per_chain, w: int) -> float:
    """Memory / reads of W chains without prefix sharing: the sum of the first ``w`` chains' figures."""
    if w > len(per_chain):
        raise ValueError(f"W={w} but only {len(per_chain)} chains")
    return float(sum(per_chain[:w]))


def hyperscale_budget_pages(num_layers: int, num_kv_heads: int, prompt_tokens: int, chains: int,
                            max_new_tokens: int, page_size: int) -> int:
    """A page pool that holds one shared prompt and ``chains`` chains whatever they do: per (layer, KV head) the
    prompt's pages, and per chain its new tokens' pages plus a copy-on-write copy of a shared page for every new
    token (an evicting policy overwrites evicted prompt slots). Sized so, the pool never preempts, and it stays far
    smaller than the engine's default (every chain keeping the model's whole context)."""
    per_chain = -(-max_new_tokens // page_size) + 2 + max_new_tokens
    return num_layers * num_kv_heads * (-(-prompt_tokens // page_size) + 1 + chains * per_chain)


def hyperscale_settings(job: Job, s: dict) -> dict:
    """The identity of a group (resuming): everything that determines its cases' samples, not the case count."""
    d = {"mode": "hyperscale", "method": job.method, "task": job.task, "length": job.length, "ratio": job.ratio,
         "budget": job.budget(), "model": s["model_id"], "checkpoint": job.checkpoint, "seed": TASK_SEEDS[job.task],
         "page_size": s["page_size"], "prefill_chunk": s["prefill_chunk"], "max_new_tokens": s["max_new_tokens"],
         "chains": s["chains"], "temperature": s["temperature"], "top_p": s["top_p"],
         "sample_seed": s["sample_seed"]}
    if job.task == "passkey":
        d["depths"] = list(s["depths"])
    if s.get("cache_dtype"):
        d["cache_dtype"] = s["cache_dtype"]
    return d


def hyperscale_points(group: dict) -> list[dict]:
    """The points (one per W) of a group from its recorded cases."""
    import numpy as np

    cases = sorted(group["cases"], key=lambda c: c["index"])
    if not cases:
        return []
    task = group["task"]
    n_chains = min(len(c["extracted"]) for c in cases)
    lh = group.get("layer_heads") or 1
    peak_chain = float(np.mean([x for c in cases for x in c["peak"]]))
    cr = float(np.mean([x for c in cases for x in c["dense"]])) / max(peak_chain, 1e-9)
    single = float(np.mean([x for c in cases for x in c["scores"][:n_chains]]))
    points = []
    for w in vote_widths(n_chains):
        scores = [nested_vote_scores(task, c["extracted"], c["answer"], [w])[w] for c in cases]
        blocks = [block_vote_score(task, c["extracted"][:n_chains], c["answer"], w) for c in cases]
        interval, how = ci95(scores)
        peak = float(np.mean([chains_total(c["peak"], w) for c in cases]))
        points.append({
            "method": group["method"], "series": group["series"], "task": task, "length": group["length"],
            "checkpoint": group["checkpoint"], "ratio": group["settings"]["ratio"], "chains": w, "cr": cr,
            "accuracy": float(np.mean(scores)), "ci95": interval, "ci_method": how,
            "accuracy_blocks": float(np.mean(blocks)), "single_chain_accuracy": single, "cases": len(cases),
            "peak_tokens": peak, "peak_tokens_per_head": peak / lh,
            "kv_reads": float(np.mean([chains_total(c["reads"], w) for c in cases])),
            "kv_reads_prefill": float(np.mean([c["prefill_reads"] for c in cases])),
            "peak_tokens_shared": float(np.mean([c["pool_peak_tokens"] for c in cases])) if w == n_chains else None,
            "prompt_tokens": float(np.mean([c["prompt_tokens"] for c in cases])),
            "new_tokens": float(np.mean([x for c in cases for x in c["new_tokens"][:w]])),
            "seconds_per_case": float(np.mean([c["seconds"] for c in cases])),
            "settings": dict(group["settings"], voted=w),
        })
    return points


def hyperscale_table(points) -> str:
    lines = ["| task | method | CR | W | accuracy (95% CI) | mean over disjoint W-blocks | peak tokens (W chains) | "
             "KV reads (W chains) | cases |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(points, key=lambda p: (p["task"], p["length"], p["cr"], p.get("series") or "", p["chains"])):
        lines.append(f"| {_panel(p)} | {_series(p)} | {p['cr']:.2f} | {p['chains']} | "
                     f"{p['accuracy']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] | {p['accuracy_blocks']:.2f} | "
                     f"{p['peak_tokens']:.4g} | {p['kv_reads']:.4g} | {p['cases']} |")
    return "\n".join(lines) + "\n"


def _draw_hyperscale_axis(ax, row: int, pts, colors):
    """Majority-vote accuracy against the W chains' peak tokens (row 0) or KV reads (row 1), a curve per series."""
    xkey, xlabel = [("peak_tokens", "peak KV tokens of the W chains (no prefix sharing)"),
                    ("kv_reads", "KV-cache token reads of the W chains (decode)")][row]
    for name in sorted({_series(p) for p in pts}):
        sp = sorted((p for p in pts if _series(p) == name), key=lambda p: p["chains"])
        err = [[p["accuracy"] - p["ci95"][0] for p in sp], [p["ci95"][1] - p["accuracy"] for p in sp]]
        ax.errorbar([p[xkey] for p in sp], [p["accuracy"] for p in sp], yerr=err, marker="o", color=colors[name],
                    label=f"{name} (CR {sp[0]['cr']:.1f})", capsize=3, alpha=0.9)
        for p in sp:
            ax.annotate(f"W={p['chains']}", (p[xkey], p["accuracy"]), fontsize=7, color=colors[name],
                        textcoords="offset points", xytext=(3, -10))
    log_x_if_positive(ax, [p[xkey] for p in pts], base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("majority-vote accuracy")


def hyperscale_plot(points, png: Path, title: str):
    panel_figure(points, png, title, _draw_hyperscale_axis, panel_width=4.6, legend_columns=6)


def write_hyperscale_outputs(out: Path, results: dict, plot_it: bool) -> str:
    table = hyperscale_table(results["points"])
    with open(out.with_suffix(".md"), "w") as f:
        f.write(f"{markdown_header(results)}\n{table}")
    if plot_it:
        hyperscale_plot(results["points"], out.with_suffix(".png"),
                        f"Majority voting at equal memory: {results['model'].split(' (')[0]}")
    return table


def run_hyperscale_case(eng, tok, case, index: int, task: str, s: dict) -> dict:
    """One case: one prefill, ``chains`` sampled chains; per chain the extracted answer, its score and the cache
    figures (JSON-ready)."""
    from dms_jax.serve.sampling import SamplingConfig

    t0 = time.perf_counter()
    res = eng.generate([list(case.prompt_ids)], max_new_tokens=s["max_new_tokens"], chains=s["chains"],
                       sampling=SamplingConfig(temperature=s["temperature"], top_p=s["top_p"]),
                       seed=s["sample_seed"] + index)
    if res.preempted:
        raise RuntimeError(f"case {index}: {len(res.preempted)} chains were preempted (the page pool was too "
                           "small); the memory figures would be wrong")
    texts = [tok.decode(r.tokens, skip_special_tokens=True) for r in res.requests]
    extract = tasks.TASKS[task].extract
    extracted = [extract(t) for t in texts]
    ms = [r.metrics for r in res.requests]
    return {
        "index": index, "answer": case.answer,
        "extracted": [list(x) if isinstance(x, tuple) else x for x in extracted],
        "scores": [float(tasks.score(case, t)) for t in texts],
        "peak": [m.peak_live_tokens for m in ms], "reads": [m.kv_token_reads for m in ms],
        "dense": [m.dense_tokens for m in ms], "new_tokens": [m.new_tokens for m in ms],
        "prefill_reads": int(ms[0].kv_token_reads_prefill), "prompt_tokens": int(ms[0].prompt_tokens),
        # With prefix sharing (what this engine really held): the pool's high water in tokens (pages x page size x
        # nothing else: a page belongs to one layer and KV head).
        "pool_peak_tokens": int(res.pool_high_water_pages) * res.page_size,
        "text0": texts[0], "seconds": time.perf_counter() - t0,
    }


def run_hyperscale_sweep(s, results, out: Path, jobs, runner, bar):
    """Runs every group's missing cases (saving after each case) and rebuilds the points."""
    from dms_jax.serve.engine import Engine

    groups = results.setdefault("groups", [])
    by_key = {_key(g["settings"]): g for g in groups}

    def rebuild_and_save():
        results["points"] = [p for g in groups for p in hyperscale_points(g)]
        save_results(out, results)

    engines = {}
    block = s.get("case_block") or s["cases"]
    # Cases in blocks of ``case_block`` indices across all groups (block 0 of every group, then block 1, ...), so
    # that a run stopped early still has every group at about the same number of cases.
    for start in range(0, s["cases"], block):
        for job in jobs:
            settings = hyperscale_settings(job, s)
            g = by_key.get(_key(settings))
            done = {c["index"] for c in g["cases"]} if g else set()
            todo = [i for i in range(start, min(start + block, s["cases"])) if i not in done]
            if not todo:
                continue
            model = runner.model_for(job)
            if job.method == "dms" and model.dms_cfg is None:
                raise SystemExit(f"{job.checkpoint}: not a DMS model")
            cases = runner.cases(job.task, job.length)
            cfg = model.cfg
            ek = (job.checkpoint, job.method, job.budget())
            if ek not in engines or engines[ek].model is not model:
                # One pool size for every task of a length class (prompts rounded up to 256 tokens): one compilation.
                longest = max(c.num_tokens for c in cases)
                budget = hyperscale_budget_pages(cfg.num_layers, cfg.num_kv_heads, -(-longest // 256) * 256,
                                                 s["chains"], s["max_new_tokens"], s["page_size"])
                kw = {"budget": job.budget()} if job.method in BASELINES else {}
                engines[ek] = Engine(model, job.method, page_size=s["page_size"], prefill_chunk=s["prefill_chunk"],
                                     budget_pages=budget, **kw)
            eng = engines[ek]
            if g is None:
                g = {"method": job.method, "series": job.series, "task": job.task, "length": job.length,
                     "checkpoint": job.checkpoint, "info": job.info,
                     "layer_heads": cfg.num_layers * cfg.num_kv_heads, "settings": settings, "cases": []}
                groups.append(g)
                by_key[_key(settings)] = g
            for i in todo:
                bar.set_postfix_str(f"{job.series} {job.task} {job.length} case {i}")
                g["cases"].append(run_hyperscale_case(eng, runner.tok, cases[i], i, job.task, s))
                rebuild_and_save()
                bar.update(1)
    rebuild_and_save()
