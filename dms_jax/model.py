"""Flax NNX decoder for the Llama / Qwen2 / Qwen3 families, with DMS in the attention.

Layout: activations are [batch, time, heads, head_dim]. One implementation; the config's flags select qkv bias
(Qwen2), q/k RMSNorm (Qwen3), tied embeddings and the RoPE variant.

The model runs in three DMS modes:
  "off"   teacher / vanilla: plain causal attention, the decision neuron is not touched;
  "train" noisy soft decisions (Gumbel-sigmoid, straight-through) and the additive log(1 - alpha) bias;
  "hard"  noise-free decisions (logit > 0) and exact delayed eviction: the reference the paged cache must match.
A model built with a DMCConfig instead (Dynamic Memory Compression, dmc.py) runs the same three modes with DMC's
merge decisions: "train" keeps every intermediate merged state and hides the overwritten ones by a soft bias,
"hard" equals the token-by-token merge cache (forward_with_dmc_cache; prefill_dmc_cache fills that cache from one
hard full-sequence pass).
The DMS / DMC math itself lives in dms.py / dmc.py as pure functions; this file only wires it in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dms_jax import dmc, dms
from dms_jax.config import DMCConfig, DMSConfig, ModelConfig

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
    return weighted_values(attention_probs(q, k, bias), v, q.dtype)


def attention_probs(q, k, bias):
    """Attention weights [B, Hkv, G, T, S] (float32) of the grouped query heads: head g of KV group h is query
    head h * G + g."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    return jax.nn.softmax(scores + bias[:, :, None], axis=-1)


def weighted_values(probs, v, dtype):
    """Attention output [B, T, Hq, D] in ``dtype`` from weights [B, Hkv, G, T, S] and values [B, S, Hkv, D]."""
    b, hkv, g, t, _ = probs.shape
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hkv * g, v.shape[-1]).astype(dtype)


def causal_bias(q_pos, k_pos, k_valid):
    """Additive bias [B, 1, T, S]: 0 where the key is valid and not in the future, MASK_VALUE elsewhere."""
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]
    return jnp.where(visible, 0.0, MASK_VALUE)[:, None].astype(jnp.float32)


@dataclasses.dataclass
class Projected:
    """Attention inputs of one layer after projections, norms and RoPE, plus the DMS decision logits."""

    q: jax.Array  # [B, T, Hq, D], RoPE applied, reused neuron zeroed when DMS / DMC is on
    k: jax.Array  # [B, T, Hkv, D], RoPE applied
    v: jax.Array  # [B, T, Hkv, D]
    decision_logits: jax.Array | None  # [B, Hkv, T] logits computed at each position (DMS: before the shift;
    #                                    DMC: merge logits of each token itself)
    importance: jax.Array | None = None  # DMC: [B, Hkv, T] importance weights omega
    k_unrotated: jax.Array | None = None  # DMC: [B, T, Hkv, D] keys before RoPE (element d-1 zeroed): what DMC
    #                                       averages; a merged state is rotated at its newest token's position


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dms_cfg: DMSConfig | None, *, dtype, param_dtype, rngs: nnx.Rngs,
                 dmc_cfg: DMCConfig | None = None):
        self.cfg, self.dms_cfg, self.dmc_cfg = cfg, dms_cfg, dmc_cfg
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

    def project(self, x_normed, x_residual, positions, dms_on: bool, neuron_scale=None) -> Projected:
        """q, k, v with RoPE for positions [B, T]; decision logits when DMS (or DMC) is on.

        x_residual is the residual stream before the layer's input norm (the adapter's input).
        neuron_scale (DMC stage one, compression off): multiplies element d-1 of every q and k head before and
        after RoPE, so the model learns to do without the neurons DMC is about to borrow.
        """
        cfg, dcfg = self.cfg, self.dms_cfg
        b, t, _ = x_normed.shape
        q = self.q_proj(x_normed).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x_normed).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x_normed).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.dmc_cfg is not None and (dms_on or neuron_scale is not None):
            return self._project_dmc(q, k, v, positions, dms_on, neuron_scale)
        logits = None
        use_neuron = dms_on and dcfg is not None and dcfg.variant == "neuron"
        if dms_on and dcfg is not None:
            if use_neuron:
                logits = dms.neuron_decision_logits(q, cfg.num_kv_heads, dcfg.alpha_scale, dcfg.alpha_offset)
                # The borrowed neuron must not also act as a query feature.
                q = dms.zero_reused_neuron(q, cfg.num_kv_heads)
            else:
                logits = self.adapter_logits(x_residual)
            logits = logits.astype(jnp.float32)
        cos, sin = rope_cos_sin(cfg, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if use_neuron:
            # Rotate-half RoPE moves the zeroed element's partner into d-1: zero it again.
            q = dms.zero_reused_neuron(q, cfg.num_kv_heads)
        return Projected(q, k, v, logits)

    def adapter_logits(self, x_residual):
        """Decision logits [B, Hkv, T] of the adapter variant, computed at each position (before the shift)."""
        proj = self.dms_proj_alpha(self.dms_proj_alpha_norm(x_residual))
        return dms.adapter_decision_logits(proj, self.dms_cfg.alpha_scale, self.dms_cfg.alpha_offset)

    def _project_dmc(self, q, k, v, positions, dmc_on: bool, neuron_scale):
        """DMC on: merge logits from k[..., d-1] and importance from q[..., d-1] (read before RoPE), then element d-1
        of every q and k head zeroed before and after RoPE. DMC off (stage one): that element scaled by
        neuron_scale instead, no decisions."""
        cfg, ccfg = self.cfg, self.dmc_cfg
        logits = importance = None
        if dmc_on:
            neuron_scale = 0.0
            logits = dmc.merge_logits(k, ccfg.logit_offset, ccfg.logit_scale)
            importance = dmc.importance_weights(q, cfg.num_kv_heads, ccfg.logit_offset, ccfg.logit_scale)
        q, k = dmc.scale_borrowed_neurons(q, neuron_scale), dmc.scale_borrowed_neurons(k, neuron_scale)
        k_unrotated = k
        cos, sin = rope_cos_sin(cfg, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Rotate-half RoPE writes x[d/2-1] * sin into element d-1: scale it again.
        q, k = dmc.scale_borrowed_neurons(q, neuron_scale), dmc.scale_borrowed_neurons(k, neuron_scale)
        return Projected(q, k, v, logits, importance, k_unrotated if dmc_on else None)

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
    def __init__(self, cfg: ModelConfig, dms_cfg, *, dtype, param_dtype, rngs: nnx.Rngs, dmc_cfg=None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, names=("embed",))
        self.self_attn = Attention(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, dmc_cfg=dmc_cfg)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, names=("embed",))
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, attention_fn, dms_on: bool, neuron_scale=None):
        """attention_fn(Projected) -> ([B, T, Hq, D] attention output, aux); lets callers own the keys (cache)."""
        p = self.self_attn.project(self.input_layernorm(x), x, positions, dms_on, neuron_scale)
        attn, aux = attention_fn(p)
        x = x + self.self_attn.output(attn)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, aux


class CausalLM(nnx.Module):
    """Decoder-only LM. `dtype` is the compute dtype (bf16 for training), `param_dtype` the master weights'."""

    def __init__(self, cfg: ModelConfig, dms_cfg: DMSConfig | None = None, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs, dmc_cfg: DMCConfig | None = None):
        if dms_cfg is not None and dmc_cfg is not None:
            raise ValueError("a model compresses its cache with DMS or with DMC, not both: pass one config")
        self.cfg, self.dms_cfg, self.dmc_cfg = cfg, dms_cfg, dmc_cfg
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=_sharded(nnx.initializers.normal(0.02), ("vocab", "embed")))
        self.layers = nnx.List([
            DecoderLayer(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs, dmc_cfg=dmc_cfg)
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
                 remat: bool = False, borrowed_neuron_scale=None):
        """Full-sequence forward (teacher, training or hard-eviction reference).

        tokens, positions, valid: [B, T]; positions default to 0..T-1; valid marks real (non-padding) tokens.
        Returns (logits [B, T, V] float32, aux) where aux["decisions"] is [L, B, Hkv, T] (after the one-token shift:
        the decision *for* each token; straight-through in "train" mode, 0/1 in "hard" mode) or None when off.
        On a DMC model dms_mode selects DMC and aux["decisions"] are the merge decisions of each token itself
        (1 = merged into the previous slot; 0 at every segment start). borrowed_neuron_scale (DMC model, "off"
        only): DMC's first stage, the borrowed q/k neurons multiplied by this (possibly traced) scalar.
        """
        if dms_mode not in DMS_MODES:
            raise ValueError(f"dms_mode must be one of {DMS_MODES}, got {dms_mode!r}")
        dms_on = dms_mode != "off"
        if dms_on and self.dms_cfg is None and self.dmc_cfg is None:
            raise ValueError(f"dms_mode={dms_mode!r} needs a model built with a DMSConfig (or a DMCConfig)")
        if borrowed_neuron_scale is not None and (dms_on or self.dmc_cfg is None):
            raise ValueError("borrowed_neuron_scale is DMC's first stage: it needs a DMC model and dms_mode='off'")
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
                # jax.checkpoint over the layer's split state, not nnx.remat: with a frozen base (adapter-only
                # training) the layer holds Params of the outer jit trace, which nnx.remat would try to write back
                # from the inner one (TraceContextError).
                layer_def, layer_state = nnx.split(layer)

                def run(state, x_, attention_fn=attention_fn, layer_def=layer_def):
                    return nnx.merge(layer_def, state)(x_, positions, attention_fn, dms_on, borrowed_neuron_scale)

                x, dec = jax.checkpoint(run)(layer_state, x)
            else:
                x, dec = layer(x, positions, attention_fn, dms_on, borrowed_neuron_scale)
            decisions.append(dec)
        aux = {"decisions": jnp.stack(decisions) if dms_on else None}
        return self.unembed(x).astype(jnp.float32), aux

    def _full_sequence_attention(self, positions, valid, dms_mode, noise_key):
        dcfg = self.dms_cfg
        if self.dmc_cfg is not None and dms_mode != "off":
            return self._full_sequence_dmc_attention(positions, valid, dms_mode, noise_key)

        def attention_fn(p: Projected):
            if dms_mode == "off":
                return attend(p.q, p.k, p.v, causal_bias(positions, positions, valid)), None
            # The decision for token j is computed at position j + 1 (one-token shift). The last real token's
            # decision is not known yet, and a pad never lends its logit to a real token: "keep" there.
            owner_logits = dms.owner_logits(p.decision_logits, valid)
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

    def _full_sequence_dmc_attention(self, positions, valid, dms_mode, noise_key):
        starts = dmc.segment_starts(valid)  # the first token (and padding) can only append

        def attention_fn(p: Projected):
            out, decision, _, _ = _dmc_sequence_attention(self.cfg, self.dmc_cfg, p, positions, valid, starts,
                                                          dms_mode, noise_key)
            return out, decision

        return attention_fn


def _dmc_sequence_attention(cfg: ModelConfig, ccfg: DMCConfig, p: Projected, positions, valid, starts, dms_mode,
                            noise_key):
    """DMC attention of a whole sequence ("train" or "hard"): (output [B, T, Hq, D], decisions [B, Hkv, T],
    k_states [B, T, Hkv, D] (RoPE applied), v_states [B, T, Hkv, D]) -- every intermediate merged state."""
    if dms_mode == "train":
        noise = dms.logistic_noise(noise_key, p.decision_logits.shape)
        z = dmc.force_append(dms.noisy_logits(p.decision_logits, noise, ccfg.tau), starts, dms.KEEP_LOGIT)
        alpha, decision = dms.gumbel_sigmoid(z, None, 1.0)
        log_keep = dms.soft_log_keep(z)  # log(1 - alpha_t)
    else:
        decision = dmc.force_append(dms.hard_decisions(p.decision_logits), starts, 0.0)
        alpha = decision
        log_keep = dms.hard_log_keep(decision)
    # Every intermediate state, then RoPE at each state's own (newest token's) position.
    k_states = dmc.accumulate(p.k_unrotated, alpha, p.importance, ccfg.accumulation_window)
    v_states = dmc.accumulate(p.v, alpha, p.importance, ccfg.accumulation_window)
    cos, sin = rope_cos_sin(cfg, positions)
    k_states = dmc.scale_borrowed_neurons(apply_rope(k_states, cos, sin), 0.0)
    # State j survives for later queries iff token j + 1 does not merge into it: shift log(1 - alpha).
    bias = dmc.attention_bias(dms.shift_to_owner(log_keep, 0.0), positions, positions, valid)
    return attend(p.q, k_states, v_states, bias), decision, k_states, v_states


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
    if dms_on and model.dms_cfg is None:
        raise ValueError("a DMS dense cache needs a model built with a DMSConfig (DMC: forward_with_dmc_cache)")
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


def init_dmc_cache(cfg: ModelConfig, dmc_cfg: DMCConfig, batch: int, max_slots: int, dtype=jnp.float32) -> dict:
    """A dense DMC cache: per (layer, sequence, KV head) up to max_slots slots and the accumulation window.

    k, v [L, B, Hkv, S, D]: slot keys (RoPE applied at the newest merged token's position) and values;
    n_slots [L, B, Hkv]; win_k, win_v [L, B, Hkv, W, D], win_w [L, B, Hkv, W], seg_len [L, B, Hkv]: the last W
    tokens' pre-RoPE keys, values and importance, and how many of them the last slot averages (dmc.window_update);
    n_seen [B]: valid tokens seen so far (the first one always appends). Heads fill at different rates; size
    max_slots for the worst case (no merge at all). This is the simple reference the paged engine must match.
    """
    nl, hkv, d, w = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dmc_cfg.accumulation_window
    slots, window = (nl, batch, hkv, max_slots, d), (nl, batch, hkv, w, d)
    return {"k": jnp.zeros(slots, dtype), "v": jnp.zeros(slots, dtype),
            "n_slots": jnp.zeros((nl, batch, hkv), jnp.int32),
            "win_k": jnp.zeros(window, dtype), "win_v": jnp.zeros(window, dtype),
            "win_w": jnp.ones((nl, batch, hkv, w), jnp.float32), "seg_len": jnp.zeros((nl, batch, hkv), jnp.int32),
            "n_seen": jnp.zeros((batch,), jnp.int32)}


def dmc_decode_step(model: CausalLM, tokens, positions, valid, cache: dict):
    """One token per sequence through a DMC model with hard decisions: tokens, positions, valid [B].

    Per layer and KV head the token's key/value either appends a slot or is merged into the last slot by the
    importance-weighted mean (dmc.window_update, dmc.slot_write); the query then attends to the head's slots.
    An invalid token (padding) leaves its row's cache unchanged. Returns (logits [B, V] float32, cache).
    """
    ccfg = model.dmc_cfg
    if ccfg is None:
        raise ValueError("dmc_decode_step needs a model built with a DMCConfig")
    first = cache["n_seen"] == 0
    pos = positions.astype(jnp.int32)[:, None]
    x = model.embed_tokens(tokens[:, None])
    keys = ("k", "v", "n_slots", "win_k", "win_v", "win_w", "seg_len")
    new = {k: [] for k in keys}
    for i, layer in enumerate(model.layers):
        def attention_fn(p: Projected, i=i):
            merge = (dms.hard_decisions(p.decision_logits[..., 0]) > 0.5) & ~first[:, None]  # [B, Hkv]
            win_k, win_v, win_w, seg_len, state_k, state_v = dmc.window_update(
                cache["win_k"][i], cache["win_v"][i], cache["win_w"][i], cache["seg_len"][i], cache["n_seen"],
                p.k_unrotated[:, 0], p.v[:, 0], p.importance[..., 0], merge, valid)
            cos, sin = rope_cos_sin(model.cfg, pos)
            state_k = dmc.scale_borrowed_neurons(apply_rope(state_k[:, None], cos, sin), 0.0)[:, 0]
            slots_k, slots_v, n_slots = dmc.slot_write(cache["k"][i], cache["v"][i], cache["n_slots"][i],
                                                       state_k, state_v, merge, valid)
            live = jnp.arange(slots_k.shape[2])[None, None, :] < n_slots[..., None]  # [B, Hkv, S]
            bias = jnp.where(live, 0.0, MASK_VALUE)[:, :, None, :].astype(jnp.float32)
            out = attend(p.q, jnp.swapaxes(slots_k, 1, 2).astype(p.q.dtype),
                         jnp.swapaxes(slots_v, 1, 2).astype(p.q.dtype), bias)
            return out, (slots_k, slots_v, n_slots, win_k, win_v, win_w, seg_len)

        x, layer_cache = layer(x, pos, attention_fn, dms_on=True)
        for k, val in zip(keys, layer_cache):
            new[k].append(val)
    out = {k: jnp.stack(v) for k, v in new.items()}
    out["n_seen"] = cache["n_seen"] + valid.astype(jnp.int32)
    return model.unembed(x)[:, 0].astype(jnp.float32), out


def forward_with_dmc_cache(model: CausalLM, tokens, positions, valid, cache: dict):
    """T tokens per sequence fed one at a time through dmc_decode_step (a scan over time): prefill and decode are
    the same loop. tokens, positions, valid [B, T]. Returns (logits [B, T, V] float32, cache)."""
    def step(c, xs):
        tok, pos, val = xs
        logits, c = dmc_decode_step(model, tok, pos, val, c)
        return c, logits

    cache, logits = jax.lax.scan(step, cache, (tokens.T, positions.T, valid.T))
    return jnp.swapaxes(logits, 0, 1), cache


def prefill_dmc_cache(model: CausalLM, tokens, positions, valid, max_slots: int, dtype=jnp.float32,
                      all_logits: bool = False):
    """A prompt into a fresh DMC cache in one parallel pass instead of T decode steps: (logits, cache).

    The hard-mode full-sequence forward (every intermediate merged state, hidden by the bias as in training)
    gives the logits; per layer and KV head, the state that ends each segment (the next valid token appends)
    is the slot the token-by-token cache holds, so scattering those states to their slot index (appended tokens
    so far - 1) and the last W valid tokens into the accumulation ring builds the cache forward_with_dmc_cache
    would build from the same tokens (tests/test_dmc.py checks both against each other). tokens, positions,
    valid [B, T] (left or right padding); max_slots >= T. Logits: the last position's [B, V] float32, or all
    positions' [B, T, V] with all_logits=True.
    """
    cfg, ccfg = model.cfg, model.dmc_cfg
    if ccfg is None:
        raise ValueError("prefill_dmc_cache needs a model built with a DMCConfig")
    b, t = tokens.shape
    if max_slots < t:
        raise ValueError(f"max_slots ({max_slots}) must be >= the prompt width ({t}): every token may append")
    hkv, d, w = cfg.num_kv_heads, cfg.head_dim, ccfg.accumulation_window
    v_b = valid.astype(bool)
    starts = dmc.segment_starts(v_b)
    n_seen = jnp.sum(v_b, axis=-1, dtype=jnp.int32)
    valid_index = jnp.cumsum(v_b, axis=-1, dtype=jnp.int32) - 1  # [B, T]: index among the row's valid tokens
    # The ring keeps the last W valid tokens at (valid index % W); older ones and padding go nowhere (index W).
    ring = jnp.where(v_b & (valid_index >= n_seen[:, None] - w), valid_index % w, w)
    ring = jnp.broadcast_to(ring[:, None, :], (b, hkv, t))
    bi, hi = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]
    tokens_valid = v_b[:, None, :]  # [B, 1, T]

    def to_heads(x):  # [B, T, H, D] -> [B, H, T, D] in the cache dtype
        return jnp.swapaxes(x, 1, 2).astype(dtype)

    x = model.embed_tokens(tokens)
    keys = ("k", "v", "n_slots", "win_k", "win_v", "win_w", "seg_len")
    new = {k: [] for k in keys}
    for layer in model.layers:
        def attention_fn(p: Projected):
            out, decision, k_states, v_states = _dmc_sequence_attention(cfg, ccfg, p, positions, v_b, starts, "hard",
                                                                        None)
            appended = tokens_valid & (decision < 0.5)  # [B, Hkv, T]
            slot = jnp.cumsum(appended, axis=-1, dtype=jnp.int32) - 1  # the slot each valid token belongs to
            n_slots = jnp.sum(appended, axis=-1, dtype=jnp.int32)
            # A state is kept iff the next token does not merge into it (padding and the sequence end append).
            seg_end = tokens_valid & (dms.shift_to_owner(decision, 0.0) < 0.5)
            target = jnp.where(seg_end, slot, max_slots)
            slots_k = jnp.zeros((b, hkv, max_slots, d), dtype).at[bi, hi, target].set(to_heads(k_states), mode="drop")
            slots_v = jnp.zeros((b, hkv, max_slots, d), dtype).at[bi, hi, target].set(to_heads(v_states), mode="drop")
            win_k = jnp.zeros((b, hkv, w, d), dtype).at[bi, hi, ring].set(to_heads(p.k_unrotated), mode="drop")
            win_v = jnp.zeros((b, hkv, w, d), dtype).at[bi, hi, ring].set(to_heads(p.v), mode="drop")
            win_w = jnp.ones((b, hkv, w), jnp.float32).at[bi, hi, ring].set(p.importance, mode="drop")
            # Tokens averaged into the last slot (at most W of them).
            in_last = tokens_valid & (slot == n_slots[..., None] - 1)
            seg_len = jnp.minimum(jnp.sum(in_last, axis=-1, dtype=jnp.int32), w)
            return out, (slots_k, slots_v, n_slots, win_k, win_v, win_w, seg_len)

        x, layer_cache = layer(x, positions, attention_fn, dms_on=True)
        for k, val in zip(keys, layer_cache):
            new[k].append(val)
    cache = {k: jnp.stack(v) for k, v in new.items()}
    cache["n_seen"] = n_seen
    logits = model.unembed(x if all_logits else x[:, -1:]).astype(jnp.float32)
    return (logits if all_logits else logits[:, 0]), cache


def create_model(cfg: ModelConfig, dms_cfg: DMSConfig | None = None, *, seed: int = 0, dtype=jnp.float32,
                 param_dtype=jnp.float32, dmc_cfg: DMCConfig | None = None) -> CausalLM:
    return CausalLM(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed), dmc_cfg=dmc_cfg)


def abstract_model(cfg: ModelConfig, dms_cfg: DMSConfig | None = None, **kw) -> CausalLM:
    """The model's structure with ShapeDtypeStruct leaves: no memory, no compute (used to load weights)."""
    return nnx.eval_shape(lambda: create_model(cfg, dms_cfg, **kw))


def param_count(model: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
