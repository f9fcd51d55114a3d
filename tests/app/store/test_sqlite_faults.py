"""SqliteStore under faults: one owner, damage refused, deletes whole or not at all,
refused jobs leave nothing, unreadable rows skipped, progress never backwards."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.store.base import (
    DataDirInUse,
    JobActiveError,
    QueueFullError,
    StoreDamaged,
    StoreUnavailable,
)
from app.store.sqlite import SqliteStore

from .test_sqlite import HYPER, _job, _model


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "data")
    yield s
    s.close()


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------ one owner


def test_a_second_store_on_the_same_directory_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = SqliteStore(data)
    with pytest.raises(
        DataDirInUse, match=rf"in use by another charnn server \(pid {os.getpid()}\)"
    ):
        SqliteStore(data)
    first.close()
    SqliteStore(data).close()  # released on close


def test_another_process_is_refused_and_the_lock_dies_with_its_owner(tmp_path: Path) -> None:
    data = tmp_path / "data"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from app.store.sqlite import SqliteStore; "
            f"s = SqliteStore({str(data)!r}); print('ready', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(DataDirInUse, match=f"pid {holder.pid}"):
            SqliteStore(data)
    finally:
        holder.kill()  # what kill -9 does: the kernel releases the lock
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    SqliteStore(data).close()


# ------------------------------------------------------------------ damage


def test_a_damaged_database_is_refused_at_open_with_what_to_do(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with SqliteStore(data) as s:
        for i in range(200):  # enough rows for several pages
            _job(s, f"job {i}", corpus="x" * 50 + str(i))
    db = data / "charnn.db"
    raw = bytearray(db.read_bytes())
    page = 4096
    raw[3 * page : 4 * page] = os.urandom(page)  # garbage in a page of the jobs table
    db.write_bytes(bytes(raw))
    with pytest.raises(StoreDamaged, match=r"charnn check"):
        SqliteStore(data)


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_lost_database_beside_model_files_is_refused(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    with SqliteStore(data) as s:
        _model(s)
        _job(s)
    db = data / "charnn.db"
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    if how == "truncated":
        db.write_bytes(b"")
    else:
        db.unlink()
    with pytest.raises(StoreDamaged, match=r"1 model file\(s\) and 1 job folder\(s\).*--repair"):
        SqliteStore(data)


def test_unreadable_rows_are_skipped_not_fatal(store: SqliteStore) -> None:
    good_job, bad_job = _job(store, "good"), _job(store, "bad")
    good, bad = _model(store, "good"), _model(store, "bad")
    conn = sqlite3.connect(store.data_dir / "charnn.db")
    with conn:
        conn.execute("UPDATE jobs SET hyperparameters = '\"nope\"' WHERE id = ?", (bad_job.id,))
        conn.execute("UPDATE models SET vocab = '[1, 2]' WHERE id = ?", (bad.id,))
    conn.close()
    assert [j.id for j in store.list_jobs()] == [good_job.id]
    assert store.get_job(bad_job.id) is None
    assert [m.id for m in store.list_models()] == [good.id]
    assert store.get_model(bad.id) is None
    newest = store.newest_model()  # the damaged one is the newest: the next one is served
    assert newest is not None and newest.id == good.id
    assert store.resolve_model("bad") is None


# ------------------------------------------------------------------ refused means nothing stored


def test_queue_room_is_checked_with_the_insert_so_racing_submissions_never_overfill(
    store: SqliteStore,
) -> None:
    outcomes: list[str] = []
    barrier = threading.Barrier(40)

    def submit(i: int) -> None:
        barrier.wait()
        try:
            store.create_job(f"j{i}", f"corpus {i}", HYPER, 0, None, 8, max_queued=16)
            outcomes.append("ok")
        except QueueFullError:
            outcomes.append("full")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 16 and outcomes.count("full") == 24
    assert store.count_jobs() == 16
    assert len(list((store.data_dir / "jobs").iterdir())) == 16  # no corpus of a refused job


def test_a_corpus_that_cannot_be_written_is_unavailable_and_stores_nothing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.store.sqlite as module

    def full(path: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(module, "atomic_write_bytes", full)
    with pytest.raises(StoreUnavailable, match="the disk is full") as caught:
        _job(store)
    assert str(store.data_dir) not in str(caught.value)
    with pytest.raises(StoreUnavailable, match="the disk is full"):
        _model(store)
    assert store.count_jobs() == 0 and store.count_models() == 0
    assert files_under(store.data_dir / "jobs") == files_under(store.data_dir / "models") == []


# ------------------------------------------------------------------ deletes: whole or not at all


@pytest.mark.parametrize("what", ["model", "job"])
def test_a_delete_the_disk_refuses_changes_nothing(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    model = _model(store)
    job = _job(store)
    store.update_job(job.id, status="succeeded")
    before = files_under(store.data_dir)

    def refuse(self: Path, target: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(self))

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(StoreUnavailable, match="not writable"):
        if what == "model":
            store.delete_model(model.id)
        else:
            store.delete_job(job.id)
    monkeypatch.undo()
    assert files_under(store.data_dir) == before
    assert store.get_model(model.id) is not None and store.get_job(job.id) is not None


def test_a_delete_whose_commit_fails_puts_the_file_back(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(store)
    real_tx = store._tx

    class Failing:
        def __init__(self) -> None:
            self.inner = real_tx()

        def __enter__(self) -> sqlite3.Connection:
            return self.inner.__enter__()

        def __exit__(self, *exc: Any) -> None:
            self.inner.__exit__(None, None, None)  # the delete happened...
            raise StoreUnavailable("the store could not write: the disk is full")  # ...commit lost

    monkeypatch.setattr(store, "_tx", Failing)
    with pytest.raises(StoreUnavailable):
        store.delete_model(model.id)
    monkeypatch.undo()
    assert (store.data_dir / "models" / f"{model.id}.npz").is_file()
    assert not list((store.data_dir / "models").glob(".*deleting"))


def test_a_crash_inside_a_delete_is_finished_at_the_next_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with SqliteStore(data) as s:
        kept, gone = _model(s, "kept"), _model(s, "gone")
        assert s.delete_model(gone.id)
    models = data / "models"
    # As if a crash came after the rename: one whose row survived, one whose row is gone.
    (models / f"{kept.id}.npz").rename(models / f".{kept.id}.npz.deleting")
    (models / f".{gone.id}.npz.deleting").write_bytes(b"leftover")
    with SqliteStore(data) as s:
        assert s.read_model_bytes(kept.id) == b"npz-bytes"
        assert sorted(p.name for p in models.iterdir()) == [f"{kept.id}.npz"]


def test_delete_job_removes_row_metrics_and_files_but_not_its_model(store: SqliteStore) -> None:
    from app.store.base import MetricPoint

    job = _job(store)
    model = _model(store, job_id=job.id)
    store.add_metrics(job.id, [MetricPoint(1, 0.1, 2.0)])
    for status in ("queued", "running"):
        store.update_job(job.id, status=status)
        with pytest.raises(JobActiveError):
            store.delete_job(job.id)
    store.update_job(job.id, status="failed")
    assert store.delete_job(job.id) is True
    assert store.get_job(job.id) is None and store.get_metrics(job.id) == []
    assert list((store.data_dir / "jobs").iterdir()) == []
    assert store.get_model(model.id) is not None
    assert store.delete_job(job.id) is False


def test_purge_removes_old_finished_jobs_files_only(store: SqliteStore) -> None:
    old, recent, active = _job(store, "old"), _job(store, "recent"), _job(store, "active")
    store.update_job(old.id, status="succeeded", finished_at=1000.0)
    store.update_job(recent.id, status="failed", finished_at=5000.0)
    store.update_job(active.id, status="running")
    assert store.purge_job_files(finished_before=2000.0) == [old.id]
    assert not (store.data_dir / "jobs" / old.id).exists()
    assert (store.data_dir / "jobs" / recent.id / "corpus.txt").is_file()
    assert (store.data_dir / "jobs" / active.id / "corpus.txt").is_file()
    assert store.get_job(old.id) is not None  # the row and its figures stay
    assert store.purge_job_files(finished_before=2000.0) == []


# ------------------------------------------------------------------ progress


def test_progress_never_goes_backwards(store: SqliteStore) -> None:
    job = _job(store)
    assert store.update_progress(job.id, step=150, train_loss=1.5)
    assert not store.update_progress(job.id, step=130, train_loss=1.7)  # a resumed replay
    assert not store.update_progress(job.id, step=150, train_loss=1.5)
    got = store.get_job(job.id)
    assert got is not None and (got.step, got.train_loss) == (150, 1.5)
    assert store.update_progress(job.id, step=160, train_loss=1.4)
    with pytest.raises(ValueError, match="not progress"):
        store.update_progress(job.id, step=170, status="failed")


# ------------------------------------------------------------------ readiness


@pytest.mark.parametrize("folder", ["", "models", "jobs"])
def test_writable_probes_every_directory_the_server_writes(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    import tempfile

    target = store.data_dir / folder if folder else store.data_dir
    real = tempfile.mkstemp

    def mkstemp(prefix: str, suffix: str, dir: Path) -> tuple[int, str]:  # noqa: A002
        if Path(dir) == target:
            raise OSError(errno.EPERM, "Operation not permitted")
        return real(prefix=prefix, suffix=suffix, dir=dir)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert store.writable() is False
