"""Tests of DMC's training wiring (dms_jax/train/step.py, experiments.distill --method dmc): the borrowed neurons
zeroed, the two-stage schedule, train steps, and the CLI end to end (export, reload, resume). The math, the model
and generation are in test_dmc.py, whose random-model helpers these tests share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402
from test_dmc import LLAMA, np_sigmoid, wide_model  # noqa: E402
from dms_jax import weights  # noqa: E402
from dms_jax.config import DMCConfig  # noqa: E402
from dms_jax.train import step as train  # noqa: E402

# ----------------------------------------------------------------------------------------------- training


def test_zero_dmc_neurons_starts_from_append_everything():
    ccfg = DMCConfig(accumulation_window=4, logit_offset=5.0)
    model = wide_model(LLAMA, ccfg, seed=5)
    train.zero_dmc_neurons(model)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, LLAMA.vocab_size, size=(1, 8)), jnp.int32)
    layer = model.layers[0]
    x = model.embed_tokens(tokens)
    p = layer.self_attn.project(layer.input_layernorm(x), x, jnp.arange(8)[None], True)
    assert np.all(np.asarray(p.decision_logits) == -5.0)
    np.testing.assert_allclose(np.asarray(p.importance), np_sigmoid(5.0) + 2.0 ** -7, rtol=1e-6)
    _, aux = model(tokens, dms_mode="hard")
    assert float(aux["decisions"].max()) == 0.0


def test_distill_config_dmc_schedule_and_validation():
    cfg = train.DistillConfig(steps=20, method="dmc", neuron_decay_steps=5, cr_initial=1.0, cr_final=3.0)
    assert cfg.compression_start == 5 and cfg.schedule_final_step == 12  # 80% of the 15 compression steps
    np.testing.assert_allclose([float(cfg.target_cr(s)) for s in (0, 5, 11, 17, 19)], [1, 1, 2, 3, 3], rtol=1e-6)
    assert train.DistillConfig(steps=20).compression_start == 0
    with pytest.raises(ValueError, match="method"):
        train.DistillConfig(method="merge")
    with pytest.raises(ValueError, match="neuron_decay_steps"):
        train.DistillConfig(steps=5, method="dmc", neuron_decay_steps=5)
    with pytest.raises(ValueError, match="neuron_decay_steps"):
        train.DistillConfig(steps=5, neuron_decay_steps=2)


def test_dmc_train_steps_decay_then_compress():
    """Two decay steps then compression steps through make_train_step, after zeroing as distill does."""
    ccfg = DMCConfig(accumulation_window=4)
    model = wide_model(LLAMA, ccfg, seed=6)
    tcfg = train.DistillConfig(steps=5, batch_size=2, seq_len=16, lr=1e-3, method="dmc", neuron_decay_steps=2,
                               cr_final=4.0, cr_final_step=2, compute_dtype="float32", remat=False)
    gd, params, frozen, teacher = train.split_model(model, tcfg)
    tx = train.make_optimizer(tcfg)
    opt = tx.init(params)
    step_fn = train.make_train_step(tcfg, tx, gd)
    rng = np.random.default_rng(10)
    rows = []
    for step in range(tcfg.steps):
        if step == tcfg.compression_start:
            params, frozen = train.zero_dmc_neurons_in_states(gd, params, frozen, tcfg.trainable)
        toks = jnp.asarray(rng.integers(0, LLAMA.vocab_size, size=(1, 2, 16)), jnp.int32)
        params, opt, m = step_fn(params, frozen, teacher, opt, toks, jnp.ones(toks.shape, bool), step)
        rows.append({k: float(v) for k, v in m.items()})
    assert all(np.isfinite(v) for r in rows for v in r.values())
    np.testing.assert_allclose([r["neuron_scale"] for r in rows], [1.0, 0.375, 0, 0, 0], atol=1e-6)
    assert rows[0]["loss_cr"] == rows[1]["loss_cr"] == 0.0 and rows[0]["loss"] == rows[0]["kl"]
    assert rows[0]["kl"] < 1e-6  # scale 1 at step 0: the student is the teacher
    assert [r["target_cr"] for r in rows] == pytest.approx([1, 1, 1, 2.5, 4])
    assert rows[-1]["loss_cr"] > 0  # the hinge is active at the end of the schedule


# ----------------------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return th.tiny_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


def test_cli_dmc_run_exports_and_reloads(assets, tmp_path):
    run_dir = tmp_path / "run"
    args = th.tiny_cli_args(assets, run_dir, "--method", "dmc", "--neuron-decay-steps", "2", "--dmc-window", "4",
                            "--eval-seqs", "2", "--eval-seq-len", "64", "--passkey-cases", "2",
                            "--passkey-lengths", "320", steps=6)
    args.remove("--no-export")
    # Training, evaluation, export and four compiled generation loops: ~1 min quiet, over 5 on a loaded 2-core machine.
    th.assert_ok(th.run_cli(args, th.cli_env(assets), tmp_path / "log.txt", timeout=900))

    rows = th.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["kl"]) for r in rows)
    np.testing.assert_allclose([r["neuron_scale"] for r in rows], [1.0, 0.375, 0, 0, 0, 0], atol=1e-6)
    assert rows[0]["kl"] < 1e-6 and rows[0]["loss_cr"] == 0.0
    assert rows[2]["target_cr"] == 1.0 and rows[-1]["target_cr"] == pytest.approx(2.5)  # 1 -> 3 over 4 steps from 2

    res = json.loads((run_dir / "results.json").read_text())
    assert res["method"] == "dmc" and res["dmc_accumulation_window"] == 4 and res["neuron_decay_steps"] == 2
    assert res["compression"] >= 1 and np.isfinite(res["kl_heldout"])
    # Passkey: the student generates through its merge cache (generate_dmc), the original densely.
    assert res["passkey_cases"] == 2 and set(res["passkey_accuracy"]) == set(res["passkey_accuracy_vanilla"]) == {"320"}
    assert 0 <= res["passkey_accuracy"]["320"] <= 1 and res["passkey_cache_ratio"]["320"] >= 1
    cfg = json.loads((run_dir / "export" / "config.json").read_text())
    assert cfg["dmc_accumulation_window"] == 4 and cfg["dmc_tau"] == 0.1 and cfg["dmc_logit_offset"] == 5.0
    assert cfg["dmc_cr"] == round(res["compression"], 3)
    assert not any(k.startswith("dms_") for k in cfg)
    model = weights.load_model(run_dir / "export")
    assert model.dmc_cfg == DMCConfig(accumulation_window=4) and model.dms_cfg is None
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(1, 24)), jnp.int32)
    logits, aux = model(tokens, dms_mode="hard")
    assert np.isfinite(np.asarray(logits)).all() and aux["decisions"].shape == (2, 1, 2, 24)


def test_cli_dmc_refuses_dms_only_settings(assets, tmp_path, capsys, monkeypatch):
    from experiments import distill

    monkeypatch.setattr(weights, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    for extra, message in [(["--neuron-decay-steps", "2"], "needs --method dmc"),
                           (["--method", "dmc", "--neuron-decay-steps", "6"], "neuron_decay_steps"),
                           (["--method", "dmc", "--dmc-window", "0"], "accumulation_window")]:
        with pytest.raises(SystemExit):
            distill.main(th.tiny_cli_args(assets, tmp_path / "run", *extra))
        assert message in capsys.readouterr().err, extra


def test_cpu_dmc_preset_matches_the_cpu_budget():
    from experiments import distill

    args, _ = distill.parse_args(["--preset", "cpu-dmc"])
    _, tcfg, _, lengths = distill.validate(args)
    cpu = distill.PRESETS["cpu"]
    for key in ("steps", "batch_size", "seq_len", "lr", "trainable", "cr_final", "recall_fraction", "eval_seq_len",
                "passkey_cases"):
        assert getattr(args, key) == cpu[key], key
    assert args.method == tcfg.method == "dmc" and tcfg.compression_start == 20 and lengths == [1024, 2048]
    assert float(tcfg.target_cr(20)) == 1.0 and float(tcfg.target_cr(150)) == pytest.approx(4.5)  # as "cpu" at 150
    assert distill.parse_args([])[0].method == "dms"


@pytest.mark.slow  # three tiny runs; ~3 min quiet, 10 under load
def test_cli_dmc_resume_after_the_stage_change_equals_uninterrupted(assets, tmp_path):
    """q_proj outside the trainable set lives in the frozen state, rebuilt from the original weights on --resume: its
    borrowed neurons must be zeroed again (they feed the importance weights), or the resumed steps differ. Offset 0.5
    makes merges common, so a wrong importance shows in the KL."""
    def cli(run_dir, steps, *extra):
        args = th.tiny_cli_args(assets, run_dir, "--method", "dmc", "--neuron-decay-steps", "2", "--dmc-offset", "0.5",
                                "--trainable", "mlp|k_proj", *extra, steps=steps)
        return args + ["--cr-final-step", "4"]  # the last flag wins: the same schedule for 4 and 6 steps

    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    th.assert_ok(th.run_cli(cli(reference, 6), th.cli_env(assets), tmp_path / "ref.log"))
    th.assert_ok(th.run_cli(cli(run_dir, 4), th.cli_env(assets), tmp_path / "first.log"))
    th.assert_ok(th.run_cli(cli(run_dir, 6, "--resume"), th.cli_env(assets), tmp_path / "resumed.log"))
    rows, ref_rows = th.read_metrics(run_dir), th.read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert max(r["eviction_fraction"] for r in ref_rows) > 0.1  # merges happen: the importance weights matter
    for key in ("loss", "kl", "loss_cr", "eviction_fraction", "grad_norm", "neuron_scale"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
