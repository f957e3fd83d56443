"""Decode speed and peak KV memory of the paged engine: vanilla vs DMS, with transformers side by side.

    python benchmarks/bench_engine_decode.py                      # 1K / 4K / 8K context, W in {1, 8}, CR 8
    python benchmarks/bench_engine_decode.py --contexts 1024 --steps 4 --no-transformers   # a quick look

The workload and the measurements are dms_jax.eval.bench_decode (described below); this script parses the flags.
Writes docs/results/engine_decode.json (fields of issue 4) and docs/results/engine_decode.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_jax.eval import bench_decode  # noqa: E402
from dms_jax.eval.bench_decode import REPEATS, DecodeBenchConfig  # noqa: E402

PROG = "python benchmarks/bench_engine_decode.py"


def parse_args(argv=None) -> argparse.Namespace:
    d = DecodeBenchConfig()
    p = argparse.ArgumentParser(description=__doc__ + "\n" + bench_decode.__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=list(d.contexts))
    p.add_argument("--chains", type=int, nargs="+", default=list(d.chains))
    p.add_argument("--cr", type=int, default=d.cr)
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--steps", type=int, default=d.steps, help="decode forwards per timed segment (after one untimed)")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens,
                   help="tokens each chain generates (the peak KV memory is taken over all of them); at least "
                        f"1 + {1 + REPEATS} x --steps. A DMS token stays in the window for --window steps, so over "
                        "a generation shorter than the window the chains' new tokens are not compressed at all")
    p.add_argument("--page-size", type=int, default=d.page_size)
    p.add_argument("--prefill-chunk", type=int, default=d.prefill_chunk)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--random-weights", action="store_true",
                   help="SmolLM2-135M's architecture with random weights and random prompt tokens (no GGUF needed; "
                        "implies --no-transformers)")
    p.add_argument("--attention-backend", default=d.attention_backend,
                   help="engine attention: auto | xla_blocked | xla | pallas_tpu | pallas_gpu")
    p.add_argument("--time-budget", type=float, default=d.time_budget, help="seconds; contexts not started by then "
                   "are recorded as not run")
    p.add_argument("--no-unshared", action="store_true",
                   help="skip the extra vanilla decode of every W > 1 that reads the prompt's pages once per chain")
    p.add_argument("--out", default=str(ROOT / "docs/results/engine_decode.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    cfg = DecodeBenchConfig(contexts=tuple(args.contexts), chains=tuple(args.chains), cr=args.cr, window=args.window,
                            steps=args.steps, new_tokens=args.new_tokens, page_size=args.page_size,
                            prefill_chunk=args.prefill_chunk, transformers=not args.no_transformers,
                            random_weights=args.random_weights, attention_backend=args.attention_backend,
                            time_budget=args.time_budget, unshared_too=not args.no_unshared)
    result = bench_decode.benchmark(cfg, PROG, argv)
    out = bench_decode.write_outputs(result, args.out)
    print(f"wrote {out} ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
