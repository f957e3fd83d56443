"""dms_jax.eval.bench_decode on a tiny random model: the results record has the rows and fields the plot and the
results notebook read, the time budget records contexts as not run, the outputs are written. No timing asserted."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dms_jax.config import ModelConfig
from dms_jax.eval import bench_decode
from dms_jax.eval.bench_decode import REPEATS, DecodeBenchConfig
from dms_jax.model import create_model

CFG = ModelConfig(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True)
BENCH = DecodeBenchConfig(contexts=(48,), chains=(1, 2), cr=4, window=8, steps=2, new_tokens=0, page_size=8,
                          prefill_chunk=16, transformers=False)
PLOT_FIELDS = {"context", "chains", "cr", "tokens_per_s_vanilla", "tokens_per_s_dms", "tokens_per_s_transformers",
               "tokens_per_s_transformers_default", "kv_peak_bytes_vanilla", "kv_peak_bytes_dms", "kv_memory_ratio"}


@pytest.fixture(scope="module")
def result():
    model = create_model(CFG, seed=0)
    return bench_decode.run_benchmark(BENCH, model, model_name="tiny random Llama", argv=["--contexts", "48"])


def test_rows_have_the_fields_the_plot_needs(result):
    for key in ("command", "machine", "date", "conditions", "model", "decisions", "settings", "runs", "not_run"):
        assert key in result, key
    assert result["command"] == "python benchmarks/bench_engine_decode.py --contexts 48"
    assert result["model"] == "tiny random Llama" and result["not_run"] == []
    assert result["settings"]["generated_tokens_per_chain"] == bench_decode.decode_length(2, 0) == 1 + (1 + REPEATS) * 2
    rows = result["runs"]
    assert [(r["context"], r["chains"]) for r in rows] == [(48, 1), (48, 2)]
    for r in rows:
        assert PLOT_FIELDS <= set(r), PLOT_FIELDS - set(r)
        assert r["cr"] == 4 and r["window"] == 8 and r["context_tokens"] == 48
        assert r["tokens_per_s_transformers"] is None and r["speedup_vanilla_vs_transformers"] is None
        assert r["tokens_per_s_vanilla"] > 0 and r["tokens_per_s_dms"] > 0
        assert r["kv_memory_ratio"] == pytest.approx(r["kv_peak_bytes_vanilla"] / r["kv_peak_bytes_dms"])
        assert r["kv_memory_ratio_per_chain"] == pytest.approx(
            r["kv_peak_bytes_per_chain_vanilla"] / r["kv_peak_bytes_per_chain_dms"])
        assert r["achieved_cr_dms"] > 1.0  # fixed decisions: 3 of every 4 tokens leave once 8 tokens old
        assert r["timed_forwards"] >= REPEATS * 2 and r["timed_forwards"] % 2 == 0
        assert set(r["ms_per_step"]) == {"vanilla", "dms", "transformers", "transformers_default"}


def test_outputs_are_written_and_the_time_budget_stops_contexts(result, tmp_path):
    out = bench_decode.write_outputs(result, tmp_path / "engine_decode.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert out.with_suffix(".png").stat().st_size > 1000
    model = create_model(CFG, seed=0)
    late = bench_decode.run_benchmark(dataclasses.replace(BENCH, time_budget=0.0), model, model_name="tiny")
    assert late["runs"] == [] and late["not_run"] == [
        {"context": 48, "chains": 1, "reason": "time budget"}, {"context": 48, "chains": 2, "reason": "time budget"}]
    bench_decode.write_outputs(late, tmp_path / "late.json")
    assert not (tmp_path / "late.png").exists()
