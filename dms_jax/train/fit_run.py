"""A whole adapter fit as ``experiments.fit_adapter`` runs it: data, labels, saving, resuming, the output files.

Two label kinds (``FitRun.labels``):

* ``"reads"``: the future read weight of every (layer, KV head, token) (``dms_jax.train.importance``); the fitted
  logits rank tokens, and one calibrated file per ``cache_ratios`` entry sets the threshold;
* ``"heads"``: per KV head, the distillation loss when that head alone marks every token
  (``dms_jax.train.heads.marked_head_damage`` on long-range rows, saved as ``head_damage.npy`` and reused on
  resume); the ``keep_heads`` heads that hurt most keep every token, the others mark all but their first ``sink``
  tokens. One file, ``adapter_heads<K>.safetensors``: the number of kept heads sets the compression.

The run directory gets ``metrics.jsonl``, ``starts.jsonl``, ``adapter_latest.safetensors`` (every ``save_every``
batches; ``resume`` continues from it with fresh Adam moments), the final files and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from dms_jax.config import DMSConfig
from dms_jax.train import heads
from dms_jax.train.importance import FitConfig, adapter_cache_ratio, calibrate_offset, fit_adapter, save_fitted

__all__ = ["FitRun", "LABELS", "run_fit"]

LABELS = ("reads", "heads")


@dataclasses.dataclass(frozen=True)
class FitRun:
    fit: FitConfig
    run_dir: Path
    command: str
    model: str | None = None  # safetensors dir or .gguf; None: the embedded default
    data: str = "default"
    seq_len: int = 1024
    window: int = 64
    recall_fraction: float = 0.5  # long-range rows (dms_jax.data.synthetic) among the training rows
    save_every: int = 25
    resume: bool = False
    labels: str = "reads"
    cache_ratios: tuple[float, ...] = (4.0,)  # "reads": calibrated adapter files written at the end
    calibration_rows: int = 8  # held-out rows of seq_len tokens
    keep_heads: int = 18  # "heads": heads that keep every token
    sink: int = 4  # "heads": the first tokens every head keeps
    damage_rows: int = 4  # "heads": long-range rows the damage is measured on

    def __post_init__(self):
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        for name in ("keep_heads", "sink"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.damage_rows, int) or self.damage_rows < 1:
            raise ValueError(f"damage_rows must be an integer >= 1, got {self.damage_rows!r}")


def _load(run: FitRun):
    """(model, start_step): the base with a fresh adapter, or with the run's saved one when resuming."""
    from dms_jax import weights
    from dms_jax.adapter import read_adapter

    latest = run.run_dir / "adapter_latest.safetensors"
    if not run.resume:
        if latest.exists():
            raise ValueError(f"run_dir: {run.run_dir} already holds a fit; pass --resume or another --run-dir")
        return weights.load_model(run.model, dms=DMSConfig(variant="adapter", window=run.window)), 0
    if not latest.exists():
        raise ValueError(f"--resume: no {latest.name} in {run.run_dir}")
    saved = read_adapter(latest)
    if saved.dms_config.window != run.window:
        raise ValueError(f"--resume: the run fitted window {saved.dms_config.window}, not --window {run.window}")
    return weights.load_model(run.model, dms=latest), int(saved.provenance["step"])


def _append_json(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _head_damage(run: FitRun, model, data, progress: bool) -> np.ndarray:
    """The per-head damage, measured once on the first ``damage_rows`` long-range rows and kept in the run dir."""
    from tqdm import tqdm

    path = run.run_dir / "head_damage.npy"
    if path.exists():
        return np.load(path)
    weight = data.train.loss_weight
    if weight is None:
        raise ValueError("recall_fraction: head labels are measured on long-range rows; it must be > 0")
    rows = np.flatnonzero((weight > 1).any(axis=1))[: run.damage_rows]
    bar = tqdm(total=model.cfg.num_layers * model.cfg.num_kv_heads, disable=not progress, desc="head damage")
    damage = heads.marked_head_damage(model, data.train.tokens[rows], data.train.valid[rows], run.window,
                                      sink=run.sink, loss_weight=weight[rows], on_head=lambda *_: bar.update(1))
    bar.close()
    np.save(path, damage)
    return damage


def run_fit(run: FitRun, progress: bool = True) -> dict:
    """Fits, saves as it goes, writes the final adapter files and ``results.json`` (module docstring)."""
    from tqdm import tqdm

    from dms_jax import weights
    from dms_jax.data.dataset import build_dataset
    from dms_jax.provenance import machine_description, utc_now

    run.run_dir.mkdir(parents=True, exist_ok=True)
    model, start = _load(run)
    tokenizer = weights.load_tokenizer(run.model)
    # Head damage weighs the long-range rows' question blocks (where far facts are needed) 10x.
    data = build_dataset(tokenizer, run.seq_len, run.data, last="drop", recall_fraction=run.recall_fraction,
                         synthetic_kind="longrange", window=run.window,
                         answer_weight=10.0 if run.labels == "heads" and run.recall_fraction > 0 else 1.0)
    _append_json(run.run_dir / "starts.jsonl", {"step": start, "command": run.command, "date": utc_now()})
    base = {"command": run.command, "base_model": str(run.model or "SmolLM2-135M-Instruct (embedded)"),
            "method": f"attention-fit ({run.labels})", "fit": dataclasses.asdict(run.fit), "seq_len": run.seq_len}
    labels_fn = None
    if run.labels == "heads":
        keep = heads.heads_to_keep(_head_damage(run, model, data, progress), run.keep_heads)
        labels_fn = lambda read, labelled, valid: heads.head_labels(keep, valid, run.sink)  # noqa: E731
        base.update(keep_heads=run.keep_heads, sink=run.sink,
                    kept=[[int(layer), int(h)] for layer, h in zip(*np.nonzero(keep))])
    bar = tqdm(total=run.fit.steps, initial=start, disable=not progress, desc="fit adapter")

    def on_step(step, metrics):
        _append_json(run.run_dir / "metrics.jsonl", {"step": step, **metrics})
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", agreement=f"{metrics['agreement']:.2f}")
        if step % run.save_every == 0 or step == run.fit.steps:
            save_fitted(model, run.run_dir / "adapter_latest.safetensors", {**base, "step": step})

    fit_adapter(model, data.train.tokens, data.train.valid, run.fit, on_step=on_step, start_step=start,
                labels_fn=labels_fn)
    bar.close()
    rows = data.heldout.tokens[: run.calibration_rows], data.heldout.valid[: run.calibration_rows]
    files = {}
    if run.labels == "heads":
        path = save_fitted(model, run.run_dir / f"adapter_heads{run.keep_heads}.safetensors",
                           {**base, "step": run.fit.steps})
        files["heads"] = {"file": str(path), "cache_ratio": adapter_cache_ratio(model, *rows,
                                                                                 model.dms_cfg.alpha_offset)}
    for ratio in run.cache_ratios if run.labels == "reads" else ():
        offset, measured = calibrate_offset(model, *rows, target_cache_ratio=ratio)
        path = save_fitted(model, run.run_dir / f"adapter_cr{ratio:g}.safetensors",
                           {**base, "step": run.fit.steps, "calibrated_cache_ratio": ratio,
                            "calibration": f"{len(rows[0])} held-out rows of {run.seq_len} tokens"}, offset)
        files[f"{ratio:g}"] = {"alpha_offset": offset, "file": str(path), "cache_ratio": measured}
    results = {**base, "machine": machine_description(), "date": utc_now(), "steps": run.fit.steps,
               "train_rows": int(data.train.tokens.shape[0]), "files": files,
               "heldout_rows": f"{len(rows[0])} held-out rows of {run.seq_len} tokens"}
    (run.run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results
