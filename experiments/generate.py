"""Generate answers with a supported model (default: the embedded SmolLM2-135M-Instruct).

    python -m experiments.generate --prompt "What is the capital of France?"
    python -m experiments.generate --prompt "Hi" --prompt "Tell me a joke" --temperature 0.7 --top-p 0.9
    python -m experiments.generate --model path/to/hf_dir --no-chat --prompt "The quick brown fox"
    python -m experiments.generate --model path/to/dms_checkpoint --dms --chains 4 --temperature 0.7 --prompt "Hi"
    python -m experiments.generate --model path/to/dmc_checkpoint --dmc --prompt "Hi"

All prompts run as one left-padded batch through a jit-compiled decode loop with a dense KV cache, or, with --dms,
--dmc, --chains or --budget-pages, through the paged engine (dms_jax.serve.engine: per-head pages, DMS eviction or DMC
merging that frees memory, chains sharing the prompt's pages, a page budget). Prompts go through the model's chat
template unless --no-chat. The first call includes jit compilation; use --repeat 2 to also time a compiled run.
"""

from __future__ import annotations

import argparse
import sys
import time


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {s}")
    return v


def _non_negative_float(s: str) -> float:
    v = float(s)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _probability(s: str) -> float:
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt (repeat for a batch of prompts of any lengths)")
    p.add_argument("--model", help="safetensors dir with config.json, or a .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=_probability, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="feed prompts as raw text, without the chat template")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--repeat", type=_positive_int, default=1, help="run the batch N times (timing after compile)")
    engine = p.add_argument_group("paged engine (any of these flags selects it instead of the dense cache)")
    engine.add_argument("--dms", action="store_true",
                        help="evict with the model's learned DMS decisions (needs a checkpoint with DMS settings)")
    engine.add_argument("--dmc", action="store_true",
                        help="merge tokens with the model's learned DMC decisions (needs a checkpoint with DMC "
                             "settings)")
    engine.add_argument("--chains", type=_positive_int, default=1,
                        help="parallel chains per prompt, sharing the prompt's prefill (copy-on-write pages)")
    engine.add_argument("--budget-pages", type=_positive_int, default=None,
                        help="KV page pool size (memory budget); sequences that do not fit are preempted and "
                             "reported (default: enough for every token)")
    return p


def _load(args, parser):
    """The model, its tokenizer, the encoded prompts and the stop ids; bad flags end in parser.error."""
    from dms_jax import weights
    from dms_jax.chat import chat_prompt

    try:
        t0 = time.perf_counter()
        model = weights.load_model(args.model)
        tokenizer = weights.load_tokenizer(args.model)
        print(f"loaded {args.model or weights.default_model_path().name} "
              f"({model.cfg.model_type}, {model.cfg.num_layers} layers) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if args.dms and args.dmc:
        parser.error("--dms and --dmc exclude each other (a model compresses with one of them)")
    for flag, settings, kind in (("dms", model.dms_cfg, "a retrofitted checkpoint"),
                                 ("dmc", model.dmc_cfg, "a DMC checkpoint")):
        if getattr(args, flag) and settings is None:
            parser.error(f"--{flag} needs a model with {flag.upper()} settings ({kind}); "
                         f"{args.model or 'the default model'} has none")
    if args.no_chat:
        prompts = [tokenizer(p)["input_ids"] for p in args.prompt]
    else:
        prompts = [chat_prompt(tokenizer, p, system=args.system) for p in args.prompt]
    stop = list(model.cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    return model, tokenizer, prompts, stop


def _engine_notes(result, run: int) -> list[str]:
    """Prints the engine's pool figures for one run; returns each answer's compression note."""
    policy = " ".join(f"{k}={v}" for k, v in result.policy.items())
    print(f"[run {run + 1}] {policy}: KV pool high-water {result.pool_high_water_pages} pages "
          f"({result.pool_high_water_bytes / 2**20:.1f} MiB) of {result.budget_pages}", file=sys.stderr)
    return [f", compression {r.metrics.compression_ratio:.2f}x, KV reads {r.metrics.kv_token_reads}"
            + (", PREEMPTED: the page budget ran out" if r.status == "preempted" else "") for r in result.requests]


def main(argv: list[str] | None = None) -> list[str]:
    """Runs the CLI; returns the decoded answers (one per prompt, or per chain: prompt-major)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    from dms_jax.serve.reference import generate
    from dms_jax.serve.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    model, tokenizer, prompts, stop = _load(args, parser)
    use_engine = args.dms or args.dmc or args.chains > 1 or args.budget_pages is not None
    if use_engine:
        from dms_jax.serve.engine import Engine

        policy = "dms" if args.dms else "dmc" if args.dmc else "vanilla"
        engine = Engine(model, policy, budget_pages=args.budget_pages)
    notes = [""] * (len(prompts) * args.chains)
    for run in range(args.repeat):
        t0 = time.perf_counter()
        try:
            if use_engine:
                result = engine.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                         stop_ids=stop, seed=args.seed, chains=args.chains)
                outputs = result.tokens()
            else:
                outputs = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                                   stop_ids=stop, seed=args.seed)
        except ValueError as e:
            parser.error(str(e))
        seconds = time.perf_counter() - t0
        n_new = sum(len(o) for o in outputs)
        note = " (includes jit compilation)" if run == 0 else ""
        print(f"[run {run + 1}] {n_new} new tokens for {len(prompts)} prompt(s) in {seconds:.2f} s: "
              f"{n_new / seconds:.1f} tokens/s{note}", file=sys.stderr)
        if use_engine:
            notes = _engine_notes(result, run)

    answers = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    for i, (answer, ids) in enumerate(zip(answers, outputs)):
        k, chain = divmod(i, args.chains)
        label = f"### prompt {k + 1}" + (f" chain {chain + 1}" if args.chains > 1 else "")
        print(f"{label} ({len(prompts[k])} tokens): {args.prompt[k]}")
        print(answer)
        print(f"### ({len(ids)} new tokens{', stopped' if ids and ids[-1] in stop else ''}{notes[i]})\n")
    return answers


if __name__ == "__main__":
    main()
