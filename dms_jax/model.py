"""Flax NNX decoder for the Llama / Qwen2 / Qwen3 families, with DMS in the attention.

Layout: activations are [batch, time, heads, head_dim]. One implementation; the config's flags select qkv bias
(Qwen2), q/k RMSNorm (Qwen3), tied embeddings and the RoPE variant.

The model runs in three DMS modes:
  "off"   teacher / vanilla: plain causal attention, the decision neuron is not touched;
  "train" noisy soft decisions (Gumbel-sigmoid, straight-through) and the additive log(1 - alpha) bias;
  "hard"  noise-free decisions (logit > 0) and exact delayed eviction: the reference the paged cache must match.
The DMS math itself lives in dms.py as pure functions; this file only wires it in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dms_jax import dms
from dms_jax.config import DMSConfig, ModelConfig

DMS_MODES = ("off", "train", "hard")
# Finite "minus infinity" for masked scores: keeps fully masked rows (left padding) free of NaN.
MASK_VALUE = -1e30


def _sharded(init, names):
    """Attaches logical axis names to a parameter initialiser (sharding.py maps them onto mesh axes)."""
    # Not eager: the names are logical and only become mesh axes under sharding.py's rules.
    return nnx.with_partitioning(init, names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, then scaled in the input dtype (as the HF reference does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, names=("norm",)):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=names, eager_sharding=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def _linear(n_in, n_out, names, *, bias, dtype, param_dtype, rngs, zero=False):
    init = nnx.initializers.zeros_init() if zero else nnx.initializers.normal(0.02)
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=_sharded(init, names), bias_init=_sharded(nnx.initializers.zeros_init(), names[1:]),
    )


def rope_inverse_frequencies(cfg: ModelConfig) -> jnp.ndarray:
    """Inverse frequencies [head_dim/2], with linear or Llama-3 scaling."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    kind = cfg.rope_scaling[0]
    if kind == "linear":
        inv_freq = inv_freq / cfg.rope_scaling[1]
    elif kind == "llama3":
        _, factor, low_ff, high_ff, orig_max = cfg.rope_scaling
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = orig_max / low_ff, orig_max / high_ff
        smooth = (orig_max / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = jnp.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray):
    """cos, sin of shape [B, T, head_dim] in float32 for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(cfg)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE on [B, T, H, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos[:, :, None] + rotated.astype(jnp.float32) * sin[:, :, None]
    return out.astype(x.dtype)


def attend(q, k, v, bias):
    """Grouped-query attention with an additive bias.

    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; bias [B, Hkv or 1, T, S] (shared by a KV head's query group).
    Scores and softmax in float32.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = scores + bias[:, :, None]
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def causal_bias(q_pos, k_pos, k_valid):
    """Additive bias [B, 1, T, S]: 0 where the key is valid and not in the future, MASK_VALUE elsewhere."""
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    return jnp.where(visible, 0.0, MASK_VALUE)[:, None].astype(jnp.float32)


@dataclasses.dataclass
class Projected:
    """Attention inputs of one layer after projections, norms and RoPE, plus the DMS decision logits."""

    q: jax.Array  # [B, T, Hq, D], RoPE applied, reused neuron zeroed when DMS is on
    k: jax.Array  # [B, T, Hkv, D], RoPE applied
    v: jax.Array  # [B, T, Hkv, D]
    decision_logits: jax.Array | None  # [B, Hkv, T] logits computed at each position (before the shift)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dms_cfg: DMSConfig | None, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg, self.dms_cfg = cfg, dms_cfg
        h, hq, hkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = _linear(h, hq * d, ("embed", "q_heads"), bias=cfg.attention_bias, **kw)
        self.k_proj = _linear(h, hkv * d, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.v_proj = _linear(h, hkv * d, ("embed", "kv_heads"), bias=cfg.attention_bias, **kw)
        self.o_proj = _linear(hq * d, h, ("q_heads", "embed"), bias=False, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
        if dms_cfg is not None and dms_cfg.variant == "adapter":
            # Zero-initialised, so every logit starts at -offset: nothing is evicted before training.
            self.dms_proj_alpha_norm = RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype, names=("embed",))
            self.dms_proj_alpha = _linear(h, hkv, ("embed", None), bias=False, zero=True, **kw)

    def project(self, x_normed, x_residual, positions, dms_on: bool) -> Projected:
        """q, k, v with RoPE for positions [B, T]; decision logits when DMS is on.

        x_residual is the residual stream before the layer's input norm (the adapter's input).
        """
        cfg, dcfg = self.cfg, self.dms_cfg
        b, t, _ = x_normed.shape
        q = self.q_proj(x_normed).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_normed).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_normed).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = None
        use_neuron = dms_on and dcfg is not None and dcfg.variant == "neuron"
        if dms_on and dcfg is not None:
            if use_neuron:
                logits = dms.neuron_decision_logits(q, cfg.num_kv_heads, dcfg.alpha_scale, dcfg.alpha_offset)
                # The borrowed neuron must not also act as a query feature.
                q = dms.zero_reused_neuron(q, cfg.num_kv_heads)
            else:
                proj = self.dms_proj_alpha(self.dms_proj_alpha_norm(x_residual))
                logits = dms.adapter_decision_logits(proj, dcfg.alpha_scale, dcfg.alpha_offset)
            logits = logits.astype(jnp.float32)
        cos, sin = rope_cos_sin(cfg, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if use_neuron:
            # Rotate-half RoPE moves the zeroed element's partner into d-1: zero it again.
            q = dms.zero_reused_neuron(q, cfg.num_kv_heads)
        return Projected(q, k, v, logits)

    def output(self, attn_out):
        b, t = attn_out.shape[:2]
        return self.o_proj(attn_out.reshape(b, t, -1))


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dms_cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, names=("embed",))
        self.self_attn = Attention(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, names=("embed",))
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, attention_fn, dms_on: bool):
        """attention_fn(Projected) -> ([B, T, Hq, D] attention output, aux); lets callers own the keys (cache)."""
        p = self.self_attn.project(self.input_layernorm(x), x, positions, dms_on)
        attn, aux = attention_fn(p)
        x = x + self.self_attn.output(attn)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, aux


class CausalLM(nnx.Module):
    """Decoder-only LM. `dtype` is the compute dtype (bf16 for training), `param_dtype` the master weights'."""

    def __init__(self, cfg: ModelConfig, dms_cfg: DMSConfig | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dms_cfg = cfg, dms_cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=_sharded(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.layers = nnx.List([
            DecoderLayer(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in range(cfg.num_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, names=("embed",))
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def unembed(self, x):
        x = self.norm(x)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(x)
        return self.lm_head(x)

    def __call__(self, tokens, positions=None, valid=None, *, dms_mode: str = "off", noise_key=None,
                 remat: bool = False):
        """Full-sequence forward (teacher, training or hard-eviction reference).

        tokens, positions, valid: [B, T]; positions default to 0..T-1; valid marks real (non-padding) tokens.
        Returns (logits [B, T, V] float32, aux) where aux["decisions"] is [L, B, Hkv, T] (after the one-token shift:
        the decision *for* each token; straight-through in "train" mode, 0/1 in "hard" mode) or None when off.
        """
        if dms_mode not in DMS_MODES:
            raise ValueError(f"dms_mode must be one of {DMS_MODES}, got {dms_mode!r}")
        dms_on = dms_mode != "off"
        if dms_on and self.dms_cfg is None:
            raise ValueError(f"dms_mode={dms_mode!r} needs a model built with a DMSConfig")
        if dms_mode == "train" and noise_key is None:
            raise ValueError("dms_mode='train' needs noise_key (Gumbel noise for the decisions)")
        b, t = tokens.shape
        if t > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds the context of {self.cfg.max_position_embeddings} tokens")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if valid is None:
            valid = jnp.ones((b, t), bool)
        noise_keys = jax.random.split(noise_key, self.cfg.num_layers) if dms_mode == "train" else [None] * len(
            self.layers)

        x = self.embed_tokens(tokens)
        decisions = []
        for layer, key in zip(self.layers, noise_keys):
            attention_fn = self._full_sequence_attention(positions, valid, dms_mode, key)
            if remat:
                x, dec = nnx.remat(lambda lyr, x_: lyr(x_, positions, attention_fn, dms_on))(layer, x)
            else:
                x, dec = layer(x, positions, attention_fn, dms_on)
            decisions.append(dec)
        aux = {"decisions": jnp.stack(decisions) if dms_on else None}
        return self.unembed(x).astype(jnp.float32), aux

    def _full_sequence_attention(self, positions, valid, dms_mode, noise_key):
        dcfg = self.dms_cfg

        def attention_fn(p: Projected):
            if dms_mode == "off":
                return attend(p.q, p.k, p.v, causal_bias(positions, positions, valid)), None
            # The decision for token j is computed at position j + 1 (one-token shift).
            # The last token's decision is not known yet: pad with a "keep" logit.
            owner_logits = dms.shift_to_owner(p.decision_logits, dms.KEEP_LOGIT)
            if dms_mode == "train":
                noise = dms.logistic_noise(noise_key, owner_logits.shape)
                # alpha_per="layer" copies head 0's *noisy* decision, as the reference does.
                z = dms.apply_alpha_per(dms.noisy_logits(owner_logits, noise, dcfg.tau), dcfg.alpha_per)
                _, decision = dms.gumbel_sigmoid(z, None, 1.0)
                log_keep = dms.soft_log_keep(z)
            else:
                decision = dms.hard_decisions(dms.apply_alpha_per(owner_logits, dcfg.alpha_per))
                log_keep = dms.hard_log_keep(decision)
            bias = dms.dms_attention_bias(log_keep, positions, positions, dcfg.window, valid)
            return attend(p.q, p.k, p.v, bias), decision

        return attention_fn


def init_dense_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32, dms: bool = False) -> dict:
    """A dense KV cache: k, v [L, B, S, Hkv, D]; per-slot absolute position and validity [B, S].

    With dms=True it also keeps, per slot, the hard decision *computed at* that slot ([L, B, Hkv, S]); the
    decision *for* a token is the one computed at the next slot (one-token shift). This cache masks evicted
    tokens exactly but does not free them: it is the simple reference, the paged cache frees the memory.
    """
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
             "pos": jnp.zeros((batch, length), jnp.int32), "valid": jnp.zeros((batch, length), bool)}
    if dms:
        cache["decision"] = jnp.zeros((cfg.num_layers, batch, cfg.num_kv_heads, length), jnp.float32)
    return cache


def forward_with_dense_cache(model: CausalLM, tokens, positions, valid, cache: dict, index):
    """Forward of T new tokens written into cache slots [index, index + T) (same slots for the whole batch).

    Queries attend to every valid cached slot whose position is not in their future, so left-padded batches of
    different lengths decode together. A cache made with dms=True applies hard DMS eviction (exactly the
    training forward's "hard" mode). Returns (logits [B, T, V] float32, updated cache).
    """
    dms_on = "decision" in cache
    pos_all = jax.lax.dynamic_update_slice(cache["pos"], positions.astype(jnp.int32), (0, index))
    valid_all = jax.lax.dynamic_update_slice(cache["valid"], valid, (0, index))
    bias = causal_bias(positions, pos_all, valid_all)
    x = model.embed_tokens(tokens)
    new = {"k": [], "v": [], "decision": []}
    for i, layer in enumerate(model.layers):
        def attention_fn(p: Projected, i=i):
            k_all = jax.lax.dynamic_update_slice(cache["k"][i], p.k.astype(cache["k"].dtype), (0, index, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"][i], p.v.astype(cache["v"].dtype), (0, index, 0, 0))
            layer_bias, dec_all = bias, None
            if dms_on:
                dcfg = model.dms_cfg
                computed = dms.hard_decisions(dms.apply_alpha_per(p.decision_logits, dcfg.alpha_per))
                dec_all = jax.lax.dynamic_update_slice(cache["decision"][i], computed, (0, 0, index))
                # Slots of a row are consecutive, so the decision for slot s was computed at slot s + 1;
                # a slot whose successor is not written yet (or is padding) is kept.
                owner = dms.shift_to_owner(dec_all * valid_all[:, None, :], 0.0)
                layer_bias = dms.dms_attention_bias(
                    dms.hard_log_keep(owner), positions, pos_all, dcfg.window, valid_all)
            out = attend(p.q, k_all.astype(p.q.dtype), v_all.astype(p.q.dtype), layer_bias)
            return out, (k_all, v_all, dec_all)

        x, (k_all, v_all, dec_all) = layer(x, positions, attention_fn, dms_on=dms_on)
        new["k"].append(k_all)
        new["v"].append(v_all)
        new["decision"].append(dec_all)
    out = {"k": jnp.stack(new["k"]), "v": jnp.stack(new["v"]), "pos": pos_all, "valid": valid_all}
    if dms_on:
        out["decision"] = jnp.stack(new["decision"])
    return model.unembed(x).astype(jnp.float32), out


def create_model(cfg: ModelConfig, dms_cfg: DMSConfig | None = None, *, seed: int = 0, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> CausalLM:
    return CausalLM(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, dms_cfg: DMSConfig | None = None, **kw) -> CausalLM:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no compute (used to load weights)."""
    return nnx.eval_shape(lambda: create_model(cfg, dms_cfg, **kw))


def param_count(model: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
