"""Statistics of evaluation points: confidence intervals, the one compression figure, wording families."""

from __future__ import annotations

import math


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean (seeded)."""
    import numpy as np

    v = np.asarray(values, np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def ci95(scores) -> tuple[list[float], str]:
    binary = all(x in (0.0, 1.0) for x in scores)
    if binary:
        return list(wilson_interval(sum(scores), len(scores))), "wilson"
    return list(bootstrap_interval(scores)), "bootstrap"


def compression_summary(dense, final_live, peak_live) -> dict:
    """The one compression figure of every method (issue 14): dense (token, layer, KV head) entries / live entries,
    pooled over the cases (a ratio of sums, so long cases weigh by their size). ``compression``: at the end of
    prompt + answer; ``compression_peak``: the same dense entries over the most entries live at any one time (what
    the memory must hold)."""
    import numpy as np

    d = float(np.sum(dense))
    return {"compression": d / max(float(np.sum(final_live)), 1e-9),
            "compression_peak": d / max(float(np.sum(peak_live)), 1e-9)}


def wording_summary(scores_by_wording: dict[str, list[float]]) -> dict:
    """Accuracy per wording family, and the worst family (ties: the first in the task's order)."""
    import numpy as np

    by = {w: float(np.mean(v)) for w, v in scores_by_wording.items()}
    worst = min(by, key=by.get)
    return {"accuracy_by_wording": by, "cases_by_wording": {w: len(v) for w, v in scores_by_wording.items()},
            "wording_worst": worst, "accuracy_worst": by[worst]}
