"""The stores' paused status: the transitions, and old databases upgraded in place."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.store.base import JobActiveError, QueueFullError
from app.store.postgres import PostgresStore
from app.store.sqlite import SqliteStore

from .test_postgres import _sql, pg_url, schema

__all__ = ["pg_url", "schema"]  # fixtures, used here


def _old_check(db: Path) -> None:
    """Make the jobs table what a charnn before ``paused`` created: its CHECK without it."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        (table,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()
        assert "'paused', " in table
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("BEGIN")
        old = table.replace("'paused', ", "").replace("jobs (", "jobs_old (", 1)
        conn.execute(old)
        conn.execute("INSERT INTO jobs_old SELECT * FROM jobs")
        conn.execute("DROP TABLE jobs")
        conn.execute("ALTER TABLE jobs_old RENAME TO jobs")
        conn.execute("COMMIT")
        (now,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs'").fetchone()
        assert "'paused'" not in now
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE jobs SET status = 'paused'")
    finally:
        conn.close()


def test_an_old_sqlite_database_upgrades_in_place(tmp_path: Path) -> None:
    with SqliteStore(tmp_path) as store:
        job = store.create_job("old", "hello world", {}, 0, None, 8)
        store.add_metrics(job.id, [])
    _old_check(tmp_path / "charnn.db")
    with SqliteStore(tmp_path) as store:  # the table rebuilt, the row kept
        assert store.pause_job(job.id)
        again = store.get_job(job.id)
        assert again is not None and again.status == "paused" and again.name == "old"
        assert store.jobs_to_resume() == []  # a restart leaves it paused
        with pytest.raises(JobActiveError):
            store.delete_job(job.id)
        assert store.resume_job(job.id)
        assert not store.resume_job(job.id)  # queued now: not paused
        assert [j.id for j in store.jobs_to_resume()] == [job.id]


def test_sqlite_pause_resume_and_cancel_rules(tmp_path: Path) -> None:
    with SqliteStore(tmp_path) as store:
        a = store.create_job("a", "hello world", {}, 0, None, 8)
        b = store.create_job("b", "hello world", {}, 0, None, 8)
        assert store.pause_job(a.id)
        assert not store.pause_job(a.id)  # already paused
        with pytest.raises(QueueFullError):
            store.resume_job(a.id, max_queued=1)  # b takes the queue's one place
        assert store.finish_job(a.id, "succeeded") is False  # only a cancel ends it
        assert store.finish_job(a.id, "cancelled") is True
        assert not store.resume_job(a.id)
        assert store.request_pause(b.id) and store.pause_requests() == [b.id]
        assert store.pause_job(b.id) and store.pause_requests() == []


@pytest.fixture
def pg(pg_url: str, schema: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_url, schema=schema)
    yield s
    s.close()


def test_postgres_pause_is_the_owner_s_and_survives(pg: PostgresStore, pg_url: str) -> None:
    queued = pg.create_job("q", "hello world", {}, 0, None, 8)
    assert pg.request_pause(queued.id)  # queued: paused at once
    row = pg.get_job(queued.id)
    assert row is not None and row.status == "paused"

    running = pg.create_job("r", "hello world", {}, 0, None, 8)
    assert pg.claim_job(running.id, "w1", 10.0) is not None
    assert not pg.pause_asked(running.id)
    assert pg.request_pause(running.id) and pg.pause_asked(running.id)
    assert not pg.pause_job(running.id, worker="w2", state=b"x")  # not w2's job
    assert pg.pause_job(running.id, worker="w1", state=b"state")
    assert pg.read_state(running.id) == b"state" and not pg.pause_asked(running.id)
    assert pg.requeue_stale(0.0) == []  # paused: no reaper takes it back
    with pytest.raises(JobActiveError):
        pg.delete_job(running.id)
    with pytest.raises(QueueFullError):
        pg.resume_job(running.id, max_queued=0)
    assert pg.resume_job(running.id, max_queued=5)
    assert pg.claim_job(running.id, "w3", 10.0) is not None  # any worker continues it
    assert pg.finish_job(queued.id, "cancelled") is True  # a paused job can be cancelled


def test_postgres_version_1_upgrades_in_place(pg_url: str, schema: str) -> None:
    first = PostgresStore(pg_url, schema=schema)
    job = first.create_job("old", "hello world", {}, 0, None, 8)
    first.close()
    # As version 1 made it: the CHECK without 'paused', no pause_requested column.
    _sql(pg_url, schema, "ALTER TABLE charnn_jobs DROP CONSTRAINT charnn_jobs_status_check")
    _sql(
        pg_url,
        schema,
        "ALTER TABLE charnn_jobs ADD CONSTRAINT charnn_jobs_status_check CHECK (status IN "
        "('queued', 'running', 'succeeded', 'failed', 'cancelled'))",
    )
    _sql(pg_url, schema, "ALTER TABLE charnn_jobs DROP COLUMN pause_requested")
    _sql(pg_url, schema, "UPDATE charnn_meta SET schema_version = 1")
    again = PostgresStore(pg_url, schema=schema)
    try:
        assert again.request_pause(job.id)
        row = again.get_job(job.id)
        assert row is not None and row.status == "paused"
    finally:
        again.close()
