"""The retrofit report (issue 14's done-when): one entry per DMS milestone with its whole-cache compression, per
task the DMS and original accuracy on average and in the worst wording family, the held-out KL, and a check of
each target; built from an ``experiments.evaluate`` results file (``--sweep v3``) plus the distill results.

Per task the figures pool the task's context lengths: ``dms`` / ``original`` are the mean accuracy over the
length points (equal cases each); ``*_worst`` is the family with the lowest accuracy pooled over the lengths.
``cr_cache`` is the whole-cache compression (dense / live entries at the end of prompt + answer) pooled over
every generation case of the milestone, the same figure evaluate reports for every method.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

GENERATION_TASKS = ("passkey", "variable_tracking", "multikey")
# (name, milestones with at least this whole-cache compression, task, pooled figure, allowed drop in points)
TARGETS = (
    ("CR>=4 passkey (mean)", 4.0, "passkey", "mean", 3),
    ("CR>=4 passkey (worst wording)", 4.0, "passkey", "worst", 3),
    ("CR>=4 variable tracking (mean)", 4.0, "variable_tracking", "mean", 5),
    ("CR>=4 variable tracking (worst wording)", 4.0, "variable_tracking", "worst", 5),
    ("CR>=8 passkey (mean)", 8.0, "passkey", "mean", 8),
)
PARETO_BASELINES = ("tova", "h2o", "streaming")


def pooled_task(points: list[dict]) -> dict:
    """Mean accuracy over the length points and the worst wording family pooled over them."""
    by_wording = defaultdict(list)
    for p in points:
        for w, acc in p["accuracy_by_wording"].items():
            by_wording[w].append(acc)
    family_means = {w: sum(v) / len(v) for w, v in by_wording.items()}
    worst = min(family_means, key=family_means.get)
    return {"mean": sum(p["accuracy"] for p in points) / len(points), "worst": family_means[worst],
            "worst_wording": worst, "cases": sum(p["cases"] for p in points),
            "by_length": {str(p["length"]): p["accuracy"] for p in points}}


def _by_task(points: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for p in points:
        if p["task"] in GENERATION_TASKS:
            out[p["task"]].append(p)
    return out


def milestone_entry(dms_points: list[dict], original_points: list[dict], command: str) -> dict:
    """One milestone: its compression, per task DMS vs the original (average and worst family), held-out KL."""
    gen = [p for p in dms_points if p["task"] in GENERATION_TASKS]
    if not gen:
        raise ValueError(f"checkpoint {dms_points[0]['checkpoint']}: no generation points to report")
    dense = sum(p["dense_tokens"] * p["cases"] for p in gen)
    entry = {
        "checkpoint": gen[0]["checkpoint"], "step": (gen[0].get("checkpoint_info") or {}).get("step"),
        "target_cr": (gen[0].get("checkpoint_info") or {}).get("target_cr"),
        "cr_cache": dense / sum(p["final_tokens"] * p["cases"] for p in gen),
        "cr_cache_peak": dense / sum(p["peak_tokens"] * p["cases"] for p in gen),
        "cases": sorted({p["cases"] for p in gen}),
        "command": command,
    }
    original = _by_task(original_points)
    for task, pts in _by_task(dms_points).items():
        lengths = {p["length"] for p in pts}
        ref = [p for p in original.get(task, []) if p["length"] in lengths]
        d = pooled_task(pts)
        row = {"dms": d["mean"], "dms_worst": d["worst"], "dms_worst_wording": d["worst_wording"],
               "dms_by_length": d["by_length"], "cases": d["cases"]}
        if len(ref) == len(lengths):
            o = pooled_task(ref)
            row.update(original=o["mean"], original_worst=o["worst"], original_worst_wording=o["worst_wording"],
                       original_by_length=o["by_length"])
        entry[task] = row
    held = [p for p in dms_points if p["task"] == "heldout"]
    entry["kl_heldout"] = held[0]["kl_to_vanilla"] if held else None
    entry["ppl_heldout"] = held[0]["ppl"] if held else None
    return entry


def check_targets(entries: list[dict]) -> list[dict]:
    """Each target on every milestone it applies to (by measured compression); met only where it holds on all."""
    out = []
    for name, min_cr, task, figure, drop in TARGETS:
        rows = []
        for e in entries:
            row = e.get(task, {})
            if e["cr_cache"] < min_cr or "original" not in row:
                continue
            key = "" if figure == "mean" else "_worst"
            dms, ref = row[f"dms{key}"], row[f"original{key}"]
            rows.append({"step": e["step"], "cr_cache": e["cr_cache"], "dms": dms, "original": ref,
                         "met": dms >= ref - drop / 100})
        out.append({"target": name, "allowed_drop_points": drop, "milestones": rows,
                    "met": bool(rows) and all(r["met"] for r in rows),
                    "note": None if rows else f"no milestone reaches whole-cache compression {min_cr:g}"})
    return out


def pareto_dominance(points: list[dict]) -> list[dict]:
    """Per (task, length) panel: is every TOVA / H2O / StreamingLLM point matched by a DMS point that holds no more
    peak memory and scores at least as well? Baseline points below the smallest DMS memory are listed apart."""
    panels = defaultdict(list)
    for p in points:
        if p["task"] in GENERATION_TASKS:
            panels[(p["task"], p["length"])].append(p)
    out = []
    for (task, length), pts in sorted(panels.items()):
        dms = [p for p in pts if p["method"] == "dms"]
        if not dms:
            continue
        lowest = min(p["peak_tokens"] for p in dms)
        beaten, not_beaten, below = [], [], []
        for b in (p for p in pts if p["method"] in PARETO_BASELINES):
            tag = f"{b['method']}@{b.get('compression', b['ratio']):.2f}x"
            if b["peak_tokens"] < lowest:
                below.append(tag)
            elif any(d["peak_tokens"] <= b["peak_tokens"] and d["accuracy"] >= b["accuracy"] for d in dms):
                beaten.append(tag)
            else:
                not_beaten.append(tag)
        out.append({"task": task, "length": length, "dms_above": not not_beaten, "beaten": beaten,
                    "not_beaten": not_beaten, "below_dms_memory": below})
    return out


def build_report(results: dict, distill: dict | None = None, train_step: dict | None = None) -> dict:
    """The report from an evaluate results file, the distill results (starts, recipe) and the train-step sweep."""
    points = [p for p in results["points"] if "accuracy_by_wording" in p or p["task"] == "heldout"]
    original = [p for p in points if p["method"] == "vanilla"]
    by_ckpt = defaultdict(list)
    for p in points:
        if p["method"] == "dms":
            by_ckpt[p["checkpoint"]].append(p)
    command = " ; ".join(r["command"] for r in results.get("runs", [])) or results.get("command", "")
    entries = sorted((milestone_entry(pts, original, command) for pts in by_ckpt.values()),
                     key=lambda e: (e["step"] is None, e["step"] or 0))
    held = [p for p in original if p["task"] == "heldout"]
    report = {
        "model": results.get("model"), "machine": results.get("machine"),
        "ppl_original": held[0]["ppl"] if held else None,
        "points": entries,
        "targets": check_targets(entries),
        "pareto_equal_peak_memory": pareto_dominance(points),
        "train_step_fraction_of_peak": (train_step or {}).get("train_step_fraction_of_peak"),
    }
    if distill is not None:
        report["retrofit"] = {k: distill.get(k) for k in ("command", "steps", "seq_len", "batch_size", "window",
                                                           "trainable", "cr_schedule", "starts", "wall_seconds")}
    return report


def plot_report(report: dict, png) -> None:
    """Accuracy against whole-cache compression, one panel per task: DMS milestones on average (solid) and in
    their worst wording family (dashed), the original model's average and worst family as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in report["points"] if any(t in e for t in GENERATION_TASKS)]
    tasks = [t for t in GENERATION_TASKS if any(t in e for e in entries)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.4 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        es = sorted((e for e in entries if task in e), key=lambda e: e["cr_cache"])
        x = [e["cr_cache"] for e in es]
        # Markers, not lines: the points may come from different runs or recipes; each is named by its file.
        ax.plot(x, [e[task]["dms"] for e in es], "D", color="C0", label="DMS (mean)")
        ax.plot(x, [e[task]["dms_worst"] for e in es], "D", color="C0", alpha=0.4, label="DMS (worst wording)")
        for e in es:
            name = Path(str(e["checkpoint"])).stem.replace("smollm2_", "")
            ax.annotate(name, (e["cr_cache"], e[task]["dms"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ref = next((e[task] for e in es if "original" in e[task]), None)
        if ref is not None:
            ax.axhline(ref["original"], color="k", label="original (mean)")
            ax.axhline(ref["original_worst"], color="k", ls=":", label="original (worst wording)")
        ax.set_xlabel("whole-cache compression (dense / live entries)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"DMS retrofit milestones: {report.get('model')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
