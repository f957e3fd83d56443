"""The serving benchmark's pieces (dms_jax.eval.serve_bench) on a tiny model: the workload, our scheduler under a
byte budget (greedy outputs equal each request run alone through Engine.generate), transformers' continuous
batching (outputs equal transformers' own generate), the summary ratios."""

from __future__ import annotations

import numpy as np
import pytest
from train_helpers import make_tiny_llama_dir

from dms_jax import weights
from dms_jax.eval import serve_bench


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_llama_dir(tmp_path_factory.mktemp("serve_bench") / "tiny")
    return d, weights.load_tokenizer(str(d))


def test_make_workload_lengths_arrivals_and_errors(tiny):
    _, tok = tiny
    w = serve_bench.make_workload(tok, 6, 80, 120, 5, rate=2.0, seed=3)
    assert w == serve_bench.make_workload(tok, 6, 80, 120, 5, rate=2.0, seed=3)
    lengths = [len(p) for p in w.prompts]
    assert all(78 <= n <= 124 for n in lengths), lengths  # byte tokens: a decode/encode round trip may shift one
    assert w.arrivals[0] == 0.0 and all(b > a for a, b in zip(w.arrivals, w.arrivals[1:]))
    for kw, name in ((dict(n_requests=0), "n_requests"), (dict(max_tokens=10), "max_tokens"),
                     (dict(rate=0.0), "rate")):
        args = dict(n_requests=2, min_tokens=20, max_tokens=30, answer_tokens=4, rate=1.0) | kw
        with pytest.raises(ValueError, match=name):
            serve_bench.make_workload(tok, **args)


def test_scheduler_run_matches_requests_alone_and_stays_in_budget(tiny):
    from dms_jax.serve.engine import Engine

    path, tok = tiny
    w = serve_bench.make_workload(tok, 4, 40, 90, 6, rate=50.0, seed=1)
    engine = Engine(weights.load_model(str(path)), "fixed", window=4, cr=2, prefill_chunk=32)
    budget = 400 * engine.make_spec(1, 128, budget_pages=1).bytes_per_page
    run = serve_bench.run_scheduler(engine, w, budget, max_seqs=4, context=128, segment_steps=4)
    for prompt, out in zip(w.prompts, run["outputs"]):
        alone = engine.generate([list(prompt)], max_new_tokens=6, stop_ids=[]).tokens()[0]
        assert out == list(np.asarray(alone)[:6]), (out, alone)
    assert run["pool_bytes"] <= budget and run["pool_pages"] == 400
    assert 1 <= run["max_concurrent"] <= 4 and run["generated_tokens"] == 24
    assert run["throughput_tokens_per_s"] > 0 and run["ttft_mean_s"] >= 0 and run["tpot_mean_s"] >= 0


def test_transformers_run_matches_its_own_generate(tiny):
    import torch
    from transformers import AutoModelForCausalLM

    path, tok = tiny
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    w = serve_bench.make_workload(tok, 3, 30, 60, 5, rate=50.0, seed=2)
    run = serve_bench.run_transformers(hf, w, budget_bytes=2**20, page_size=16, max_seqs=4)
    for prompt, out in zip(w.prompts, run["outputs"]):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out == ref
    assert run["generated_tokens"] == 15 and run["pool_bytes"] <= 2**20


def test_summary_ratios():
    runs = {"vanilla": {"throughput_tokens_per_s": 10.0, "max_concurrent": 2, "outputs": [[1, 2], [3]]},
            "dms-fixed8": {"throughput_tokens_per_s": 45.0, "max_concurrent": 12},
            "transformers": {"throughput_tokens_per_s": 4.0, "max_concurrent": None, "outputs": [[1, 2], [4]]}}
    s = serve_bench.summary(runs)
    assert s["throughput_dms_over_vanilla"] == 4.5 and s["concurrency_dms_over_vanilla"] == 6
    assert s["throughput_vanilla_over_transformers"] == 2.5 and s["throughput_retrofit_over_vanilla"] is None
    assert s["transformers_outputs_equal_vanilla"] == 0.5
    assert "outputs" not in serve_bench.strip_outputs(runs)["vanilla"]
