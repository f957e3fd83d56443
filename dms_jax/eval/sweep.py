"""A sweep of evaluation points (method, ratio, task, context length, wording families) on the paged engine: the
named sweeps, the grid, the checkpoints it loads and the runner that scores each point. The CLI is
``experiments.evaluate``; its help describes the figures each point records."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from dms_jax.eval import tasks
from dms_jax.eval.stats import ci95, compression_summary, wording_summary
from dms_jax.eval.tasks import WORDINGS

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
               wordings="all", max_lengths={}, batch=5, max_new_tokens=16, heldout_seqs=8, heldout_len=2048,
               heldout_chunk=64, prefill_chunk=64, page_size=16),
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


def default_wordings(task: str) -> list[str]:
    return list(WORDINGS[task][:1]) if task in WORDINGS else []


def resolve_wordings(spec: str, task_names, cases: int) -> dict[str, list[str]]:
    """{task: its wording families} from ``spec``: 'default', 'all' or comma-separated family names (a name applies
    to every task that has it, and each must belong to at least one of the tasks). ValueError names the problem."""
    generated = [t for t in task_names if t in WORDINGS]
    if spec == "default":
        out = {t: default_wordings(t) for t in generated}
    elif spec == "all":
        out = {t: list(WORDINGS[t]) for t in generated}
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if not any(n in WORDINGS[t] for t in generated)]
        if unknown:
            known = {t: list(WORDINGS[t]) for t in generated}
            raise ValueError(f"--wordings: {unknown} is no wording family of the tasks {generated}; they have {known}")
        out = {t: [n for n in names if n in WORDINGS[t]] or default_wordings(t) for t in generated}
    uneven = {t: len(f) for t, f in out.items() if cases % len(f)}
    if uneven:
        raise ValueError(f"--cases {cases} does not split evenly over the wording families {uneven}")
    return out


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


def sweep_cases(tokenizer, task: str, length: int, cases: int, families, depths=()) -> list:
    """A point's cases: ``cases`` split evenly over the task's wording ``families``, family by family (passkey
    needles cycle through ``depths``). Every tool that measures on the sweep's cases takes them from here."""
    kw = {"target_tokens": length}
    if task == "passkey" and depths:
        kw["depth"] = list(depths)
    per_family = cases // len(families)
    return [c for f, wording in enumerate(tasks.WORDINGS[task]) if wording in families
            for c in tasks.make_cases(task, tokenizer, per_family, TASK_SEEDS[task] + WORDING_SEED_STRIDE * f,
                                      wording=wording, **kw)]


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

        from dms_jax import lowrank, weights
        from dms_jax.config import DMSConfig
        from dms_jax.train import step as train

        arch = metas[step]["arch"]
        dms_cfg = DMSConfig(**arch["dms_config"])
        model = weights.load_model(base_model, dms=dms_cfg)
        if dms_cfg.variant == "neuron" and arch.get("neuron_init") == "zero":
            train.zero_decision_neurons(model)
        if arch.get("lowrank"):
            lowrank.attach(model, arch["lowrank"]["rank"], arch["lowrank"]["targets"])
        graphdef, params, frozen = nnx.split(model, train.trainable_filter(arch["trainable"]), ...)
        ck = RetrofitCheckpoints(ckpt_dir, async_save=False)
        try:
            params = ck.restore_milestone(step, params)
        finally:
            ck.close()
        model = nnx.merge(graphdef, params, frozen)
        lowrank.fold(model)  # a plain model: kernels + the milestone's low-rank products, if it has any
        return model

    return [(f"{ckpt_dir.parent}@milestone{step}", {"step": int(step), "target_cr": metas[step].get("target_cr")},
             lambda step=step: load(step)) for step in sorted(steps)]


def dms_checkpoints(s: dict, base_model_path) -> list[tuple[str, str, dict, object]]:
    """[(checkpoint id, series label, info, loader)] of every DMS checkpoint the settings name; a loader returns
    the model (loaded lazily: skipped points never load theirs)."""
    from dms_jax import weights

    out = []
    for path in s["dms_models"]:
        if str(path).endswith(".safetensors"):  # an adapter file on the base model (dms_jax.adapter)
            out.append(adapter_checkpoint(path, base_model_path))
            continue
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


def adapter_checkpoint(path, base_model_path) -> tuple[str, str, dict, object]:
    """dms_checkpoints' entry for an adapter file: its provenance gives the step and target CR."""
    from dms_jax import adapter, weights

    try:
        prov = adapter.read_adapter(path).provenance
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--dms-model {path}: {e}") from e
    info = {"target_cr": prov.get("target_cr"), "step": prov.get("step")}
    return (str(Path(path).resolve()), f"dms ({Path(path).stem})", info,
            lambda: weights.load_model(base_model_path, dms=path))


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
        from dms_jax.serve.baselines import budget_for_ratio

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
        if s.get("cache_dtype"):  # points of the model's own cache dtype keep their old identity
            d["cache_dtype"] = s["cache_dtype"]
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
    if s.get("cache_dtype"):  # another K/V storage is another curve
        for j in jobs:
            j.series = f"{j.series} [{s['cache_dtype']} KV]"
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
        from dms_jax.serve.engine import Engine

        kw = {} if job.method in ("vanilla",) + LEARNED else {"budget": job.budget()}
        if job.method == "dms" and model.dms_cfg is None:
            raise SystemExit(f"{job.checkpoint}: not a DMS model")
        if job.method == "dmc" and model.dmc_cfg is None:
            raise SystemExit(f"{job.checkpoint}: not a DMC model")
        return Engine(model, job.method, page_size=self.s["page_size"], prefill_chunk=prefill_chunk,
                      cache_dtype=self.s.get("cache_dtype"), **kw)

    def cases(self, task, length):
        """The point's cases (``sweep_cases``)."""
        key = (task, length)
        if key not in self._cases:
            self._cases[key] = sweep_cases(self.tok, task, length, self.s["cases"], self.s["wordings"][task],
                                           self.s["depths"])
        return self._cases[key]

    def run_generation(self, job: Job) -> dict:
        import numpy as np

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

        from dms_jax.data import corpus, packing

        if "heldout" not in self._cases:
            docs = corpus.load_documents("default")
            _, held = corpus.split_documents(docs)
            toks = corpus.tokenize_documents(held, self.tok)
            eos = self.tok.eos_token_id
            packed = packing.pack_tokens(toks, self.s["heldout_len"], eos_id=eos, last="drop")
            n = min(self.s["heldout_seqs"], len(packed.tokens))
            if n == 0:
                raise SystemExit(f"the held-out split has no sequence of {self.s['heldout_len']} tokens")
            self._cases["heldout"] = [np.asarray(packed.tokens[i]).tolist() for i in range(n)]
        return self._cases["heldout"]

    def heldout_reference(self):
        """Vanilla logits of every held-out row (float16, the KL reference) and their NLL."""
        import numpy as np

        from dms_jax.serve.engine import Engine

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
            # Vanilla on the reference's own cache is the reference (its KL would only measure the float16 copy).
            kl += 0.0 if job.method == "vanilla" and not self.s.get("cache_dtype") else float(b)
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
