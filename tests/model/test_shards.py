"""Shard back-ends: same bits whether shards run in a child process, threads or in turn."""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest

from model.params import init_params
from model.shards import ProcessShards, ThreadShards, make_shards
from model.train import TrainConfig, Trainer

H, V, T, B = 16, 11, 8, 6


def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.integers(0, V, (T, B))
    Y = rng.integers(0, V, (T, B))
    h0 = (rng.standard_normal((B, H)) * 0.3).astype(np.float32)
    return X, Y, h0


def test_process_threads_and_sequential_agree_bit_for_bit() -> None:
    params = init_params(H, V, np.random.default_rng(0))
    X, Y, h0 = batch()
    results = []
    for shards in (
        ThreadShards(params, T, B, threads=1),
        ThreadShards(params, T, B, threads=2),
        ProcessShards(params, T, B),
    ):
        try:
            loss = shards(params, X, Y, h0)
            results.append((loss, shards.grads.flat.copy(), shards.hidden.copy()))
        finally:
            shards.close()
    for loss, grads, hidden in results[1:]:
        assert loss == results[0][0]
        np.testing.assert_array_equal(grads, results[0][1])
        np.testing.assert_array_equal(hidden, results[0][2])


def test_training_through_a_child_process_matches_in_process_training() -> None:
    text = "to be or not to be, that is the question. " * 30
    cfg = TrainConfig(hidden_size=H, seq_length=T, batch_size=B, max_steps=12, eval_every=6)
    weights = []
    for threads, mode in ((1, "thread"), (2, "process")):
        trainer = Trainer(text, cfg, threads=threads, shard_mode=mode)
        list(trainer.run())
        weights.append(trainer.state.params.flat.copy())
    np.testing.assert_array_equal(weights[0], weights[1])


def test_a_dead_child_is_a_clear_error_and_close_still_cleans_up() -> None:
    params = init_params(H, V, np.random.default_rng(0))
    X, Y, h0 = batch()
    shards = ProcessShards(params, T, B)
    shm_name = shards._shm.name
    shards(params, X, Y, h0)
    os.kill(shards._proc.pid, signal.SIGKILL)
    shards._proc.wait()
    with pytest.raises(RuntimeError, match="shard process died"):
        shards(params, X, Y, h0)
    shards.close()
    assert not os.path.exists(f"/dev/shm/{shm_name.lstrip('/')}")


def test_the_child_outlives_sigint_and_sigterm_and_still_computes() -> None:
    # A terminal Ctrl-C (SIGINT to the process group) or a SIGTERM to the group reaches the
    # child too; it must leave stopping to its parent, which stops between steps and closes.
    params = init_params(H, V, np.random.default_rng(0))
    X, Y, h0 = batch()
    reference = ThreadShards(params, T, B, threads=1)
    expected = reference(params, X, Y, h0)
    shards = make_shards(params, T, B, threads=2, mode="process")
    assert isinstance(shards, ProcessShards)
    try:
        assert shards(params, X, Y, h0) == expected  # the child is up and running
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(shards._proc.pid, sig)
        with pytest.raises(subprocess.TimeoutExpired):
            shards._proc.wait(timeout=0.5)  # not dead
        for _ in range(2):
            assert shards(params, X, Y, h0) == expected
            np.testing.assert_array_equal(shards.grads.flat, reference.grads.flat)
            np.testing.assert_array_equal(shards.hidden, reference.hidden)
    finally:
        shards.close()
        reference.close()
    assert shards._proc.returncode == 0  # it quit when asked
    assert not os.path.exists(f"/dev/shm/{shards._shm.name.lstrip('/')}")


def test_small_work_stays_in_process() -> None:
    params = init_params(H, V, np.random.default_rng(0))
    shards = make_shards(params, T, B, threads=2)
    try:
        assert isinstance(shards, ThreadShards)
    finally:
        shards.close()
    big = init_params(64, V, np.random.default_rng(0))
    shards = make_shards(big, 64, 64, threads=2)
    try:
        assert isinstance(shards, ProcessShards)
    finally:
        shards.close()
