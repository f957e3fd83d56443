"""Export the DMS adapter of an adapter-only distill run (with its low-rank factors, for a --lowrank run) as one
small file (dms_jax.adapter).

    python -m experiments.export_adapter runs/distill --out adapter.safetensors             # newest milestone
    python -m experiments.export_adapter runs/distill/checkpoints/milestones/300 --out FILE     # one step

The source is a run directory, its checkpoints/ (milestones/ or latest/) or one step directory; the file holds
the adapter tensors (and factors), the DMSConfig, the base model's identity (architecture and fingerprint) and the
provenance (the run's command, step, target CR and results file, plus --note). Load it with
`weights.load_model(base, dms="adapter.safetensors")`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m experiments.export_adapter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="distill run dir, its checkpoints/ (milestones/, latest/) or a step dir")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest milestone / step)")
    p.add_argument("--model", help="the run's base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--note", help="a note for the provenance, e.g. where its measured figures are")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from dms_jax import adapter

    extra = {"note": args.note} if args.note else {}
    try:
        out = adapter.export_adapter(args.checkpoint, args.out, step=args.step, base_model=args.model,
                                     provenance=extra)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    info = adapter.read_adapter(out)
    print(f"{out}: {out.stat().st_size / 1e3:.0f} kB, {len(info.tensors)} tensors, step "
          f"{info.provenance['step']}, target CR {info.provenance['target_cr']}")
    return str(out)


if __name__ == "__main__":
    main()
