"""dms_jax.eval.survival (needle vs all-token keep rates) against plain Python loops over random decisions, on a
tiny random DMS model end to end, and the CLI on the shipped adapter (slow)."""

import json

import numpy as np
import pytest

from dms_jax.eval import survival


def test_needle_occurrences():
    assert survival.needle_occurrences([5, 1, 2, 9, 1, 2, 1], [1, 2]) == [[1, 2], [4, 5]]
    with pytest.raises(ValueError, match="do not occur"):
        survival.needle_occurrences([5, 1, 3], [1, 2])


def _loop_counts(dec, length, window, occurrences):
    """The same counts, one (layer, head, position) at a time."""
    n_layers, n_heads, _ = dec.shape
    old = [length - 1 - p > window for p in range(length)]
    needle = sorted({p for occ in occurrences for p in occ if old[p]})
    needle_kept = np.zeros((n_layers, n_heads))
    base_kept = np.zeros((n_layers, n_heads))
    whole = np.zeros((n_layers, n_heads), bool)
    for li in range(n_layers):
        for h in range(n_heads):
            kept = [dec[li, h, p] == 0 or not old[p] for p in range(length)]
            needle_kept[li, h] = sum(kept[p] for p in needle)
            base_kept[li, h] = sum(kept[p] for p in range(length) if old[p])
            whole[li, h] = any(all(old[p] and kept[p] for p in occ) for occ in occurrences)
    return needle_kept, len(needle), base_kept, sum(old), whole


def test_case_survival_matches_loops():
    rng = np.random.default_rng(7)
    window, length = 6, 40
    for trial in range(5):
        dec = (rng.random((3, 2, 48)) < 0.6).astype(np.float32)  # 8 padding positions past the prompt
        starts = sorted(rng.choice(np.arange(0, length - 3), 2, replace=False))
        occ = [[s, s + 1, s + 2] for s in starts]
        got = survival.case_survival(dec, length, window, occ)
        nk, nn, bk, bn, whole = _loop_counts(dec, length, window, occ)
        if nn == 0:
            assert got is None
            continue
        np.testing.assert_array_equal(got["needle_kept"], nk)
        np.testing.assert_array_equal(got["base_kept"], bk)
        np.testing.assert_array_equal(got["whole"], whole)
        assert (got["needle_n"], got["base_n"]) == (nn, bn)
    # A needle inside the window is always cached: the case says nothing and is left out.
    assert survival.case_survival(np.ones((1, 1, 40)), 40, 6, [[36, 37]]) is None
    s = survival.summarize([survival.case_survival(dec, length, window, occ) for dec, occ in (
        (np.zeros((2, 2, 40)), [[3, 4]]), (np.ones((2, 2, 40)), [[10, 11]]))] + [None])
    # Everything kept in case 1, nothing outside the window in case 2: half of the needle entries survive.
    assert s["cases"] == 2 and s["cases_needle_in_window"] == 1
    assert s["needle_kept"] == pytest.approx(0.5) and s["base_kept"] == pytest.approx(0.5)
    assert s["enrichment"] == pytest.approx(1.0) and s["recoverable_heads"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="inside the window"):
        survival.summarize([None])


def test_model_survival_on_a_tiny_dms_model():
    import jax.numpy as jnp

    from dms_jax import weights
    from dms_jax.eval.sweep import sweep_cases, tiny_random_model

    tok = weights.load_tokenizer(None)
    model = tiny_random_model(tok)
    cases = sweep_cases(tok, "passkey", 300, 3, ["ruler"], (0.2, 0.5))
    got = survival.model_survival(model, tok, cases, batch=2)
    # Reference: each case alone through the model, counted with the loops above.
    per = []
    for c in cases:
        _, aux = model(jnp.asarray([c.prompt_ids]), dms_mode="hard")
        occ = survival.needle_occurrences(c.prompt_ids, tok.encode(c.answer, add_special_tokens=False))
        per.append(_loop_counts(np.asarray(aux["decisions"])[:, 0], c.num_tokens, model.dms_cfg.window, occ))
    needle = sum(p[0] for p in per) / sum(p[1] for p in per)
    base = sum(p[2] for p in per) / sum(p[3] for p in per)
    assert got["cases"] == 3
    assert got["needle_kept"] == pytest.approx(float(needle.mean()), abs=1e-6)
    assert got["base_kept"] == pytest.approx(float(base.mean()), abs=1e-6)
    assert 0.0 < got["base_kept"] < 1.0, "a random adapter marks some tokens and keeps others"
    assert len(got["per_layer"]["needle_kept"]) == model.cfg.num_layers


def test_cli_errors(capsys):
    from experiments import needle_survival

    for argv, match in ((["--tasks", "variable_tracking", "--dms-model", "x"], "--tasks must name"),
                        (["--length", "50", "--dms-model", "x"], "--length"),
                        ([], "--dms-model or --dms-run")):
        with pytest.raises(SystemExit):
            needle_survival.main(argv)
        assert match in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_the_shipped_adapter(tmp_path):
    from experiments import needle_survival

    out = tmp_path / "survival.json"
    res = needle_survival.main(["--dms-model", "dms_jax/assets/smollm2_dms_adapter.safetensors", "--tasks",
                                "passkey", "--cases", "5", "--length", "512", "--out", str(out)])
    assert json.loads(out.read_text())["models"][0]["tasks"]["passkey"]["cases"] == 5
    assert out.with_suffix(".png").stat().st_size > 0
    r = res["models"][0]["tasks"]["passkey"]
    assert 0.0 < r["base_kept"] < 1.0 and 0.0 <= r["needle_kept"] <= 1.0
