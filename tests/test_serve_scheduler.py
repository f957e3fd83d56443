"""dms_jax.serve.scheduler: continuous batching over one pool, checked against each request run alone through
Engine.generate (an independent path: one batch, empty cache, its own prefill and decode loop).

- staggered arrivals, a pool that admits only some requests at once, and a pool so small that running requests
  are preempted and recomputed: every greedy output equals the request alone, and no page is left at the end;
  vanilla by default admits by whole dense lengths and never preempts; idle cache entries are dropped before a
  running sequence is preempted;
- sampled requests give the same tokens alone and among neighbours (a key per request and token);
- a conversation's next turn, prefilled into its kept slot, equals the whole conversation prefilled at once, for
  vanilla, DMS and DMC; a pinned prefix is prefilled once and forked copy-on-write;
- streaming events add up to the result; cancellation frees pages; bad requests name their field;
- the compiled shapes stay bounded whatever the prompt lengths (decode segments: one per power-of-two count of
  running sequences).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_serve_engine import CHUNK, PAGE, _tiny_dms_model  # noqa: E402
from test_serve_engine_dmc import _tiny_dmc_model  # noqa: E402

from dms_jax.serve.engine import Engine  # noqa: E402
from dms_jax.serve.sampling import SamplingConfig  # noqa: E402
from dms_jax.serve.scheduler import RequestError, Scheduler  # noqa: E402
from dms_jax.serve.spec import check_invariants  # noqa: E402

CONTEXT = 96
LENGTHS = (5, 13, 21, 9, 30, 17)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_dms_model()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 97, size=n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def engines(tiny):
    return {p: Engine(tiny, p, page_size=PAGE, prefill_chunk=CHUNK) for p in ("vanilla", "dms")}


def _alone(engine, prompts, max_new, **kw):
    return [engine.generate([p], max_new_tokens=max_new, context=CONTEXT, **kw).requests[0].tokens for p in prompts]


@pytest.mark.parametrize("policy, budget, max_new, reserve_dense",
                         [("dms", None, 12, None), ("dms", 60, 12, None), ("vanilla", 90, 40, False),
                          ("vanilla", 90, 40, None)],
                         ids=["dms-roomy", "dms-tight", "vanilla-preempting", "vanilla-reserving"])
def test_staggered_requests_equal_each_alone(engines, prompts, policy, budget, max_new, reserve_dense):
    eng = engines[policy]
    sched = Scheduler(eng, max_seqs=4, context=CONTEXT, budget_pages=budget, prefill_batch=2, segment_steps=4,
                      prefix_cache=False, reserve_dense=reserve_dense)
    peak = 0
    rids = [sched.submit(p, max_new_tokens=max_new) for p in prompts[:3]]
    sched.step()
    sched.step()
    rids += [sched.submit(p, max_new_tokens=max_new) for p in prompts[3:]]
    while not sched.idle:
        sched.step()
        peak = max(peak, sched.metrics()["running"] + sched.metrics()["prefilling"])
    done = [sched.result(r) for r in rids]
    assert [d.tokens for d in done] == _alone(eng, prompts, max_new)
    assert all(d.status == "finished" for d in done)
    m = sched.metrics()
    assert m["pages_used"] == 0 and m["free_slots"] == 4
    check_invariants(sched.cache, sched.spec)
    if policy == "vanilla" and reserve_dense is False:  # 6 x (30 + 40 tokens) need 6 x 72 pages: the pool holds 90
        assert m["preemptions"] > 0
        preempted = [d.arrival for d in done if d.preemptions]
        assert preempted and min(preempted) > 0  # the oldest request is never the one that goes
    if policy == "vanilla" and reserve_dense is None:  # the default for a policy that evicts nothing
        # Dense lengths: 2 layers x 2 KV heads x ceil((prompt + 40) / 4) pages = 48 to 72 pages per request, so at
        # most one of them fits the 90 pages at a time, and none is ever preempted.
        assert m["preemptions"] == 0 and peak == 1
    if policy == "dms":
        assert all(d.compression > 1.2 for d in done)  # the tiny model evicts: fewer live than dense entries


def test_sampling_does_not_depend_on_neighbours(engines, prompts):
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    eng = engines["dms"]
    alone = Scheduler(eng, max_seqs=4, context=CONTEXT, segment_steps=4)
    solo = alone.generate([prompts[2]], max_new_tokens=10, sampling=sampling, seed=7)[0].tokens
    crowd = Scheduler(eng, max_seqs=4, context=CONTEXT, segment_steps=4)
    rids = [crowd.submit(p, max_new_tokens=10, sampling=sampling, seed=s) for s, p in enumerate(prompts[:2])]
    rid = crowd.submit(prompts[2], max_new_tokens=10, sampling=sampling, seed=7)
    crowd.run()
    assert crowd.result(rid).tokens == solo
    assert crowd.result(rids[0]).tokens != crowd.result(rids[1]).tokens


def _engine(kind, tiny):
    if kind == "dmc":
        return Engine(_tiny_dmc_model(), "dmc", page_size=PAGE, prefill_chunk=CHUNK)
    return Engine(tiny, kind, page_size=PAGE, prefill_chunk=CHUNK)


@pytest.mark.parametrize("kind", ["vanilla", "dms", "dmc"])
def test_next_turn_equals_the_whole_conversation_at_once(tiny, prompts, kind):
    eng = _engine(kind, tiny)
    sched = Scheduler(eng, max_seqs=3, context=CONTEXT, segment_steps=4)
    first = sched.generate([prompts[1]], max_new_tokens=7, stop_ids=[])[0]
    conversation = first.context + [5, 6, 7, 8, 9, 10, 11]  # the user's next turn
    turn = sched.generate([conversation], max_new_tokens=9, stop_ids=[])[0]
    assert turn.reused_tokens == len(first.context) - 1  # all but the last answer token were in the cache
    whole = eng.generate([conversation], max_new_tokens=9, context=CONTEXT, stop_ids=[]).requests[0].tokens
    assert turn.tokens == whole
    sched.drop_cache_entries()
    assert sched.metrics()["pages_used"] == 0


def test_pinned_prefix_is_prefilled_once_and_shared(engines, prompts):
    eng = engines["dms"]
    system = prompts[4]
    asks = [system + p for p in prompts[:3]]
    sched = Scheduler(eng, max_seqs=4, context=CONTEXT, segment_steps=4)
    sched.add_prefix(system)
    done = sched.generate(asks, max_new_tokens=8)
    assert [d.reused_tokens for d in done] == [len(system)] * 3
    assert sched.counters["prefill_tokens"] == len(system) + sum(len(p) for p in prompts[:3])
    assert [d.tokens for d in done] == _alone(eng, asks, 8)
    check_invariants(sched.cache, sched.spec)  # refcounts match the tables: the forks' copies are accounted
    again = sched.generate([system + prompts[5]], max_new_tokens=8)[0]  # the pinned prefix is still intact
    assert again.reused_tokens == len(system) and again.tokens == _alone(eng, [system + prompts[5]], 8)[0]


def test_cache_entries_give_way_before_a_running_sequence_is_preempted(engines, prompts):
    # Pool of 90 pages, 4 (layer, KV head) pairs, 4 tokens a page. The first request ends as a cache entry of
    # 30 + 19 = 49 cached tokens (52 pages); the second, unrelated, grows to 9 + 40 = 49 tokens (52 pages): both
    # do not fit, so the entry must be dropped while the second decodes, not the second preempted.
    eng = engines["vanilla"]
    sched = Scheduler(eng, max_seqs=4, context=CONTEXT, budget_pages=90, segment_steps=4)
    first = sched.generate([prompts[4]], max_new_tokens=20, stop_ids=[])[0]
    assert sched.metrics()["cache_entries"] == 1
    second = sched.generate([prompts[3]], max_new_tokens=40, stop_ids=[])[0]
    assert first.preemptions == 0 and second.preemptions == 0 and sched.counters["preemptions"] == 0
    assert second.tokens == eng.generate([prompts[3]], max_new_tokens=40, context=CONTEXT,
                                         stop_ids=[]).requests[0].tokens
    check_invariants(sched.cache, sched.spec)


def test_events_stream_the_tokens_and_cancel_frees_pages(engines, prompts):
    eng = engines["dms"]
    sched = Scheduler(eng, max_seqs=4, context=CONTEXT, segment_steps=4, prefix_cache=False)
    events = []
    rid = sched.submit(prompts[0], max_new_tokens=20, stop_ids=[], on_event=events.append)
    other = sched.submit(prompts[1], max_new_tokens=20, stop_ids=[])
    sched.step()
    sched.step()
    sched.cancel(other)
    sched.run()
    streamed = [t for e in events for t in e.tokens]
    assert streamed == sched.result(rid).tokens and len(streamed) == 20
    assert events[-1].done and events[-1].status == "finished" and not any(e.done for e in events[:-1])
    assert sched.result(other).status == "cancelled" and len(sched.result(other).tokens) < 20
    assert sched.metrics()["pages_used"] == 0


@pytest.mark.parametrize("kw, param", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[1, 200]), "prompt"),
    (dict(max_new_tokens=0), "max_tokens"),
    (dict(max_new_tokens=CONTEXT), "max_tokens"),
    (dict(prompt=[3] * (CONTEXT + 1)), "prompt"),
    (dict(sampling=SamplingConfig(top_k=1000)), "top_k"),
    (dict(stop_ids=list(range(9))), "stop"),
    (dict(seed=-1), "seed"),
])
def test_bad_requests_name_their_field(engines, kw, param):
    sched = Scheduler(engines["dms"], max_seqs=2, context=CONTEXT)
    args = dict(prompt=[3, 4, 5]) | kw
    with pytest.raises(RequestError) as e:
        sched.submit(args.pop("prompt"), **args)
    assert e.value.param == param


def test_too_many_tokens_for_the_pool(engines):
    sched = Scheduler(engines["vanilla"], max_seqs=2, context=CONTEXT, budget_pages=40)
    with pytest.raises(RequestError, match="more than the whole pool") as e:
        sched.submit([3] * 60, max_new_tokens=30)  # 4 heads x 23 pages
    assert e.value.param == "max_tokens"
    with pytest.raises(ValueError, match="cannot hold one prefill chunk"):
        Scheduler(engines["vanilla"], max_seqs=2, context=CONTEXT, budget_pages=8)


def test_compiled_shapes_stay_bounded(engines):
    rng = np.random.default_rng(1)
    sched = Scheduler(engines["dms"], max_seqs=4, context=CONTEXT, segment_steps=4)
    sched.generate([rng.integers(3, 97, size=n).tolist() for n in (3, 8, 11, 26, 40, 57, 4)], max_new_tokens=6)
    names = [s[0] for s in sched.compiled_shapes()]
    assert names.count("prefill") == 1 and names.count("first_tokens") == 1
    # One segment per running-sequence count rounded up to a power of two (1, 2, 4 with max_seqs=4), one width.
    sizes = {s[1] for s in sched.compiled_shapes() if s[0] == "segment"}
    assert sizes <= {1, 2, 4} and names.count("segment") == len(sizes)
    assert len(names) <= 8, sched.compiled_shapes()


def test_tova_prompt_mode_reuses_nothing(tiny, prompts):
    eng = Engine(tiny, "tova", page_size=PAGE, prefill_chunk=CHUNK, budget=12)
    sched = Scheduler(eng, max_seqs=3, context=CONTEXT, segment_steps=4)
    first = sched.generate([prompts[1]], max_new_tokens=5, stop_ids=[])[0]
    again = sched.generate([first.context + [5, 6]], max_new_tokens=5, stop_ids=[])[0]
    assert again.reused_tokens == 0
    assert again.tokens == _alone(eng, [first.context + [5, 6]], 5, stop_ids=[])[0]
