"""dms_jax.config: ModelConfig from HF configs (objects and dicts, transformers 4.x and 5.x spellings), export of
config.json fields, validation errors; DMSConfig and DMCConfig validation (the one place each window is checked);
check_int."""

import dataclasses

import numpy as np
import pytest

from conftest import TINY_FAMILIES, tiny_hf_config_dict
from dms_jax.config import DMCConfig, DMSConfig, ModelConfig, check_int

SMOLLM2_CONFIG = {  # SmolLM2-135M-Instruct's config.json (the fields we read)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 100000, "rope_scaling": None,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2,
}


def test_from_hf_dict_smollm2():
    cfg = ModelConfig.from_hf(SMOLLM2_CONFIG)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert cfg.head_dim == 64 and cfg.group_size == 3
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling == ("default",)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.eos_token_ids == (2,) and cfg.pad_token_id == 2 and cfg.max_position_embeddings == 8192


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_from_hf_object_and_dict_agree(family):
    from transformers import AutoConfig

    d = tiny_hf_config_dict(family)
    obj = AutoConfig.for_model(**d)
    cfg = ModelConfig.from_hf(obj)
    assert cfg == ModelConfig.from_hf(obj.to_dict())
    assert cfg.model_type == d["model_type"]
    assert cfg.attention_bias == (family == "qwen2")  # Qwen2 always has q/k/v bias
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.head_dim == d["head_dim"]
    assert cfg.tie_word_embeddings == d["tie_word_embeddings"]
    if family == "llama3":
        assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_to_hf_dict_round_trip_through_transformers(family):
    """to_hf_dict -> transformers config object -> from_hf gives the same ModelConfig."""
    from transformers import AutoConfig

    cfg = ModelConfig.from_hf(tiny_hf_config_dict(family))
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf(d) == cfg
    assert ModelConfig.from_hf(AutoConfig.for_model(**d)) == cfg


def test_transformers4_rope_spellings():
    base = dict(SMOLLM2_CONFIG)
    linear = ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == ("linear", 2.0)
    llama3 = ModelConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert llama3.rope_scaling == ("llama3", 32.0, 1.0, 4.0, 8192) and llama3.rope_theta == 500000.0


def test_head_dim_and_eos_defaults():
    c = {k: v for k, v in SMOLLM2_CONFIG.items() if k not in ("num_key_value_heads",)}
    cfg = ModelConfig.from_hf({**c, "eos_token_id": [2, 7], "num_attention_heads": 9})
    assert cfg.num_kv_heads == 9 and cfg.head_dim == 64 and cfg.eos_token_ids == (2, 7)
    assert ModelConfig.from_hf({**c, "eos_token_id": None}).eos_token_ids == ()


def test_config_is_frozen_and_hashable():
    cfg = ModelConfig.from_hf(SMOLLM2_CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 2
    assert hash(cfg) == hash(ModelConfig.from_hf(SMOLLM2_CONFIG))


@pytest.mark.parametrize("config, match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_embd": 768},
     r"unsupported architecture: model_type='gpt2'"),
    ({**SMOLLM2_CONFIG, "model_type": "mistral", "sliding_window": 4096, "architectures": ["MistralForCausalLM"]},
     r"unsupported architecture: model_type='mistral'"),
    ({**SMOLLM2_CONFIG, "model_type": None}, r"unsupported architecture"),
    ({**SMOLLM2_CONFIG, "model_type": "qwen2", "use_sliding_window": True}, r"use_sliding_window=True"),
    ({**SMOLLM2_CONFIG, "layer_types": ["full_attention", "sliding_attention"]}, r"full-attention layers"),
    ({**SMOLLM2_CONFIG, "mlp_bias": True}, r"mlp_bias=True"),
    ({**SMOLLM2_CONFIG, "hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({**SMOLLM2_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn'"),
    ({k: v for k, v in SMOLLM2_CONFIG.items() if k != "hidden_size"}, r"missing required fields: \['hidden_size'\]"),
    ({**SMOLLM2_CONFIG, "num_key_value_heads": 4}, r"num_heads \(9\) must be a multiple of num_kv_heads \(4\)"),
    ({**SMOLLM2_CONFIG, "hidden_size": 567}, r"head_dim must be even"),  # 567 / 9 = 63
    ({**SMOLLM2_CONFIG, "num_hidden_layers": 0}, r"num_layers must be >= 1"),
])
def test_from_hf_errors(config, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(config)


def test_direct_construction_errors():
    cfg = ModelConfig.from_hf(SMOLLM2_CONFIG)
    with pytest.raises(ValueError, match=r"model_type='bert' is not supported"):
        dataclasses.replace(cfg, model_type="bert")
    with pytest.raises(ValueError, match=r"rope_scaling type 'ntk'"):
        dataclasses.replace(cfg, rope_scaling=("ntk", 2.0))


def test_dms_config_defaults_and_errors():
    d = DMSConfig()
    assert (d.variant, d.alpha_scale, d.alpha_offset, d.tau, d.alpha_per) == ("neuron", 100.0, 5.0, 0.1, "head")
    assert DMSConfig(window=np.int64(3)).window == 3 and DMSConfig(window=1).window == 1
    for kw, match in [(dict(variant="merge"), r"variant must be 'neuron' or 'adapter'"),
                      (dict(window=0), r"window must be an integer >= 1"),
                      (dict(window=2.5), r"window must be an integer >= 1"),
                      (dict(window=4.0), r"window must be an integer >= 1, got 4.0"),
                      (dict(window=True), r"window must be an integer >= 1, got True"),
                      (dict(tau=0.0), r"tau must be > 0"),
                      (dict(tau=-1.0), r"tau must be > 0"),
                      (dict(tau=float("nan")), r"tau must be > 0"),
                      (dict(alpha_per="token"), r"alpha_per must be 'head' or 'layer'")]:
        with pytest.raises(ValueError, match=match):
            DMSConfig(**kw)


def test_dmc_config_accumulation_window_errors():
    assert DMCConfig().accumulation_window == 12
    for w in (0, 2.5, 12.0, True):
        with pytest.raises(ValueError, match=r"accumulation_window must be an integer >= 1"):
            DMCConfig(accumulation_window=w)


def test_check_int():
    check_int("n", 1)
    check_int("n", np.int32(5), 5)
    check_int("sinks", 0, 0)
    for v, lo in ((0, 1), (4, 5), (1.0, 1), (True, 0), ("3", 1), (None, 1)):
        with pytest.raises(ValueError, match=rf"^n must be an integer >= {lo}, got {v!r}$"):
            check_int("n", v, lo)
