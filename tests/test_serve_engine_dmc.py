"""DMC through the paged engine (policy "dmc"): prefill + decode equal the training-side forward in hard mode over
the whole sequence (fp32, <= 1e-4 relative) with chunked prefill (chunks shorter and longer than the accumulation
window), W > 1 chains forked from one prompt (copy-on-write of the shared last page) and different lengths; the
live slots per head after every step equal the appends implied by the hard decisions; pages return on release;
greedy and sampled generation equal generate_dmc (the dense merge cache) token for token; a worst-case page check
preempts cleanly; configuration mismatches fail clearly.

Marked slow, the same parity on a real DMC retrofit of the default model, named by the environment variable
DMS_JAX_DMC_EXPORT (skipped when unset).

The tiny model's weights are widened (as in tests/test_dmc.py) and DMCConfig(logit_offset=0.3) gives a mix of merges
and appends, with segments longer than the window W = 4.
"""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from dms_jax.config import DMCConfig, DMSConfig, ModelConfig
from dms_jax.model import create_model
from dms_jax.serve.engine import Engine
from dms_jax.serve.pages import exclusive_pages, free_pages
from dms_jax.serve.policies import DMCPolicy
from dms_jax.serve.reference import generate_dmc
from dms_jax.serve.sampling import SamplingConfig
from dms_jax.serve.spec import check_invariants
from test_serve_engine import _hard_forward, _rel, _teacher_forced_errors

WINDOW = 4
PAGE = 4
TOL = 1e-4
CFG = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(2,))


def _tiny_dmc_model(seed=1):
    """Weights wide enough that merges change the logits visibly and the merge neuron k[d-1] is of order 1."""
    model = create_model(CFG, dmc_cfg=DMCConfig(accumulation_window=WINDOW, logit_offset=0.3), seed=seed)
    nnx.update(model, jax.tree.map(lambda x: x * 10.0 if x.ndim == 2 else x, nnx.state(model, nnx.Param)))
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 5.0
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_dmc_model()


def _slots(dec, t):
    """[L, H] slots after token t: one per appended token 0..t."""
    return (dec[:, :, :t + 1] < 0.5).sum(-1)


def _longest_segment(dec):
    """Longest run of tokens sharing one slot, over every (layer, head) of dec [L, H, T]."""
    best = 0
    for row in dec.reshape(-1, dec.shape[-1]):
        run = 0
        for x in row:
            run = run + 1 if x > 0.5 else 1
            best = max(best, run)
    return best


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("chunk", [3, 8])
def test_prefill_and_decode_equal_hard_forward(tiny, chunk):
    """Chunked prefill (chunk 3 < W = 4 < chunk 8 < prompts of 13 and 29 tokens), prompt 1 forked into 2 chains,
    teacher-forced continuations of different lengths; a finished sequence returns its pages mid-run."""
    rng = np.random.default_rng(2)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 29, 6)]
    owner = [0, 1, 1, 2]  # slots: 0 = prompt 0, 1 and 2 = two chains of prompt 1, 3 = prompt 2
    conts = [list(map(int, rng.integers(3, 97, size=n))) for n in (7, 5, 9, 3)]
    seqs = [prompts[o] + c for o, c in zip(owner, conts)]
    ref, dec = _hard_forward(tiny, seqs)
    chex.assert_shape(dec, (CFG.num_layers, 4, CFG.num_kv_heads, max(len(s) for s in seqs)))
    frac = float(np.mean([dec[:, i, :, :len(s)].mean() for i, s in enumerate(seqs)]))
    assert 0.2 < frac < 0.8, f"the check needs both merges and appends, got a merge fraction {frac}"
    assert _longest_segment(dec[:, 1, :, :len(seqs[1])]) > WINDOW, "a segment should outgrow the window"

    eng = Engine(tiny, "dmc", page_size=PAGE, prefill_chunk=chunk)
    assert eng.policy.describe() == {"policy": "dmc", "accumulation_window": WINDOW}
    spec = eng.make_spec(4, 40)
    cache = eng.new_cache(spec)
    logits, cache, failed, _ = eng.prefill(cache, spec, [0, 1, 3], [prompts[o] for o in (0, 1, 2)],
                                           all_logits=True)
    assert not failed.any()
    errs = []
    for i, slot in enumerate([0, 1, 3]):
        errs.append(_rel(logits[i], ref[slot, :len(prompts[owner[slot]])]))
    cache = eng.fork(cache, spec, [1], [2])
    plen = [len(prompts[o]) for o in owner]

    def check_slots(step_pos):
        lengths = np.asarray(cache.lengths)
        for s, t in enumerate(step_pos):
            if t is not None:
                np.testing.assert_array_equal(lengths[:, s], _slots(dec[:, s], t), err_msg=f"slot {s} token {t}")
        return check_invariants(cache, spec)["used_pages"]

    used_seen = [check_slots([p - 1 for p in plen])]
    # The forked chains' first writes go to shared pages: a merge into the shared last slot, or an append into a
    # partly filled shared page -- both need copy-on-write.
    lengths0 = np.asarray(cache.lengths)[:, 1]
    first_merge = dec[:, 1, :, plen[1]] > 0.5
    assert first_merge.any(), "the first decode token of a chain should merge into a shared slot somewhere"
    assert (lengths0 % PAGE != 0).any()
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
        for s in range(4):
            if active[s]:
                errs.append(_rel(out[s], ref[s, plen[s] + step]))
        used_seen.append(check_slots([plen[s] + step if active[s] else None for s in range(4)]))
    print(f"chunk {chunk}: max relative logit error {max(errs):.2e}")
    assert max(errs) <= TOL, max(errs)
    assert int(cache.high_water) == max(used_seen)
    cache = eng.release(cache, spec, [0, 1, 2])
    assert check_invariants(cache, spec)["used_pages"] == 0
    assert not np.asarray(cache.policy_state["seg_len"]).any()  # the window state is cleared with the pages


@pytest.mark.slow
def test_retrofit_export_paged_equals_hard_forward():
    """The same parity on a real DMC retrofit (``DMS_JAX_DMC_EXPORT``: a directory written by
    ``experiments.distill --method dmc``, e.g. runs/distill/export): prompts of real text (about 10, 25 and 7
    accumulation windows), 64-token prefill chunks, the middle prompt forked into two chains, 8..24 teacher-forced
    decode steps; live slots per head equal the appends of the hard decisions after the prompt and after every
    step."""
    import os

    path = os.environ.get("DMS_JAX_DMC_EXPORT")
    if not path:
        pytest.skip("set DMS_JAX_DMC_EXPORT to a DMC retrofit's export directory")
    from dms_jax import weights
    from dms_jax.data.corpus import builtin_text_ids

    model = weights.load_model(path)
    assert model.dmc_cfg is not None, f"{path} has no DMC settings in its config.json"
    w = model.dmc_cfg.accumulation_window
    ids = builtin_text_ids(weights.load_tokenizer(path), 45 * w + 100)
    cut = [0, 10 * w + 3, 35 * w + 8, 42 * w + 9]
    prompts = [ids[a:b] for a, b in zip(cut, cut[1:])]
    rest = ids[cut[-1]:]
    owner = [0, 1, 1, 2]
    conts = [rest[:8], rest[8:32], rest[32:48], rest[48:60]]
    seqs = [prompts[o] + c for o, c in zip(owner, conts)]
    ref, dec = _hard_forward(model, seqs)
    frac = float(np.mean([dec[:, i, :, :len(s)].mean() for i, s in enumerate(seqs)]))

    eng = Engine(model, "dmc", page_size=16, prefill_chunk=64)
    spec = eng.make_spec(4, max(len(s) for s in seqs))
    cache = eng.new_cache(spec)
    logits, cache, failed, _ = eng.prefill(cache, spec, [0, 1, 3], prompts, all_logits=True)
    assert not failed.any()
    errs = [_rel(logits[i], ref[slot, :len(prompts[owner[slot]])]) for i, slot in enumerate([0, 1, 3])]
    cache = eng.fork(cache, spec, [1], [2])
    plen = [len(prompts[o]) for o in owner]
    for s in range(4):
        np.testing.assert_array_equal(np.asarray(cache.lengths)[:, s], _slots(dec[:, s], plen[s] - 1))
    for step in range(max(len(c) for c in conts)):
        active = np.array([step < len(c) for c in conts])
        out, cache, pre = eng.step(cache, spec, [c[step] if a else 0 for c, a in zip(conts, active)], active)
        assert not pre.any()
        lengths = np.asarray(cache.lengths)
        for s in np.flatnonzero(active):
            errs.append(_rel(np.asarray(out)[s], ref[s, plen[s] + step]))
            np.testing.assert_array_equal(lengths[:, s], _slots(dec[:, s], plen[s] + step))
    print(f"{path}: accumulation window {w}, {frac:.1%} of the tokens merged, max relative logit error "
          f"{max(errs):.2e}")
    assert 0.05 < frac < 0.95, f"a real DMC retrofit should merge some tokens and append others, got {frac}"
    assert max(errs) <= TOL, max(errs)


def test_decode_parity_with_the_kernel_attention_path(tiny):
    """The non-deferred decode path (copy and write before the attention, pallas_kernels' XLA reference)."""
    rng = np.random.default_rng(4)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 6)]
    conts = [list(map(int, rng.integers(3, 97, size=5))) for _ in range(2)]
    ref, _ = _hard_forward(tiny, [p + c for p, c in zip(prompts, conts)])
    eng = Engine(tiny, "dmc", page_size=PAGE, prefill_chunk=8, attention_backend="xla")
    errs = _teacher_forced_errors(eng, prompts, conts, ref, 24)
    print(f"xla kernel path: max relative logit error {max(errs):.2e}")
    assert max(errs) <= TOL


# ------------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 29, 6)]


def test_engine_equals_generate_dmc(tiny, prompts):
    """Greedy and sampled generation through the pages == generate_dmc (the dense merge cache), token for token;
    the metrics count the slots the hard decisions imply."""
    eng = Engine(tiny, "dmc", page_size=PAGE, prefill_chunk=8, segment_steps=7)
    for sampling in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=20)):
        want, _ = generate_dmc(tiny, prompts, max_new_tokens=20, sampling=sampling, stop_ids=[2], seed=3,
                               pad_to_multiple=8)
        res = eng.generate(prompts, max_new_tokens=20, sampling=sampling, stop_ids=[2], seed=3)
        assert res.tokens() == want, sampling
        assert res.pages_in_use_at_end == 0 and not res.preempted
    assert res.policy == {"policy": "dmc", "accumulation_window": WINDOW}
    lh = CFG.num_layers * CFG.num_kv_heads
    for p, r in zip(prompts, res.requests):
        m = r.metrics
        seq = p + r.tokens[:-1]  # the last emitted token is never fed through a forward
        _, dec = _hard_forward(tiny, [seq])
        assert m.final_live_tokens == m.peak_live_tokens == int((dec[:, 0] < 0.5).sum())
        assert m.dense_tokens == lh * len(seq)
        assert m.compression_ratio == pytest.approx(m.dense_tokens / m.final_live_tokens)
        # Reads: after each decode forward, the slots then live.
        want_reads = sum(int(_slots(dec[:, 0], t).sum()) for t in range(len(p), len(seq)))
        assert m.kv_token_reads == want_reads
    m = res.requests[1].metrics
    assert m.compression_ratio > 1.3 and m.read_ratio > 1.3 and m.peak_live_tokens < m.dense_tokens
    assert res.pool_high_water_bytes == res.pool_high_water_pages * res.bytes_per_page


def test_chains_equal_generate_dmc_of_copies(tiny, prompts):
    """W chains of each prompt (one prefill, copy-on-write) == generate_dmc of W copies, same seed; the shared
    prompt pages are stored once."""
    w = 3
    sampling = SamplingConfig(temperature=1.0)
    eng = Engine(tiny, "dmc", page_size=PAGE, prefill_chunk=8)
    res = eng.generate(prompts[:2], max_new_tokens=12, sampling=sampling, stop_ids=[2], seed=5, chains=w)
    copies = [p for p in prompts[:2] for _ in range(w)]
    want, _ = generate_dmc(tiny, copies, max_new_tokens=12, sampling=sampling, stop_ids=[2], seed=5,
                           pad_to_multiple=8)
    assert res.tokens() == want
    assert len({tuple(r.tokens) for r in res.requests[:w]}) > 1, "sampled chains should differ"
    assert res.pool_high_water_pages < sum(r.metrics.peak_pages for r in res.requests)
    assert res.pages_in_use_at_end == 0


def test_exhaustion_preempts_and_others_stay_exact(tiny, prompts):
    """A page budget too small for all three: the most recent request is preempted (the per-step check reserves the
    worst case, every head appending), the others finish exactly as without a budget."""
    full = Engine(tiny, "dmc", page_size=PAGE, prefill_chunk=8).generate(prompts, max_new_tokens=20, stop_ids=[-1])
    need = full.pool_high_water_pages
    res = Engine(tiny, "dmc", page_size=PAGE, prefill_chunk=8, budget_pages=need - 6).generate(
        prompts, max_new_tokens=20, stop_ids=[-1])
    assert res.preempted and res.pool_high_water_pages <= need - 6 and res.pages_in_use_at_end == 0
    for i, (a, b) in enumerate(zip(res.requests, full.requests)):
        if i in res.preempted:
            assert a.status == "preempted" and a.tokens == b.tokens[:len(a.tokens)]
        else:
            assert a.status == "finished" and a.tokens == b.tokens


# ------------------------------------------------------------------------------------------------ errors


def test_policy_and_model_must_agree(tiny):
    with pytest.raises(ValueError, match="needs a model with a DMSConfig.*use policy 'dmc'"):
        Engine(tiny, "dms", window=4)
    with pytest.raises(ValueError, match="accumulation_window \\(5\\) differs from the model's"):
        Engine(tiny, DMCPolicy(DMCConfig(accumulation_window=5)))
    with pytest.raises(ValueError, match="accumulation_window \\(5\\) differs from the model's"):
        Engine(tiny, "dmc", accumulation_window=5)
    dms_model = create_model(CFG, DMSConfig(window=3))
    with pytest.raises(ValueError, match="needs a model with a DMCConfig"):
        Engine(dms_model, "dmc")
    with pytest.raises(ValueError, match="needs a model with a DMCConfig.*use policy 'dms'"):
        Engine(dms_model, DMCPolicy(DMCConfig(accumulation_window=4)))
    with pytest.raises(ValueError, match="needs a model with a DMCConfig"):
        Engine(create_model(CFG), "dmc")


# ------------------------------------------------------------------------------------------------ CLI


class _ByteTokenizer:
    """Just enough of a tokenizer for the CLI with --no-chat: one id per character."""

    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [3 + ord(ch) % 90 for ch in text]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_cli_dmc(tiny, monkeypatch, capsys):
    from dms_jax import weights
    from experiments import generate as cli

    monkeypatch.setattr(weights, "load_model", lambda path=None, **kw: tiny)
    monkeypatch.setattr(weights, "load_tokenizer", lambda path=None: _ByteTokenizer())
    answers = cli.main(["--prompt", "a prompt of some length", "--no-chat", "--dmc", "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    assert len(answers) == 1 and "policy=dmc accumulation_window=4: KV pool high-water" in err
    assert "compression" in out
    with pytest.raises(SystemExit):
        cli.main(["--prompt", "x", "--no-chat", "--dms", "--dmc"])
    assert "exclude each other" in capsys.readouterr().err
    monkeypatch.setattr(weights, "load_model", lambda path=None, **kw: create_model(CFG))
    with pytest.raises(SystemExit):
        cli.main(["--prompt", "x", "--no-chat", "--dmc"])
    assert "--dmc needs a model with DMC settings" in capsys.readouterr().err
