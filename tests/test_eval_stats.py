"""dms_jax.eval.stats: the confidence intervals, the one compression figure and the wording summary, against
figures worked out by hand."""

import numpy as np
import pytest

from dms_jax.eval import stats


def test_confidence_intervals():
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert stats.wilson_interval(0, 5)[0] == 0.0 and stats.wilson_interval(5, 5)[1] == 1.0
    assert stats.ci95([1.0, 0.0, 1.0])[1] == "wilson"
    vals = [0.5, 1.0, 0.0, 0.5]
    (blo, bhi), how = stats.ci95(vals)
    assert how == "bootstrap" and blo <= np.mean(vals) <= bhi
    assert stats.bootstrap_interval(vals) == (blo, bhi)  # seeded


def test_compression_is_a_ratio_of_sums_at_the_end_and_at_the_peak():
    # Two cases: 600 / 300 dense entries, 150 / 100 live at the end, 200 / 100 at their peaks.
    c = stats.compression_summary([600, 300], [150, 100], [200, 100])
    assert c["compression"] == pytest.approx(900 / 250) and c["compression_peak"] == pytest.approx(900 / 300)
    assert stats.compression_summary([10], [10], [10]) == {"compression": 1.0, "compression_peak": 1.0}


def test_wording_summary_reports_each_family_and_the_worst():
    w = stats.wording_summary({"ruler": [1.0, 1.0], "lines": [0.0, 1.0], "natural": [0.0, 1.0]})
    assert w["accuracy_by_wording"] == {"ruler": 1.0, "lines": 0.5, "natural": 0.5}
    assert (w["wording_worst"], w["accuracy_worst"]) == ("lines", 0.5)  # a tie goes to the first family
    assert w["cases_by_wording"] == {"ruler": 2, "lines": 2, "natural": 2}
