"""Does a DMS model keep the tokens the answer needs? Needle vs all-token keep rates per layer (dms_jax.eval.survival).

    python -m experiments.needle_survival --dms-model dms_jax/assets/smollm2_dms_adapter.safetensors \\
        --dms-run /work/dms_runs/retrofit_v7 --dms-milestones 58 --out docs/results/needle_survival.json

The cases are the evaluation sweep's (experiments.evaluate: same seeds, wording families and depths), so the
figures line up with its accuracy points. Writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dms_jax.eval import survival
from dms_jax.eval.sweep import PASSKEY_DEPTHS, dms_checkpoints, resolve_wordings, sweep_cases
from dms_jax.provenance import provenance


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.needle_survival", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--dms-model", nargs="+", default=[], metavar="PATH",
                   help="DMS checkpoints: HF export directories or adapter .safetensors files")
    p.add_argument("--dms-run", nargs="+", default=[], metavar="DIR", help="distill run directories (milestones)")
    p.add_argument("--dms-milestones", help="comma-separated milestone steps of the --dms-run runs (default: all)")
    p.add_argument("--tasks", default=",".join(survival.TASKS), help=f"subset of {','.join(survival.TASKS)}")
    p.add_argument("--cases", type=int, default=50, help="cases per task, split over the wording families")
    p.add_argument("--wordings", default="all", help="'default', 'all' or comma-separated family names")
    p.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    p.add_argument("--out", default="docs/results/needle_survival.json")
    p.add_argument("--no-plot", action="store_true")
    return p, p.parse_args(argv)


def main(argv=None) -> dict:
    from dms_jax import weights

    parser, args = parse_args(argv)
    task_names = [t for t in args.tasks.split(",") if t]
    if not task_names or any(t not in survival.TASKS for t in task_names):
        parser.error(f"--tasks must name some of {', '.join(survival.TASKS)}, got {args.tasks!r}")
    if args.cases < 1 or args.length < 128:
        parser.error("--cases must be >= 1 and --length >= 128 (tokens)")
    if not args.dms_model and not args.dms_run:
        parser.error("give at least one --dms-model or --dms-run")
    try:
        families = resolve_wordings(args.wordings, task_names, args.cases)
        milestones = [int(x) for x in args.dms_milestones.split(",")] if args.dms_milestones else None
    except ValueError as e:
        parser.error(str(e))
    base_path = weights.resolve_model_path(args.model) if args.model else None
    tok = weights.load_tokenizer(base_path)
    ckpts = dms_checkpoints({"dms_models": args.dms_model, "dms_runs": args.dms_run, "dms_milestones": milestones},
                            base_path)
    cases = {t: sweep_cases(tok, t, args.length, args.cases, families[t], PASSKEY_DEPTHS) for t in task_names}
    out = Path(args.out)
    results = {**provenance("python -m experiments.needle_survival", argv), "length": args.length,
               "wordings": families, "definitions": survival.__doc__, "models": []}
    for ckpt_id, label, info, load in ckpts:
        model = load()
        entry = {"checkpoint": ckpt_id, "label": f"{label} step {info.get('step')}", "info": info, "tasks": {}}
        for t in task_names:
            entry["tasks"][t] = survival.model_survival(model, tok, cases[t])
            r = entry["tasks"][t]
            print(f"{entry['label']} {t}: needle kept {r['needle_kept']:.3f}, all tokens {r['base_kept']:.3f} "
                  f"(x{r['enrichment']:.2f}), heads holding a whole answer {r['recoverable_heads']:.3f}",
                  file=sys.stderr, flush=True)
        results["models"].append(entry)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")  # after every model: nothing measured is lost
    if not args.no_plot:
        survival.plot(results, out.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
