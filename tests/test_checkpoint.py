"""Orbax checkpoints of a retrofit (dms_jax.checkpoint) and `--resume` of `python -m experiments.distill`.

The central claim: a run killed with SIGKILL after its first checkpoint and resumed with --resume ends with the
same parameters as an uninterrupted run -- bit for bit (data position and Gumbel noise are pure functions of the
step, the optimizer state is restored exactly, the step compiles to the same program). Also: keep-K retention,
a milestone at every whole target CR, refusal to resume from another architecture / DMS setting (before any
compute), resuming a finished run is a no-op, and a NaN stops the run with the last good checkpoint intact.

CLI runs are subprocesses of the tiny byte-tokenizer Llama (tests/train_helpers.py) sharing one XLA cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402
from dms_jax import weights  # noqa: E402
from dms_jax.checkpoint import RetrofitCheckpoints  # noqa: E402
from dms_jax.config import DMSConfig  # noqa: E402
from dms_jax.train import step as train  # noqa: E402

STEPS = 12
# checkpoint every 2 steps, keep 2; target CR 1 -> 3 over 10 steps: whole CRs 2 and 3 at steps 5 and 10.
RUN_FLAGS = ["--checkpoint-every", "2", "--keep-checkpoints", "2", "--cr-final", "3", "--cr-final-step", "10"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return th.tiny_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


def cli(assets, run_dir, *extra):
    args = th.tiny_cli_args(assets, run_dir, *RUN_FLAGS, *extra, steps=STEPS)
    return [a for a in args if a != "--no-export"]  # these runs export: the parameters are compared there


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted 12-step run (export on)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    th.assert_ok(th.run_cli(cli(assets, run_dir), th.cli_env(assets), run_dir.parent / "log.txt"))
    return run_dir


def tree_digest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def restore_params(run_dir: Path, model_dir: Path, *, step=None, milestone=False) -> tuple[dict, dict | None]:
    """HF-named float32 weights (and meta) of a checkpoint of a tiny-preset run (neuron variant, window 4)."""
    tcfg = train.DistillConfig(trainable="all", compute_dtype="float32")
    model = weights.load_model(model_dir, dms=DMSConfig(window=4))
    graphdef, params, frozen, _ = train.split_model(model, tcfg)
    ckpt = RetrofitCheckpoints(run_dir / "checkpoints", async_save=False)
    try:
        if milestone:
            restored, meta = ckpt.restore_milestone(step, params), None
        else:
            restored, _, meta, _ = ckpt.restore(params, train.make_optimizer(tcfg).init(params), step=step)
    finally:
        ckpt.close()
    return weights.to_hf_state_dict(nnx.merge(graphdef, restored, frozen)), meta


# ----------------------------------------------------------------------------------------------- the manager


def test_manager_keep_k_meta_milestones_and_restore(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    opt = {"count": jnp.int32(0), "mu": jax.tree.map(jnp.zeros_like, params)}
    ckpt = RetrofitCheckpoints(tmp_path, every=2, keep=2, async_save=True)
    saved = []
    for step in range(1, 8):
        p = jax.tree.map(lambda x: x + step, params)
        saved.append(ckpt.save(step, p, dict(opt, count=jnp.int32(step)), {"step": step, "arch": {"x": 1}}))
        if step in (3, 6):
            ckpt.save_milestone(step, p, {"step": step, "target_cr": step / 3})
    assert saved == [False, True, False, True, False, True, False]  # every 2 steps
    assert ckpt.save(7, params, opt, {"step": 7}, force=True)  # the final step is forced
    ckpt.wait()
    assert list(ckpt.latest.all_steps()) == [6, 7] and ckpt.latest_step() == 7  # keep 2
    assert ckpt.milestone_steps() == [3, 6]  # milestones are never pruned
    assert ckpt.read_meta(6) == {"step": 6, "arch": {"x": 1}}
    p6, o6, meta, step = ckpt.restore(params, opt, step=6)
    assert step == 6 and meta["step"] == 6 and int(o6["count"]) == 6
    chex.assert_trees_all_equal(p6, jax.tree.map(lambda x: x + 6, params))
    chex.assert_trees_all_equal(ckpt.restore_milestone(3, params), jax.tree.map(lambda x: x + 3, params))
    ckpt.close()
    # A new manager (a resumed process) sees the same steps; an empty directory has nothing to resume.
    again = RetrofitCheckpoints(tmp_path, every=2, keep=2)
    assert again.latest_step() == 7 and again.read_meta()["step"] == 7
    # Resumed from step 2, the run crosses milestone 3 again: the first one stays (it may have been evaluated).
    assert not again.save_milestone(3, jax.tree.map(lambda x: x + 100, params), {"step": 3})
    again.wait()
    chex.assert_trees_all_equal(again.restore_milestone(3, params), jax.tree.map(lambda x: x + 3, params))
    again.close()
    empty = RetrofitCheckpoints(tmp_path / "empty")
    assert empty.read_meta() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        empty.restore(params, opt)
    empty.close()
    for kw, name in ((dict(every=0), "checkpoint_every"), (dict(keep=0), "keep_checkpoints")):
        with pytest.raises(ValueError, match=name):
            RetrofitCheckpoints(tmp_path / "bad", **kw)


def test_milestone_steps_are_exact_for_awkward_schedules():
    """1 -> 4 over 41 steps: the float32 schedule gives 3.9999998 at step 41 (XLA's vectorised division), so a
    milestone chosen from it would never be saved for CR 4 in a 41-step run; the CLI picks steps exactly."""
    from dms_jax.train.distill import _exact_target_cr

    cfg = train.DistillConfig(steps=41, cr_initial=1.0, cr_final=4.0, cr_final_step=41)
    crs = [_exact_target_cr(cfg, s) for s in range(42)]
    milestones = [s for s in range(1, 42) if int(crs[s]) > int(crs[s - 1])]
    assert milestones == [14, 28, 41] and crs[41] == 4.0
    np.testing.assert_allclose(np.asarray(cfg.target_cr(jnp.arange(42))), crs, rtol=1e-6)  # same schedule


# ----------------------------------------------------------------------------------------------- the CLI


def test_keep_k_and_a_milestone_at_every_whole_cr(reference, assets):
    assert th.committed_steps(reference / "checkpoints" / "latest") == [10, 12]
    assert th.committed_steps(reference / "checkpoints" / "milestones") == [5, 10]
    rows = th.read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Row k logs the target its step trained at, CR(k - 1); the milestone after step k is CR(k) reached.
    assert [r["target_cr"] for r in rows][4:6] == [1.7999999523162842, 2.0]
    ckpt = RetrofitCheckpoints(reference / "checkpoints", async_save=False)
    try:
        metas = {s: ckpt.milestones.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                 for s in (5, 10)}
    finally:
        ckpt.close()
    assert {s: m["target_cr"] for s, m in metas.items()} == {5: 2.0, 10: 3.0}
    # The final checkpoint holds exactly the exported parameters; the CR-2 milestone holds earlier ones.
    export = th.read_export(reference / "export")
    final, meta = restore_params(reference, assets["model"])
    assert meta["step"] == STEPS and meta["arch"]["dms_config"]["window"] == 4
    chex.assert_trees_all_equal(final, export)
    ms5, _ = restore_params(reference, assets["model"], step=5, milestone=True)
    assert not np.array_equal(ms5["model.layers.0.self_attn.q_proj.weight"],
                              export["model.layers.0.self_attn.q_proj.weight"])


def test_sigkill_then_resume_equals_uninterrupted(reference, assets, tmp_path):
    run_dir = tmp_path / "killed"
    latest = run_dir / "checkpoints" / "latest"
    proc = th.start_cli(cli(assets, run_dir), th.cli_env(assets), tmp_path / "killed.log")
    try:
        got = th.wait_for(lambda: th.committed_steps(latest), timeout=240, proc=proc)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "killed.log").read_text()
    assert got, f"no checkpoint appeared:\n{log[-3000:]}"
    assert rc == -signal.SIGKILL, f"the run ended before it could be killed (rc {rc}); make it longer"
    done = th.committed_steps(latest)
    assert done and done[-1] < STEPS, done
    assert not (run_dir / "export").exists()

    resumed = th.run_cli(cli(assets, run_dir, "--resume"), th.cli_env(assets), tmp_path / "resumed.log")
    th.assert_ok(resumed)
    # Same parameters as the uninterrupted run, bit for bit.
    chex.assert_trees_all_equal(th.read_export(run_dir / "export"), th.read_export(reference / "export"))
    # One metrics row per step (rows the killed run logged after its last checkpoint were dropped and redone),
    # with the same losses.
    ref_rows, rows = th.read_metrics(reference), th.read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in ("loss", "kl", "loss_cr", "eviction_fraction", "grad_norm", "target_cr"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
    assert th.committed_steps(latest) == [10, 12]
    assert th.committed_steps(run_dir / "checkpoints" / "milestones") == [5, 10]


def test_resuming_a_finished_run_is_a_noop(reference, assets, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(reference, run_dir)
    before_ckpt, before_metrics = tree_digest(run_dir / "checkpoints"), (run_dir / "metrics.jsonl").read_text()
    before_export = th.read_export(run_dir / "export")
    th.assert_ok(th.run_cli(cli(assets, run_dir, "--resume"), th.cli_env(assets), tmp_path / "log.txt"))
    assert tree_digest(run_dir / "checkpoints") == before_ckpt
    assert (run_dir / "metrics.jsonl").read_text() == before_metrics
    chex.assert_trees_all_equal(th.read_export(run_dir / "export"), before_export)
    assert json.loads((run_dir / "results.json").read_text())["steps"] == STEPS


def _main_exits(argv, capsys, monkeypatch) -> str:
    """Runs distill.main in-process, refusing any train-step compilation; returns the error message."""
    from experiments import distill

    def no_compute(*a, **k):
        raise AssertionError("a train step was built: the error must come before any compute")

    monkeypatch.setattr(train, "make_train_step", no_compute)
    with pytest.raises(SystemExit) as exc:
        distill.main(argv)
    return f"{exc.value.code}\n{capsys.readouterr().err}"


def test_resume_from_another_architecture_or_dms_setting_stops_before_compute(reference, assets, tmp_path,
                                                                               capsys, monkeypatch):
    run_dir = tmp_path / "other"
    shutil.copytree(reference, run_dir)
    digest = tree_digest(run_dir)
    other_model = th.make_tiny_llama_dir(tmp_path / "wider", hidden_size=48, head_dim=12)
    for extra in (["--window", "8"], ["--variant", "adapter"], ["--alpha-per", "layer"], ["--trainable", "mlp"],
                  ["--model", str(other_model)]):
        msg = _main_exits(cli(assets, run_dir, "--resume", *extra), capsys, monkeypatch)  # the last flag wins
        assert "--resume: the checkpoint was made for another architecture / DMS setting" in msg, (extra, msg)
    assert tree_digest(run_dir) == digest  # nothing was written
    # --resume with no checkpoint, and a second run into a used run dir without --resume.
    msg = _main_exits(cli(assets, tmp_path / "empty", "--resume"), capsys, monkeypatch)
    assert "--resume: no checkpoint in" in msg
    msg = _main_exits(cli(assets, run_dir), capsys, monkeypatch)
    assert "already holds a run; pass --resume" in msg
    assert tree_digest(run_dir) == digest


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    """lr 1e30: Adam's first update moves every weight by ~1e30; the next step's gradients overflow to NaN.
    The run stops there, saying so, without applying that update or saving after it."""
    run_dir = tmp_path / "nan"
    args = cli(assets, run_dir, "--lr", "1e30", "--checkpoint-every", "1", "--no-async-checkpoint")
    result = th.run_cli(args, th.cli_env(assets), tmp_path / "log.txt")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "non-finite loss/gradient" in result.stdout and "at step 2" in result.stdout, result.stdout[-3000:]
    assert "The last good checkpoint (step 1)" in result.stdout
    rows = th.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1] and all(np.isfinite(v) for v in rows[0].values())
    assert th.committed_steps(run_dir / "checkpoints" / "latest") == [1]
    assert not (run_dir / "export").exists()
    params, meta = restore_params(run_dir, assets["model"])
    assert meta["step"] == 1
    assert all(np.isfinite(v).all() for v in params.values())
