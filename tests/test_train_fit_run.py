"""A whole adapter fit (dms_jax.train.fit_run) on a tiny model: resumable, calibrated files for read labels, one
file for head labels whose marked heads evict and kept heads keep (checked on the loaded adapter's decisions)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import make_tiny_llama_dir, write_text_jsonl

from dms_jax import dms, weights
from dms_jax.adapter import decision_logits
from dms_jax.config import DMSConfig
from dms_jax.train import fit_run
from dms_jax.train import importance as imp


def test_run_fit_resumes_and_writes_calibrated_adapters(tmp_path):
    model_dir = make_tiny_llama_dir(tmp_path / "tiny")
    data = write_text_jsonl(tmp_path / "text.jsonl", n_docs=60)
    fit = imp.FitConfig(steps=4, batch_size=2, inner_steps=2, evict_fraction=0.7, lr=1e-2)
    run = fit_run.FitRun(fit=fit, run_dir=tmp_path / "run", command="test", model=str(model_dir), data=str(data),
                     seq_len=64, window=4, recall_fraction=0.0, save_every=2, cache_ratios=(1.5, 2.0),
                     calibration_rows=2)
    fit_run.run_fit(run, progress=False)
    with pytest.raises(ValueError, match="run_dir"):
        fit_run.run_fit(run, progress=False)
    longer = fit_run.FitRun(**{**run.__dict__, "fit": imp.FitConfig(**{**fit.__dict__, "steps": 6}), "resume": True})
    results = fit_run.run_fit(longer, progress=False)

    def make_rows(model):
        from dms_jax.data.dataset import build_dataset

        held = build_dataset(weights.load_tokenizer(str(model_dir)), 64, str(data), last="drop").heldout
        return held.tokens[:2], held.valid[:2]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    starts = [json.loads(line)["step"] for line in (tmp_path / "run" / "starts.jsonl").read_text().splitlines()]
    assert starts == [0, 4]
    for ratio in ("1.5", "2"):
        c = results["files"][ratio]
        loaded = weights.load_model(str(model_dir), dms=c["file"])
        # The calibrated threshold is folded into the weights: the file keeps the run's DMSConfig.
        assert loaded.dms_cfg == DMSConfig(variant="adapter", window=4)
        rows = make_rows(loaded)
        assert imp.adapter_cache_ratio(loaded, *rows, loaded.dms_cfg.alpha_offset) == pytest.approx(
            c["cache_ratio"], rel=1e-5)
        assert abs(c["cache_ratio"] - float(ratio)) < 0.15 * float(ratio)
    jax.clear_caches()


def test_run_fit_with_head_labels_marks_the_least_needed_heads(tmp_path):
    model_dir = make_tiny_llama_dir(tmp_path / "tiny")
    data = write_text_jsonl(tmp_path / "text.jsonl", n_docs=160)
    fit = imp.FitConfig(steps=30, batch_size=2, inner_steps=4, lr=1e-2)
    run = fit_run.FitRun(fit=fit, run_dir=tmp_path / "run", command="test", model=str(model_dir), data=str(data),
                         seq_len=512, window=4, recall_fraction=0.5, labels="heads", keep_heads=1, sink=2,
                         damage_rows=2, calibration_rows=2)
    results = fit_run.run_fit(run, progress=False)
    damage = np.load(tmp_path / "run" / "head_damage.npy")
    assert damage.shape == (2, 2) and results["kept"] == [list(np.unravel_index(np.argmax(damage), (2, 2)))]
    loaded = weights.load_model(str(model_dir), dms=results["files"]["heads"]["file"])
    from dms_jax.data.dataset import build_dataset

    tokens = build_dataset(weights.load_tokenizer(str(model_dir)), 512, str(data), last="drop").heldout.tokens[:1]
    marked = np.asarray(dms.hard_decisions(dms.owner_logits(jnp.asarray(decision_logits(loaded, tokens)[:, 0]),
                                                            None)))  # [L, Hkv, T]
    kept = tuple(results["kept"][0])
    share = marked[:, :, 2:-1].mean(axis=-1)  # [L, Hkv]: the share of decided tokens each head marks
    assert share[kept] < 0.25, share
    # Layer 0 reads the bare embedding, which a linear adapter of a tiny random model cannot push to one side for
    # every token: there the marked heads need only mark more than the kept one.
    for layer, head in np.ndindex(*share.shape):
        if (layer, head) != kept:
            assert share[layer, head] > (0.75 if layer > 0 else share[kept] + 0.2), share
    for bad, name in ((dict(labels="tokens"), "labels"), (dict(keep_heads=-1), "keep_heads"),
                      (dict(damage_rows=0), "damage_rows")):
        with pytest.raises(ValueError, match=name):
            fit_run.FitRun(fit=fit, run_dir=tmp_path, command="x", **bad)
    with pytest.raises(ValueError, match="--resume"):
        fit_run.run_fit(fit_run.FitRun(fit=fit, run_dir=tmp_path / "empty", command="x", model=str(model_dir),
                                       resume=True), progress=False)
    jax.clear_caches()
