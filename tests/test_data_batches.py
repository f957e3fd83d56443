"""Tests for dms_jax.data.batches: deterministic, resumable batches, epochs, the split over processes."""

from __future__ import annotations

import numpy as np
import pytest

from dms_jax.data import batches, dataset


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


@pytest.fixture(scope="module")
def topics_ds(tok):
    return dataset.build_dataset(tok, 256, "pydoc-topics", heldout_fraction=0.05)


def test_batches_are_deterministic_and_resumable(topics_ds):
    train = topics_ds.train
    run = [b for b in batches.iterate_batches(train, 4, seed=7, num_steps=12)]
    resumed = [b for b in batches.iterate_batches(train, 4, seed=7, start_step=9, num_steps=3)]
    for a, b in zip(run[9:], resumed):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["valid"], b["valid"])
    again = batches.get_batch(train, 5, 4, seed=7)
    np.testing.assert_array_equal(again["indices"], run[5]["indices"])
    other = batches.get_batch(train, 5, 4, seed=8)
    assert not np.array_equal(other["indices"], run[5]["indices"])
    assert run[0]["tokens"].shape == (4, 256) and run[0]["tokens"].dtype == np.int32


def test_every_row_once_per_epoch_and_epochs_reshuffle():
    n, bs = 10, 4  # batches straddle epochs
    stream = np.concatenate([batches.batch_indices(n, s, bs, seed=3) for s in range(10)])  # 4 epochs
    e0, e1, e2 = stream[:10], stream[10:20], stream[20:30]
    for e in (e0, e1, e2):
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(e0, e1)
    plain = np.concatenate([batches.batch_indices(n, s, bs, seed=3, shuffle=False) for s in range(5)])
    assert plain.tolist() == (list(range(10)) * 2)


def test_process_split_partitions_the_global_batch():
    n, bs = 37, 8
    for step in (0, 3, 11):
        glob = batches.batch_indices(n, step, bs, seed=1)
        parts = [batches.batch_indices(n, step, bs, seed=1, process_index=p, process_count=4) for p in range(4)]
        assert all(len(p) == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob)


def test_batch_errors_name_the_parameter():
    with pytest.raises(ValueError, match="batch_size"):
        batches.batch_indices(10, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        batches.batch_indices(10, 0, 6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        batches.batch_indices(10, 0, 4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="step"):
        batches.batch_indices(10, -1, 4)
