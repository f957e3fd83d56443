"""Helpers for the distillation / sharding / checkpoint / CLI tests (not a conftest: tests/conftest.py is shared).

Everything is tiny so that a test takes seconds on the 2-core CI machine:
  * a byte-level tokenizer (256 byte tokens + <|endoftext|> + <|pad|>), saved with save_pretrained, so the CLI's
    AutoTokenizer path is the real one while the vocabulary stays at 320 rows instead of 49152;
  * a tiny Llama (2 layers, hidden 32, 4 query / 2 KV heads, head_dim 8) written by transformers' save_pretrained;
  * real text: the first sections of Python's own language reference (pydoc_data.topics) as a JSONL file.

CLI runs go through subprocesses that share one persistent XLA compilation cache, so the same train step is
compiled once per test session instead of once per run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = 320  # > 258 tokenizer ids; divisible by the tensor axis of every test mesh
TINY_LLAMA = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=256, eos_token_id=256,
                  pad_token_id=257)


# ----------------------------------------------------------------------------------------------- tiny assets



def spread_random_weights(model, seed: int, scale: float) -> None:
    """Re-draws a transformers model's weights wider than its std-0.02 init (norms 1 +- 0.1, embeddings N(0, 1),
    the rest N(0, scale^2)), so that every parameter visibly moves the logits. Shared by the parity and the
    training tests."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))

def save_byte_tokenizer(directory: Path):
    """A byte-level BPE tokenizer without merges: ids 0..255 are bytes, 256 = <|endoftext|>, 257 = <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    specials = ["<|endoftext|>", "<|pad|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    fast.save_pretrained(directory)
    return fast


def make_tiny_llama_dir(directory: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama saved by transformers (config.json + model.safetensors) with the byte tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config).eval()
    # transformers' std-0.02 init gives near-uniform logits (KL ~ 0 for anything); larger weights make the
    # teacher's distribution peaked enough that evictions measurably change it.
    spread_random_weights(model, seed + 1, scale=0.2)
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory


def write_text_jsonl(path: Path, n_docs: int = 160) -> Path:
    """Real English text (Python's language reference, shipped with CPython) as JSONL, one section a line."""
    from dms_jax.data import corpus

    path = Path(path)
    if not path.exists():
        docs = corpus.builtin_documents("pydoc-topics")[:n_docs]
        with open(path, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return path


def tiny_assets(base: Path) -> dict:
    """{'model': dir, 'data': jsonl, 'cache': XLA cache dir}, created once under `base` (idempotent)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    cache = base / "xla_cache"
    cache.mkdir(exist_ok=True)
    return {"model": make_tiny_llama_dir(base / "tiny_llama"), "data": write_text_jsonl(base / "text.jsonl"),
            "cache": cache}


# ----------------------------------------------------------------------------------------------- CLI runs


def tiny_cli_args(assets: dict, run_dir: Path, *extra: str, steps: int = 6) -> list[str]:
    """Flags of a seconds-long retrofit of the tiny model (float32, no remat, no eval/export unless asked)."""
    return ["--preset", "tiny", "--model", str(assets["model"]), "--data", str(assets["data"]),
            "--run-dir", str(run_dir), "--steps", str(steps), "--batch-size", "2", "--seq-len", "16",
            "--window", "4", "--cr-final", "3", "--cr-final-step", str(max(1, steps - 2)),
            "--compute-dtype", "float32", "--no-remat", "--no-progress", "--eval-seqs", "0", "--no-export",
            *extra]


def cli_env(assets: dict, devices: int = 1, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_COMPILATION_CACHE_DIR": str(assets["cache"]),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONWARNINGS": "ignore",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "experiments.distill", *args], cwd=REPO, env=env, stdout=f,
                            stderr=subprocess.STDOUT)


def run_cli(args: list[str], env: dict, log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = start_cli(args, env, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"distill run timed out after {timeout} s; log:\n{Path(log).read_text()[-4000:]}")
    return subprocess.CompletedProcess(proc.args, rc, Path(log).read_text(), "")


def assert_ok(result: subprocess.CompletedProcess):
    assert result.returncode == 0, f"distill failed (rc {result.returncode}):\n{result.stdout[-6000:]}"


def read_metrics(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def committed_steps(ckpt_dir: Path) -> list[int]:
    """Steps of finished orbax checkpoints (a directory named by the step; orbax renames it when complete)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def wait_for(predicate, timeout: float, interval: float = 0.02, proc: subprocess.Popen | None = None) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    return False


def read_export(export_dir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(Path(export_dir) / "model.safetensors"))
