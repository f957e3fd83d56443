"""Orbax checkpoints of a retrofit: rolling "latest" (every N steps, keep K, async) and one per whole CR.

A run can be killed at any moment (SIGKILL included): orbax writes each step to a temporary directory and
renames it when complete, so the newest finished step is always restorable. Resuming restores the trainable
parameters, the optimizer state and the step; data position and noise are pure functions of the step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree, shardings=None):
    """ShapeDtypeStruct leaves (with shardings when given), as orbax needs to restore under a mesh."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class RetrofitCheckpoints:
    """latest/: {params, opt_state} + meta every `every` steps, keep `keep`; milestones/: params at whole CRs."""

    def __init__(self, directory: str | Path, *, every: int = 50, keep: int = 2, async_save: bool = True):
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.every = every
        # Two managers save concurrently (async): in a multi-process run each needs its own barrier-key prefix,
        # otherwise their finalize threads collide on the same coordination-service barrier
        # ("Barrier ThreadSaveMultiHostValueHolder:set_value_start is already ongoing").
        self.latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="latest")),
        )
        self.milestones = ocp.CheckpointManager(
            self.directory / "milestones",
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save, create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="milestones")),
        )

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, *, force: bool = False) -> bool:
        if not force and step % self.every:
            return False
        return self.latest.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def save_milestone(self, step: int, params, meta: dict) -> bool:
        """Saves the milestone unless one exists at this step: a run resumed from a checkpoint older than its last
        milestone crosses that step again, and the milestone first saved there may already have been evaluated
        or exported. Returns whether it saved."""
        if step in self.milestones.all_steps():
            return False
        return self.milestones.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params}), meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest.latest_step() if step is None else step
        if step is None:
            return None
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, params_like, opt_state_like, *, step: int | None = None, param_shardings=None,
                opt_shardings=None) -> tuple[Any, Any, dict, int]:
        """Restores (params, opt_state, meta, step) into the structure (and shardings) of the given trees."""
        step = self.latest.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory / 'latest'}")
        target = {"params": _abstract(params_like, param_shardings),
                  "opt_state": _abstract(opt_state_like, opt_shardings)}
        out = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out["state"]["params"], out["state"]["opt_state"], out["meta"], step

    def restore_milestone(self, step: int, params_like) -> Any:
        out = self.milestones.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": _abstract(params_like)})))
        return out["state"]["params"]

    def milestone_steps(self) -> list[int]:
        return list(self.milestones.all_steps())

    def wait(self):
        self.latest.wait_until_finished()
        self.milestones.wait_until_finished()

    def close(self):
        self.latest.close()
        self.milestones.close()
