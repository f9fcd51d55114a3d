"""PostgresStore: a metric point's diagnostics round-trip, and a ``charnn_metrics`` made
before them gains the columns in place when a store opens it (skipped without PostgreSQL,
as tests/app/store/test_postgres.py is)."""

from __future__ import annotations

from app.store.base import METRIC_DIAGNOSTICS, MetricPoint
from app.store.postgres import PostgresStore

from .test_metric_diagnostics import POINTS, check_round_trip
from .test_postgres import _sql, pg_url, schema, store  # noqa: F401 (fixtures)
from .test_sqlite import _job


def test_diagnostics_round_trip(store: PostgresStore) -> None:  # noqa: F811
    check_round_trip(store)


def test_an_older_metrics_table_gains_the_columns_in_place(
    pg_url: str,  # noqa: F811
    schema: str,  # noqa: F811
) -> None:
    with PostgresStore(pg_url, schema=schema) as first:
        job = _job(first)
        first.add_metrics(job.id, [MetricPoint(10, 1.0, 3.0, 3.1)])
    for name in METRIC_DIAGNOSTICS:  # as an older charnn made it
        _sql(pg_url, schema, f"ALTER TABLE charnn_metrics DROP COLUMN {name}")
    with PostgresStore(pg_url, schema=schema) as again:
        assert again.get_metrics(job.id) == [MetricPoint(10, 1.0, 3.0, 3.1)]
        again.add_metrics(job.id, [POINTS[1]])
        assert again.get_metrics(job.id, after_step=10) == [POINTS[1]]
    columns = _sql(
        pg_url,
        schema,
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'charnn_metrics'",
        schema,
    )
    assert set(METRIC_DIAGNOSTICS) <= {c for (c,) in columns}
