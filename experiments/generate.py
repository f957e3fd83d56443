"""Generate answers with a supported model (default: the embedded SmolLM2-135M-Instruct).

    python -m experiments.generate --prompt "What is the capital of France?"
    python -m experiments.generate --prompt "Hi" --prompt "Tell me a joke" --temperature 0.7 --top-p 0.9
    python -m experiments.generate --model path/to/hf_dir --no-chat --prompt "The quick brown fox"

All prompts run as one left-padded batch through a jit-compiled decode loop with a dense KV cache. Prompts go
through the model's chat template unless --no-chat. The first call includes jit compilation; use --repeat 2 to
also time a compiled run.
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
    # Later: --dms / --chains / --budget-pages select the DMS paged engine; they are not implemented yet.
    return p


def main(argv: list[str] | None = None) -> list[str]:
    """Runs the CLI; returns the decoded answers (one per prompt)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    from dms_jax import weights
    from dms_jax.generate import SamplingConfig, chat_prompt, generate

    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    try:
        t0 = time.perf_counter()
        model = weights.load_model(args.model)
        tokenizer = weights.load_tokenizer(args.model)
        print(f"loaded {args.model or weights.default_model_path().name} "
              f"({model.cfg.model_type}, {model.cfg.num_layers} layers) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    if args.no_chat:
        prompts = [tokenizer(p)["input_ids"] for p in args.prompt]
    else:
        prompts = [chat_prompt(tokenizer, p, system=args.system) for p in args.prompt]
    stop = list(model.cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)

    for run in range(args.repeat):
        t0 = time.perf_counter()
        try:
            outputs = generate(model, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling,
                               stop_ids=stop, seed=args.seed)
        except ValueError as e:
            parser.error(str(e))
        seconds = time.perf_counter() - t0
        n_new = sum(len(o) for o in outputs)
        note = " (includes jit compilation)" if run == 0 else ""
        print(f"[run {run + 1}] {n_new} new tokens for {len(prompts)} prompt(s) in {seconds:.2f} s: "
              f"{n_new / seconds:.1f} tokens/s{note}", file=sys.stderr)

    answers = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    for i, (prompt, answer, ids) in enumerate(zip(args.prompt, answers, outputs)):
        print(f"### prompt {i + 1} ({len(prompts[i])} tokens): {prompt}")
        print(answer)
        print(f"### ({len(ids)} new tokens{', stopped' if ids and ids[-1] in stop else ''})\n")
    return answers


if __name__ == "__main__":
    main()
