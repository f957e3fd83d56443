"""experiments.evaluate: the smoke sweep (a tiny random model with the default tokenizer, every method) writes the
Pareto JSON with the documented structure, a plot and a markdown table; a second run resumes (skips every point
already there); the held-out perplexity / KL task; the confidence intervals; the hyper-scaling mode (votes over
nested prefixes of the chains, memory without prefix sharing, a tiny end-to-end run that resumes)."""

import json

import numpy as np
import pytest

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


def test_dmc_export_is_evaluated_and_a_non_dmc_export_is_refused(tmp_path):
    from dms_jax import weights

    tok = evaluate._tokenizer(None)
    weights.export_hf(evaluate.tiny_random_model(tok, dmc=True), tmp_path / "dmc")
    weights.export_hf(evaluate.tiny_random_model(tok), tmp_path / "dms")
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
    from dms_jax import tasks

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


def test_wording_families_draw_their_own_cases_and_the_default_keeps_the_old_ones():
    from dms_jax import tasks

    tok = evaluate._tokenizer(None)
    s = dict(evaluate.SWEEPS["smoke"], cases=6, depths=[0.5], wordings={"passkey": ["ruler", "natural", "lines"]})
    cases = evaluate.Runner(s, None, tok, lambda n: None).cases("passkey", 256)
    assert [c.meta["wording"] for c in cases] == ["ruler"] * 2 + ["natural"] * 2 + ["lines"] * 2
    old = tasks.make_cases("passkey", tok, 2, evaluate.TASK_SEEDS["passkey"], target_tokens=256, depth=[0.5])
    assert [c.prompt_ids for c in cases[:2]] == [c.prompt_ids for c in old]
    assert len({c.answer for c in cases}) == 6  # other needles per family


@pytest.mark.parametrize("argv,match", [
    (["--wordings", "all", "--cases", "7"], "does not split evenly"),
    (["--wordings", "ruler,haiku"], "no wording family"),
])
def test_wording_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["--sweep", "smoke", "--out", str(tmp_path / "x.json")] + argv)
    assert match in capsys.readouterr().err


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


# ------------------------------------------------------------------------------------------------ hyper-scaling


def test_vote_over_nested_prefixes_and_disjoint_blocks():
    assert evaluate.vote_widths(16) == [1, 2, 4, 8, 16]
    assert evaluate.vote_widths(12) == [1, 2, 4, 8, 12] and evaluate.vote_widths(1) == [1]
    ext = ["5", None, "7", "7", "5", "7", "7", "7"]
    # W=1: "5"; W=2: "5" (None is ignored); W=4: 5, 7, 7 -> "7"; W=8: "7".
    assert evaluate.nested_vote_scores("arithmetic", ext, "7", [1, 2, 4, 8]) == {1: 0.0, 2: 0.0, 4: 1.0, 8: 1.0}
    # Disjoint pairs: [5, None] -> 5, [7, 7] -> 7, [5, 7] -> 5 (a tie goes to the first seen), [7, 7] -> 7.
    assert evaluate.block_vote_score("arithmetic", ext, "7", 2) == 0.5
    assert evaluate.block_vote_score("arithmetic", ext, "7", 1) == 5 / 8  # W=1: the mean single-chain score
    assert evaluate.nested_vote_scores("arithmetic", [None, None], "7", [1, 2]) == {1: 0.0, 2: 0.0}
    # Variable tracking votes on the set of names (JSON lists) and scores the fraction of the answer's names.
    vt = [["ABCDE"], ["ABCDE", "FGHIJ"], ["ABCDE", "FGHIJ"]]
    assert evaluate.nested_vote_scores("variable_tracking", vt, "ABCDE FGHIJ", [1, 2, 3]) == {1: 0.5, 2: 0.5,
                                                                                             3: 1.0}
    with pytest.raises(ValueError, match="chains"):
        evaluate.nested_vote_scores("passkey", ["12345"], "12345", [1, 2])


def _case(index, answer, extracted, scores, peak, reads, dense=400):
    n = len(extracted)
    return {"index": index, "answer": answer, "extracted": extracted, "scores": scores, "peak": peak,
            "reads": reads, "dense": [dense] * n, "new_tokens": [5] * n, "prefill_reads": 10, "prompt_tokens": 90,
            "pool_peak_tokens": 200, "seconds": 1.0}


def test_memory_accounting_without_prefix_sharing():
    assert evaluate.chains_total([100, 110, 120, 130], 1) == 100
    assert evaluate.chains_total([100, 110, 120, 130], 3) == 330
    # One shared prompt of 13 pages (+1 partly filled), and per chain 1 page of new tokens, 2 spare, 4 copies.
    assert evaluate.hyperscale_budget_pages(2, 2, 100, 4, 4, 8) == 2 * 2 * (13 + 1 + 4 * (1 + 2 + 4))
    group = {"method": "dms", "series": "dms", "task": "passkey", "length": 100, "checkpoint": "ck", "layer_heads": 4,
             "settings": {"ratio": None},
             "cases": [_case(1, "22222", [None, "22222", "22222", None], [0, 1, 1, 0], [200] * 4, [2000] * 4),
                       _case(0, "12345", ["12345", "11111", "12345", "12345"], [1, 0, 1, 1], [100, 110, 120, 130],
                             [1000, 1100, 1200, 1300])]}
    by = {p["chains"]: p for p in evaluate.hyperscale_points(group)}
    assert sorted(by) == [1, 2, 4]
    # W chains hold the sum of their own peaks (prompt included, no sharing); reads likewise; mean over the cases.
    assert by[1]["peak_tokens"] == (100 + 200) / 2 and by[1]["kv_reads"] == (1000 + 2000) / 2
    assert by[2]["peak_tokens"] == (210 + 400) / 2 and by[2]["kv_reads"] == (2100 + 4000) / 2
    assert by[4]["peak_tokens"] == (460 + 800) / 2 and by[4]["kv_reads"] == (4600 + 8000) / 2
    assert by[4]["peak_tokens_per_head"] == by[4]["peak_tokens"] / 4
    assert by[1]["accuracy"] == 0.5 and by[2]["accuracy"] == 1.0 and by[4]["accuracy"] == 1.0
    assert by[1]["ci95"] == list(evaluate.wilson_interval(1, 2)) and by[1]["ci_method"] == "wilson"
    assert by[1]["accuracy_blocks"] == by[1]["single_chain_accuracy"] == 5 / 8
    for p in by.values():
        assert p["cr"] == pytest.approx(400 / (1260 / 8)) and p["cases"] == 2
        assert p["settings"]["voted"] == p["chains"]
    assert by[4]["peak_tokens_shared"] == 200 and by[1]["peak_tokens_shared"] is None


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
