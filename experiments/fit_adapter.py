"""Fit a DMS decision adapter to the original model's attention, then calibrate it to target compression ratios.

    python -m experiments.fit_adapter --run-dir RUN --steps 300 --cache-ratio 4 --cache-ratio 8
    python -m experiments.fit_adapter --run-dir RUN --labels heads --keep-heads 17 --steps 60
    python -m experiments.fit_adapter --run-dir RUN --steps 300 --resume     # continue a killed fit

--labels reads: each (layer, KV head, token) is labelled with the largest attention weight a query more than
--window positions later gives it in the original model; the adapter learns to mark the lowest --evict-fraction
of them (dms_jax.train.importance), and adapter_cr<R>.safetensors per --cache-ratio sets the threshold so that
held-out rows of --seq-len tokens compress R times (whole cache).
--labels heads: the --keep-heads KV heads whose marking costs the most distillation loss on long-range rows keep
every token, the others mark all but their first --sink (dms_jax.train.heads): adapter_heads<K>.safetensors.
The run directory also gets metrics.jsonl, starts.jsonl, adapter_latest.safetensors (every --save-every batches)
and results.json (dms_jax.train.fit_run). The files load with
`weights.load_model(dms=FILE)`, `experiments.evaluate --dms-model FILE`, or start a DMS distillation with
`experiments.distill --init-adapter FILE`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.fit_adapter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--model", help="safetensors dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="default", help="text source (dms_jax.data.corpus; default: Python's docs)")
    p.add_argument("--steps", type=int, default=300, help="batches, one teacher forward each (default 300)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--inner-steps", type=int, default=4, help="Adam steps per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--window", type=int, default=64, help="the DMS window (default 64)")
    p.add_argument("--evict-fraction", type=float, default=0.85, help="labelled 'evict' share (default 0.85)")
    p.add_argument("--recall-fraction", type=float, default=0.5, help="long-range synthetic rows (default 0.5)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--cache-ratio", type=float, action="append", dest="cache_ratios",
                   help="write an adapter calibrated to this whole-cache compression (repeatable; default 4)")
    p.add_argument("--calibration-rows", type=int, default=8, help="held-out rows the ratios are measured on")
    p.add_argument("--labels", choices=("reads", "heads"), default="reads")
    p.add_argument("--keep-heads", type=int, default=18, help="--labels heads: heads that keep every token")
    p.add_argument("--sink", type=int, default=4, help="--labels heads: first tokens every head keeps")
    p.add_argument("--damage-rows", type=int, default=4, help="--labels heads: long-range rows to measure on")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(sys.argv[1:] if argv is None else argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dms_jax.provenance import command_line
    from dms_jax.train.fit_run import FitRun, run_fit
    from dms_jax.train.importance import FitConfig

    try:
        fit = FitConfig(steps=args.steps, batch_size=args.batch_size, inner_steps=args.inner_steps,
                        evict_fraction=args.evict_fraction, lr=args.lr, seed=args.seed)
        run = FitRun(fit=fit, run_dir=args.run_dir, command=command_line("python -m experiments.fit_adapter", argv),
                     model=args.model, data=args.data, seq_len=args.seq_len, window=args.window,
                     recall_fraction=args.recall_fraction, save_every=args.save_every, resume=args.resume,
                     cache_ratios=tuple(args.cache_ratios or (4.0,)), calibration_rows=args.calibration_rows,
                     labels=args.labels, keep_heads=args.keep_heads, sink=args.sink, damage_rows=args.damage_rows)
        results = run_fit(run, progress=not args.no_progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    for name, f in results["files"].items():
        print(f"{name}: whole-cache compression {f['cache_ratio']:.2f} on {results['heldout_rows']} ({f['file']})")
    return results


if __name__ == "__main__":
    main()
