"""Speed of the distillation train step on this machine, as a fraction of its own matmul peak.

    python benchmarks/bench_train_step.py                        # the whole grid (~20 min on 2 cores)
    python benchmarks/bench_train_step.py --seq-lens 1024 --trainable adapter --repeats 2   # a quick look

Workload: SmolLM2-135M-Instruct, adapter decisions (window 64), one jitted train step of train.make_train_step
(student forward + backward with Gumbel-sigmoid decisions, teacher forward, Adam), on real text, with
``--tokens-per-step`` tokens per step (rows of each length, as many as fit). The grid: compute dtype (float32 /
bfloat16; master weights float32 either way), remat on / off, row length, trainable set (all weights / the
decision adapter alone, frozen base).

FLOP/s counts what XLA compiles (``cost_analysis``): the recomputed forward under remat included, so it measures
how well the machine is used, not how useful the work is; tokens/s is the figure to choose a recipe by. The peak
is a jitted jnp matmul at the model's own shapes (rows x hidden x intermediate, and the LM head), measured in the
same run, in the same dtype; the fraction is achieved / peak of that dtype. Every configuration compiles once
(not timed) and then runs ``--repeats`` steps; the best is reported and the median too, since the machine is
shared. Writes docs/results/train_step.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dms_jax import weights  # noqa: E402
from dms_jax.config import DMSConfig  # noqa: E402
from dms_jax.data.corpus import builtin_text_ids  # noqa: E402
from dms_jax.provenance import provenance  # noqa: E402
from dms_jax.train import step as train  # noqa: E402


def _csv(text, kind=str):
    return [kind(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/bench_train_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="256,1024,2048", help="row lengths, comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, comma-separated")
    p.add_argument("--remat", default="on,off", help="'on', 'off' or both")
    p.add_argument("--trainable", default="adapter,all", help="trainable sets, comma-separated")
    p.add_argument("--tokens-per-step", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (>= 1)")
    p.add_argument("--out", default=str(ROOT / "docs/results/train_step.json"))
    p.add_argument("--append", action="store_true",
                   help="add these configurations to the runs already in --out (a grid measured in parts)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    for length in _csv(args.seq_lens, int):
        if not 64 <= length <= args.tokens_per_step:
            p.error(f"--seq-lens: every length must be in [64, --tokens-per-step={args.tokens_per_step}], got {length}")
    if set(_csv(args.remat)) - {"on", "off"}:
        p.error(f"--remat takes 'on' and/or 'off', got {args.remat!r}")
    return args


def matmul_peak(dtype, shapes, repeats: int = 20) -> dict:
    """Best FLOP/s of a jitted (m x k) @ (k x n) per shape, in ``dtype``."""
    out = {}
    for m, k, n in shapes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype)
        b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
        out[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def time_config(model_path, text_ids, dtype: str, remat: bool, seq_len: int, trainable: str, tokens_per_step: int,
                repeats: int) -> dict:
    rows = max(1, tokens_per_step // seq_len)
    cfg = train.DistillConfig(steps=1000, batch_size=rows, seq_len=seq_len, lr=1e-4, trainable=trainable,
                              compute_dtype=dtype, remat=remat, cr_final=4.0)
    model = weights.load_model(model_path, dms=DMSConfig(variant="adapter", window=64),
                               dtype=train.COMPUTE_DTYPES[dtype])
    graphdef, params, frozen, teacher = train.split_model(model, cfg)
    del model
    tx = train.make_optimizer(cfg)
    opt_state = tx.init(params)
    step_fn = train.make_train_step(cfg, tx, graphdef)
    ids = np.asarray(text_ids[: rows * seq_len], np.int32).reshape(1, rows, seq_len)
    tokens, valid = jnp.asarray(ids), jnp.ones(ids.shape, bool)
    t = time.perf_counter()
    # One compile serves the FLOP count and the timed steps (a plain call would compile a second time).
    compiled = step_fn.lower(params, frozen, teacher, opt_state, tokens, valid, 0).compile()
    compile_s = time.perf_counter() - t
    flops = _xla_flops(compiled)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        params, opt_state, metrics = compiled(params, frozen, teacher, opt_state, tokens, valid, i)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    best = min(times)
    return {"compute_dtype": dtype, "remat": remat, "seq_len": seq_len, "rows": rows, "trainable": trainable,
            "tokens_per_step": rows * seq_len, "compile_s": compile_s, "step_s_best": best,
            "step_s_median": statistics.median(times), "tokens_per_s": rows * seq_len / best,
            "xla_flops_per_step": flops, "flops_per_s": flops / best}


def plot(results: dict, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    runs = results["runs"]
    short = {"float32": "f32", "bfloat16": "bf16"}
    labels = [f"{r['trainable']} {short.get(r['compute_dtype'], r['compute_dtype'])} remat "
              f"{'on' if r['remat'] else 'off'}" for r in runs]
    for label in dict.fromkeys(labels):
        sel = sorted((r for r, lab in zip(runs, labels) if lab == label), key=lambda r: r["seq_len"])
        xs = [r["seq_len"] for r in sel]
        a.plot(xs, [r["tokens_per_s"] for r in sel], "o-", label=label)
        b.plot(xs, [r["fraction_of_peak"] for r in sel], "o-", label=label)
    for ax, name in ((a, "tokens / s"), (b, "XLA FLOP/s / matmul peak")):
        ax.set_xscale("log", base=2), ax.set_xlabel("row length (tokens)"), ax.set_ylabel(name), ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle("Distillation train step, SmolLM2-135M, " + results["machine"].split(";")[0])
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model_path = weights.resolve_model_path(None)
    tokenizer = weights.load_tokenizer(model_path)
    text_ids = builtin_text_ids(tokenizer, args.tokens_per_step)
    cfg = weights.load_model(model_path).cfg
    shapes = [(1024, cfg.hidden_size, cfg.intermediate_size), (1024, cfg.hidden_size, cfg.vocab_size)]
    peaks = {d: matmul_peak(train.COMPUTE_DTYPES[d], shapes) for d in _csv(args.dtypes)}
    runs = []
    grid = itertools.product(_csv(args.trainable), _csv(args.dtypes), [r == "on" for r in _csv(args.remat)],
                             _csv(args.seq_lens, int))
    for trainable, dtype, remat, seq_len in grid:
        r = time_config(model_path, text_ids, dtype, remat, seq_len, trainable, args.tokens_per_step, args.repeats)
        r["fraction_of_peak"] = r["flops_per_s"] / max(peaks[dtype].values())
        runs.append(r)
        print(json.dumps(r), flush=True)
    out = Path(args.out)
    made = provenance("python benchmarks/bench_train_step.py", argv)
    parts = [{**made, "matmul_peak_flops_per_s": peaks, "configurations": len(runs)}]
    if args.append and out.is_file():  # each part keeps its own peak: fractions are taken within one run
        earlier = json.loads(out.read_text())
        runs = earlier["runs"] + runs
        parts = earlier.get("parts", []) + parts
    fastest = max(runs, key=lambda r: r["tokens_per_s"])
    results = {**made, "matmul_peak_flops_per_s": peaks, "parts": parts, "runs": runs, "fastest": fastest,
               # The fraction of the configuration a recipe would pick (the fastest), not the largest fraction:
               # remat's recomputed forward raises FLOP/s without making the step any faster.
               "train_step_fraction_of_peak": fastest["fraction_of_peak"],
               "largest_fraction_of_peak": max(r["fraction_of_peak"] for r in runs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps({k: results[k] for k in ("matmul_peak_flops_per_s", "fastest", "train_step_fraction_of_peak")},
                     indent=2))
    return results


if __name__ == "__main__":
    main()
