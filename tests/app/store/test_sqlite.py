"""SqliteStore: rows, files, ordering, durability, hostile ids, thread safety."""

from __future__ import annotations

import math
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from app.store import base as store_module
from app.store.base import JobRecord, MetricPoint, ModelRecord, NewModel, Store, valid_id
from app.store.sqlite import SqliteStore

HYPER = {"hidden_size": 32, "seq_length": 16, "learning_rate": 0.01}
BAD_IDS = ["../../etc/passwd", "A" * 1000, "abc\x00", "", "0" * 31, "0" * 32 + "\n", "F" * 32]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "data")
    yield s
    s.close()


def _job(store: Store, name: str = "job", corpus: str = "hello world") -> JobRecord:
    return store.create_job(name, corpus, HYPER, seed=1, init_from=None, vocab_size=8)


def _model(
    store: Store, name: str = "m", data: bytes = b"npz-bytes", job_id: str | None = None
) -> Any:
    model = NewModel(name, data, HYPER, {"val_loss": 1.5}, ["a", "b"], 10, "float32")
    return store.add_model(model, job_id)


def test_satisfies_protocol(store: SqliteStore) -> None:
    s: Store = store  # mypy checks the structural match
    assert s.count_jobs() == 0


def test_create_and_get_job(store: SqliteStore) -> None:
    job = store.create_job("tiny", "héllo\nwörld", HYPER, seed=7, init_from="m1", vocab_size=9)
    assert valid_id(job.id)
    assert job.status == "queued"
    assert (job.name, job.seed, job.init_from, job.vocab_size) == ("tiny", 7, "m1", 9)
    assert job.corpus_chars == len("héllo\nwörld")
    assert job.hyperparameters == HYPER
    assert job.step == 0 and job.started_at is None and job.model_id is None
    assert store.get_job(job.id) == job
    folder = store.job_folder(job.id)
    assert folder is not None
    corpus = folder / "corpus.txt"
    assert corpus.read_text(encoding="utf-8") == "héllo\nwörld"
    assert store.read_corpus(job.id) == "héllo\nwörld"
    assert not (folder / "state.npz").exists() and store.read_state(job.id) is None
    assert store.get_job("0" * 32) is None


def test_list_filter_paginate_newest_first(store: SqliteStore) -> None:
    jobs = [_job(store, f"j{i}") for i in range(5)]
    store.update_job(jobs[1].id, status="running")
    store.update_job(jobs[3].id, status="succeeded")
    listed = store.list_jobs()
    assert [j.name for j in listed] == ["j4", "j3", "j2", "j1", "j0"]
    assert [j.name for j in store.list_jobs(limit=2, offset=1)] == ["j3", "j2"]
    assert store.list_jobs(limit=2, offset=10) == []
    assert [j.name for j in store.list_jobs(status="queued")] == ["j4", "j2", "j0"]
    assert store.count_jobs() == 5
    assert store.count_jobs("queued") == 3
    assert store.count_active() == 4
    assert [j.name for j in store.jobs_to_resume()] == ["j0", "j1", "j2", "j4"]
    with pytest.raises(ValueError):
        store.list_jobs(limit=-1)
    with pytest.raises(ValueError):
        store.list_jobs(status="bogus")  # type: ignore[arg-type]


def test_update_job(store: SqliteStore) -> None:
    job = _job(store)
    updated = store.update_job(
        job.id,
        status="running",
        started_at=123.0,
        step=40,
        total_steps=100,
        train_loss=2.5,
        eta_s=math.inf,
    )
    assert updated is not None
    assert (updated.status, updated.started_at, updated.step) == ("running", 123.0, 40)
    assert updated.train_loss == 2.5 and updated.eta_s is None  # non-finite stored as null
    assert store.get_job(job.id) == updated
    assert store.update_job(job.id) == updated
    assert store.update_job("0" * 32, step=1) is None


@pytest.mark.parametrize(
    "fields",
    [{"corpus_chars": 3}, {"id": "0" * 32}, {"step": 1, "bogus": 2}, {"status": "done"}],
)
def test_update_job_rejects_unknown_fields(store: SqliteStore, fields: dict[str, Any]) -> None:
    job = _job(store)
    with pytest.raises(ValueError):
        store.update_job(job.id, **fields)
    assert store.get_job(job.id) == job


def test_metrics_idempotent_and_ordered(store: SqliteStore) -> None:
    job = _job(store)
    pts = [MetricPoint(step=s, elapsed_s=s / 10, train_loss=3.0 - s / 100) for s in (30, 10, 20)]
    assert store.add_metrics(job.id, pts) == 3
    # A resumed job re-reports steps 20 and 30 (with different numbers) and adds 40.
    again = [
        MetricPoint(step=20, elapsed_s=9.0, train_loss=9.0),
        MetricPoint(step=30, elapsed_s=9.0, train_loss=9.0, val_loss=9.0),
        MetricPoint(step=40, elapsed_s=4.0, train_loss=2.0, val_loss=2.1),
    ]
    assert store.add_metrics(job.id, again) == 1
    got = store.get_metrics(job.id)
    assert [p.step for p in got] == [10, 20, 30, 40]
    assert got[1] == MetricPoint(step=20, elapsed_s=2.0, train_loss=2.8)  # first report wins
    assert got[3].val_loss == 2.1
    assert [p.step for p in store.get_metrics(job.id, after_step=20)] == [30, 40]
    assert store.get_metrics(job.id, after_step=40) == []
    assert store.add_metrics("0" * 32, pts) == 0  # unknown job: nothing stored, no error
    assert store.get_metrics("0" * 32) == []


def test_metrics_non_finite_loss(store: SqliteStore) -> None:
    job = _job(store)
    store.add_metrics(job.id, [MetricPoint(step=1, elapsed_s=0.1, train_loss=math.nan)])
    (point,) = store.get_metrics(job.id)
    assert math.isnan(point.train_loss)


def add_three_models(store: Store) -> tuple[ModelRecord, ModelRecord]:
    """Two models named "shakespeare" and one "other", checked through every read; the
    first and the second "shakespeare". Shared by the SQLite and PostgreSQL tests."""
    job = _job(store)
    first = _model(store, "shakespeare", b"first", job_id=job.id)
    other = _model(store, "other", b"other")
    second = _model(store, "shakespeare", b"second!")
    assert first.size_bytes == 5 and second.size_bytes == 7
    assert first.job_id == job.id and first.vocab == ["a", "b"]
    assert first.metrics == {"val_loss": 1.5} and first.hyperparameters == HYPER
    assert store.get_model(first.id) == first
    assert store.read_model_bytes(first.id) == b"first"
    assert store.resolve_model(first.id) == first
    assert store.resolve_model("shakespeare") == second  # newest of that name wins
    assert store.resolve_model("nope") is None
    assert store.newest_model() == second
    assert [m.name for m in store.list_models()] == ["shakespeare", "other", "shakespeare"]
    assert store.list_models(limit=1, offset=1) == [other]
    assert store.count_models() == 3
    return first, second


def test_models_add_resolve_delete(store: SqliteStore) -> None:
    first, second = add_three_models(store)

    path = store.model_file(second.id)
    assert path is not None and path.read_bytes() == b"second!"
    assert store.delete_model(second.id) is True
    assert not path.exists()
    assert store.get_model(second.id) is None and store.model_file(second.id) is None
    assert store.read_model_bytes(second.id) is None
    assert store.resolve_model("shakespeare") == first
    assert store.delete_model(second.id) is False
    assert store.count_models() == 2


def test_delete_model_tolerates_missing_file(store: SqliteStore) -> None:
    model = _model(store)
    path = store.model_file(model.id)
    assert path is not None
    path.unlink()
    assert store.read_model_bytes(model.id) is None
    assert store.delete_model(model.id) is True
    assert store.get_model(model.id) is None


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_not_found(
    store: SqliteStore, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _job(store)
    _model(store)
    touched: list[str] = []

    def spy(self: Path, *args: Any, **kwargs: Any) -> Any:
        touched.append(str(self))
        raise AssertionError("no file access for a bad id")

    for method in ("read_bytes", "unlink", "exists", "open", "stat"):
        monkeypatch.setattr(Path, method, spy)
    assert store.get_job(bad) is None
    assert store.update_job(bad, step=3) is None
    assert store.job_folder(bad) is None
    assert store.read_corpus(bad) is None
    assert store.read_state(bad) is None
    assert store.add_metrics(bad, [MetricPoint(1, 0.1, 1.0)]) == 0
    assert store.get_metrics(bad) == []
    assert store.get_model(bad) is None
    assert store.model_file(bad) is None
    assert store.read_model_bytes(bad) is None
    assert store.delete_model(bad) is False
    assert store.resolve_model(bad) is None
    assert touched == []
    monkeypatch.undo()
    assert store.count_models() == 1 and store.count_jobs() == 1


def test_durable_across_instances(tmp_path: Path) -> None:
    with SqliteStore(tmp_path) as first:
        job = _job(first)
        first.update_job(job.id, status="succeeded", step=5)
        first.add_metrics(job.id, [MetricPoint(5, 1.0, 2.0, 2.5)])
        model = _model(first, "kept", b"bytes", job_id=job.id)
    with SqliteStore(tmp_path) as second:  # schema creation is idempotent
        got = second.get_job(job.id)
        assert got is not None and got.status == "succeeded" and got.step == 5
        assert second.get_metrics(job.id) == [MetricPoint(5, 1.0, 2.0, 2.5)]
        assert second.resolve_model("kept") == model
        assert second.read_model_bytes(model.id) == b"bytes"
    conn = sqlite3.connect(tmp_path / "charnn.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        conn.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    SqliteStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "charnn.db")
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(store_module.StoreError, match="schema version 99"):
        SqliteStore(tmp_path)


def _failing_tx(check: Any) -> Any:
    def tx() -> AbstractContextManager[sqlite3.Connection]:
        check()
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    return tx


def test_corpus_written_before_row(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def corpus_already_there() -> None:
        files = list((store.data_dir / "jobs").glob("*/corpus.txt"))
        assert len(files) == 1 and files[0].read_text(encoding="utf-8") == "abc"
        seen.extend(files)

    monkeypatch.setattr(store, "_tx", _failing_tx(corpus_already_there))
    with pytest.raises(sqlite3.OperationalError):
        store.create_job("x", "abc", HYPER, seed=0, init_from=None, vocab_size=3)
    monkeypatch.undo()
    assert seen, "the insert was never attempted"
    assert store.count_jobs() == 0
    assert not seen[0].exists() and not seen[0].parent.exists()  # orphan cleaned up


def test_model_written_before_row(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []

    def model_already_there() -> None:
        files = list((store.data_dir / "models").glob("*.npz"))
        assert len(files) == 1 and files[0].read_bytes() == b"npz-bytes"
        seen.extend(files)

    monkeypatch.setattr(store, "_tx", _failing_tx(model_already_there))
    with pytest.raises(sqlite3.OperationalError):
        _model(store)
    monkeypatch.undo()
    assert seen, "the insert was never attempted"
    assert store.count_models() == 0 and store.newest_model() is None
    assert list((store.data_dir / "models").iterdir()) == []


def test_corpus_that_is_not_utf8_writes_nothing(store: SqliteStore) -> None:
    with pytest.raises(UnicodeEncodeError):
        _job(store, corpus="lone \ud800 surrogate")
    assert store.count_jobs() == 0
    assert list((store.data_dir / "jobs").iterdir()) == []


def test_writable(store: SqliteStore) -> None:
    assert store.writable() is True
    assert [p.name for p in store.data_dir.iterdir() if p.name.startswith(".writable")] == []


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions"
)
def test_not_writable_read_only_dir(store: SqliteStore) -> None:
    store.data_dir.chmod(0o500)
    try:
        assert store.writable() is False
    finally:
        store.data_dir.chmod(0o700)


def test_not_writable_when_data_dir_is_gone(tmp_path: Path) -> None:
    # Works as root too: the data dir is replaced by a regular file.
    data = tmp_path / "data"
    with SqliteStore(data) as s:
        shutil.rmtree(data)
        data.write_bytes(b"not a directory")
        assert s.writable() is False


def test_not_writable_when_database_unusable(store: SqliteStore) -> None:
    store.close()
    store.close()  # idempotent
    assert store.writable() is False


def test_concurrent_threads(store: SqliteStore) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(10):
                job = _job(store, f"t{n}-{i}", corpus=f"corpus {n} {i}")
                store.update_job(job.id, status="running", step=i)
                store.add_metrics(job.id, [MetricPoint(i, 0.1, 1.0)])
                store.list_jobs(limit=5)
                store.count_active()
                model = _model(store, f"m{n}", f"{n}-{i}".encode())
                assert store.read_model_bytes(model.id) == f"{n}-{i}".encode()
                if i % 2:
                    assert store.delete_model(model.id)
                assert store.writable()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.count_jobs() == 80
    assert store.count_active() == 80
    assert store.count_models() == 40
    assert len(list((store.data_dir / "models").iterdir())) == 40


@pytest.mark.parametrize("bad", [*BAD_IDS, None, 123])
def test_valid_id_rejects_everything_but_uuid_hex(bad: object) -> None:
    assert valid_id(bad) is False


def test_ids_are_uuid_hex(store: SqliteStore) -> None:
    ids = {_job(store).id for _ in range(3)} | {_model(store).id for _ in range(3)}
    assert len(ids) == 6 and all(valid_id(i) for i in ids)
