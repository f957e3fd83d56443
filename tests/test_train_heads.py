"""Per-head marking damage (dms_jax.train.heads) against a plain numpy Llama forward written for this test, with
per-(layer, KV head) visibility masks; head choice and labels against numpy. Tolerance: KL values relative 1e-3
(float32 forwards of a 2-layer model; the KLs are ~1e-2)."""

from __future__ import annotations

import numpy as np
import pytest

from dms_jax.config import DMSConfig
from dms_jax.train import heads


def _np_forward(sd: dict, cfg, tokens: np.ndarray, hidden: dict) -> np.ndarray:
    """Logits [T, V] of a Llama state dict for one row; ``hidden[(layer, kv_head)]`` = key positions that kv head
    cannot see beyond its window (a [T, T] bool mask of (query, key) pairs)."""
    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

    t, d, hq, hkv = len(tokens), cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [T, H, D]
        rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    x = sd["model.embed_tokens.weight"][tokens].astype(np.float64)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).reshape(t, hq, d))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).reshape(t, hkv, d))
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).reshape(t, hkv, d)
        out = np.zeros((t, hq, d))
        for head in range(hq):
            g = head // (hq // hkv)
            s = q[:, head] @ k[:, g].T / np.sqrt(d)
            blocked = np.triu(np.ones((t, t), bool), 1) | hidden.get((i, g), np.zeros((t, t), bool))
            s = np.where(blocked, -np.inf, s)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(t, -1) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = h @ sd[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    head_w = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms(x, sd["model.norm.weight"]) @ head_w.T


def _np_kl(student, teacher, weight):
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    ls, lt = log_softmax(student), log_softmax(teacher)
    kl = (np.exp(ls) * (ls - lt)).sum(-1)
    return (kl * weight).sum() / weight.sum()


def test_marked_head_damage_matches_numpy(tiny_hf_model):
    from dms_jax import weights

    hf = tiny_hf_model("llama")
    model = weights.from_transformers(hf, DMSConfig(variant="adapter", window=3))
    cfg = model.cfg
    sd = {k: v.detach().double().numpy() for k, v in hf.state_dict().items()}
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 14))
    valid = np.ones(tokens.shape, bool)
    weight = rng.uniform(0.5, 2.0, size=tokens.shape).astype(np.float32)
    window, sink = 3, 2
    damage = heads.marked_head_damage(model, tokens, valid, window, sink=sink, loss_weight=weight, batch_size=2)
    t = tokens.shape[1]
    qi, kj = np.arange(t)[:, None], np.arange(t)[None, :]
    # Key j (sink <= j <= T-2: the last token has no decision yet) is hidden from queries more than `window` later.
    hidden_mask = (qi - kj > window) & (kj >= sink) & (kj <= t - 2)
    for layer in range(cfg.num_layers):
        for head in range(cfg.num_kv_heads):
            # One batch of both rows: the weighted mean pools their tokens.
            student = np.concatenate([_np_forward(sd, cfg, row, {(layer, head): hidden_mask}) for row in tokens])
            teacher = np.concatenate([_np_forward(sd, cfg, row, {}) for row in tokens])
            np.testing.assert_allclose(damage[layer, head], _np_kl(student, teacher, weight.reshape(-1)), rtol=1e-3)
    assert damage.max() > 1e-4  # the masks do hide something
    wide = heads.marked_head_damage(model, tokens, valid, window=t, sink=sink)
    np.testing.assert_allclose(wide, 0.0, atol=1e-6)


def test_heads_to_keep_and_labels():
    damage = np.array([[0.1, 0.5], [0.3, 0.05], [0.2, 0.4]])
    keep = heads.heads_to_keep(damage, 3)
    np.testing.assert_array_equal(keep, [[False, True], [True, False], [False, True]])
    with pytest.raises(ValueError, match="keep"):
        heads.heads_to_keep(damage, 7)
    valid = np.array([[True] * 6, [True] * 4 + [False] * 2])
    labels, mask = heads.head_labels(keep, valid, sink=2)
    labels, mask = np.asarray(labels), np.asarray(mask)
    assert labels.shape == mask.shape == (3, 2, 2, 6)
    decided = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], bool)  # the last real token has no decision
    for l in range(3):
        for h in range(2):
            np.testing.assert_array_equal(mask[l, :, h], decided)
            want = decided & (np.arange(6) >= 2) & (not keep[l, h])
            np.testing.assert_array_equal(labels[l, :, h] > 0.5, want)
