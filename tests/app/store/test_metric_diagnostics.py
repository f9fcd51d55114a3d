"""A metric point's diagnostics (grad norm, clipping, learning rate, speed, sample) are
stored and read back, and a metrics table made before them upgrades in place."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from app.store.base import METRIC_DIAGNOSTICS, MetricPoint, Store
from app.store.sqlite import DB_NAME, SqliteStore

from .test_sqlite import _job

POINTS = [
    MetricPoint(10, 1.0, 3.0, None, 12.5, True, 0.01, 2048.0, None),
    MetricPoint(20, 2.0, 2.5, 2.6, 0.75, False, 0.005, 1024.5, "the quick brown\nfox ☃"),
    MetricPoint(30, 3.0, 2.4),  # a caller that reports no diagnostics
]


def check_round_trip(store: Store) -> None:
    """Shared with the PostgreSQL tests."""
    job = _job(store)
    assert store.add_metrics(job.id, POINTS) == 3
    assert store.get_metrics(job.id) == POINTS
    got = store.get_metrics(job.id)
    assert got[0].clipped is True and got[1].clipped is False and got[2].clipped is None
    # Non-finite diagnostics are stored as NULL, as losses are.
    inf = MetricPoint(40, 4.0, 2.3, None, float("inf"), True, float("nan"), None, "")
    assert store.add_metrics(job.id, [inf]) == 1
    last = store.get_metrics(job.id, after_step=30)[0]
    assert last.grad_norm is None and last.learning_rate is None and last.sample == ""


def test_diagnostics_round_trip(tmp_path: Path) -> None:
    with SqliteStore(tmp_path / "data") as store:
        check_round_trip(store)


def test_an_older_metrics_table_gains_the_columns_in_place(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with SqliteStore(data) as store:
        job = _job(store)
        store.add_metrics(job.id, [MetricPoint(10, 1.0, 3.0, 3.1)])
    conn = sqlite3.connect(data / DB_NAME)  # as an older charnn made it: no diagnostics
    for name in METRIC_DIAGNOSTICS:
        conn.execute(f"ALTER TABLE metrics DROP COLUMN {name}")
    conn.commit()
    assert {r[1] for r in conn.execute("PRAGMA table_info(metrics)")} == {
        "job_id",
        "step",
        "elapsed_s",
        "train_loss",
        "val_loss",
    }
    conn.close()
    with SqliteStore(data) as store:
        assert store.get_metrics(job.id) == [MetricPoint(10, 1.0, 3.0, 3.1)]  # kept, read back
        store.add_metrics(job.id, [POINTS[1]])
        assert store.get_metrics(job.id, after_step=10) == [POINTS[1]]
    with SqliteStore(data) as store:  # a current table: opened as is
        assert len(store.get_metrics(job.id)) == 2
