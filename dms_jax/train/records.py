"""The files a retrofit run writes besides its checkpoints: starts.jsonl, metrics.jsonl, the training plot and the
results JSON (layout in ``dms_jax.train.distill``)."""

from __future__ import annotations

import json
from pathlib import Path

from dms_jax.provenance import utc_now

__all__ = ["record_start", "read_starts", "reset_metrics", "append_metrics", "plot_metrics", "write_results"]


def record_start(path: Path, step: int, command: str, resumed: bool, warm_start: str | None = None,
                 init_adapter: str | None = None) -> None:
    """Appends one line per start of the run (the first one, then every --resume): when, from which step, how
    (``warm_start``: the adapter file a fresh run directory continued from, with a fresh optimizer state;
    ``init_adapter``: the adapter file a fresh run started from at step 0).
    A fresh start clears the file; the results JSON lists them all as "starts"."""
    if not resumed and path.exists():
        path.unlink()
    row = {"date": utc_now(), "from_step": int(step), "resumed": bool(resumed), "command": command}
    if warm_start:
        row.update(warm_start=str(warm_start), optimizer_state="fresh")
    if init_adapter:
        row.update(init_adapter=str(init_adapter))
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_starts(path: Path) -> list[dict]:
    """The starts that ``record_start`` recorded, oldest first."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def reset_metrics(path: Path, resumed: bool, start_step: int) -> None:
    """A fresh start deletes metrics.jsonl. A resumed one keeps the rows up to ``start_step``: a killed run may
    have logged steps after its last checkpoint, which are redone now, so they are dropped (with a line cut in
    half by the kill) to keep one row per step."""
    if not resumed and path.exists():
        path.unlink()
    if resumed and path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= start_step:
                kept.append(line + "\n")
        path.write_text("".join(kept))


def append_metrics(path: Path, row: dict) -> None:
    """One JSON line per training step."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_metrics(metrics_file: Path, png: Path, title: str = "DMS retrofit"):
    # An explicit Figure + Agg canvas, not pyplot: no global backend switch or figure registry, so a notebook that
    # plots while main() runs in a thread is left alone. Imported here: matplotlib is an optional dependency.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in open(metrics_file)]
    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    a, b = fig.subplots(1, 2)
    a.plot(steps, [r["kl"] for r in rows], label="KL(student || teacher)")
    a.plot(steps, [r["loss_cr"] for r in rows], label="compression hinge")
    a.set_xlabel("step"), a.set_ylabel("loss"), a.set_yscale("log"), a.legend(), a.grid(alpha=0.3)
    b.plot(steps, [r["target_cr"] for r in rows], label="target CR")
    b.plot(steps, [1 / max(1 - r["eviction_fraction"], 1e-6) for r in rows], label="achieved CR (train, hard)")
    b.set_xlabel("step"), b.set_ylabel("compression ratio"), b.legend(), b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def write_results(result: dict, run_dir: Path, results_file: str | None, metrics_file: Path, title: str) -> None:
    """run_dir/results.json; with ``results_file`` also a copy there and the training plot beside it (.png).
    Prints the result, without the data's metadata."""
    with open(run_dir / "results.json", "w") as f:
        json.dump(result, f, indent=2)
    if results_file:
        Path(results_file).parent.mkdir(parents=True, exist_ok=True)
        with open(results_file, "w") as f:
            json.dump(result, f, indent=2)
        plot_dst = Path(results_file).with_suffix(".png")
        plot_metrics(metrics_file, plot_dst, title)
    print(json.dumps({k: v for k, v in result.items() if k not in ("data",)}, indent=2))
