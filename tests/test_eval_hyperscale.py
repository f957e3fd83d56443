"""dms_jax.eval.hyperscale: majority votes over nested prefixes and disjoint blocks of chains, and memory counted
without prefix sharing, against figures worked out by hand."""

import pytest

from dms_jax.eval import hyperscale, stats


def test_vote_over_nested_prefixes_and_disjoint_blocks():
    assert hyperscale.vote_widths(16) == [1, 2, 4, 8, 16]
    assert hyperscale.vote_widths(12) == [1, 2, 4, 8, 12] and hyperscale.vote_widths(1) == [1]
    ext = ["5", None, "7", "7", "5", "7", "7", "7"]
    # W=1: "5"; W=2: "5" (None is ignored); W=4: 5, 7, 7 -> "7"; W=8: "7".
    assert hyperscale.nested_vote_scores("arithmetic", ext, "7", [1, 2, 4, 8]) == {1: 0.0, 2: 0.0, 4: 1.0, 8: 1.0}
    # Disjoint pairs: [5, None] -> 5, [7, 7] -> 7, [5, 7] -> 5 (a tie goes to the first seen), [7, 7] -> 7.
    assert hyperscale.block_vote_score("arithmetic", ext, "7", 2) == 0.5
    assert hyperscale.block_vote_score("arithmetic", ext, "7", 1) == 5 / 8  # W=1: the mean single-chain score
    assert hyperscale.nested_vote_scores("arithmetic", [None, None], "7", [1, 2]) == {1: 0.0, 2: 0.0}
    # Variable tracking votes on the set of names (JSON lists) and scores the fraction of the answer's names.
    vt = [["ABCDE"], ["ABCDE", "FGHIJ"], ["ABCDE", "FGHIJ"]]
    assert hyperscale.nested_vote_scores("variable_tracking", vt, "ABCDE FGHIJ", [1, 2, 3]) == {1: 0.5, 2: 0.5,
                                                                                             3: 1.0}
    with pytest.raises(ValueError, match="chains"):
        hyperscale.nested_vote_scores("passkey", ["12345"], "12345", [1, 2])


def _case(index, answer, extracted, scores, peak, reads, dense=400):
    n = len(extracted)
    return {"index": index, "answer": answer, "extracted": extracted, "scores": scores, "peak": peak,
            "reads": reads, "dense": [dense] * n, "new_tokens": [5] * n, "prefill_reads": 10, "prompt_tokens": 90,
            "pool_peak_tokens": 200, "seconds": 1.0}


def test_memory_accounting_without_prefix_sharing():
    assert hyperscale.chains_total([100, 110, 120, 130], 1) == 100
    assert hyperscale.chains_total([100, 110, 120, 130], 3) == 330
    # One shared prompt of 13 pages (+1 partly filled), and per chain 1 page of new tokens, 2 spare, 4 copies.
    assert hyperscale.hyperscale_budget_pages(2, 2, 100, 4, 4, 8) == 2 * 2 * (13 + 1 + 4 * (1 + 2 + 4))
    group = {"method": "dms", "series": "dms", "task": "passkey", "length": 100, "checkpoint": "ck", "layer_heads": 4,
             "settings": {"ratio": None},
             "cases": [_case(1, "22222", [None, "22222", "22222", None], [0, 1, 1, 0], [200] * 4, [2000] * 4),
                       _case(0, "12345", ["12345", "11111", "12345", "12345"], [1, 0, 1, 1], [100, 110, 120, 130],
                             [1000, 1100, 1200, 1300])]}
    by = {p["chains"]: p for p in hyperscale.hyperscale_points(group)}
    assert sorted(by) == [1, 2, 4]
    # W chains hold the sum of their own peaks (prompt included, no sharing); reads likewise; mean over the cases.
    assert by[1]["peak_tokens"] == (100 + 200) / 2 and by[1]["kv_reads"] == (1000 + 2000) / 2
    assert by[2]["peak_tokens"] == (210 + 400) / 2 and by[2]["kv_reads"] == (2100 + 4000) / 2
    assert by[4]["peak_tokens"] == (460 + 800) / 2 and by[4]["kv_reads"] == (4600 + 8000) / 2
    assert by[4]["peak_tokens_per_head"] == by[4]["peak_tokens"] / 4
    assert by[1]["accuracy"] == 0.5 and by[2]["accuracy"] == 1.0 and by[4]["accuracy"] == 1.0
    assert by[1]["ci95"] == list(stats.wilson_interval(1, 2)) and by[1]["ci_method"] == "wilson"
    assert by[1]["accuracy_blocks"] == by[1]["single_chain_accuracy"] == 5 / 8
    for p in by.values():
        assert p["cr"] == pytest.approx(400 / (1260 / 8)) and p["cases"] == 2
        assert p["settings"]["voted"] == p["chains"]
    assert by[4]["peak_tokens_shared"] == 200 and by[1]["peak_tokens_shared"] is None
