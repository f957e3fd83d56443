"""dms_jax.model: logits parity with transformers (real SmolLM2-135M weights and tiny random Llama / Qwen2 / Qwen3
with GQA), padding invariance, the dense KV cache, RoPE variants, shapes and errors.

Tolerances are relative to the largest reference logit: max |ours - ref| / max |ref|.
  real model (30 layers, fp32 on both sides): <= 1e-4 (the issue's bar; measured 2.9e-6 to 3.2e-6);
  tiny models (2 layers, fp32): <= 1e-5 (measured 2.6e-7 to 4.2e-7).
"""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_FAMILIES, hf_logits, rel_err, tiny_hf_config_dict
from dms_jax import model as M
from dms_jax.config import ModelConfig
from dms_jax.serve.reference import left_pad

REAL_TOL = 1e-4
TINY_TOL = 1e-5


def _real_text_prompt(tokenizer, n_chars):
    """Real prose that Python ships: the json module's documentation."""
    return tokenizer(json.__doc__.strip()[:n_chars])["input_ids"]


def _tiny_tokens(batch, length, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int32)


def _right_pad(prompts, pad_id=0):
    """Right padding: harmless under causal attention (real positions never see the pad), one shape for all."""
    width = max(len(p) for p in prompts)
    return np.asarray([list(p) + [pad_id] * (width - len(p)) for p in prompts], np.int32)


# ----------------------------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def real_prompts(tokenizer, chat_prompts):
    prompts = chat_prompts + [_real_text_prompt(tokenizer, 1000)]
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == 4 and max(lengths) > 200, lengths
    return prompts


@pytest.fixture(scope="module")
def real_right_padded_logits(default_model, real_prompts):
    logits, aux = default_model(jnp.asarray(_right_pad(real_prompts)))
    assert aux["decisions"] is None
    return np.asarray(logits)


def test_real_model_logits_parity(real_right_padded_logits, hf_default_model, real_prompts):
    """Real SmolLM2-135M weights (GGUF), real prompts of 4 lengths; the reference runs each prompt alone."""
    chex.assert_shape(real_right_padded_logits, (4, max(len(p) for p in real_prompts), 49152))
    for i, p in enumerate(real_prompts):
        ours = real_right_padded_logits[i, : len(p)]
        ref = hf_logits(hf_default_model, np.asarray([p]))[0]
        diff, rel = rel_err(ours, ref)
        assert rel <= REAL_TOL, f"{len(p)} tokens: max|diff| {diff:.3g}, relative {rel:.3g} > {REAL_TOL}"
        np.testing.assert_array_equal(np.argmax(ours, -1), np.argmax(ref, -1))


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_logits_parity(family, tiny_model, tiny_hf_model):
    """96 tokens: beyond the llama3 case's original context of 64."""
    model = tiny_model(family)
    tokens = _tiny_tokens(2, 96, seed=1)
    ours, _ = model(jnp.asarray(tokens))
    chex.assert_shape(ours, (2, 96, 256))
    chex.assert_type(ours, jnp.float32)
    diff, rel = rel_err(ours, hf_logits(tiny_hf_model(family), tokens))
    assert rel <= TINY_TOL, f"{family}: max|diff| {diff:.3g}, relative {rel:.3g} > {TINY_TOL}"


TINY_PROMPT_LENGTHS = (3, 19, 8)


def _tiny_prompts():
    return [list(_tiny_tokens(1, n, seed=n)[0]) for n in TINY_PROMPT_LENGTHS]


def test_tiny_parity_with_hf_padding(tiny_model, tiny_hf_model):
    """Left padding + valid mask + positions agree with transformers' own padded forward."""
    tokens, positions, valid = left_pad(_tiny_prompts(), 0)
    ours, _ = tiny_model("qwen2")(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    ref = hf_logits(tiny_hf_model("qwen2"), tokens, attention_mask=valid, position_ids=positions)
    diff, rel = rel_err(np.asarray(ours)[valid], ref[valid])
    assert rel <= TINY_TOL, f"padded qwen2: max|diff| {diff:.3g}, relative {rel:.3g} > {TINY_TOL}"


# ----------------------------------------------------------------------------------------------- padding


def _left_padded_real_positions(model, prompts):
    tokens, positions, valid = left_pad(prompts, 0)
    padded, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    padded = np.asarray(padded)
    assert np.all(np.isfinite(padded)), "fully masked padding rows must not produce NaN/inf"
    width = tokens.shape[1]
    return [padded[i, width - len(p):] for i, p in enumerate(prompts)]


def test_padding_invariance_real_model(default_model, real_prompts, real_right_padded_logits):
    """Left padding + valid + positions gives the logits of each prompt alone (= right-padded, causal)."""
    for i, (p, left) in enumerate(zip(real_prompts, _left_padded_real_positions(default_model, real_prompts))):
        diff, rel = rel_err(left, real_right_padded_logits[i, : len(p)])
        assert rel <= 1e-5, f"prompt {i} ({len(p)} tokens): left-padded vs alone relative {rel:.3g} > 1e-5"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_padding_invariance_tiny(family, tiny_model, tiny_hf_model):
    model, prompts = tiny_model(family), _tiny_prompts()
    right = np.asarray(model(jnp.asarray(_right_pad(prompts)))[0])
    for i, (p, left) in enumerate(zip(prompts, _left_padded_real_positions(model, prompts))):
        _, rel = rel_err(left, right[i, : len(p)])
        assert rel <= 1e-6, f"{family} prompt {i}: left-padded vs right-padded relative {rel:.3g} > 1e-6"
        _, rel = rel_err(left, hf_logits(tiny_hf_model(family), np.asarray([p]))[0])
        assert rel <= TINY_TOL, f"{family} prompt {i}: left-padded vs transformers alone {rel:.3g} > {TINY_TOL}"


# ----------------------------------------------------------------------------------------------- dense cache


def test_init_dense_cache_structure():
    cfg = ModelConfig.from_hf(tiny_hf_config_dict("qwen3"))
    cache = M.init_dense_cache(cfg, batch=3, length=10, dtype=jnp.bfloat16)
    expected = {"k": jnp.zeros((2, 3, 10, 2, 32), jnp.bfloat16), "v": jnp.zeros((2, 3, 10, 2, 32), jnp.bfloat16),
                "pos": jnp.zeros((3, 10), jnp.int32), "valid": jnp.zeros((3, 10), bool)}
    chex.assert_trees_all_equal_structs(cache, expected)
    chex.assert_trees_all_equal_shapes_and_dtypes(cache, expected)
    assert not bool(cache["valid"].any())


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_dense_cache_decode_matches_full_forward(family, tiny_model):
    """Prefill of left-padded prompts, then one token at a time, equals the full-sequence forward."""
    model = tiny_model(family)
    prompts = [list(_tiny_tokens(1, n, seed=10 + n)[0]) for n in (4, 9)]
    cont = _tiny_tokens(2, 6, seed=3)
    tokens, positions, valid = left_pad(prompts, 0)
    full_tokens = np.concatenate([tokens, cont], 1)
    full_pos = np.concatenate([positions, positions[:, -1:] + 1 + np.arange(6)], 1)
    full_valid = np.concatenate([valid, np.ones((2, 6), bool)], 1)
    ref, _ = model(jnp.asarray(full_tokens), jnp.asarray(full_pos), jnp.asarray(full_valid))

    p = tokens.shape[1]
    cache = M.init_dense_cache(model.cfg, 2, p + 6)
    logits, cache = M.forward_with_dense_cache(
        model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), cache, 0)
    steps = [logits]
    for s in range(6):
        logits, cache = M.forward_with_dense_cache(
            model, jnp.asarray(cont[:, s:s + 1]), jnp.asarray(full_pos[:, p + s:p + s + 1]),
            jnp.ones((2, 1), bool), cache, p + s)
        steps.append(logits)
    incremental = np.concatenate([np.asarray(x) for x in steps], 1)
    _, rel = rel_err(incremental[full_valid], np.asarray(ref)[full_valid])
    assert rel <= 1e-6, f"cached decode vs full forward relative {rel:.3g} > 1e-6"
    chex.assert_shape(cache["k"], (model.cfg.num_layers, 2, p + 6, model.cfg.num_kv_heads, model.cfg.head_dim))
    assert bool(cache["valid"][:, p:].all())


# ----------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen3"])
def test_rope_inverse_frequencies_match_transformers(family, tiny_hf_model):
    ref = tiny_hf_model(family).model.rotary_emb.inv_freq.numpy()
    ours = M.rope_inverse_frequencies(ModelConfig.from_hf(tiny_hf_config_dict(family)))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-6)


def test_rope_linear_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = {**tiny_hf_config_dict("llama"), "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                              "factor": 4.0}}
    d.pop("model_type")
    ref, _ = ROPE_INIT_FUNCTIONS["linear"](LlamaConfig(**d))
    ours = M.rope_inverse_frequencies(ModelConfig.from_hf({**d, "model_type": "llama"}))
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)


def test_attend_gqa_matches_naive():
    rng = np.random.default_rng(0)
    b, t, hq, hkv, d = 2, 5, 6, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)])
    pos = np.broadcast_to(np.arange(t), (b, t))
    bias = M.causal_bias(jnp.asarray(pos), jnp.asarray(pos), jnp.ones((b, t), bool))
    out = np.asarray(M.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias))
    ref = np.zeros_like(out)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)  # query head h uses KV head h // G
            s = q[bi, :, h] @ k[bi, :, kh].T / np.sqrt(d)
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            ref[bi, :, h] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, kh]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_param_count_matches_transformers(family, tiny_hf_model):
    cfg = ModelConfig.from_hf(tiny_hf_config_dict(family))
    hf_count = sum(p.numel() for p in tiny_hf_model(family).parameters())
    assert M.param_count(M.abstract_model(cfg)) == hf_count


def test_create_model_bf16_compute():
    cfg = ModelConfig.from_hf(tiny_hf_config_dict("qwen3"))
    model = M.create_model(cfg, dtype=jnp.bfloat16)
    logits, _ = model(jnp.asarray(_tiny_tokens(1, 7)))
    chex.assert_shape(logits, (1, 7, 256))
    chex.assert_type(logits, jnp.float32)  # logits always come back in float32
    chex.assert_tree_all_finite(logits)
    params = jax.tree.leaves(M.nnx.state(model, M.nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)  # master weights stay float32


def test_model_errors(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"sequence length 513 exceeds the context of 512 tokens"):
        model(jnp.zeros((1, 513), jnp.int32))
    with pytest.raises(ValueError, match=r"dms_mode must be one of"):
        model(jnp.zeros((1, 4), jnp.int32), dms_mode="soft")
    with pytest.raises(ValueError, match=r"needs a model built with a DMSConfig"):
        model(jnp.zeros((1, 4), jnp.int32), dms_mode="hard")
