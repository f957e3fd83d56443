"""Frozen configuration dataclasses: the decoder architecture (built from a Hugging Face config), DMS and DMC."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (Python or numpy, not a bool) >= ``minimum``.

    Why so strict: these settings become shapes, loop bounds and jit static arguments, where a float or a bool
    would either fail far from its source or silently mean something else (``True`` is 1).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder family covers Llama, Qwen2 (qkv bias) and Qwen3 (q/k RMSNorm)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # ("default",) | ("linear", factor) | ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
    rope_scaling: tuple = ("default",)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotate-half RoPE, got {self.head_dim}")
        if self.rope_scaling[0] not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {self.rope_scaling[0]!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Builds the config from a transformers config object or its dict (config.json)."""
        c = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = c.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} (architectures={archs}); "
                f"dms-jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if c.get("use_sliding_window"):
            raise ValueError("use_sliding_window=True is not supported (sliding-window attention layers)")
        if c.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        layer_types = c.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"only full-attention layers are supported, got layer_types={sorted(set(layer_types))}")
        act = c.get("hidden_act", c.get("hidden_activation", "silu"))
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported (the Llama/Qwen MLP uses silu)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if c.get(k) is None]
        if missing:
            raise ValueError(f"config is missing required fields: {missing}")
        num_heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=c.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(c)),
            rope_scaling=_rope_scaling(c),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; its config has no attention_bias field.
            attention_bias=bool(c.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=c.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict:
        """config.json fields that transformers needs to rebuild the same architecture."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        rope = {"rope_type": self.rope_scaling[0], "rope_theta": self.rope_theta}
        if self.rope_scaling[0] == "linear":
            rope["factor"] = self.rope_scaling[1]
        elif self.rope_scaling[0] == "llama3":
            _, f, lo, hi, orig = self.rope_scaling
            rope.update(factor=f, low_freq_factor=lo, high_freq_factor=hi, original_max_position_embeddings=orig)
        d = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta/rope_scaling.
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling[0] == "default" else rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d


def _rope_theta(c: Mapping) -> float:
    params = c.get("rope_parameters") or {}
    return params.get("rope_theta", c.get("rope_theta", 10000.0))


def _rope_scaling(c: Mapping) -> tuple:
    # transformers >= 5 keeps everything in rope_parameters; 4.x used rope_scaling (with "type" or "rope_type").
    params = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return ("default",)
    if kind == "linear":
        return ("linear", float(params["factor"]))
    if kind == "llama3":
        return ("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    raise ValueError(f"rope type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class DMSConfig:
    """Dynamic Memory Sparsification settings. Field names follow the paper; `to_hf_dict` gives NVIDIA's names."""

    variant: str = "neuron"  # "neuron": reuse q[..., d-1] of each group's first head; "adapter": Linear(RMSNorm(x))
    window: int = 256  # tokens stay visible for `window` positions after they are marked for eviction
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0  # logits start near -offset, so nothing is evicted at step 0
    tau: float = 0.1  # Gumbel-sigmoid temperature during training
    alpha_per: str = "head"  # "head" or "layer" (all heads of a layer copy head 0's decision)

    def __post_init__(self):
        if self.variant not in ("neuron", "adapter"):
            raise ValueError(f"variant must be 'neuron' or 'adapter', got {self.variant!r}")
        # The one check of the DMS window: policies and caches take it from here (dms.visible_if_marked).
        check_int("window", self.window)
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.alpha_per not in ("head", "layer"):
            raise ValueError(f"alpha_per must be 'head' or 'layer', got {self.alpha_per!r}")


@dataclasses.dataclass(frozen=True)
class DMCConfig:
    """Dynamic Memory Compression settings (Nawrot et al. 2024; reference: NVIDIA/Megatron-LM megatron/contrib/dmc).

    DMC borrows element d-1 of every key head (merge logit) and of every query head (importance) and, per KV head
    and token, merges the token into the head's last cache slot instead of appending it. A model carries either a
    DMSConfig or a DMCConfig, never both. Megatron's argument names are in brackets.
    """

    accumulation_window: int = 12  # [dmc_window_size] a slot averages at most this many of its newest tokens
    tau: float = 0.1  # [dmc_temp] Gumbel-sigmoid temperature during training
    logit_offset: float = 5.0  # [dmc_init_val] merge logit k[d-1] - offset; importance sigmoid(q[d-1] + offset)
    # Not in the reference (1 there): merge logit scale * k[d-1] - offset, importance sigmoid(scale * q[d-1] + ...).
    # The borrowed rows start at zero and, under Adam at a retrofit's learning rate, move ~lr per step each: a
    # logit of ~576 such weights moves too slowly for a few-hundred-step run (the unscaled CPU retrofit never
    # left "append everything"). Under Adam a scale s is an s-times larger learning rate for those rows alone.
    logit_scale: float = 1.0

    def __post_init__(self):
        check_int("accumulation_window", self.accumulation_window)
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not math.isfinite(self.logit_offset):
            raise ValueError(f"logit_offset must be finite, got {self.logit_offset}")
        if not (math.isfinite(self.logit_scale) and self.logit_scale > 0):
            raise ValueError(f"logit_scale must be finite and > 0, got {self.logit_scale}")
