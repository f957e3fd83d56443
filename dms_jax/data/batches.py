"""Deterministic, resumable batches of packed rows: ``batch_indices``, ``get_batch``, ``iterate_batches``.

Plain numpy; no JAX needed.  Batches are a pure function of ``(seed, step)``: the row stream is the
concatenation of one seeded permutation of the rows per epoch, and the global batch at ``step`` is the slice
``[step * batch_size, (step + 1) * batch_size)`` of that stream.  A resumed run therefore continues at the
same data position with no iterator state to save; process ``p`` of ``P`` takes the ``p``-th contiguous
``batch_size // P`` rows of the global batch.
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from dms_jax.data.packing import PackedData

__all__ = ["batch_indices", "get_batch", "iterate_batches"]


@functools.lru_cache(maxsize=64)
def _epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    perm = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, epoch, 0x444D53]).permutation(num_rows)
    perm.setflags(write=False)
    return perm


def _check_batch_args(num_rows, step, batch_size, seed, process_index, process_count) -> None:
    if not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"data: has no rows (num_rows={num_rows!r}); nothing to batch")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: must be an integer >= 0, got {step!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count: must be an integer >= 1, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index: must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size: the global batch {batch_size} must divide evenly among process_count={process_count}"
        )


def batch_indices(
    num_rows: int,
    step: int,
    batch_size: int,
    seed: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> np.ndarray:
    """Row indices of this process's part of the global batch at ``step`` (int64 [batch_size // process_count]).

    The row stream is ``concat(perm(seed, 0), perm(seed, 1), ...)``, one seeded permutation of
    ``range(num_rows)`` per epoch; the global batch at ``step`` is stream positions
    ``[step * batch_size, (step + 1) * batch_size)`` (a batch may straddle two epochs), and process ``p`` takes
    the ``p``-th contiguous ``batch_size // process_count`` of them.  Every row is seen once per epoch.
    """
    _check_batch_args(num_rows, step, batch_size, seed, process_index, process_count)
    local = batch_size // process_count
    start = int(step) * int(batch_size) + int(process_index) * local
    pos = np.arange(start, start + local, dtype=np.int64)
    epochs, offsets = np.divmod(pos, int(num_rows))
    out = np.empty(local, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(int(num_rows), int(seed), int(e), bool(shuffle))[offsets[sel]]
    return out


def get_batch(
    data: PackedData,
    step: int,
    batch_size: int,
    seed: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> dict[str, np.ndarray]:
    """This process's batch at ``step``: ``{"tokens", "valid", "loss_weight", "segment_ids", "indices"}``
    ([B_local, ...]; ``loss_weight`` is ``PackedData.weights``).

    A pure function of its arguments: resuming at step k gives exactly the batch an uninterrupted run saw.
    ``"epoch"`` (float) is the number of passes over the data completed at the start of this step.
    """
    idx = batch_indices(
        len(data), step, batch_size, seed, process_index=process_index, process_count=process_count,
        shuffle=shuffle,
    )
    return {
        "tokens": data.tokens[idx],
        "valid": data.valid[idx],
        "loss_weight": data.weights[idx],
        "segment_ids": data.segment_ids[idx],
        "indices": idx,
        "epoch": np.float64(step * batch_size / len(data)),
    }


def iterate_batches(
    data: PackedData,
    batch_size: int,
    seed: int = 0,
    *,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """``get_batch`` for ``start_step, start_step + 1, ...`` (forever when ``num_steps`` is None)."""
    _check_batch_args(len(data), start_step, batch_size, seed, process_index, process_count)
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield get_batch(data, step, batch_size, seed, process_index=process_index,
                        process_count=process_count, shuffle=shuffle)
        step += 1
