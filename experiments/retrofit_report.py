"""Writes the retrofit report (docs/results/retrofit_smollm2_v3.json and .png) from an evaluate results file.

    python -m experiments.evaluate --sweep v3 --dms-run RUN --out docs/results/retrofit_smollm2_v3_points.json
    python -m experiments.retrofit_report --points docs/results/retrofit_smollm2_v3_points.json \\
        --distill docs/results/retrofit_smollm2_v3_distill.json --train-step docs/results/train_step.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dms_jax.eval import retrofit_report
from dms_jax.provenance import command_line, utc_now


def _read(path: str | None, flag: str) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{flag}: no file {p}")
    return json.loads(p.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.retrofit_report", description=__doc__.split("\n")[0])
    p.add_argument("--points", required=True, help="an experiments.evaluate results JSON with DMS milestone points")
    p.add_argument("--distill", help="the retrofit's distill results JSON (recipe and every start / resume)")
    p.add_argument("--train-step", help="benchmarks/bench_train_step.py's JSON (fraction of the matmul peak)")
    p.add_argument("--out", default="docs/results/retrofit_smollm2_v3.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    results = _read(args.points, "--points")
    try:
        report = retrofit_report.build_report(results, _read(args.distill, "--distill"),
                                              _read(args.train_step, "--train-step"))
    except ValueError as e:
        raise SystemExit(f"--points {args.points}: {e}")
    report.update(command=command_line("python -m experiments.retrofit_report", argv), date=utc_now(), points_file=args.points)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_plot:
        retrofit_report.plot_report(report, out.with_suffix(".png"))
    for t in report["targets"]:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['target']}: "
              + (", ".join(f"step {r['step']} CR {r['cr_cache']:.2f}: {r['dms']:.2f} vs {r['original']:.2f}"
                           for r in t["milestones"]) or t["note"]), file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
