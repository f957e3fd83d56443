"""Shared fixtures: the embedded default model (ours and transformers'), its tokenizer, tiny random HF models.

The real model is loaded once per test session (each load costs seconds on the 2-core CI machine).
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from train_helpers import spread_random_weights

# Tiny configs of each supported family: 2 layers, hidden 64, 4 query / 2 KV heads (GQA), vocab 256, fp32.
TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                   rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama 3 RoPE scaling with all three frequency bands present at head_dim 16: with an original context of
    # 64, wavelengths < 16 keep their frequency, 16..64 are smoothed, > 64 are divided by the factor.
    "llama3": dict(model_type="llama", tie_word_embeddings=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # head_dim 32 != hidden / heads, as in real Qwen3 checkpoints.
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32, use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

# Real prompts for the default model (chat messages), of different lengths.
CHAT_MESSAGES = [
    "Write a short poem about autumn leaves.",
    "Explain in a few sentences why the sky is blue.",
    "List three tips for writing clear Python code, with one sentence each.",
]


def tiny_hf_config_dict(family: str) -> dict:
    return {**TINY_COMMON, **TINY_FAMILIES[family]}


def _torch_single_thread():
    """PyTorch's 2 OpenMP threads spin badly when the 2 cores are shared (measured 6-8x slower); 1 is enough."""
    import torch

    torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _tiny_hf_model(family: str, seed: int = 0):
    import torch

    _torch_single_thread()
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tiny_hf_config_dict(family)
    config = AutoConfig.for_model(**d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # transformers' init (std 0.02, norms at 1, zero biases) gives nearly uniform attention and logits; larger
    # random weights make every parameter, bias and norm matter in the parity checks.
    spread_random_weights(model, seed + 1, scale=0.1)
    return model


@pytest.fixture(scope="session")
def tiny_hf_model():
    """Factory: tiny_hf_model(family) -> a cached tiny random-weight transformers model (fp32, eval mode).

    Families: "llama", "llama3" (Llama 3 RoPE scaling), "qwen2" (qkv bias), "qwen3" (q/k norm, head_dim 32).
    """
    return _tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_model):
    """Factory: tiny_model(family) -> our NNX model imported from the live tiny transformers model."""
    from dms_jax import weights

    @functools.lru_cache(maxsize=None)
    def make(family: str):
        return weights.from_transformers(tiny_hf_model(family))

    return make


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_hf_model):
    """Factory: tiny_hf_dir(family) -> a directory written by transformers' save_pretrained."""
    cache = {}

    def make(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"hf_{family}")
            tiny_hf_model(family).save_pretrained(out)
            cache[family] = out
        return cache[family]

    return make


def hf_logits(hf_model, tokens: np.ndarray, attention_mask: np.ndarray | None = None,
              position_ids: np.ndarray | None = None) -> np.ndarray:
    import torch

    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.long)
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(position_ids, dtype=torch.long)
    with torch.no_grad():
        return hf_model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kw).logits.float().numpy()


def rel_err(ours, ref) -> tuple[float, float]:
    """(max |ours - ref|, max |ours - ref| / max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    diff = float(np.max(np.abs(ours - ref)))
    return diff, diff / float(np.max(np.abs(ref)))


@pytest.fixture(scope="session")
def default_path():
    from dms_jax import weights

    return weights.default_model_path()


@pytest.fixture(scope="session")
def default_model(default_path):
    from dms_jax import weights

    return weights.load_model(default_path)


@pytest.fixture(scope="session")
def tokenizer(default_path):
    from dms_jax import weights

    return weights.load_tokenizer(default_path)


@pytest.fixture(scope="session")
def hf_default_model(default_path):
    """transformers' own import of the default GGUF (dequantised to fp32): the reference for parity."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _torch_single_thread()
    return AutoModelForCausalLM.from_pretrained(
        default_path.parent, gguf_file=default_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def chat_prompts(tokenizer):
    from dms_jax.chat import chat_prompt

    return [chat_prompt(tokenizer, m) for m in CHAT_MESSAGES]


def write_config(directory, config: dict):
    with open(directory / "config.json", "w") as f:
        json.dump(config, f)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_executables():
    """Drop JAX's compiled executables after each test module: one process runs the whole suite, and the
    accumulated XLA state of ~400 tests (many shapes, Pallas interpret kernels) crashed the compiler late in a run."""
    yield
    import jax

    jax.clear_caches()
