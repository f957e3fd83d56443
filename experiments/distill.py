"""Retrofit a Hugging Face LLM with DMS by logit distillation.

    python -m experiments.distill --preset cpu                      # SmolLM2-135M-Instruct on this CPU
    python -m experiments.distill --preset cpu --resume             # continue after a crash / kill
    python -m experiments.distill --preset cpu-dmc                  # the same budget for DMC (merging)
    python -m experiments.distill --model DIR --mesh 2,2,2 ...      # any supported model, 8 devices

Multi-process (one process per host, or several on localhost for testing):
    python -m experiments.distill ... --coordinator 127.0.0.1:1234 --num-processes 2 --process-id {0,1}

The retrofit itself is dms_jax.train.distill (presets, settings, the loop); this module parses the flags and
passes in the passkey check, which needs the serving engine and the evaluation tasks.
"""

from __future__ import annotations

import argparse

from dms_jax import lowrank
from dms_jax.eval.passkey import make_passkey_cases, score_passkey
from dms_jax.provenance import command_line
from dms_jax.serve.reference import generate, generate_dmc
from dms_jax.train.distill import (DEFAULTS, PRESETS, RunStopped, SettingsError, run_retrofit, settings_from_args,
                                   validate)

__all__ = ["PRESETS", "DEFAULTS", "parse_args", "validate", "passkey_accuracy", "main"]


def parse_args(argv=None):
    # The whole command line, one flag a line in --help order: a flat list reads best, so it is not split up.
    p = argparse.ArgumentParser(prog="python -m experiments.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (flags override it)")
    p.add_argument("--model", help="safetensors dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="default",
                   help="'default' (Python's own docs), a .txt file/dir, a .jsonl file, or hf:NAME / a saved dataset")
    p.add_argument("--text-field", default="text")
    p.add_argument("--synthetic-kind", choices=["recall", "longrange"],
                   help="synthetic rows: 'recall' (v2: one wording of facts) or 'longrange' (v3: facts and variable "
                        "chains in many wordings, dms_jax.data.synthetic)")
    p.add_argument("--recall-fraction", type=float,
                   help="fraction of training rows that are synthetic recall rows (facts asked for again far "
                        "outside the window), in [0, 1)")
    p.add_argument("--answer-weight", type=float,
                   help="loss weight (>= 1) of the long-range rows' question blocks, where the answers need a "
                        "fact from outside the window (default 1: every position alike)")
    p.add_argument("--run-dir", default="runs/distill", help="checkpoints, metrics.jsonl, plots, export")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument("--warm-start", metavar="ADAPTER",
                   help="continue an adapter-only retrofit whose checkpoints were lost, in a new --run-dir, from an "
                        "adapter file (e.g. a milestone export) at the step it records; Adam's state starts fresh")
    p.add_argument("--init-adapter", metavar="ADAPTER",
                   help="start an adapter-variant DMS retrofit at step 0 from an adapter file (e.g. one fitted to the "
                        "original model's attention by experiments.fit_adapter) instead of the zero adapter")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step (global)")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--trainable", help="'all', 'adapter' or a regex over parameter paths")
    p.add_argument("--lowrank", type=int, metavar="R",
                   help="with --trainable adapter: also train rank-R changes of the base model's projections "
                        "(dms_jax.lowrank), so the retrofit ships as adapter + factors (export_adapter)")
    p.add_argument("--lowrank-init-scale", type=float, metavar="S",
                   help="the factors' initial range times S: the low-rank change then grows ~S times faster "
                        "(LoRA's alpha / r under Adam)")
    p.add_argument("--lowrank-targets", default=lowrank.DEFAULT_TARGETS, metavar="REGEX",
                   help="which Linear layers get low-rank factors (searched in paths like "
                        "'layers.3.self_attn.q_proj'; default: every attention and MLP projection)")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"])
    p.add_argument("--remat", action=argparse.BooleanOptionalAction,
                   help="recompute each layer's forward in the backward pass (--no-remat: keep activations)")
    p.add_argument("--variant", help="decision logits: 'neuron' (paper, default) or 'adapter'")
    p.add_argument("--alpha-per", default="head", help="'head' or 'layer'")
    p.add_argument("--neuron-init", default="zero", choices=["zero", "keep"],
                   help="neuron variant: zero the borrowed q neuron so training starts from 'evict nothing'")
    p.add_argument("--window", type=int)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--method", choices=["dms", "dmc"],
                   help="dms: learned delayed eviction; dmc: Dynamic Memory Compression (merge into the last slot)")
    p.add_argument("--dmc-window", type=int, default=12, help="dmc: a slot averages at most this many newest tokens")
    p.add_argument("--dmc-offset", type=float,
                   help="dmc: merge logit k[d-1] - offset, importance sigmoid(q[d-1] + offset)")
    p.add_argument("--dmc-logit-scale", type=float,
                   help="dmc: merge logit scale * k[d-1] - offset (1 = the reference; under Adam, scale s is an s "
                        "times larger learning rate for the borrowed rows alone)")
    p.add_argument("--neuron-decay-steps", type=int,
                   help="dmc: first-stage steps that decay the borrowed q/k neurons to zero before compression "
                        "training (default: 10%% of --steps)")
    p.add_argument("--cr-initial", type=float)
    p.add_argument("--cr-final", type=float)
    p.add_argument("--cr-final-step", type=int)
    p.add_argument("--cr-loss-weight", type=float, default=1.0,
                   help="weight of the compression hinge against the KL (default 1, as in the papers; > 1 follows "
                        "the CR schedule more closely at a higher KL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 for data: all remaining devices)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--no-async-checkpoint", action="store_true")
    p.add_argument("--eval-seqs", type=int, help="held-out sequences for KL/perplexity/CR")
    p.add_argument("--eval-seq-len", type=int, help="held-out sequence length (2048 gives compression_2k)")
    p.add_argument("--passkey-cases", type=int, help="greedy passkey cases per length (0: skip)")
    p.add_argument("--passkey-lengths", help="comma-separated prompt lengths in tokens")
    p.add_argument("--results", help="write the results JSON here (e.g. docs/results/retrofit_smollm2.json)")
    p.add_argument("--no-export", action="store_true", help="do not write the HF safetensors export")
    p.add_argument("--coordinator", help="host:port of process 0 for multi-process runs")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    merged = dict(DEFAULTS, **PRESETS.get(args.preset, {}))
    for k, v in merged.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args, p


def passkey_accuracy(model, tokenizer, lengths, n, *, dms: bool, dmc: bool = False, batch: int = 5,
                     seed: int = 1234, cache_ratios: dict | None = None) -> dict:
    """Greedy passkey retrieval accuracy per prompt length (same cases for every model).

    dms: the model's hard DMS eviction (dense cache); dmc: the model's hard DMC merges through its merge cache
    (generate_dmc). With dmc, cache_ratios (a dict) receives per length the tokens / slots of the caches at the end
    of generation, summed over the cases.
    """
    out = {}
    for length in lengths:
        cases = make_passkey_cases(tokenizer, n, seed=seed, target_tokens=length)
        hits, n_tokens, n_live = 0, 0.0, 0.0
        for i in range(0, n, batch):
            chunk = cases[i:i + batch]
            prompts = [list(c.prompt_ids) for c in chunk]
            if dmc:
                answers, stats = generate_dmc(model, prompts, max_new_tokens=16)
                n_tokens, n_live = n_tokens + float(stats["n_tokens"].sum()), n_live + float(stats["n_live"].sum())
            else:
                answers = generate(model, prompts, max_new_tokens=16, dms=dms)
            hits += sum(score_passkey(tokenizer.decode(a), c.answer) for c, a in zip(chunk, answers))
        out[str(length)] = hits / n
        if dmc and cache_ratios is not None:
            cache_ratios[str(length)] = n_tokens / max(n_live, 1.0)
    return out


def main(argv=None) -> dict:
    args, parser = parse_args(argv)
    try:
        settings = settings_from_args(args, command_line("python -m experiments.distill", argv))
        return run_retrofit(settings, passkey=passkey_accuracy)
    except SettingsError as e:
        parser.error(str(e))
    except RunStopped as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
