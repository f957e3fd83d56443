"""experiments.evaluate: the smoke sweep (a tiny random model with the default tokenizer, every method) writes the
Pareto JSON with the documented structure, a plot and a markdown table; a second run resumes (skips every point
already there); the held-out perplexity / KL task; the confidence intervals."""

import json

import numpy as np
import pytest

from experiments import evaluate

POINT_KEYS = {"method", "task", "ratio", "accuracy", "ci95", "cases", "kv_reads", "peak_tokens", "settings",
              "length", "budget", "series", "measured_ratio", "kv_reads_prefill", "seconds_per_case"}


def _check_common(res, out):
    for key in ("command", "date", "model", "machine", "points"):
        assert key in res, key
    assert json.loads(out.read_text()) == res
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert "| task | method | ratio |" in table


def test_smoke_sweep_writes_points_plot_and_table_and_resumes(tmp_path, capsys):
    out = tmp_path / "pareto.json"
    res = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress"])
    _check_common(res, out)
    pts = res["points"]
    assert sorted(p["method"] for p in pts) == sorted(evaluate.METHODS)
    for p in pts:
        assert POINT_KEYS <= set(p), POINT_KEYS - set(p)
        assert p["task"] == "passkey" and p["cases"] == 2 and p["length"] == 160
        assert 0.0 <= p["ci95"][0] <= p["accuracy"] <= p["ci95"][1] <= 1.0
        assert p["kv_reads"] > 0 and p["peak_tokens"] > 0
    by = {p["method"]: p for p in pts}
    assert by["vanilla"]["ratio"] == 1.0 and by["tova"]["ratio"] == 4.0
    # Budget 160 / 4 = 40 tokens per KV head (2 layers x 2 KV heads): the evicting baselines keep exactly that.
    for m in ("tova", "h2o", "streaming"):
        assert by[m]["budget"] == 40
        assert by[m]["peak_tokens"] == 40 * 4 and by[m]["peak_tokens_per_head"] == 40
        assert by[m]["kv_reads"] < by["vanilla"]["kv_reads"]
    # Quest keeps everything in memory but reads less.
    assert by["quest"]["peak_tokens"] == by["vanilla"]["peak_tokens"]
    assert by["quest"]["kv_reads"] < by["vanilla"]["kv_reads"]
    assert by["dms"]["measured_ratio"] > 1.0
    assert "| passkey 160 | tova | 4 |" in capsys.readouterr().out

    # Resuming: every point is there already, nothing runs, the file keeps its points.
    again = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--no-plot"])
    assert [p["settings"] for p in again["points"]] == [p["settings"] for p in pts]
    assert [p["seconds"] for p in again["points"]] == [p["seconds"] for p in pts]
    assert len(again["runs"]) == 2 and again["runs"][1]["points"] == 0


def test_heldout_task_and_a_new_ratio_is_added(tmp_path):
    out = tmp_path / "p.json"
    res = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--tasks", "heldout",
                         "--methods", "vanilla,streaming,quest", "--ratios", "2"])
    _check_common(res, out)
    by = {p["method"]: p for p in res["points"]}
    assert set(by) == {"vanilla", "streaming"}  # Quest's prefill is dense: no held-out point
    assert by["vanilla"]["kl_to_vanilla"] == 0.0 and by["vanilla"]["ppl"] > 1
    assert by["streaming"]["kl_to_vanilla"] > 0 and by["streaming"]["peak_tokens_per_head"] == 48
    assert by["vanilla"]["peak_tokens_per_head"] == 96
    res = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--no-plot", "--tasks",
                         "heldout", "--methods", "vanilla,streaming", "--ratios", "2,4"])
    assert sorted((p["method"], p["ratio"]) for p in res["points"]) == [("streaming", 2.0), ("streaming", 4.0),
                                                                        ("vanilla", 1.0)]
    assert res["runs"][-1]["points"] == 1


def test_confidence_intervals():
    lo, hi = evaluate.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert evaluate.wilson_interval(0, 5)[0] == 0.0 and evaluate.wilson_interval(5, 5)[1] == 1.0
    assert evaluate.ci95([1.0, 0.0, 1.0])[1] == "wilson"
    vals = [0.5, 1.0, 0.0, 0.5]
    (blo, bhi), how = evaluate.ci95(vals)
    assert how == "bootstrap" and blo <= np.mean(vals) <= bhi
    assert evaluate.bootstrap_interval(vals) == (blo, bhi)  # seeded


@pytest.mark.parametrize("argv,match", [
    (["--methods", "vanilla,nope"], "unknown"),
    (["--tasks", "poetry"], "unknown"),
    (["--ratios", "0.5"], "must be >= 1"),
    (["--depths", "1.5"], "must be in"),
    (["--cases", "0"], "must be >= 1"),
])
def test_argument_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--sweep", "smoke", "--out", str(tmp_path / "x.json")] + argv)
    assert match in capsys.readouterr().err
