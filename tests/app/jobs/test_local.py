"""The process runner with real spawned job processes and a real SQLite store."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.jobs.local import LocalRunner
from app.settings import Settings
from app.store.base import JobRecord
from app.store.sqlite import SqliteStore

from ..conftest import CORPUS, LONG, QUICK


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "data")
    yield s
    s.close()


def make_runner(
    store: SqliteStore, events: list[tuple[str, dict[str, Any]]] | None = None, **kw: Any
) -> LocalRunner:
    options: dict[str, Any] = {
        "max_concurrent_jobs": 1,
        "limits": Settings().model_limits,
        "job_threads": 1,
        "checkpoint_every_s": 0.2,
        **kw,
    }
    on_event = (lambda job_id, m: events.append((job_id, m))) if events is not None else None
    return LocalRunner(store, on_event=on_event, **options)


def new_job(store: SqliteStore, hp: dict[str, Any]) -> JobRecord:
    return store.create_job("fox", CORPUS, hp, seed=1, init_from=None, vocab_size=29)


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def status(store: SqliteStore, job_id: str) -> str:
    job = store.get_job(job_id)
    assert job is not None
    return job.status


def test_a_job_trains_in_a_child_process_and_stores_its_model(store: SqliteStore) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    runner = make_runner(store, events)
    runner.start()
    try:
        job = new_job(store, QUICK)
        runner.submit(job.id)
        wait_for(lambda: status(store, job.id) in ("succeeded", "failed"))
        done = store.get_job(job.id)
        assert done is not None and done.status == "succeeded", done
        assert done.model_id is not None and store.get_model(done.model_id) is not None
        points = store.get_metrics(job.id)
        assert points[-1].step == 40 and points[-1].train_loss < points[0].train_loss
        # The outcome is stored first, then announced: on a busy machine the final event
        # may come a moment after the store says "succeeded".
        wait_for(lambda: any(m["type"] == "status" for j, m in events if j == job.id))
        kinds = [m["type"] for j, m in events if j == job.id]
        assert "progress" in kinds and kinds[-1] == "status"
    finally:
        runner.stop()


def test_cancel_stops_a_running_job(store: SqliteStore) -> None:
    runner = make_runner(store)
    runner.start()
    try:
        job = new_job(store, LONG)
        runner.submit(job.id)
        wait_for(lambda: (store.get_job(job.id) or job).step > 0)
        assert runner.cancel(job.id)
        wait_for(lambda: status(store, job.id) == "cancelled", timeout=15)
        assert not runner.cancel(job.id)
    finally:
        runner.stop()


def test_job_processes_run_at_the_configured_niceness(store: SqliteStore) -> None:
    runner = make_runner(store, job_nice=7)
    runner.start()
    try:
        job = new_job(store, LONG)
        runner.submit(job.id)
        wait_for(lambda: (store.get_job(job.id) or job).step > 0)
        pid = runner._running[job.id].process.pid
        assert pid is not None
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
        assert runner.cancel(job.id)
    finally:
        runner.stop()


def test_a_killed_worker_fails_the_job_and_the_runner_goes_on(store: SqliteStore) -> None:
    runner = make_runner(store)
    runner.start()
    try:
        job = new_job(store, LONG)
        runner.submit(job.id)
        wait_for(lambda: (store.get_job(job.id) or job).step > 0)
        pid = runner._running[job.id].process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # what the OOM killer does
        wait_for(lambda: status(store, job.id) == "failed", timeout=15)
        failed = store.get_job(job.id)
        assert failed is not None and "died (exit code -9)" in (failed.error or "")
        quick = new_job(store, QUICK)
        runner.submit(quick.id)
        wait_for(lambda: status(store, quick.id) == "succeeded")
    finally:
        runner.stop()


@pytest.mark.slow  # over a second: the full suite runs it
def test_stopping_requeues_and_the_next_runner_resumes_from_the_checkpoint(
    store: SqliteStore,
) -> None:
    runner = make_runner(store)
    runner.start()
    job = new_job(store, {**QUICK, "max_steps": 3000})
    runner.submit(job.id)
    wait_for(lambda: (store.get_job(job.id) or job).step >= 200)
    runner.stop()
    stopped = store.get_job(job.id)
    assert stopped is not None and stopped.status == "queued"
    folder = store.job_folder(job.id)
    assert folder is not None and (folder / "state.npz").exists()
    resumed_from = stopped.step

    again = make_runner(store)
    again.start()
    try:
        wait_for(lambda: status(store, job.id) == "succeeded", timeout=120)
        first_new = [p.step for p in store.get_metrics(job.id, after_step=resumed_from)]
        assert first_new and first_new[0] > resumed_from  # continued, not restarted
    finally:
        again.stop()


def test_a_store_failure_fails_the_job_not_the_runner(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.store.sqlite

    def disk_full(path: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    runner = make_runner(store)
    runner.start()
    try:
        job = new_job(store, QUICK)
        with monkeypatch.context() as m:
            m.setattr(app.store.sqlite, "atomic_write_bytes", disk_full)  # the model's file
            runner.submit(job.id)
            wait_for(lambda: status(store, job.id) in ("succeeded", "failed"))
        failed = store.get_job(job.id)
        assert failed is not None and failed.status == "failed"
        assert failed.error == "the model could not be stored: the disk is full"
        assert str(store.data_dir) not in failed.error
        assert runner.alive()
        quick = new_job(store, QUICK)
        runner.submit(quick.id)
        wait_for(lambda: status(store, quick.id) == "succeeded")
    finally:
        runner.stop()
