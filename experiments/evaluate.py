"""Accuracy against KV-cache reads and peak memory: vanilla, DMS checkpoints and the baselines (TOVA, H2O,
StreamingLLM, Quest) on the same paged engine, at matched budgets.

    python -m experiments.evaluate --sweep cpu --dms-model runs/distill/export
    python -m experiments.evaluate --sweep cpu --dms-run runs/distill --methods vanilla,dms,tova --ratios 4
    python -m experiments.evaluate --sweep smoke --out /tmp/pareto.json          # tiny random model, seconds
    python -m experiments.evaluate --sweep hyperscale --dms-run runs/distill --dms-milestones 129   # majority voting

This module parses the flags; the sweep itself (its design, the points' fields, the outputs, resuming) is
``dms_jax.eval.run`` over ``dms_jax.eval.sweep`` and ``dms_jax.eval.hyperscale``.
"""

from __future__ import annotations

import argparse

from dms_jax.eval.run import SettingsError, run_sweep, settings_from_args
from dms_jax.eval.sweep import METHODS, SWEEPS, TASKS
from dms_jax.provenance import command_line


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="cpu", help="named preset (default: cpu)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--ratios", help="comma-separated compression ratios for the baselines (all / kept tokens)")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--cases", type=int, help="cases per (task, length), spread evenly over the wording families")
    p.add_argument("--wordings", help="wording families of each task (dms_jax.eval.tasks.WORDINGS): 'default' "
                                      "(each task's first), 'all', or a comma-separated list of family names")
    p.add_argument("--lengths", help="comma-separated prompt lengths in tokens (passkey, variable_tracking)")
    p.add_argument("--depths", help="comma-separated passkey needle depths in [0, 1], cycled over the cases")
    p.add_argument("--heldout-seqs", type=int, help="held-out sequences for the heldout task")
    p.add_argument("--heldout-len", type=int, help="tokens per held-out sequence")
    p.add_argument("--model", help="base model: HF directory or .gguf (default: the sweep's; the embedded SmolLM2)")
    p.add_argument("--dms-model", nargs="+", default=[], metavar="PATH",
                   help="DMS checkpoints: HF export directories or adapter .safetensors files (e.g. runs/distill/export)")
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
    p.add_argument("--cache-dtype", help="K/V storage of the engine: float32, bfloat16, float16 or int8 (a scale per "
                                         "token per head); default the model's dtype. Points get their own series")
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


def main(argv=None) -> dict:
    args, parser = parse_args(argv)
    try:
        s = settings_from_args(args)
    except SettingsError as e:
        parser.error(str(e))
    return run_sweep(s, command_line("python -m experiments.evaluate", argv), args.out, dry_run=args.dry_run,
                     plot=not args.no_plot, progress=not args.no_progress)


if __name__ == "__main__":
    main()
