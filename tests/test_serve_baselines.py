"""dms_jax.serve.baselines: TOVA, H2O, StreamingLLM and Quest on the paged cache evict (or read) exactly what their
papers say, on hand-made attention patterns, and the engine keeps every head within the budget.

Policy-level tests drive the cache as the engine does (prefill chunks through ``prefill_plan`` + ``insert_chunk``,
decode steps through ``plan_decode`` + ``apply_decode_plan`` + ``observe_decode``) with hand-set random queries and
keys, and compare the live token set of every head, after every chunk and step, with a plain-Python reference of
the paper's rule (whose attention probabilities are computed in numpy). Keys are distinct random vectors, so the
position of the token in a slot is read back from the pages. Engine-level tests use a tiny random model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax.config import ModelConfig
from dms_jax.model import create_model
from dms_jax.serve import baselines as bl
from dms_jax.serve.engine import Engine
from dms_jax.serve.pages import compact_selected_pages, note_high_water, write_kv
from dms_jax.serve.plans import (apply_decode_plan, chunk_owner_decisions, insert_chunk, plan_decode,
                                 set_previous_decision)
from dms_jax.serve.registry import make_policy
from dms_jax.serve.spec import CacheSpec, check_invariants, init_cache
from pallas_kernels import paged_attention_blocked, paged_decode_attention

H, G, D, PS = 2, 2, 8, 4  # KV heads, query heads per KV head, head dim, page size


# ------------------------------------------------------------------------------------------ the harness


def _qkv(n, seed, sharp=2.5):
    """Hand-set queries [n, H, G, D], keys and values [n, H, D]: distinct random vectors (peaked attention)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, H, G, D)).astype(np.float32) * sharp
    k = rng.normal(size=(n, H, D)).astype(np.float32)
    v = rng.normal(size=(n, H, D)).astype(np.float32)
    return q, k, v


def _probs(q_t, keys):
    """Group-mean softmax probabilities of q_t [G, D] over keys [T, D] (the rule's GQA weights)."""
    s = q_t @ keys.T / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).mean(0)


def _spec(policy, context):
    return CacheSpec.create(num_layers=1, num_kv_heads=H, head_dim=D, max_seqs=1, max_context=context,
                            window=policy.delay_window, page_size=PS)


@functools.partial(jax.jit, static_argnames=("policy", "spec"))
def _prefill_chunk(cache, q, k, v, n_valid, *, policy, spec):
    """One prefill chunk of one sequence, one layer: q [C, H, G, D], k / v [C, H, D], as the engine books it."""
    c = k.shape[0]
    n = cache.num_tokens
    kk = jnp.arange(c)
    qvalid = kk < n_valid
    chunk_vis = (kk[:, None] >= kk[None, :]) & qvalid[None, :] & qvalid[:, None]
    chunk_vis = jnp.broadcast_to(chunk_vis, (1, H, c, c))
    positions = n[:, None] + kk[None, :]
    dec_at = policy.decisions(None, positions, H) & qvalid[None, None, :]
    nv = jnp.asarray([n_valid], jnp.int32)
    ring_dec = set_previous_decision(cache.ring_dec[0], n, dec_at[..., 0], nv > 0, spec.ring)
    dec_chunk = chunk_owner_decisions(dec_at, nv)
    pst = jax.tree.map(lambda a: a[0], cache.policy_state)
    plan, pst = policy.prefill_plan(
        pst, q=q.reshape(1, c, H * G, D), k=k[None], chunk_vis=chunk_vis, k_pages=cache.k_pages,
        block_tables=cache.block_tables[0], lengths=cache.lengths[0], ring_slot=cache.ring_slot[0],
        ring_dec=ring_dec, num_tokens=n, n_valid=nv, page_size=spec.page_size)
    (refcount, tables, lengths, ring_slot, ring_dec), (page, off), pre, overflow = insert_chunk(
        cache.refcount, cache.block_tables[0], cache.lengths[0], cache.ring_slot[0], ring_dec, n, nv, dec_chunk,
        jnp.ones((1,), bool), spec.page_size, plan=plan)
    k_pages, v_pages = write_kv(cache.k_pages, cache.v_pages, page, off, jnp.swapaxes(k[None], 1, 2),
                                jnp.swapaxes(v[None], 1, 2))
    cache = cache.replace(
        k_pages=k_pages, v_pages=v_pages, refcount=refcount, block_tables=tables[None], lengths=lengths[None],
        ring_slot=ring_slot[None], ring_dec=ring_dec[None], num_tokens=n + nv,
        policy_state=None if pst is None else jax.tree.map(lambda a: a[None], pst))
    return note_high_water(cache)


@functools.partial(jax.jit, static_argnames=("policy", "spec"))
def _decode_step(cache, q, k, v, *, policy, spec):
    """One decode token of one sequence, one layer (q [H, G, D], k / v [H, D]); returns (cache, attention output
    [H, G, D] of the kernel reference with the policy's page mask -- with a mask, stacked with the engine's CPU
    path: [2, H, G, D] --, the mask)."""
    active = jnp.ones((1,), bool)
    plan = plan_decode(cache, spec, active, policy)
    n = cache.num_tokens
    cache, page, off = apply_decode_plan(cache, spec, plan, active)
    k_pages, v_pages = write_kv(cache.k_pages, cache.v_pages, page[0], off[0], k[None], v[None])
    dec = policy.decisions(None, n[:, None], H)[..., 0]
    ring_dec = set_previous_decision(cache.ring_dec[0], n, dec, active, spec.ring)
    pst = None if cache.policy_state is None else jax.tree.map(lambda a: a[0], cache.policy_state)
    tables, lengths = cache.block_tables[0], cache.lengths[0]
    mask = policy.page_mask(q[None], tables, lengths, pst, page_size=spec.page_size)
    out = paged_decode_attention(q[None], k_pages, v_pages, tables, lengths, page_mask=mask, backend="xla")
    if mask is not None:  # the engine's CPU path: the blocked attention over the compacted selected pages
        blocked = paged_attention_blocked(q[None], k_pages, v_pages,
                                          *compact_selected_pages(tables, lengths, mask, spec.page_size))
        out = jnp.stack([out, blocked])
    pst = policy.observe_decode(pst, q=q[None], k_new=k[None], k_pages=k_pages, block_tables=tables,
                                lengths=lengths, target=plan.target[0], positions=n, active=active, page_mask=mask)
    cache = cache.replace(k_pages=k_pages, v_pages=v_pages, ring_dec=ring_dec[None],
                          policy_state=None if pst is None else jax.tree.map(lambda a: a[None], pst))
    return cache, (out[..., 0, :, :, :], mask)


@functools.partial(jax.jit, static_argnames=("policy", "spec"))
def _finish_prefill(cache, *, policy, spec):
    return policy.finish_prefill(cache, jnp.zeros((1,), jnp.int32), spec)


def _live(cache, k_all, h):
    """Sorted positions of the tokens in head h's live slots (matched by their keys)."""
    n = int(cache.lengths[0, 0, h])
    slots = np.arange(n)
    pages = np.asarray(cache.block_tables[0, 0, h])[slots // PS]
    keys = np.asarray(cache.k_pages)[pages, slots % PS]  # [n, D]
    pos = [int(np.nonzero((k_all[:, h] == row).all(-1))[0][0]) for row in keys]
    assert len(set(pos)) == n, "a token sits in two slots"
    return sorted(pos)


def _run(policy, q, k, v, prompt_len, chunk):
    """Prefill ``prompt_len`` tokens in chunks, then decode the rest one by one; yields (cache, t, attention out or
    None) after every chunk (t = its last position) and every decode step (t = the token's position)."""
    n = k.shape[0]
    spec = _spec(policy, n)
    cache = init_cache(spec, policy)
    for s in range(0, prompt_len, chunk):
        e = min(s + chunk, prompt_len)
        pad = chunk - (e - s)
        padded = [np.concatenate([a[s:e], np.zeros((pad,) + a.shape[1:], np.float32)]) for a in (q, k, v)]
        cache = _prefill_chunk(cache, *map(jnp.asarray, padded), jnp.int32(e - s), policy=policy, spec=spec)
        if e == prompt_len:  # the engine's call after the last chunk (TOVA reduces the whole prompt here)
            cache = _finish_prefill(cache, policy=policy, spec=spec)
        check_invariants(cache, spec)
        yield cache, e - 1, None
    for t in range(prompt_len, n):
        cache, out = _decode_step(cache, jnp.asarray(q[t]), jnp.asarray(k[t]), jnp.asarray(v[t]), policy=policy,
                                  spec=spec)
        check_invariants(cache, spec)
        yield cache, t, out


# ------------------------------------------------------------------------------------------ references


def _tova_reference(q, k, h, budget, prompt_len, chunk):
    """TOVA's rule in plain Python: the sets of kept positions after every chunk / step.

    Decode step t: the head holds ``budget`` tokens at most; when full, the token with the lowest probability under
    the previous query goes, then t is added (the paper: add t, attend, drop the argmin -- the same sets, with
    the drop of step t - 1 applied when t arrives). Prefill chunk: of the kept tokens and the chunk, keep the
    ``budget`` with the highest probabilities under the chunk's last query."""
    kept, prev, out = [], None, []
    for s in range(0, prompt_len, chunk):
        e = min(s + chunk, prompt_len)
        cand = kept + list(range(s, e))
        p = _probs(q[e - 1, h], k[cand, h])
        order = sorted(range(len(cand)), key=lambda i: (-p[i], i))[:budget]
        kept = sorted(cand[i] for i in order)
        prev = dict(zip(cand, p))
        out.append(list(kept))
    for t in range(prompt_len, k.shape[0]):
        if len(kept) >= budget:
            kept.remove(min(kept, key=lambda j: prev[j]))
        kept = sorted(kept + [t])
        prev = dict(zip(kept, _probs(q[t, h], k[kept, h])))
        out.append(list(kept))
    return out


def _h2o_reference(q, k, h, budget, recent, prompt_len, chunk):
    """H2O's rule in plain Python: accumulated probabilities (sum over every query so far); the recent window (the
    last ``recent`` positions) always stays; when full, the lowest accumulated score outside it goes."""
    kept, acc, out = [], {}, []
    for s in range(0, prompt_len, chunk):
        e = min(s + chunk, prompt_len)
        cand = kept + list(range(s, e))
        for j in range(s, e):
            acc[j] = 0.0
        for i in range(s, e):  # every chunk query i attends to the kept tokens and the chunk up to i
            seen = kept + list(range(s, i + 1))
            for j, pj in zip(seen, _probs(q[i, h], k[seen, h])):
                acc[j] += pj
        recent_set = [j for j in cand if j > e - 1 - recent]
        rest = sorted((j for j in cand if j not in recent_set), key=lambda j: (-acc[j], j))
        kept = sorted(recent_set + rest[:max(budget - len(recent_set), 0)])
        out.append(list(kept))
    for t in range(prompt_len, k.shape[0]):
        if len(kept) >= budget:
            kept.remove(min((j for j in kept if j <= t - recent), key=lambda j: acc[j]))
        kept = sorted(kept + [t])
        acc[t] = 0.0
        for j, pj in zip(kept, _probs(q[t, h], k[kept, h])):
            acc[j] += pj
        out.append(list(kept))
    return out


# ------------------------------------------------------------------------------------------ TOVA / H2O / Streaming


@pytest.mark.parametrize("prompt_len,chunk", [(6, 8), (21, 8), (21, 5)])
def test_tova_evicts_the_lowest_attention_token(prompt_len, chunk):
    budget, n = 7, 34
    q, k, v = _qkv(n, seed=prompt_len + chunk)
    policy = bl.TOVAPolicy(budget=budget, scope="group", prefill="chunk")  # the per-KV-group, per-chunk variant
    ref = [_tova_reference(q, k, h, budget, prompt_len, chunk) for h in range(H)]
    steps = list(_run(policy, q, k, v, prompt_len, chunk))
    assert len(steps) == len(ref[0])
    for i, (cache, t, _) in enumerate(steps):
        for h in range(H):
            assert _live(cache, k, h) == ref[h][i], (i, t, h)
        assert int(cache.lengths.max()) <= budget
    # A hand-made pattern: the next query ignores one token completely -> that token is the next victim.
    cache = steps[-1][0]
    live = _live(cache, k, 0)
    score = np.asarray(cache.policy_state["score"][0, 0, 0, :budget])
    pos = np.asarray(cache.policy_state["pos"][0, 0, 0, :budget])
    np.testing.assert_allclose(score.sum(), 1.0, rtol=1e-5)  # the last query's probabilities over the kept slots
    np.testing.assert_allclose(score, _probs(q[n - 1, 0], k[pos, 0]), rtol=1e-4, atol=1e-7)
    assert sorted(pos.tolist()) == live
    victims = np.asarray(policy.victims(jnp.full((1, 1, H), -1), cache.lengths, cache.policy_state,
                                        cache.num_tokens))
    assert pos[victims[0, 0, 0]] == live[int(np.argmin([dict(zip(pos, score))[j] for j in live]))]


def _layer_weights(q_t, keys):
    """TOVA's layer weights in numpy: q_t [H, G, D] over keys [T, H, D] -> [T], the softmax of every query head of
    the layer over the same tokens, averaged over all H * G heads."""
    per_head = []
    for h in range(q_t.shape[0]):
        for g in range(q_t.shape[1]):
            s = keys[:, h] @ q_t[h, g] / np.sqrt(D)
            e = np.exp(s - s.max())
            per_head.append(e / e.sum())
    return np.mean(per_head, axis=0)


def _tova_layer_reference(q, k, budget, prompt_len):
    """The paper's TOVA for one layer, by hand: the dense prompt, reduced once to the ``budget`` tokens with the
    highest layer weights under the last prompt query; then per decode token, the argmin of the previous query's
    weights leaves (when full) and the token joins. One kept set for all KV heads. Returns the sets after the
    prompt and after every decode step."""
    cand = list(range(prompt_len))
    p = _layer_weights(q[prompt_len - 1], k[cand])
    kept = sorted(sorted(cand, key=lambda j: (-p[j], j))[:budget])
    prev = dict(zip(cand, p))
    out = [list(kept)]
    for t in range(prompt_len, k.shape[0]):
        if len(kept) >= budget:
            kept.remove(min(kept, key=lambda j: (prev[j], j)))
        kept = sorted(kept + [t])
        prev = dict(zip(kept, _layer_weights(q[t], k[kept])))
        out.append(list(kept))
    return out


def _attend(q_t, k, v, toks):
    """Numpy attention of q_t [H, G, D] over the tokens ``toks`` of k / v [T, H, D] -> [H, G, D]."""
    s = np.einsum("hgd,thd->hgt", q_t, k[toks]) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hgt,thd->hgd", p / p.sum(-1, keepdims=True), v[toks])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tova_layer_scope_keeps_one_set_per_layer_and_reduces_the_whole_prompt(seed):
    budget, prompt_len, n = 7, 21, 33
    q, k, v = _qkv(n, seed=100 + seed)
    policy = bl.TOVAPolicy(budget=budget)
    assert (policy.scope, policy.prefill) == ("layer", "prompt")
    ref = _tova_layer_reference(q, k, budget, prompt_len)
    runs = {}
    for chunk in (prompt_len, 8, 5):  # unchunked, and two chunkings
        sets = []
        for cache, t, out in _run(policy, q, k, v, prompt_len, chunk):
            live = [_live(cache, k, h) for h in range(H)]
            assert all(x == live[0] for x in live), (chunk, t)  # the same kept set in every KV head
            if t < prompt_len - 1:  # before the prompt's end nothing leaves (the dense prompt)
                assert live[0] == list(range(t + 1)), (chunk, t)
                continue
            sets.append(live[0])
            assert int(cache.lengths.max()) <= budget
            if out is not None:  # the cache path's attention = attention over the reference's kept set
                np.testing.assert_allclose(np.asarray(out[0]), _attend(q[t], k, v, ref[len(sets) - 1]),
                                           rtol=1e-5, atol=1e-5)
        assert sets == ref, chunk
        runs[chunk] = sets
    assert runs[prompt_len] == runs[8] == runs[5]


def test_quest_dense_layers_read_every_page():
    budget, n_layers = 8, 4
    spec = CacheSpec.create(num_layers=n_layers, num_kv_heads=H, head_dim=D, max_seqs=1, max_context=40,
                            window=1, page_size=PS)
    policy = bl.QuestPolicy(budget=budget)  # dense_layers=2, the paper's
    assert policy.dense_layers == 2
    rng = np.random.default_rng(7)
    for length in (6, 17, 30):
        state = policy.init_state(spec)
        kmin = rng.normal(size=state["kmin"].shape).astype(np.float32)
        kmax = kmin + np.abs(rng.normal(size=kmin.shape)).astype(np.float32)
        state = dict(state, kmin=jnp.asarray(kmin), kmax=jnp.asarray(kmax))
        q = rng.normal(size=(1, H, G, D)).astype(np.float32)
        lengths = jnp.full((1, H), length, jnp.int32)
        tables = jnp.zeros((1, H, spec.max_pages_per_head), jnp.int32)
        n_pages = -(-length // PS)
        for l in range(n_layers):
            mask = np.asarray(policy.page_mask(jnp.asarray(q), tables, lengths,
                                               jax.tree.map(lambda a: a[l], state), page_size=PS))[0]
            for h in range(H):
                if l < 2:  # dense: every live page
                    want = list(range(n_pages))
                else:  # numpy bound: max over the group of sum_d max(q_d min_d, q_d max_d); top full pages + last
                    qh = q[0, h][:, None, :]
                    bound = np.maximum(qh * kmin[l, 0, h][None], qh * kmax[l, 0, h][None]).sum(-1).max(0)
                    top = np.argsort(-bound[:n_pages - 1], kind="stable")[:budget // PS]
                    want = sorted(top.tolist() + [n_pages - 1])
                assert np.nonzero(mask[h])[0].tolist() == want, (length, l, h)


def test_quest_dense_layers_in_the_engine(prompts):
    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(2,))
    model = create_model(cfg, None, seed=3)
    eng = Engine(model, "quest", budget=8, page_size=PS, prefill_chunk=8)
    spec = eng.make_spec(3, 48)
    cache = eng.new_cache(spec)
    _, cache, _, _ = eng.prefill(cache, spec, [0, 1, 2], prompts)
    _, cache, _ = eng.step(cache, spec, np.array([5, 6, 7]))
    reads = np.asarray(cache.policy_state["reads"])  # [L, S, H]
    for s, p in enumerate(prompts):
        f = len(p) + 1
        pages = -(-f // PS)
        assert (reads[:2, s] == f).all()  # layers 0 and 1: every token, no metadata
        assert (reads[2, s] == min(pages - 1, 8 // PS) * PS + f - (pages - 1) * PS + pages).all()
    # All layers dense: the same tokens as the dense cache.
    kw = dict(page_size=PS, prefill_chunk=8)
    ref = Engine(model, "vanilla", **kw).generate(prompts, max_new_tokens=5, stop_ids=[]).tokens()
    assert Engine(model, "quest", budget=4, dense_layers=3, **kw).generate(
        prompts, max_new_tokens=5, stop_ids=[]).tokens() == ref


@pytest.mark.parametrize("prompt_len,chunk,recent", [(5, 8, None), (19, 8, None), (19, 4, 2)])
def test_h2o_keeps_heavy_hitters_and_the_recent_window(prompt_len, chunk, recent):
    budget, n = 8, 32
    q, k, v = _qkv(n, seed=10 + prompt_len + chunk, sharp=1.0)
    # A heavy hitter: every query shares a direction u, and token 1's key is 4 u, so it draws attention throughout.
    u = np.random.default_rng(0).normal(size=(H, D)).astype(np.float32)
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    q += 3 * u[None, :, None, :]
    k[1] = 4 * u
    policy = bl.H2OPolicy(budget=budget, recent=recent)
    r = policy.recent
    assert (r, policy.heavy) == ((budget - budget // 2, budget // 2) if recent is None else (2, 6))
    ref = [_h2o_reference(q, k, h, budget, r, prompt_len, chunk) for h in range(H)]
    for i, (cache, t, _) in enumerate(_run(policy, q, k, v, prompt_len, chunk)):
        for h in range(H):
            live = _live(cache, k, h)
            assert live == ref[h][i], (i, t, h)
            assert [j for j in range(max(t - r + 1, 0), t + 1)] == live[-min(r, t + 1):]  # the recent window
            if t >= budget:
                assert 1 in live  # the heavy hitter survives
        assert int(cache.lengths.max()) <= budget


@pytest.mark.parametrize("prompt_len,chunk", [(3, 4), (17, 4), (17, 16)])
def test_streaming_keeps_sinks_and_recent_window(prompt_len, chunk):
    budget, sinks, n = 9, 4, 30
    q, k, v = _qkv(n, seed=3)
    policy = bl.StreamingPolicy(budget=budget, sinks=sinks)
    assert policy.recent == budget - sinks and policy.delay_window == budget - sinks - 1
    for cache, t, _ in _run(policy, q, k, v, prompt_len, chunk):
        want = sorted(set(range(min(sinks, t + 1))) | set(range(max(t - (budget - sinks) + 1, 0), t + 1)))
        for h in range(H):
            assert _live(cache, k, h) == want, (t, h)
        assert int(cache.lengths.max()) == min(budget, t + 1)


# ------------------------------------------------------------------------------------------ Quest


def test_quest_reads_the_pages_with_the_highest_bound():
    budget, prompt_len, n = 8, 19, 30  # 2 pages + the current one
    q, k, v = _qkv(n, seed=5)
    policy = bl.QuestPolicy(budget=budget, dense_layers=0)  # one layer, page selection in it
    reads_seen = []
    for cache, t, out in _run(policy, q, k, v, prompt_len, 8):
        length = t + 1
        assert int(cache.lengths.min()) == length  # nothing is evicted
        if out is None:
            continue
        out, sel = out
        st = cache.policy_state
        n_pages = -(-length // PS)
        sel = np.asarray(sel[0])
        for h in range(H):
            kh = k[:length, h]
            kmin = np.stack([kh[p * PS:(p + 1) * PS].min(0) for p in range(n_pages)])
            kmax = np.stack([kh[p * PS:(p + 1) * PS].max(0) for p in range(n_pages)])
            np.testing.assert_array_equal(np.asarray(st["kmin"][0, 0, h, :n_pages]), kmin)
            np.testing.assert_array_equal(np.asarray(st["kmax"][0, 0, h, :n_pages]), kmax)
            bound = np.max(np.sum(np.maximum(q[t, h][:, None] * kmin[None], q[t, h][:, None] * kmax[None]), -1),
                           axis=0)  # [pages]: max over the group's query heads
            # An upper bound indeed: no key of a page scores higher than its bound.
            for p in range(n_pages):
                assert (q[t, h] @ kh[p * PS:(p + 1) * PS].T).max() <= bound[p] + 1e-4
            full = np.argsort(-bound[:n_pages - 1], kind="stable")[:budget // PS]
            want = sorted(full.tolist() + [n_pages - 1])
            assert np.nonzero(sel[h])[0].tolist() == want, (t, h)
            # The output equals attention restricted to the tokens of those pages (numpy reference).
            toks = [j for p in want for j in range(p * PS, min((p + 1) * PS, length))]
            s = q[t, h] @ kh[toks].T / np.sqrt(D)
            p_ = np.exp(s - s.max(-1, keepdims=True))
            ref = (p_ / p_.sum(-1, keepdims=True)) @ v[toks, h]
            for o in np.asarray(out):  # the kernel reference with the mask, the blocked path on compacted pages
                np.testing.assert_allclose(o[h], ref, rtol=1e-5, atol=1e-5)
            reads_seen.append((len(toks) + n_pages, int(st["reads"][0, 0, h])))
    assert all(a == b for a, b in reads_seen)


# ------------------------------------------------------------------------------------------ engine


def _tiny_model(seed=0):
    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(2,))
    model = create_model(cfg, None, seed=seed)
    for layer in model.layers:  # sharper attention than the default init, so that scores differ
        for name in ("q_proj", "k_proj"):
            lin = getattr(layer.self_attn, name)
            lin.kernel[...] = lin.kernel[...] * 10
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 50
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(3, 97, size=n))) for n in (27, 13, 6)]


BUDGET = 10


@pytest.mark.parametrize("name,kw", [("tova", {}), ("tova", dict(scope="group", prefill="chunk")), ("h2o", {}),
                                     ("streaming", {}), ("quest", {}), ("quest", dict(dense_layers=0)),
                                     ("quest", dict(dense_layers=1))])
def test_engine_stays_within_budget_and_metrics_reflect_it(tiny, prompts, name, kw):
    eng = Engine(tiny, name, budget=BUDGET, page_size=PS, prefill_chunk=8, **kw)
    spec = eng.make_spec(3, 48)
    cache = eng.new_cache(spec)
    _, cache, failed, _ = eng.prefill(cache, spec, [0, 1, 2], prompts)
    assert not failed.any()
    evicting = name != "quest"
    plen = np.array([len(p) for p in prompts])
    lengths = np.asarray(cache.lengths)
    assert (lengths == (np.minimum(plen, BUDGET) if evicting else plen)[None, :, None]).all()
    rng = np.random.default_rng(4)
    for step in range(9):
        before = jax.device_get(cache.policy_state)
        lengths_before = np.asarray(cache.lengths)
        n = np.asarray(cache.num_tokens)
        _, cache, pre = eng.step(cache, spec, rng.integers(3, 97, size=3))
        assert not pre.any()
        lengths = np.asarray(cache.lengths)
        check_invariants(cache, spec)
        want = np.minimum(plen + step + 1, BUDGET) if evicting else plen + step + 1
        assert (lengths == want[None, :, None]).all(), (name, step)
        if name in ("tova", "h2o"):  # the overwritten slot is the rule's victim, chosen from the previous scores
            after = jax.device_get(cache.policy_state)
            for l, s, h in np.ndindex(*lengths.shape):
                m = lengths_before[l, s, h]
                score, pos = before["score"][l, s, h, :m], before["pos"][l, s, h, :m]
                changed = np.nonzero(after["pos"][l, s, h, :m] != pos)[0].tolist()
                if m < BUDGET:
                    assert changed == [] and after["pos"][l, s, h, m] == n[s]
                    continue
                cand = pos <= n[s] - eng.policy.recent if name == "h2o" else np.ones(m, bool)
                victim = int(np.argmin(np.where(cand, score, np.inf)))
                assert changed == [victim] and after["pos"][l, s, h, victim] == n[s]
    cache = eng.release(cache, spec, [0, 1, 2])
    assert check_invariants(cache, spec)["used_pages"] == 0

    # generate(): KV reads and peak tokens follow the budget (sum over the 2 layers x 2 KV heads).
    new = 6
    res = eng.generate(prompts, max_new_tokens=new, stop_ids=[])
    lh = 2 * 2
    for r, p in zip(res.requests, plen):
        m = r.metrics
        fed = [p + i + 1 for i in range(new - 1)]  # cache tokens at each decode forward
        if evicting:
            assert m.peak_live_tokens == lh * min(p + new - 1, BUDGET)
            assert m.kv_token_reads == lh * sum(min(f, BUDGET) for f in fed)
        else:  # Quest: dense memory; reads = the top full pages + the current page + one per page (min / max)
            assert m.peak_live_tokens == lh * (p + new - 1)
            pages = [-(-f // PS) for f in fed]
            dense, sparse = 2 * min(eng.policy.dense_layers, 2), 2 * max(2 - eng.policy.dense_layers, 0)
            assert m.kv_token_reads == sum(dense * f + sparse * (min(n - 1, BUDGET // PS) * PS + f - (n - 1) * PS + n)
                                           for f, n in zip(fed, pages))
    assert res.pages_in_use_at_end == 0


@pytest.mark.parametrize("name", ["tova", "h2o", "streaming", "quest"])
def test_a_budget_that_holds_everything_equals_vanilla(tiny, prompts, name):
    kw = dict(page_size=PS, prefill_chunk=8)
    ref = Engine(tiny, "vanilla", **kw).generate(prompts, max_new_tokens=8, stop_ids=[])
    res = Engine(tiny, name, budget=48, **kw).generate(prompts, max_new_tokens=8, stop_ids=[])
    assert res.tokens() == ref.tokens()


def test_chains_share_the_prompt_and_its_scores(tiny, prompts):
    """Forked chains copy the policy state with the tables: greedy chains of a prompt stay identical."""
    eng = Engine(tiny, "h2o", budget=BUDGET, page_size=PS, prefill_chunk=8)
    res = eng.generate(prompts[:2], max_new_tokens=6, stop_ids=[], chains=2)
    toks = res.tokens()
    assert toks[0] == toks[1] and toks[2] == toks[3]
    single = eng.generate(prompts[:2], max_new_tokens=6, stop_ids=[])
    assert single.tokens() == [toks[0], toks[2]]


@pytest.mark.parametrize("call,match", [
    (lambda: bl.TOVAPolicy(budget=0), "budget must be an integer >= 1"),
    (lambda: bl.H2OPolicy(budget=0), "budget must be an integer >= 1"),
    (lambda: bl.H2OPolicy(budget=True), "budget must be an integer >= 1, got True"),
    (lambda: bl.H2OPolicy(budget=4, recent=5), "must not exceed the budget"),
    (lambda: bl.H2OPolicy(budget=4, recent=0), "recent must be an integer >= 1"),
    (lambda: bl.StreamingPolicy(budget=8, sinks=-1), "sinks must be an integer >= 0"),
    (lambda: bl.StreamingPolicy(budget=5, sinks=4), "budget must be an integer >= 6"),
    (lambda: bl.QuestPolicy(budget=1.5), "budget must be an integer"),
    (lambda: bl.QuestPolicy(budget=8, dense_layers=-1), "dense_layers must be an integer >= 0"),
    (lambda: bl.TOVAPolicy(budget=8, scope="head"), r"scope must be one of \('layer', 'group'\)"),
    (lambda: bl.TOVAPolicy(budget=8, prefill="once"), r"prefill must be one of \('prompt', 'chunk'\)"),
    (lambda: bl.budget_for_ratio(100, 0.5), "ratio must be >= 1"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_make_policy_and_describe():
    assert make_policy("tova", budget=5).describe() == {"policy": "tova", "budget": 5, "scope": "layer",
                                                        "prefill": "prompt"}
    assert make_policy("h2o", budget=9).describe() == {"policy": "h2o", "budget": 9, "heavy": 4, "recent": 5}
    assert make_policy("streaming", budget=20).describe() == {"policy": "streaming", "budget": 20, "sinks": 4,
                                                              "recent": 16}
    assert make_policy("quest", budget=64).describe() == {"policy": "quest", "budget": 64, "dense_layers": 2}
    assert bl.budget_for_ratio(1024, 4) == 256 and bl.budget_for_ratio(1000, 3) == 333
