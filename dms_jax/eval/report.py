"""A sweep's results file: load and save (atomically), the markdown table, the Pareto plot over KV reads and peak
memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dms_jax.eval.sweep import BASELINES, METHODS


def load_results(path: Path) -> dict:
    if path.is_file():
        with open(path) as f:
            return json.load(f)
    return {"points": [], "runs": []}


def save_results(path: Path, results: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def _panel(p) -> str:
    return f"{p['task']} {p['length']}"


def _series(p) -> str:
    """A point's curve: its series (a DMS run's milestones, one DMC export), else its method."""
    return p.get("series") or p["method"]


def _series_colors(points) -> dict[str, str]:
    """One colour per series (not per method): a DMS export and a run's milestones are different curves."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted({_series(p) for p in points}))}


def _fmt_ratio(p) -> str:
    """The nominal ratio a baseline was run at (its budget); '-' for the methods whose ratio is only measured."""
    return f"{p['ratio']:g}" if p["method"] in BASELINES else "-"


def _fmt_compression(p) -> str:
    """The measured whole-cache compression, at the end / at the peak (files from before it: the old peak ratio)."""
    if "compression" not in p:
        return f"{p['measured_ratio']:.2f} (peak)" if "measured_ratio" in p else "-"
    return f"{p['compression']:.2f} / {p['compression_peak']:.2f}"


def _fmt_accuracy(p) -> str:
    if p["accuracy"] is None:
        return f"ppl {p['ppl']:.2f}, KL {p['kl_to_vanilla']:.4f}"
    acc = f"{p['accuracy']:.2f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"
    if len(p.get("accuracy_by_wording", {})) > 1:
        acc += f"; worst {p['accuracy_worst']:.2f} ({p['wording_worst']})"
    return acc


def markdown_table(points) -> str:
    lines = ["| task | method | nominal ratio | compression (end / peak) | accuracy (95% CI; worst wording) | cases | "
             "KV reads (decode) | peak tokens / head | s / case |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {m: i for i, m in enumerate(METHODS)}
    for p in sorted(points, key=lambda p: (p["task"], p["length"], order.get(p["method"], 99), p.get("series") or "",
                                           p["ratio"] if p["ratio"] is not None else 0)):
        reads = f"{p['kv_reads']:.3g}" if p["task"] != "heldout" else f"{p['kv_reads_prefill']:.3g} (prefill)"
        lines.append(f"| {_panel(p)} | {_series(p)} | {_fmt_ratio(p)} | {_fmt_compression(p)} | {_fmt_accuracy(p)} "
                     f"| {p['cases']} | {reads} | {p['peak_tokens_per_head']:.0f} | {p['seconds_per_case']:.1f} |")
    return "\n".join(lines) + "\n"


def panel_figure(points, png: Path, title: str, draw, panel_width: float = 4.2, legend_columns: int = 7):
    """The scaffold both sweep plots share: one column per (task, length) panel, two rows (``draw(ax, row,
    panel_points, colors)`` fills each axis), one legend for all series at the bottom, saved to ``png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({_panel(p) for p in points})
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(panel_width * len(panels), 7.4), squeeze=False)
    colors = _series_colors(points)
    for col, panel in enumerate(panels):
        for row in range(2):
            draw(axes[row][col], row, [p for p in points if _panel(p) == panel], colors)
            axes[row][col].set_title(panel)
            axes[row][col].grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
               ncol=min(len(handles), legend_columns), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def log_x_if_positive(ax, xs, base: float = 10):
    import matplotlib.ticker

    if all(x > 0 for x in xs):
        ax.set_xscale("log", base=base)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


MARKERS = {"vanilla": "*", "dms": "D", "dmc": "P", "tova": "o", "h2o": "s", "streaming": "^", "quest": "v"}


def _draw_pareto_axis(ax, row: int, pts, colors):
    """Accuracy (held-out: KL) against KV reads (row 0) or peak tokens (row 1), one curve per series."""
    heldout = pts[0]["task"] == "heldout"
    xkey, xlabel = [("kv_reads", "KV-cache token reads per case (decode)"),
                    ("peak_tokens", "peak tokens in memory per case")][row]
    if heldout and xkey == "kv_reads":
        xkey, xlabel = "kv_reads_prefill", "KV-cache token reads per sequence (prefill)"
    ykey = "kl_to_vanilla" if heldout else "accuracy"
    for series in sorted({_series(p) for p in pts}):
        sp = sorted((p for p in pts if _series(p) == series), key=lambda p: p[xkey])
        m = sp[0]["method"]
        x, y = [p[xkey] for p in sp], [p[ykey] for p in sp]
        if heldout:
            ax.plot(x, y, marker=MARKERS.get(m, "o"), color=colors[series], label=series)
        else:
            err = [[p["accuracy"] - p["ci95"][0] for p in sp], [p["ci95"][1] - p["accuracy"] for p in sp]]
            ax.errorbar(x, y, yerr=err, marker=MARKERS.get(m, "o"), color=colors[series], label=series,
                        capsize=3, markersize=8 if m == "vanilla" else 5)
        for p in sp:  # every compressed point carries its measured whole-cache compression
            if p["method"] != "vanilla" and "compression" in p:
                ax.annotate(f"{p['compression']:.1f}x", (p[xkey], p[ykey]), fontsize=7, textcoords="offset points",
                            xytext=(3, 3))
    log_x_if_positive(ax, [p[xkey] for p in pts])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("KL to vanilla (nats / token)" if heldout else "accuracy")


def plot(points, png: Path, title: str):
    panel_figure(points, png, title, _draw_pareto_axis)


def markdown_header(results: dict) -> str:
    """Every command that added points to the file (a sweep resumes and grows over several runs), model, machine."""
    runs = results.get("runs") or [{"command": results["command"], "date": results["date"]}]
    commands = "".join(f"- `{r['command']}` ({r['date']})\n" for r in runs)
    return (f"Commands, in the order they added points (a rerun skips the points already in the file):\n\n"
            f"{commands}\nModel: {results['model']}  \nMachine: {results['machine']}  \nDate: {results['date']}\n")


def write_outputs(out: Path, results: dict, plot_it: bool) -> str:
    table = markdown_table(results["points"])
    md = out.with_suffix(".md")
    with open(md, "w") as f:
        f.write(f"{markdown_header(results)}\n{table}")
    if plot_it:
        plot(results["points"], out.with_suffix(".png"), f"Pareto: {results['model']}")
    return table
