"""Plain generation with a dense KV cache: batched prompts of different lengths, greedy or sampled, jit-compiled.
The reference the paged engine (engine.py) is tested against, token for token; sampling is sampling.py's.

Prompts are left-padded to a common length so that every sequence writes its next token into the same cache
slot; positions are counted per sequence, so padding changes nothing in the result.

generate_dmc does the same for a DMC model with hard merge decisions: the prompt goes into the dense DMC merge
cache in one parallel pass (model.prefill_dmc_cache), new tokens through model.dmc_decode_step, and it also
returns the cache statistics (slots per head against tokens seen).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax.model import (CausalLM, dmc_decode_step, forward_with_dense_cache, init_dense_cache, init_dmc_cache,
                           prefill_dmc_cache)
from dms_jax.serve.sampling import SamplingConfig, sample_next


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, pad_to_multiple: int = 1):
    """tokens, positions, valid [B, P] for left-padded prompts; P is rounded up to a multiple of pad_to_multiple."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    width = -(-max(len(p) for p in prompts) // pad_to_multiple) * pad_to_multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        valid[i, width - len(p):] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, valid


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "cache_dtype", "dms"))
def _generate(graphdef, state, tokens, positions, valid, stop_ids, key, *, max_new_tokens, sampling, cache_dtype,
              dms):
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    cache = init_dense_cache(model.cfg, b, p + max_new_tokens, cache_dtype, dms=dms)
    logits, cache = forward_with_dense_cache(model, tokens, positions, valid, cache, 0)
    next_pos = positions[:, -1] + 1

    def feed(tok, step, fed, cache):  # a finished row is fed too (its stop id; the result is never used)
        logits, cache = forward_with_dense_cache(
            model, tok[:, None], (next_pos + step)[:, None], jnp.ones((b, 1), bool), cache, p + step)
        return logits[:, -1], cache

    out, lengths, _ = _sample_loop(logits[:, -1], cache, feed, stop_ids, key, max_new_tokens=max_new_tokens,
                                   sampling=sampling)
    return out, lengths


def _sample_loop(first_logits, cache, feed, stop_ids, key, *, max_new_tokens, sampling):
    """The decode loop of the dense generators (``_generate``, ``_generate_dmc``), a ``lax.while_loop``: sample the
    next token of every row from the last logits, then ``feed(tok, step, fed, cache) -> (logits [B, V], cache)``
    (``fed`` [B]: the rows still generating), until every row has emitted a stop id or ``max_new_tokens`` are
    out. Returns (tokens [B, max_new_tokens], lengths [B] (the stop id included), cache)."""
    b = first_logits.shape[0]

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, last_logits, cache, done, lengths, out, key = carry
        key, sub = jax.random.split(key)
        tok = sample_next(last_logits, sub, sampling)
        tok = jnp.where(done, stop_ids[0], tok)  # finished rows keep emitting a stop id, never counted
        out = out.at[:, step].set(tok)
        fed = ~done
        lengths = lengths + fed.astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
        logits, cache = feed(tok, step, fed, cache)
        return step + 1, logits, cache, done, lengths, out, key

    carry = (jnp.int32(0), first_logits, cache, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
             jnp.zeros((b, max_new_tokens), jnp.int32), key)
    _, _, cache, _, lengths, out, _ = jax.lax.while_loop(cond, body, carry)
    return out, lengths, cache


def generate(model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] | None = None, seed: int = 0,
             cache_dtype=None, dms: bool = False, pad_to_multiple: int = 64) -> list[list[int]]:
    """Generates continuations for a batch of token-id prompts of any lengths.

    stop_ids: generation of a row ends after it emits one of these (the stop token is included in the output);
    defaults to the model's EOS ids. dms: apply the model's hard DMS eviction (masked in a dense cache; the
    paged engine is what frees the memory). Returns one list of new token ids per prompt.
    pad_to_multiple: the padded prompt width is rounded up to this multiple, so that prompts of similar lengths
    share one compiled decode loop (left padding does not change the result).
    """
    if dms and model.dms_cfg is None:
        raise ValueError("dms=True needs a model with a DMSConfig")
    tokens, positions, valid, stop = _prepare(model, prompts, max_new_tokens, sampling, stop_ids, pad_to_multiple)
    graphdef, state = nnx.split(model)
    out, lengths = _generate(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid),
        jnp.asarray(stop, jnp.int32), jax.random.key(seed), max_new_tokens=max_new_tokens, sampling=sampling,
        cache_dtype=cache_dtype or model.dtype, dms=dms)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, : lengths[i]].tolist() for i in range(len(prompts))]


def _prepare(model: CausalLM, prompts, max_new_tokens: int, sampling: SamplingConfig, stop_ids, pad_to_multiple: int):
    """Checks a generation request; returns the left-padded (tokens, positions, valid) and the stop ids."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.cfg.vocab_size
    if sampling.top_k > vocab:
        raise ValueError(f"top_k={sampling.top_k} exceeds the vocabulary size {vocab}")
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
    context = model.cfg.max_position_embeddings
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > context:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context of "
            f"{context} tokens")
    stop = list(model.cfg.eos_token_ids if stop_ids is None else stop_ids) or [-1]
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else stop[0]
    tokens, positions, valid = left_pad(prompts, max(pad, 0), pad_to_multiple)
    return tokens, positions, valid, stop


DMC_PREFILLS = ("parallel", "scan")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "cache_dtype", "prefill"))
def _generate_dmc(graphdef, state, tokens, positions, valid, stop_ids, key, *, max_new_tokens, sampling, cache_dtype,
                  prefill):
    model = nnx.merge(graphdef, state)
    b, p = tokens.shape
    max_slots = p + max_new_tokens  # the worst case: no token merges
    if prefill == "parallel":
        logits, cache = prefill_dmc_cache(model, tokens, positions, valid, max_slots, cache_dtype)
    else:  # token by token (the reference the parallel prefill must equal)
        def prefill_step(carry, xs):
            c, last = carry
            tok, pos, val = xs
            step_logits, c = dmc_decode_step(model, tok, pos, val, c)
            return (c, jnp.where(val[:, None], step_logits, last)), None

        carry = (init_dmc_cache(model.cfg, model.dmc_cfg, b, max_slots, cache_dtype),
                 jnp.zeros((b, model.cfg.vocab_size), jnp.float32))
        (cache, logits), _ = jax.lax.scan(prefill_step, carry, (tokens.T, positions.T, valid.T))
    next_pos = positions[:, -1] + 1

    def feed(tok, step, fed, cache):  # a finished row's cache stops changing (its statistics count what it generated)
        return dmc_decode_step(model, tok, next_pos + step, fed, cache)

    out, lengths, cache = _sample_loop(logits, cache, feed, stop_ids, key, max_new_tokens=max_new_tokens,
                                       sampling=sampling)
    return out, lengths, cache["n_slots"], cache["n_seen"]


def generate_dmc(model: CausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), stop_ids: Sequence[int] | None = None, seed: int = 0,
                 cache_dtype=None, pad_to_multiple: int = 64, prefill: str = "parallel"):
    """Generates with a DMC model's hard merge decisions through its merge cache: (tokens, stats).

    Arguments as in generate. prefill="parallel" puts the prompt into the cache in one full-sequence pass
    (model.prefill_dmc_cache), "scan" token by token through dmc_decode_step (slower; the same cache and logits
    up to float round-off). Every emitted token, the stop token included, goes into the cache. stats, numpy
    arrays per prompt: "tokens_seen" [B] (prompt + emitted tokens), "slots" [B, L, Hkv] (slots per head at the
    end), "n_tokens" [B] (= L * Hkv * tokens_seen, what a dense cache would hold), "n_live" [B] (the slots) and
    "cache_ratio" [B] = n_tokens / n_live (the compression ratio; also dmc.kv_stats's keys).
    """
    if model.dmc_cfg is None:
        raise ValueError("generate_dmc needs a model built with a DMCConfig")
    if prefill not in DMC_PREFILLS:
        raise ValueError(f"prefill must be one of {DMC_PREFILLS}, got {prefill!r}")
    tokens, positions, valid, stop = _prepare(model, prompts, max_new_tokens, sampling, stop_ids, pad_to_multiple)
    graphdef, state = nnx.split(model)
    out, lengths, n_slots, n_seen = _generate_dmc(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid),
        jnp.asarray(stop, jnp.int32), jax.random.key(seed), max_new_tokens=max_new_tokens, sampling=sampling,
        cache_dtype=cache_dtype or model.dtype, prefill=prefill)
    out, lengths = np.asarray(out), np.asarray(lengths)
    slots = np.swapaxes(np.asarray(n_slots), 0, 1)  # [B, L, Hkv]
    seen = np.asarray(n_seen)
    n_tokens = seen * slots.shape[1] * slots.shape[2]
    n_live = slots.sum(axis=(1, 2))
    stats = {"tokens_seen": seen, "slots": slots, "n_tokens": n_tokens, "n_live": n_live,
             "cache_ratio": n_tokens / np.maximum(n_live, 1)}
    return [out[i, : lengths[i]].tolist() for i in range(len(prompts))], stats
