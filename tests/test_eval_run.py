"""dms_jax.eval.run through its CLI, experiments.evaluate: the smoke sweep (a tiny random model with the default
tokenizer, every method) writes the Pareto JSON with the documented structure, a plot and a markdown table; a second
run resumes (skips every point already there); the held-out perplexity / KL task; the confidence intervals; the
hyper-scaling mode (votes over nested prefixes of the chains, memory without prefix sharing, a tiny end-to-end run
that resumes)."""

import json

import numpy as np
import pytest

from dms_jax.eval import run, sweep
from experiments import evaluate

POINT_KEYS = {"method", "task", "ratio", "accuracy", "ci95", "cases", "kv_reads", "peak_tokens", "settings",
              "length", "budget", "series", "compression", "compression_peak", "kv_reads_prefill", "seconds_per_case"}
GENERATION_KEYS = {"accuracy_by_wording", "cases_by_wording", "wording_worst", "accuracy_worst"}


def _check_common(res, out):
    for key in ("command", "date", "model", "machine", "points"):
        assert key in res, key
    assert json.loads(out.read_text()) == res
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert "| task | method | nominal ratio | compression (end / peak) |" in table


def test_smoke_sweep_writes_points_plot_and_table_and_resumes(tmp_path, capsys):
    out = tmp_path / "pareto.json"
    res = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress"])
    _check_common(res, out)
    pts = res["points"]
    assert sorted(p["method"] for p in pts) == sorted(evaluate.METHODS)
    for p in pts:
        assert POINT_KEYS | GENERATION_KEYS <= set(p), POINT_KEYS | GENERATION_KEYS - set(p)
        # Compression is dense entries over live ones, for every method alike; the default wording only.
        assert p["compression"] == pytest.approx(p["dense_tokens"] / p["final_tokens"], rel=1e-9)
        assert p["compression_peak"] == pytest.approx(p["dense_tokens"] / p["peak_tokens"], rel=1e-9)
        assert p["accuracy_by_wording"] == {"ruler": p["accuracy"]} and p["wording_worst"] == "ruler"
        assert p["task"] == "passkey" and p["cases"] == 2 and p["length"] == 160
        assert 0.0 <= p["ci95"][0] <= p["accuracy"] <= p["ci95"][1] <= 1.0
        assert p["kv_reads"] > 0 and p["peak_tokens"] > 0
    by = {p["method"]: p for p in pts}
    assert by["vanilla"]["ratio"] == 1.0 and by["tova"]["ratio"] == 4.0
    # Budget 160 / 4 = 40 tokens per KV head (2 layers x 2 KV heads): the evicting baselines keep exactly that.
    for m in ("tova", "h2o", "streaming"):
        assert by[m]["budget"] == 40
        # 3 layers x 2 KV heads (3 layers: Quest keeps its first two dense, as in its paper, and selects in the third)
        assert by[m]["peak_tokens"] == 40 * 6 and by[m]["peak_tokens_per_head"] == 40
        assert by[m]["kv_reads"] < by["vanilla"]["kv_reads"]
    # Quest keeps everything in memory but reads less.
    assert by["quest"]["peak_tokens"] == by["vanilla"]["peak_tokens"]
    assert by["quest"]["kv_reads"] < by["vanilla"]["kv_reads"]
    assert by["vanilla"]["compression"] == by["quest"]["compression"] == 1.0  # Quest evicts nothing
    # Budget 40 of the 164 tokens a case ends with (160-token prompt + 4 answers, the prompt sizes vary a little).
    for m in ("tova", "h2o", "streaming"):
        assert by[m]["compression"] == pytest.approx(by[m]["dense_tokens"] / 240, rel=1e-9) and by[m]["compression"] > 3.5
    assert by["dms"]["compression"] > 1.0 and by["dms"]["ratio"] == by["dms"]["compression"]
    assert by["dmc"]["compression"] > 1.0 and by["dmc"]["peak_tokens"] < by["vanilla"]["peak_tokens"]
    assert "| passkey 160 | tova | 4 | " in capsys.readouterr().out

    # Resuming: every point is there already, nothing runs, the file keeps its points and who made them.
    made_by = (res["command"], res["date"], list(res["runs"]))
    again = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--no-plot", "--cases", "2"])
    assert [p["settings"] for p in again["points"]] == [p["settings"] for p in pts]
    assert [p["seconds"] for p in again["points"]] == [p["seconds"] for p in pts]
    assert (again["command"], again["date"], again["runs"]) == made_by and len(made_by[2]) == 1
    assert f"- `{res['command']}`" in out.with_suffix(".md").read_text()


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


def test_int8_cache_points_are_their_own_series(tmp_path):
    """--cache-dtype int8: the same held-out point on an int8 K/V cache is added beside the float one (its own
    identity and series), and the int8 cache is really used: its perplexity differs from the float cache's, by
    little. (The smoke model is random and near uniform, perplexity ~ vocabulary size, so its KL to vanilla is at
    float rounding, -6e-9 on one machine: the sign of that KL says nothing. The int8 cache's logit error against
    exact references is tested in test_serve_int8_cache.py.)"""
    out = tmp_path / "p.json"
    argv = ["--sweep", "smoke", "--out", str(out), "--no-progress", "--no-plot", "--tasks", "heldout",
            "--methods", "vanilla"]
    evaluate.main(argv)
    res = evaluate.main(argv + ["--cache-dtype", "int8"])
    by = {p["series"]: p for p in res["points"]}
    assert set(by) == {"vanilla", "vanilla [int8 KV]"}
    assert by["vanilla [int8 KV]"]["settings"]["cache_dtype"] == "int8" and "cache_dtype" not in by["vanilla"]["settings"]
    ppl_float, ppl_int8 = by["vanilla"]["ppl"], by["vanilla [int8 KV]"]["ppl"]
    assert ppl_int8 != ppl_float and abs(ppl_int8 / ppl_float - 1) < 1e-3
    assert abs(by["vanilla [int8 KV]"]["kl_to_vanilla"]) < 0.05


def test_dmc_export_is_evaluated_and_a_non_dmc_export_is_refused(tmp_path):
    from dms_jax import weights

    tok = run.cached_tokenizer(None)
    weights.export_hf(sweep.tiny_random_model(tok, dmc=True), tmp_path / "dmc")
    weights.export_hf(sweep.tiny_random_model(tok), tmp_path / "dms")
    out = tmp_path / "p.json"
    res = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--no-plot", "--methods", "dmc",
                         "--dmc-model", str(tmp_path / "dmc")])
    (p,) = res["points"]
    assert p["method"] == "dmc" and p["checkpoint"] == str((tmp_path / "dmc").resolve())
    assert p["series"] == "dmc (dmc)"  # named by the export's directory
    assert p["compression"] > 1.0 and p["ratio"] == p["compression"]
    with pytest.raises(SystemExit, match="no DMC settings"):
        evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--methods", "dmc",
                       "--dmc-model", str(tmp_path / "dms")])


def test_every_wording_family_is_scored_and_the_worst_reported(tmp_path):
    from dms_jax.eval import tasks

    out = tmp_path / "w.json"
    res = evaluate.main(["--sweep", "smoke", "--out", str(out), "--no-progress", "--no-plot", "--wordings", "all",
                         "--tasks", "passkey,multikey", "--methods", "vanilla,streaming", "--cases", "10",
                         "--lengths", "256"])
    assert len(res["points"]) == 4
    for p in res["points"]:
        families = tasks.WORDINGS[p["task"]]
        assert list(p["accuracy_by_wording"]) == list(families) and set(p["cases_by_wording"].values()) == {2}
        assert p["accuracy"] == pytest.approx(np.mean(list(p["accuracy_by_wording"].values())))
        assert p["accuracy_worst"] == min(p["accuracy_by_wording"].values())
        assert p["accuracy_by_wording"][p["wording_worst"]] == p["accuracy_worst"]
        assert p["settings"]["wordings"] == list(families)  # not the identity of a default-wording point


@pytest.mark.parametrize("argv,match", [
    (["--wordings", "all", "--cases", "7"], "does not split evenly"),
    (["--wordings", "ruler,haiku"], "no wording family"),
])
def test_wording_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--sweep", "smoke", "--out", str(tmp_path / "x.json")] + argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--methods", "vanilla,nope"], "unknown"),
    (["--tasks", "poetry"], "unknown"),
    (["--ratios", "0.5"], "must be >= 1"),
    (["--depths", "1.5"], "must be in"),
    (["--cases", "0"], "must be >= 1"),
    (["--cache-dtype", "int4"], "--cache-dtype must be one of"),
])
def test_argument_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--sweep", "smoke", "--out", str(tmp_path / "x.json")] + argv)
    assert match in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ hyper-scaling


def test_hyperscale_smoke_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "hs.json"
    argv = ["--sweep", "hyperscale-smoke", "--out", str(out), "--no-progress", "--tasks", "arithmetic"]
    res = evaluate.main(argv + ["--cases", "1"])
    for key in ("command", "date", "model", "machine", "points", "groups"):
        assert key in res, key
    assert json.loads(out.read_text()) == res
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| arithmetic 200 | vanilla | 1.00 | 4 |" in out.with_suffix(".md").read_text()
    assert "| arithmetic 200 | vanilla | 1.00 | 4 |" in capsys.readouterr().out
    assert len(res["groups"]) == 2 and len(res["points"]) == 2 * 3
    for g in res["groups"]:
        (case,) = g["cases"]
        assert len(case["extracted"]) == len(case["peak"]) == len(case["reads"]) == 4
        pts = {p["chains"]: p for p in res["points"] if p["series"] == g["series"]}
        assert sorted(pts) == [1, 2, 4]
        for w, p in pts.items():
            assert {"method", "task", "chains", "cr", "accuracy", "ci95", "cases", "peak_tokens", "kv_reads"} <= set(p)
            assert p["peak_tokens"] == sum(case["peak"][:w]) and p["kv_reads"] == sum(case["reads"][:w])
            assert 0.0 <= p["ci95"][0] <= p["accuracy"] <= p["ci95"][1] <= 1.0
        # The engine shared the prompt between the chains: it held less than the 4 chains counted apart.
        assert case["pool_peak_tokens"] < pts[4]["peak_tokens"]
        if g["method"] == "vanilla":
            lh = g["layer_heads"]
            assert pts[1]["cr"] == 1.0
            assert case["peak"][0] == lh * (case["prompt_tokens"] + case["new_tokens"][0] - 1)
        else:
            assert pts[1]["cr"] > 1.0
    # Resuming with more cases runs only the new ones and keeps the old.
    again = evaluate.main(argv + ["--cases", "2", "--no-plot"])
    assert again["runs"][-1]["cases"] == 2
    for g0, g1 in zip(res["groups"], again["groups"]):
        assert [c["index"] for c in g1["cases"]] == [0, 1] and g1["cases"][0] == g0["cases"][0]
    assert all(p["cases"] == 2 for p in again["points"])
    # Nothing left to run: the file keeps who made it.
    noop = evaluate.main(argv + ["--cases", "2", "--no-plot"])
    assert (noop["command"], noop["date"], noop["runs"]) == (again["command"], again["date"], again["runs"])
    with pytest.raises(SystemExit):
        evaluate.main(argv + ["--tasks", "heldout"])
