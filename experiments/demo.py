"""`make demo`: the main job on the embedded default model.

For now this runs plain generation with SmolLM2-135M-Instruct on a couple of prompts (the retrofit issue turns it
into the DMS retrofit demo). Extra arguments are passed to experiments.generate, e.g. `--temperature 0.7`.
"""

from __future__ import annotations

import sys

from experiments import generate

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
]


def main(argv: list[str] | None = None) -> list[str]:
    argv = list(sys.argv[1:] if argv is None else argv)
    prompts = [a for p in DEMO_PROMPTS for a in ("--prompt", p)]
    # Two runs: the first includes jit compilation, the second shows the compiled speed.
    return generate.main(prompts + ["--max-new-tokens", "64", "--repeat", "2"] + argv)


if __name__ == "__main__":
    main()
