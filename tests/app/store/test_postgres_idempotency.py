"""PostgresStore: idempotency keys in the job's insert transaction (idempotency_checks.py),
and a database made before the key table gains it in place (skipped without PostgreSQL, as
tests/app/store/test_postgres.py is)."""

from __future__ import annotations

from app.store.idempotency import IdempotencyKey
from app.store.postgres import PostgresStore

from .idempotency_checks import (
    NoPrecheck,
    check_keys_answer_mismatch_expire_and_free,
    check_racing_inserts_make_one_job,
    create,
)
from .test_postgres import _sql, pg_url, schema, store  # noqa: F401 (fixtures)


class RacingPostgresStore(NoPrecheck, PostgresStore):
    pass


def test_racing_inserts_make_one_job(pg_url: str, schema: str) -> None:  # noqa: F811
    with RacingPostgresStore(pg_url, schema=schema) as racing:
        check_racing_inserts_make_one_job(racing)


def test_keys_answer_mismatch_expire_and_free(store: PostgresStore) -> None:  # noqa: F811
    check_keys_answer_mismatch_expire_and_free(store)


def test_an_older_database_gains_the_key_table(pg_url: str, schema: str) -> None:  # noqa: F811
    with PostgresStore(pg_url, schema=schema) as first:
        first.create_job("old", "abc " * 50, {}, 0, None, 4)
    _sql(pg_url, schema, "DROP TABLE charnn_idempotency_keys")  # as an older charnn made it
    with PostgresStore(pg_url, schema=schema) as again:
        job_id = create(again, IdempotencyKey("after-upgrade", "f", 60.0))
        assert again.idempotency_key("after-upgrade") == ("f", job_id)
        assert again.count_jobs() == 2
