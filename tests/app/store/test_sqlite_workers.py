"""SqliteStore as the processes of `charnn serve --workers N` open it: the parent holds the
lock, each worker verifies it (``owner=``); models_version, the queue and cancels are
seen by every process. The worker here is a real child process of the test."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store.base import DataDirInUse, StoreError, WorkerStore
from app.store.sqlite import SqliteStore, mark_stopping, owner_stopping

from .test_sqlite import _job, _model

ROOT = Path(__file__).resolve().parents[3]

# A worker: opens the store trusting its parent (the test), then runs what it reads on
# stdin, one Python expression per line, printing each result's repr.
WORKER = """
import os, sys
from app.store.sqlite import SqliteStore
from tests.app.store.test_sqlite import _job, _model
store = SqliteStore(sys.argv[1], owner=os.getppid())
print("ready", flush=True)
for line in sys.stdin:
    print(repr(eval(line)), flush=True)
"""


class Worker:
    def __init__(self, data: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(data)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            self.proc.kill()
            raise AssertionError(self.proc.communicate()[1])

    def __call__(self, expression: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(expression + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, self.proc.communicate()[1]
        return answer

    def close(self) -> str:
        _, err = self.proc.communicate("")
        return err


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "data")
    yield s
    s.close()


def test_a_worker_store_trusts_only_its_parents_held_lock(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(StoreError, match=f"pid {os.getpid()}, said to hold it, is not"):
        SqliteStore(data, owner=os.getpid())  # a stale variable: not our parent
    with pytest.raises(StoreError, match="nobody holds its lock"):
        SqliteStore(data, owner=os.getppid())  # our parent, but it holds nothing
    with SqliteStore(data):  # this process holds it, so a child may trust it
        worker = Worker(data)
        assert worker("store.shared") == "True"
        assert worker("store.count_jobs()") == "0"
        worker.close()


def test_a_worker_sees_model_changes_of_others_at_once(owner: SqliteStore, tmp_path: Path) -> None:
    worker = Worker(tmp_path / "data")
    try:
        before = int(worker("store.models_version"))
        assert int(worker("store.models_version")) == before  # nothing committed since
        _job(owner)  # other commits do not change the version
        assert int(worker("store.models_version")) == before
        model = _model(owner)
        after = int(worker("store.models_version"))
        assert after != before
        assert owner.delete_model(model.id)
        assert int(worker("store.models_version")) not in (before, after)
        # its own writes too (and the owner's own count stays its own writes')
        last = int(worker("store.models_version"))
        worker("_model(store).id")
        assert int(worker("store.models_version")) != last
    finally:
        assert "Traceback" not in worker.close()


def test_the_queue_and_cancels_are_the_stores(owner: SqliteStore, tmp_path: Path) -> None:
    s: WorkerStore = owner  # mypy checks the structural match
    first, second = _job(owner), _job(owner)
    assert s.queued_job_ids() == [first.id, second.id]  # oldest first
    worker = Worker(tmp_path / "data")
    try:
        assert worker(f"store.request_cancel({second.id!r}).status") == "'queued'"
        assert s.cancel_requests() == [second.id]
        worker(f"store.request_cancel({second.id!r}).id")  # asked twice: one request
        assert s.cancel_requests() == [second.id]
        # the outcome answers the request; a finished job's cancel records nothing
        assert owner.finish_job(second.id, "cancelled") is True
        assert s.cancel_requests() == []
        assert worker(f"store.request_cancel({second.id!r}).status") == "'cancelled'"
        assert worker("store.request_cancel('0' * 32)") == "None"
        assert s.cancel_requests() == []
        assert s.queued_job_ids() == [first.id]
        worker(f"store.request_cancel({first.id!r}).id")
        owner.update_job(first.id, status="running")
        assert s.cancel_requests() == [first.id]  # running jobs' too
        assert s.queued_job_ids() == []
        owner.finish_job(first.id, "failed", error="x")
        assert owner.delete_job(first.id)
    finally:
        assert "Traceback" not in worker.close()


def test_a_worker_leaves_temporary_files_alone(owner: SqliteStore, tmp_path: Path) -> None:
    """Another process's atomic write may be in flight when a worker (re)starts; only the
    owner's open, before any worker runs, removes what a crash left."""
    data = tmp_path / "data"
    in_flight = data / "models" / ".abc.npz.1234.tmp"
    in_flight.write_bytes(b"half")
    Worker(data).close()
    assert in_flight.exists()
    owner.close()
    SqliteStore(data).close()
    assert not in_flight.exists()


def test_a_stopping_owner_still_names_itself_and_says_so(tmp_path: Path) -> None:
    data = tmp_path / "data"
    fd = SqliteStore(data).detach_lock()  # what `charnn serve --workers N` keeps
    try:
        assert not owner_stopping(data)
        mark_stopping(fd)
        assert owner_stopping(data)
        with pytest.raises(DataDirInUse, match=rf"another charnn server \(pid {os.getpid()}\)"):
            SqliteStore(data)
    finally:
        os.close(fd)
    with SqliteStore(data):
        assert not owner_stopping(data)  # the next owner writes its own pid only
