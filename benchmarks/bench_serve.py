"""Serving under one fixed KV byte budget: our scheduler (vanilla, DMS with fixed CR-8 decisions, the shipped DMS
retrofit, fixed CR-8 + int8 KV) against transformers' own continuous batching, on one Poisson workload.

    python benchmarks/bench_serve.py                                   # 12 requests, 1K-4K prompts, 256 answers
    python benchmarks/bench_serve.py --requests 4 --min-tokens 256 --max-tokens 512 --answer-tokens 32 \\
        --configs vanilla,dms-fixed8 --out /tmp/serve.json                  # a quick look

Writes docs/results/serve.json (keeps its `load_test` entry) with `runs` and a `summary`, and serve.png.
The workload and the measurements: dms_jax.eval.serve_bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROG = "python benchmarks/bench_serve.py"
CONFIGS = ("vanilla", "dms-fixed8", "dms-retrofit", "dms-fixed8-int8", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--answer-tokens", type=int, default=256)
    p.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second (default 0.5)")
    p.add_argument("--budget-mib", type=float, default=512.0, help="KV bytes of every configuration (MiB)")
    p.add_argument("--max-seqs", type=int, default=16, help="sequence slots of our scheduler and transformers'")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--dms-model", help="adapter file of the dms-retrofit configuration (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs/results/serve.json"))
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; known: {','.join(CONFIGS)}")
    return args


def _engine(name: str, args, model):
    """The engine of one configuration; ``model`` is the base model, shared by all but the retrofit."""
    from dms_jax import weights
    from dms_jax.adapter import SHIPPED_ADAPTER
    from dms_jax.serve.engine import Engine

    if name == "dms-retrofit":
        return Engine(weights.load_model(dms=args.dms_model or str(SHIPPED_ADAPTER)), "dms")
    if name == "vanilla":
        return Engine(model, "vanilla")
    return Engine(model, "fixed", window=64, cr=8, cache_dtype="int8" if name.endswith("int8") else None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from dms_jax import weights
    from dms_jax.eval import serve_bench
    from dms_jax.provenance import provenance

    tok, base = weights.load_tokenizer(), weights.load_model()
    workload = serve_bench.make_workload(tok, args.requests, args.min_tokens, args.max_tokens, args.answer_tokens,
                                         args.rate, args.seed)
    budget = int(args.budget_mib * 2**20)
    context = args.max_tokens + 64 + args.answer_tokens
    runs, out = {}, Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    for name in args.configs.split(","):
        t0 = time.perf_counter()
        if name == "transformers":
            runs[name] = serve_bench.run_transformers(_hf_model(), workload, budget, max_seqs=args.max_seqs)
        else:
            runs[name] = serve_bench.run_scheduler(_engine(name, args, base), workload, budget, max_seqs=args.max_seqs,
                                                   context=context)
        print(f"{name}: {runs[name]['throughput_tokens_per_s']:.1f} tok/s, "
              f"max concurrent {runs[name].get('max_concurrent')} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        result = {**provenance(PROG, argv), "workload": {
            "requests": args.requests, "prompt_tokens": [len(p) for p in workload.prompts],
            "answer_tokens": args.answer_tokens, "rate_per_s": args.rate, "arrivals_s": list(workload.arrivals),
            "budget_bytes": budget, "max_seqs": args.max_seqs, "seed": args.seed},
            "runs": serve_bench.strip_outputs(runs), "summary": serve_bench.summary(runs)}
        result = {**old, **result}  # keeps the load test's entry
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every configuration: a kill loses one at most
    serve_bench.plot(result, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    return result


def _hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    from dms_jax import weights

    path = weights.default_model_path()
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
