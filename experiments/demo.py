"""`make demo`: SmolLM2-135M-Instruct and its DMS retrofit side by side, in about a minute on a CPU.

Loads a shipped DMS retrofit file (dms_jax/assets/smollm2_dms_adapter.safetensors, made by
`python -m experiments.export_adapter` from a distill run: the decision adapter, and low-rank changes of the base
weights if the retrofit trained them) onto the embedded base model and runs the original model (no eviction) and the retrofit (learned eviction) through the paged engine on the same long prompts:
retrieval in several wordings, a question about the middle of a document and a two-turn exchange. It prints
the answers side by side with the KV memory each held, the decode reads and the measured whole-cache
compression (dense entries / live entries), and writes docs/results/demo.json and demo.png.

`--retrofit` instead runs the old live demo: a short retrofit (`python -m experiments.distill --preset demo`)
into runs/demo, a before / after table and one answer from each model (`make retrofit`); extra flags go to
experiments.distill, e.g. `--steps 60`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

QUESTION = "What is the capital of France? Answer in one sentence."


def parse_args(argv):
    from dms_jax.adapter import SHIPPED_ADAPTER

    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=str(SHIPPED_ADAPTER), help="adapter file (default: the shipped one)")
    p.add_argument("--base", help="base model: safetensors dir or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--cases", type=int, default=1, help="prompts of each kind (default 1)")
    p.add_argument("--tokens", type=int, default=1024, help="length of each prompt in tokens (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default="docs/results/demo.json", help="results JSON; the plot goes next to it")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    p.add_argument("--retrofit", action="store_true",
                   help="run the live retrofit demo instead (experiments.distill --preset demo; extra flags go "
                        "to experiments.distill)")
    args, rest = p.parse_known_args(argv)
    if rest and not args.retrofit:
        p.error(f"unrecognized arguments: {' '.join(rest)} (only --retrofit passes flags on to experiments.distill)")
    for name in ("cases", "tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return p, args, rest


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, args, rest = parse_args(argv)
    if args.retrofit:
        return run_retrofit(rest)
    if not Path(args.adapter).is_file():
        parser.error(f"--adapter: no adapter file at {args.adapter}. Export one from a distill run with "
                     "`python -m experiments.export_adapter RUN_DIR --out FILE`, or watch a live retrofit with "
                     "`python -m experiments.demo --retrofit`")
    return run_side_by_side(args, argv)


def run_side_by_side(args, argv) -> dict:
    from dms_jax import adapter, provenance, weights
    from dms_jax.eval import side_by_side

    t0 = time.perf_counter()
    base = weights.resolve_model_path(args.base)
    model = weights.load_model(base, dms=args.adapter)
    tokenizer = weights.load_tokenizer(base)
    shipped = adapter.read_adapter(args.adapter)
    provenance_of_adapter = shipped.provenance
    # A low-rank retrofit changed the base weights: the original is then the base model itself.
    original = weights.load_model(base) if shipped.has_lowrank else None
    prompts = side_by_side.demo_prompts(tokenizer, args.tokens, args.cases)
    print(f"{len(prompts)} prompts of ~{args.tokens} tokens; DMS window {model.dms_cfg.window}; adapter "
          f"{args.adapter} (step {provenance_of_adapter.get('step')}, target CR "
          f"{provenance_of_adapter.get('target_cr')})", flush=True)
    report = side_by_side.compare(model, tokenizer, prompts, original_model=original,
                                  max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - t0
    print(side_by_side.format_table(report))
    result = {"compression": report["compression"], "seconds": seconds,
              "accuracy_original": report["accuracy_original"], "accuracy_dms": report["accuracy_dms"],
              **{k: v for k, v in report.items() if k not in ("compression", "rows")},
              "adapter": str(args.adapter), "adapter_provenance": provenance_of_adapter, "base_model": str(base),
              "window": model.dms_cfg.window, "prompt_tokens": args.tokens, "cases": args.cases,
              "max_new_tokens": args.max_new_tokens, "rows": report["rows"],
              **provenance.provenance("python -m experiments.demo", argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_plot:
        side_by_side.plot(report, out.with_suffix(".png"))
    print(f"{seconds:.0f} s in all; results in {out}" + ("" if args.no_plot else f" and {out.with_suffix('.png')}"))
    return result


def before_after_table(result: dict) -> str:
    def fmt(x, digits=3):
        return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))

    passkey = result.get("passkey_accuracy", {})
    passkey_vanilla = result.get("passkey_accuracy_vanilla", {})
    rows = [
        ("held-out perplexity", result.get("ppl_vanilla"), result.get("ppl_heldout")),
        ("held-out KL to the original (nats/token)", 0.0, result.get("kl_heldout")),
        ("compression outside the window", 1.0, result.get("compression_ratio")),
        (f"cache ratio at {result.get('eval_seq_len')} tokens", 1.0, result.get("cache_ratio")),
    ] + [(f"passkey accuracy at {k} tokens ({result.get('passkey_cases')} cases)", passkey_vanilla.get(k), v)
         for k, v in passkey.items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'original':>10}  {'DMS':>10}", "-" * (width + 24)]
    lines += [f"{name:{width}}  {fmt(a):>10}  {fmt(b):>10}" for name, a, b in rows]
    return "\n".join(lines)


def run_retrofit(argv: list[str]) -> dict:
    """The live demo: the `demo` preset of experiments.distill into runs/demo (fresh), then before / after."""
    from experiments import distill

    argv = list(argv)
    if "--run-dir" not in argv:
        shutil.rmtree("runs/demo", ignore_errors=True)  # the demo always starts fresh
        argv += ["--run-dir", "runs/demo"]
    result = distill.main(["--preset", "demo"] + argv)
    print("\nDMS retrofit of SmolLM2-135M-Instruct: before / after "
          f"({result['steps']} steps, window {result['window']}, target CR {result['cr_schedule'][1]})")
    print(before_after_table(result))

    from dms_jax import weights
    from dms_jax.chat import chat_prompt
    from dms_jax.serve.reference import generate

    run = argv[argv.index("--run-dir") + 1]
    tokenizer = weights.load_tokenizer(None)
    prompt = chat_prompt(tokenizer, QUESTION)
    original = weights.load_model(None)
    retrofitted = weights.load_model(f"{run}/export")
    print(f"\nQ: {QUESTION}")
    for name, model, dms in (("original", original, False), ("DMS", retrofitted, True)):
        answer = generate(model, [prompt], max_new_tokens=40, dms=dms)[0]
        print(f"{name:>9}: {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    return result


if __name__ == "__main__":
    main()
