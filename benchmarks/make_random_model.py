"""Writes a model directory with SmolLM2-135M-Instruct's architecture, random weights and a real tokenizer.

For machines that cannot install the embedded GGUF (an accelerator host without network access): the distillation
CLI and the benchmarks then run end to end there, and their speed and memory figures hold (they do not depend on
the weights). Quality figures (KL, perplexity, compression a retrofit reaches) of such a model mean nothing.

    python benchmarks/make_random_model.py OUT_DIR --tokenizer DIR   # DIR: any directory with SmolLM2's tokenizer
    python -m experiments.distill --model OUT_DIR ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dms_jax import weights  # noqa: E402
from dms_jax.config import ModelConfig  # noqa: E402
from dms_jax.eval.bench_decode import SMOLLM2_135M  # noqa: E402
from dms_jax.model import create_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--tokenizer", help="a directory with tokenizer.json (e.g. an export of a retrofit); default: the "
                                       "embedded GGUF's tokenizer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = weights.load_tokenizer(None)
    cfg = ModelConfig(**SMOLLM2_135M, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)
    out = weights.export_hf(create_model(cfg, seed=args.seed), args.out_dir, tokenizer=tokenizer)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
