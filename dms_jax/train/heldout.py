"""Held-out evaluation of a retrofit: KL to the teacher, perplexities and KV statistics with hard decisions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import dmc, dms
from dms_jax.model import CausalLM
from dms_jax.train.losses import next_token_nll, token_kl

__all__ = ["evaluate_heldout"]


@jax.jit
def _eval_batch(graphdef, student_state, teacher_state, tokens, valid):
    student = nnx.merge(graphdef, student_state)
    teacher = nnx.merge(graphdef, teacher_state)
    t_logits, _ = teacher(tokens, valid=valid, dms_mode="off")
    s_logits, aux = student(tokens, valid=valid, dms_mode="hard")
    w = valid.astype(jnp.float32)
    kl_sum = jnp.sum(token_kl(s_logits, t_logits) * w)
    nll_s, n = next_token_nll(s_logits, tokens, valid)
    nll_t, _ = next_token_nll(t_logits, tokens, valid)
    return kl_sum, jnp.sum(w), nll_s, nll_t, n, aux["decisions"]


def evaluate_heldout(model: CausalLM, teacher_state, tokens: np.ndarray, valid: np.ndarray, window: int | None,
                     batch_size: int = 4) -> dict:
    """Held-out KL(student || teacher), perplexities, and KV statistics with hard (inference) decisions.

    Statistics (dms.kv_stats, summed over layers, heads and sequences):
      compression: all (token, layer, KV head) entries / live ones at the end of each sequence -- the whole-cache
        figure that the engine and the evaluation report for every method;
      compression_outside_window: secondary, only the tokens older than the window / how many of them are kept.
    A DMC model (window unused, may be None) counts slots instead (dmc.kv_stats): both ratios are tokens / slots.
    """
    graphdef, state = nnx.split(model)
    kl, n_kl, nll_s, nll_t, n_tok = 0.0, 0.0, 0.0, 0.0, 0.0
    stats = {"n_tokens": 0.0, "n_live": 0.0, "n_old": 0.0, "n_old_kept": 0.0}
    for i in range(0, len(tokens), batch_size):
        tb, vb = jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(valid[i:i + batch_size])
        a, b, c, d, e, decisions = _eval_batch(graphdef, state, teacher_state, tb, vb)
        kl, n_kl, nll_s, nll_t, n_tok = kl + float(a), n_kl + float(b), nll_s + float(c), nll_t + float(d), n_tok + float(e)
        s = dmc.kv_stats(decisions, vb) if model.dmc_cfg is not None else dms.kv_stats(decisions, vb, window)
        for k in stats:
            stats[k] += float(jnp.sum(s[k]))
    return {
        "kl_heldout": kl / max(n_kl, 1),
        "ppl_heldout": float(np.exp(nll_s / max(n_tok, 1))),
        "ppl_vanilla": float(np.exp(nll_t / max(n_tok, 1))),
        "compression": stats["n_tokens"] / max(stats["n_live"], 1.0),
        "compression_outside_window": stats["n_old"] / max(stats["n_old_kept"], 1.0),
        "eval_tokens": int(n_tok),
        **{k: int(v) for k, v in stats.items()},
    }
