"""SqliteStore: idempotency keys in the job's insert transaction (idempotency_checks.py)."""

from __future__ import annotations

from pathlib import Path

from app.store.sqlite import SqliteStore

from .idempotency_checks import (
    NoPrecheck,
    check_keys_answer_mismatch_expire_and_free,
    check_racing_inserts_make_one_job,
)


class RacingSqliteStore(NoPrecheck, SqliteStore):
    pass


def test_racing_inserts_make_one_job(tmp_path: Path) -> None:
    with RacingSqliteStore(tmp_path) as store:
        check_racing_inserts_make_one_job(store)
        assert [p.name for p in (tmp_path / "jobs").iterdir()] == [store.list_jobs()[0].id]


def test_keys_answer_mismatch_expire_and_free(tmp_path: Path) -> None:
    with SqliteStore(tmp_path) as store:
        check_keys_answer_mismatch_expire_and_free(store)
