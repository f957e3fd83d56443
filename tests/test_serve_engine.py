"""dms_jax.serve.engine: prefill + decode through the paged cache equals the full-sequence hard-mode forward (fp32,
<= 1e-4 relative) with chunked prefill, W > 1 chains and different lengths; live tokens per head equal the hard
mask's count after every step; eviction off == dense generation token for token; chains == dense generation of
copies of the prompt; pool accounting (pages return, high-water mark); exhaustion (preemption that leaves the other
sequences exact, or a clear error); bad inputs.

The tiny model has hand-set decision neurons: the reused query element of each group's first head gets weights that
make the logits large and mixed (~40% of the tokens evicted), with a small window so eviction happens early.
Every distinct cache shape compiles the prefill and decode functions once (seconds on CPU), so tests share shapes.

The same parity runs on the default model (SmolLM2-135M): in the default run with adapter decisions calibrated to
evict ~75% of real text (`_calibrate_adapter`), and, marked slow, on a real retrofitted export named by the
environment variable DMS_JAX_RETROFIT_EXPORT (skipped when unset).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax import dms
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.model import create_model
from dms_jax.serve.engine import Engine
from dms_jax.serve.pages import exclusive_pages, free_pages
from dms_jax.serve.reference import generate
from dms_jax.serve.results import PoolExhaustedError
from dms_jax.serve.sampling import SamplingConfig
from dms_jax.serve.spec import check_invariants

WINDOW = 3
PAGE = 4
CHUNK = 8
TOL = 1e-4


def _tiny_dms_model(alpha_per="head", seed=0, head_dim=8):
    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=head_dim, max_position_embeddings=256,
                      eos_token_ids=(2,))
    model = create_model(cfg, DMSConfig(window=WINDOW, alpha_per=alpha_per), seed=seed)
    rng = np.random.default_rng(seed)
    g, d = cfg.group_size, cfg.head_dim
    for layer in model.layers:
        attn = layer.self_attn
        w = np.asarray(attn.q_proj.kernel[...]) * 10
        for kv in range(cfg.num_kv_heads):  # the decision neuron: logit = 100 * q[..., d-1] - 5, large and mixed
            w[:, kv * g * d + d - 1] = rng.normal(size=w.shape[0]) * 0.05
        attn.q_proj.kernel[...] = jnp.asarray(w)
        for name in ("k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, name)
            lin.kernel[...] = lin.kernel[...] * 10
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 50
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_dms_model()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 29, 6)]


def _hard_forward(model, seqs, dms_mode="hard"):
    """Full-sequence hard-mode reference: logits [B, T, V] and owner decisions [L, B, H, T] (right-padded);
    dms_mode="off": the vanilla forward."""
    t = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), t), np.int32)
    valid = np.zeros((len(seqs), t), bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        valid[i, :len(s)] = True
    logits, aux = model(jnp.asarray(tokens), valid=jnp.asarray(valid), dms_mode=dms_mode)
    return np.asarray(logits), np.asarray(aux["decisions"]) if dms_mode != "off" else None


def _live_count(dec, t, window):
    """[L, H] live tokens after token t from owner decisions dec [L, H, T]."""
    j = np.arange(t + 1)
    return (dms.visible_if_marked(t, j, window)[None, None] | (dec[:, :, :t + 1] < 0.5)).sum(-1)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _teacher_forced_errors(eng, prompts, conts, ref, max_len):
    """Prefill one sequence per prompt, then decode the continuations (all of one length) teacher-forced; the
    relative logit error of every decode step against the full-sequence reference ref [B, T, V]."""
    spec = eng.make_spec(len(prompts), max_len)
    cache = eng.new_cache(spec)
    _, cache, _, _ = eng.prefill(cache, spec, list(range(len(prompts))), prompts)
    errs = []
    for step in range(len(conts[0])):
        out, cache, _ = eng.step(cache, spec, [c[step] for c in conts])
        errs += [_rel(np.asarray(out)[i], ref[i, len(p) + step]) for i, p in enumerate(prompts)]
    return errs


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("alpha_per", ["head", "layer"])
def test_prefill_and_decode_equal_hard_forward(alpha_per, tiny):
    """Chunked prefill (chunk 8 < prompts of 13 and 29 tokens), a prompt forked into 2 chains (copy-on-write),
    teacher-forced continuations of different lengths; a finished sequence returns its pages mid-run."""
    model = tiny if alpha_per == "head" else _tiny_dms_model(alpha_per)
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 29, 6)]
    # slots: 0 = prompt 0, 1 and 2 = two chains of prompt 1, 3 = prompt 2
    owner = [0, 1, 1, 2]
    conts = [list(map(int, rng.integers(3, 97, size=n))) for n in (7, 5, 9, 3)]
    seqs = [prompts[o] + c for o, c in zip(owner, conts)]
    ref, dec = _hard_forward(model, seqs)
    frac = float(np.mean([dec[:, i, :, :len(s) - 1].mean() for i, s in enumerate(seqs)]))
    assert 0.2 < frac < 0.8, f"the hand-set neurons should evict a mixed fraction, got {frac}"

    # The "layer" run also uses 8-token attention blocks: the blocked attention then walks several blocks per head
    # in prefill and decode (with the default blocks these tiny caches fit in one).
    eng = Engine(model, "dms", page_size=PAGE, prefill_chunk=CHUNK,
                 attention_block_tokens=None if alpha_per == "head" else 8)
    spec = eng.make_spec(4, 40)
    cache = eng.new_cache(spec)
    logits, cache, failed, pre_reads = eng.prefill(cache, spec, [0, 1, 3], prompts, all_logits=True)
    assert not failed.any()
    for i, o in enumerate([0, 1, 3]):
        assert _rel(logits[i], ref[o, :len(prompts[owner[o]])]) <= TOL
    cache = eng.fork(cache, spec, [1], [2])
    reads = np.array([pre_reads[0], pre_reads[1], pre_reads[1], pre_reads[2]], np.int64)
    used_seen = [check_invariants(cache, spec)["used_pages"]]

    def check_live(step_pos):
        lengths = np.asarray(cache.lengths)
        for s in range(4):
            t = step_pos[s]
            if t is None:
                continue
            assert (lengths[:, s] == _live_count(dec[:, s], t, WINDOW)).all(), (s, t)
            stats = dms.kv_stats(jnp.asarray(dec[:, s:s + 1, :, :t + 1]), None, WINDOW)
            assert int(lengths[:, s].sum()) == int(stats["n_live"][0])
            assert int(reads[s]) == int(stats["token_reads"][0])

    plen = [len(prompts[o]) for o in owner]
    check_live([p - 1 for p in plen])
    released = False
    for step in range(max(len(c) for c in conts)):
        active = np.array([step < len(c) for c in conts])
        if not active[3] and not released:  # slot 3 is done: its pages go back to the pool now
            free_before = int(free_pages(cache.refcount))
            mine = int(exclusive_pages(cache, PAGE)[3])
            cache = eng.release(cache, spec, [3])
            assert int(free_pages(cache.refcount)) == free_before + mine > free_before
            released = True
        toks = [c[step] if a else 0 for c, a in zip(conts, active)]
        out, cache, pre = eng.step(cache, spec, toks, active)
        assert not pre.any()
        out = np.asarray(out)
        lengths = np.asarray(cache.lengths)
        for s in range(4):
            if active[s]:
                assert _rel(out[s], ref[s, plen[s] + step]) <= TOL, (s, step)
                reads[s] += lengths[:, s].sum()
        check_live([plen[s] + step if active[s] else None for s in range(4)])
        used_seen.append(check_invariants(cache, spec)["used_pages"])
    assert int(cache.high_water) == max(used_seen)
    cache = eng.release(cache, spec, [0, 1, 2])
    assert check_invariants(cache, spec)["used_pages"] == 0


@pytest.mark.parametrize("backend", ["xla", "pallas_tpu", "pallas_gpu"])
def test_decode_parity_with_kernel_backends(tiny, backend):
    """The decode attention through pallas_kernels (XLA reference, and both Pallas lowerings in interpret mode)."""
    rng = np.random.default_rng(4)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 6)]
    conts = [list(map(int, rng.integers(3, 97, size=4))) for _ in range(2)]
    ref, _ = _hard_forward(tiny, [p + c for p, c in zip(prompts, conts)])
    eng = Engine(tiny, "dms", page_size=PAGE, prefill_chunk=CHUNK, attention_backend=backend, interpret=True)
    assert max(_teacher_forced_errors(eng, prompts, conts, ref, 24)) <= TOL


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("policy, dms_flag", [("vanilla", False), ("dms", True)])
def test_engine_equals_dense_generation(tiny, prompts, policy, dms_flag):
    """Eviction off: the paged engine == plain dense generation, token for token (greedy and sampled, same seed).
    DMS: == the dense cache that masks evicted tokens (generate(dms=True)), while actually freeing them."""
    eng = Engine(tiny, policy, page_size=PAGE, prefill_chunk=CHUNK, segment_steps=7)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=20)):
        want = generate(tiny, prompts, max_new_tokens=20, sampling=sampling, stop_ids=[2], seed=3, dms=dms_flag)
        res = eng.generate(prompts, max_new_tokens=20, sampling=sampling, stop_ids=[2], seed=3)
        assert res.tokens() == want
        assert res.pages_in_use_at_end == 0 and not res.preempted
    m = res.requests[1].metrics
    lh = 2 * 2
    assert m.dense_tokens == lh * (29 + m.new_tokens - 1)
    if policy == "vanilla":
        assert m.compression_ratio == 1.0 and m.kv_token_reads == m.kv_token_reads_dense
        assert m.peak_live_tokens == m.dense_tokens
    else:
        assert m.compression_ratio > 1.3 and m.read_ratio > 1.2 and m.peak_live_tokens < m.dense_tokens
    assert m.peak_bytes == m.peak_pages * res.bytes_per_page
    assert res.pool_high_water_bytes == res.pool_high_water_pages * res.bytes_per_page


@pytest.mark.parametrize("policy", ["vanilla", "dms"])
def test_chains_equal_dense_generation_of_copies(tiny, prompts, policy):
    """W chains of each prompt (one prefill, copy-on-write; the attention reads the shared pages once per prompt)
    == dense generation of W copies, same seed. Chains that stop early release their pages mid-run."""
    w = 3
    sampling = SamplingConfig(temperature=1.0)
    eng = Engine(tiny, policy, page_size=PAGE, prefill_chunk=CHUNK)
    # A stop token that the first chain samples 4th, so that some chains stop (and release) mid-run, others not.
    stop = eng.generate(prompts[:2], max_new_tokens=12, sampling=sampling, stop_ids=[], seed=5,
                        chains=w).requests[0].tokens[3]
    res = eng.generate(prompts[:2], max_new_tokens=12, sampling=sampling, stop_ids=[stop], seed=5, chains=w)
    copies = [p for p in prompts[:2] for _ in range(w)]
    assert res.tokens() == generate(tiny, copies, max_new_tokens=12, sampling=sampling, stop_ids=[stop], seed=5,
                                    dms=policy == "dms")
    assert min(map(len, res.tokens())) < 12 == max(map(len, res.tokens()))
    assert [(r.prompt_index, r.chain) for r in res.requests] == [(i, c) for i in range(2) for c in range(w)]
    assert len({tuple(r.tokens) for r in res.requests[:w]}) > 1, "sampled chains should differ"
    # Copy-on-write: the prompts' pages are stored once, so the pool peaks well below W full copies.
    own = sum(r.metrics.peak_pages for r in res.requests)
    assert res.pool_high_water_pages < own
    assert res.pages_in_use_at_end == 0


# ------------------------------------------------------------------------------------------------ exhaustion

BUDGET = 70  # the three requests need 108 pages without eviction; prefill needs 56


def test_exhaustion_preempts_and_others_stay_exact(tiny, prompts):
    full = Engine(tiny, "vanilla", page_size=PAGE, prefill_chunk=CHUNK).generate(
        prompts, max_new_tokens=20, stop_ids=[-1])
    assert not full.preempted
    res = Engine(tiny, "vanilla", page_size=PAGE, prefill_chunk=CHUNK, budget_pages=BUDGET).generate(
        prompts, max_new_tokens=20, stop_ids=[-1])
    assert res.preempted, "the budget is too small for all three"
    assert res.pool_high_water_pages <= BUDGET and res.pages_in_use_at_end == 0
    for i, (a, b) in enumerate(zip(res.requests, full.requests)):
        if i in res.preempted:
            assert a.status == "preempted" and len(a.tokens) < 20
            assert a.tokens == b.tokens[:len(a.tokens)]  # what it produced before preemption was right
        else:
            assert a.status == "finished" and a.tokens == b.tokens
    assert res.preempted[-1] == 2  # the most recently admitted sequence goes first


def test_exhaustion_error_mode(tiny, prompts):
    eng = Engine(tiny, "vanilla", page_size=PAGE, prefill_chunk=CHUNK, budget_pages=BUDGET, on_exhaustion="error")
    with pytest.raises(PoolExhaustedError, match=r"exhausted at decode step \d+: the step needs \d+ new page"):
        eng.generate(prompts, max_new_tokens=20, stop_ids=[-1])
    eng = Engine(tiny, "vanilla", page_size=PAGE, prefill_chunk=CHUNK, budget_pages=30, on_exhaustion="error")
    with pytest.raises(PoolExhaustedError, match=r"during prefill .* of prompt\(s\) \[1\]"):
        eng.generate(prompts, max_new_tokens=4, stop_ids=[-1])


def test_prefill_exhaustion_preempts_the_prompt(tiny, prompts):
    res = Engine(tiny, "vanilla", page_size=PAGE, prefill_chunk=CHUNK, budget_pages=30).generate(
        prompts, max_new_tokens=4, stop_ids=[-1])
    assert res.preempted == [1] and res.requests[1].tokens == [] and res.requests[1].status == "preempted"
    want = generate(tiny, [prompts[0], prompts[2]], max_new_tokens=4, stop_ids=[-1])
    assert [res.requests[0].tokens, res.requests[2].tokens] == want
    assert res.pages_in_use_at_end == 0


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kw, match", [
    (dict(policy="no-such-policy"), "unknown eviction policy"),
    (dict(page_size=0), "page_size must be an integer >= 1"),
    (dict(prefill_chunk=0), "prefill_chunk must be an integer >= 1"),
    (dict(budget_pages=0), "budget_pages must be an integer >= 1"),
    (dict(on_exhaustion="ignore"), "on_exhaustion must be one of"),
    (dict(attention_backend="cuda"), "attention_backend must be one of"),
    (dict(segment_steps=0), "segment_steps must be an integer >= 1"),
    (dict(attention_block_tokens=0), "attention_block_tokens must be an integer >= 1"),
])
def test_engine_construction_errors(tiny, kw, match):
    policy = kw.pop("policy", "vanilla")
    with pytest.raises(ValueError, match=match):
        Engine(tiny, policy, **kw)


def test_dms_policy_needs_a_dms_model():
    cfg = ModelConfig(model_type="llama", vocab_size=11, hidden_size=8, intermediate_size=8, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="needs a model with a DMSConfig"):
        Engine(create_model(cfg), "dms")


@pytest.mark.parametrize("call, match", [
    (lambda e: e.generate([]), "non-empty list of non-empty"),
    (lambda e: e.generate([[1, 2], []]), "non-empty list of non-empty"),
    (lambda e: e.generate([[1, 200]]), r"token ids must be integers in \[0, 97\)"),
    (lambda e: e.generate([[1, 2]], max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (lambda e: e.generate([[1, 2]], chains=0), "chains must be an integer >= 1"),
    (lambda e: e.generate([[1] * 250], max_new_tokens=10), "exceeds the model's context of 256 tokens"),
    (lambda e: e.generate([[1]], sampling=SamplingConfig(top_k=500)), "top_k=500 exceeds the vocabulary"),
    (lambda e: e.generate([[1]], sampling={"temperature": 1}), "sampling must be a SamplingConfig"),
])
def test_generate_errors(tiny, call, match):
    with pytest.raises(ValueError, match=match):
        call(Engine(tiny, "vanilla"))


def test_generate_sizes_the_cache_for_context(tiny, prompts, monkeypatch):
    """``context`` sets the tokens per head the call's cache holds (default: longest prompt + max_new_tokens);
    the tokens do not depend on it; a context too small for the request is a clear error."""
    eng = Engine(tiny, "dms", page_size=PAGE, prefill_chunk=CHUNK)
    specs = []
    make_spec = eng.make_spec
    monkeypatch.setattr(eng, "make_spec", lambda *a, **kw: specs.append(make_spec(*a, **kw)) or specs[-1])
    lh = tiny.cfg.num_layers * tiny.cfg.num_kv_heads
    default = eng.generate(prompts[:1], max_new_tokens=4, stop_ids=[])
    sized = eng.generate(prompts[:1], max_new_tokens=4, stop_ids=[], context=64)
    assert [(sp.max_pages_per_head, sp.max_tokens_per_head) for sp in specs] == [(5, 20), (16, 64)]  # 13 + 4 -> 5
    assert (default.budget_pages, sized.budget_pages) == (lh * 5, lh * 16)
    assert default.tokens() == sized.tokens()
    with pytest.raises(ValueError, match=r"context=16 is too small: the longest prompt \(13 tokens\) \+ "
                                         r"max_new_tokens=4 need 17 tokens per head"):
        eng.generate(prompts[:1], max_new_tokens=4, context=16)
    with pytest.raises(ValueError, match="context must be an integer >= 1"):
        eng.generate(prompts[:1], max_new_tokens=4, context=32.0)


def test_low_level_errors(tiny, prompts):
    eng = Engine(tiny, "dms", page_size=PAGE, prefill_chunk=CHUNK)
    spec = eng.make_spec(4, 40)
    cache = eng.new_cache(spec)
    with pytest.raises(ValueError, match="3 prompts but 2 slots"):
        eng.prefill(cache, spec, [0, 1], prompts)
    _, cache, _, _ = eng.prefill(cache, spec, [0], prompts[:1])
    with pytest.raises(ValueError, match=r"prefill needs empty slots; slots \[0\] hold tokens"):
        eng.prefill(cache, spec, [0], prompts[:1])
    with pytest.raises(ValueError, match=r"fork needs empty destination slots; \[0\] hold tokens"):
        eng.fork(cache, spec, [1], [0])
    with pytest.raises(ValueError, match="exceeds the cache's 40 tokens"):
        eng.prefill(cache, spec, [1], [[1] * 41])
    logits = np.zeros((4, tiny.cfg.vocab_size), np.float32)
    with pytest.raises(ValueError, match="chains=3 must divide the cache's 4 sequence slots"):
        eng.decode(cache, spec, logits, max_new_tokens=2, chains=3)
    with pytest.raises(ValueError, match="chains must be an integer >= 1"):
        eng.decode(cache, spec, logits, max_new_tokens=2, chains=0)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli_default(monkeypatch, default_model, tokenizer):
    from dms_jax import weights
    from experiments import generate as cli

    monkeypatch.setattr(weights, "load_model", lambda path=None, **kw: default_model)
    monkeypatch.setattr(weights, "load_tokenizer", lambda path=None: tokenizer)
    return cli


def test_cli_chains_and_budget(cli_default, capsys):
    answers = cli_default.main(["--prompt", "What is the capital of France?", "--chains", "2", "--budget-pages",
                                "2000", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy chains agree
    assert "Paris" in answers[0]
    assert "prompt 1 chain 2" in out and "compression 1.00x" in out
    assert "policy=vanilla: KV pool high-water" in err and "of 2000" in err


def test_cli_dms_needs_a_dms_model(cli_default, capsys):
    with pytest.raises(SystemExit):
        cli_default.main(["--prompt", "x", "--dms"])
    assert "--dms needs a model with DMS settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "x", "--chains", "0"], r"--chains: must be an integer >= 1, got 0"),
    (["--prompt", "x", "--budget-pages", "-2"], r"--budget-pages: must be an integer >= 1, got -2"),
])
def test_cli_engine_argument_errors(argv, match, capsys):
    from experiments import generate as cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_real_model_parity(tokenizer, default_path):
    """SmolLM2-135M with untouched neuron-reuse logits (a mixed eviction pattern already) and a 16-token window:
    chunked prefill + teacher-forced decode == the full-sequence hard forward; live counts per head match."""
    from dms_jax import weights
    from dms_jax.chat import chat_prompt

    w = 16
    model = weights.load_model(default_path, dms=DMSConfig(window=w))
    prompt = chat_prompt(tokenizer, "Explain in a few sentences why the sky is blue, and mention Rayleigh.")
    cont = generate(model, [prompt], max_new_tokens=10, stop_ids=[-1], dms=True)[0]
    ref, dec = _hard_forward(model, [prompt + cont])
    assert 0.05 < dec[:, 0, :, :-1].mean() < 0.95
    eng = Engine(model, "dms", page_size=16, prefill_chunk=32)
    spec = eng.make_spec(2, len(prompt) + len(cont))
    cache = eng.new_cache(spec)
    logits, cache, _, _ = eng.prefill(cache, spec, [0], [prompt], all_logits=True)
    assert _rel(logits[0], ref[0, :len(prompt)]) <= TOL
    cache = eng.fork(cache, spec, [0], [1])
    for i, tok in enumerate(cont[:-1]):
        out, cache, _ = eng.step(cache, spec, [tok, tok])
        t = len(prompt) + i
        assert _rel(np.asarray(out)[0], ref[0, t]) <= TOL and _rel(np.asarray(out)[1], ref[0, t]) <= TOL
        lengths = np.asarray(cache.lengths)
        assert (lengths[:, 0] == _live_count(dec[:, 0], t, w)).all() and (lengths[:, 1] == lengths[:, 0]).all()
    check_invariants(cache, spec)


# ------------------------------------------------------------------------------------------------ default model: parity


def _paged_equals_hard(model, prompts, owner, conts, *, window, page, chunk, block_tokens=None, min_evicted=0.3):
    """Prefill + teacher-forced decode through the paged cache == the full-sequence hard forward, step by step.

    Slot ``i`` holds prompt ``owner[i]`` followed by ``conts[i]``: the first slot of each prompt is prefilled (in
    chunks of ``chunk`` tokens), the others are forked from it copy-on-write (chains), and every slot is fed its
    own continuation, so the chains diverge; slots with shorter continuations are released when done (their pages
    return to the pool). After the prefill and after every step: logits within TOL of the reference, live tokens
    of every (layer, KV head) equal to the hard mask's count, KV reads equal to ``dms.kv_stats``, pool invariants.
    Returns the eviction fraction of the reference decisions."""
    seqs = [list(prompts[o]) + list(c) for o, c in zip(owner, conts)]
    ref, dec = _hard_forward(model, seqs)
    frac = float(np.mean([dec[:, i, :, :len(q) - 1].mean() for i, q in enumerate(seqs)]))
    assert frac >= min_evicted, f"the decisions should evict a real fraction of the tokens, got {frac:.2f}"
    n = len(owner)
    eng = Engine(model, "dms", page_size=page, prefill_chunk=chunk, attention_block_tokens=block_tokens)
    spec = eng.make_spec(n, max(len(q) for q in seqs))
    cache = eng.new_cache(spec)
    first = [owner.index(o) for o in range(len(prompts))]
    logits, cache, failed, pre_reads = eng.prefill(cache, spec, first, prompts, all_logits=True)
    assert not failed.any()
    for o, slot in enumerate(first):
        assert _rel(logits[o], ref[slot, :len(prompts[o])]) <= TOL, f"prefill of prompt {o}"
    src = [first[o] for i, o in enumerate(owner) if i != first[o]]
    dst = [i for i, o in enumerate(owner) if i != first[o]]
    cache = eng.fork(cache, spec, src, dst)
    reads = np.array([pre_reads[o] for o in owner], np.int64)
    plen = [len(prompts[o]) for o in owner]

    def check(pos):  # pos[s]: position of the slot's last cached token (None: released)
        lengths = np.asarray(cache.lengths)
        for s_, t in enumerate(pos):
            if t is None:
                continue
            assert (lengths[:, s_] == _live_count(dec[:, s_], t, window)).all(), f"live tokens, slot {s_} token {t}"
            stats = dms.kv_stats(jnp.asarray(dec[:, s_:s_ + 1, :, :t + 1]), None, window)
            assert int(lengths[:, s_].sum()) == int(stats["n_live"][0])
            assert int(reads[s_]) == int(stats["token_reads"][0])
        check_invariants(cache, spec)

    check([p - 1 for p in plen])
    done = np.zeros(n, bool)
    for step in range(max(len(c) for c in conts)):
        active = np.array([step < len(c) for c in conts])
        if (~active & ~done).any():  # finished slots let their pages go
            gone = np.nonzero(~active & ~done)[0].tolist()
            free_before = int(free_pages(cache.refcount))
            mine = int(np.asarray(exclusive_pages(cache, page))[gone].sum())
            cache = eng.release(cache, spec, gone)
            assert int(free_pages(cache.refcount)) == free_before + mine
            done |= ~active
        toks = [c[step] if a else 0 for c, a in zip(conts, active)]
        out, cache, pre = eng.step(cache, spec, toks, active)
        assert not pre.any()
        out, lengths = np.asarray(out), np.asarray(cache.lengths)
        for s_ in np.nonzero(active)[0]:
            assert _rel(out[s_], ref[s_, plen[s_] + step]) <= TOL, f"decode step {step}, slot {s_}"
            reads[s_] += lengths[:, s_].sum()
        check([plen[s_] + step if active[s_] else None for s_ in range(n)])
    cache = eng.release(cache, spec, np.nonzero(~done)[0].tolist())
    assert check_invariants(cache, spec)["used_pages"] == 0
    return frac


def _calibrate_adapter(model, tokens, targets=(0.65, 0.8, 0.9)):
    """Adapter decision weights with a realistic eviction pattern, for a default-model parity test without a retrofit.

    Each (layer, KV head) reads one existing projection column of its layer (q / k / v / gate / up, through a copy of
    the layer's input norm), the column whose decision ``scale * x . w - offset > 0`` holds for about ``targets[h]``
    of the tokens of ``tokens`` [1, T] in a teacher forward. Decisions then follow the content, differ between heads
    and layers, and evict ~75% of real text (a retrofit to CR ~4); nothing is random."""
    t = tokens.shape[1]
    pos = jnp.arange(t)[None]
    attention = model._full_sequence_attention(pos, jnp.ones((1, t), bool), "off", None)
    dcfg, hkv = model.dms_cfg, model.cfg.num_kv_heads
    x = model.embed_tokens(tokens)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        w = jnp.concatenate([lin.kernel[...] for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj,
                                                         mlp.up_proj)], axis=1)
        xn = layer.input_layernorm(x)[0]
        frac = np.asarray(jnp.mean(dcfg.alpha_scale * (xn @ w) - dcfg.alpha_offset > 0, axis=0))
        cols = []
        for h in range(hkv):
            err = np.abs(frac - targets[h % len(targets)])
            err[cols] = np.inf
            cols.append(int(np.argmin(err)))
        attn.dms_proj_alpha_norm.weight[...] = layer.input_layernorm.weight[...]
        attn.dms_proj_alpha.kernel[...] = w[:, np.asarray(cols)]
        x, _ = layer(x, pos, attention, False)


def test_default_model_paged_equals_hard_forward(chat_prompts):
    """SmolLM2-135M, adapter decisions evicting ~75% (calibrated on the prompts), window 16: three chat prompts of
    38 / 41 / 44 tokens prefilled in 16-token chunks, the second forked into two chains, four different
    continuations of 4..9 tokens (the shortest released early): logits == the hard forward, live tokens == the hard
    mask's count after every step."""
    from dms_jax import weights

    w = 16
    model = weights.load_model(weights.resolve_model_path(None), dms=DMSConfig(variant="adapter", window=w))
    _calibrate_adapter(model, jnp.asarray([[t for p in chat_prompts for t in p]]))
    owner = [0, 1, 1, 2]
    conts = [chat_prompts[2][-6:], chat_prompts[0][-9:], chat_prompts[2][5:12], chat_prompts[1][-4:]]
    frac = _paged_equals_hard(model, chat_prompts, owner, conts, window=w, page=8, chunk=16, min_evicted=0.5)
    assert frac < 0.95


@pytest.mark.slow
def test_retrofit_export_paged_equals_hard_forward():
    """The same parity on a real retrofitted export (``DMS_JAX_RETROFIT_EXPORT``: a directory written by
    ``experiments.distill``, e.g. runs/distill/export), with its own window and decisions: prompts of real text
    long enough to evict (3 / 5 / 2 windows), 128-token prefill chunks, two chains, 8..24 decode steps."""
    path = os.environ.get("DMS_JAX_RETROFIT_EXPORT")
    if not path:
        pytest.skip("set DMS_JAX_RETROFIT_EXPORT to a retrofitted export directory")
    from dms_jax import weights
    from dms_jax.data.corpus import builtin_text_ids

    model = weights.load_model(path)
    assert model.dms_cfg is not None, f"{path} has no DMS settings in its config.json"
    w = model.dms_cfg.window
    ids = builtin_text_ids(weights.load_tokenizer(path), 12 * w + 200)
    prompts = [ids[:3 * w + 5], ids[3 * w + 5:8 * w + 18], ids[8 * w + 18:10 * w + 25]]
    rest = ids[10 * w + 25:]
    owner = [0, 1, 1, 2]
    conts = [rest[:12], rest[12:36], rest[36:53], rest[53:61]]
    frac = _paged_equals_hard(model, prompts, owner, conts, window=w, page=16, chunk=128)
    print(f"{path}: window {w}, {frac:.1%} of the tokens evicted")
