"""What the two SQL stores share: their reads, written once, with the dialect as data.

SQLite and PostgreSQL hold the same rows under different table names and
placeholders; how they write (files beside SQLite, bytes inside PostgreSQL,
ownership checks for workers) differs and stays in ``sqlite.py`` and
``postgres.py``. A store mixes in :class:`SqlReads`, names its :class:`Dialect`
and says how to run one read query (``_rows``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..domain import JobStatus
from .base import (
    METRIC_DIAGNOSTICS,
    JobRecord,
    MetricPoint,
    ModelRecord,
    check_page,
    check_status,
    job_from_row,
    metric_from_row,
    model_from_row,
    readable,
    valid_id,
)

# The bulk columns (corpus, state, model bytes) are never in these lists: listing jobs
# or models must not drag megabytes out of the database.
JOB_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, hyperparameters, seed, init_from, "
    "corpus_chars, vocab_size, step, total_steps, train_loss, val_loss, chars_per_sec, eta_s, "
    "model_id, error"
)
MODEL_COLUMNS = (
    "id, name, created_at, job_id, hyperparameters, metrics, vocab, param_count, size_bytes, dtype"
)
# A name may label several models; the newest readable one of the first few wins (a
# damaged newest row does not hide the others).
NEWEST_OF = 8


@dataclass(frozen=True)
class Dialect:
    p: str  # the placeholder: "?" or "%s"
    jobs: str  # table names
    models: str
    metrics: str
    tiebreak: str  # the column that orders rows created within one clock tick

    @property
    def newest(self) -> str:
        return f"ORDER BY created_at DESC, {self.tiebreak} DESC"

    @property
    def oldest(self) -> str:
        return f"ORDER BY created_at ASC, {self.tiebreak} ASC"


SQLITE = Dialect("?", "jobs", "models", "metrics", "rowid")
POSTGRES = Dialect("%s", "charnn_jobs", "charnn_models", "charnn_metrics", "seq")

Row = Any  # sqlite3.Row or psycopg's dict row: both index by column name


class SqlReads:
    """The read half of ``Store`` for a SQL store; unreadable rows are skipped (logged once)."""

    dialect: Dialect
    _reported: set[str]

    def _rows(self, query: str, params: Sequence[Any] = ()) -> Sequence[Row]:
        """Run one read query (the store's own connection handling and error mapping)."""
        raise NotImplementedError

    def _count(self, table: str, where: str = "", params: Sequence[Any] = ()) -> int:
        rows = self._rows(f"SELECT COUNT(*) AS n FROM {table} {where}", params)
        return int(rows[0]["n"])

    def _jobs(self, rows: Sequence[Row]) -> list[JobRecord]:
        return readable(rows, job_from_row, "job", self._reported)

    def _models(self, rows: Sequence[Row]) -> list[ModelRecord]:
        return readable(rows, model_from_row, "model", self._reported)

    def _first_model(self, rows: Sequence[Row]) -> ModelRecord | None:
        models = self._models(rows)
        return models[0] if models else None

    # -- jobs -------------------------------------------------------------------

    def get_job(self, job_id: str) -> JobRecord | None:
        if not valid_id(job_id):
            return None
        d = self.dialect
        jobs = self._jobs(
            self._rows(f"SELECT {JOB_COLUMNS} FROM {d.jobs} WHERE id = {d.p}", (job_id,))
        )
        return jobs[0] if jobs else None

    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs newest first, optionally only those with ``status``."""
        check_status(status)
        check_page(limit, offset)
        d = self.dialect
        where, params = (f"WHERE status = {d.p}", [status]) if status is not None else ("", [])
        rows = self._rows(
            f"SELECT {JOB_COLUMNS} FROM {d.jobs} {where} {d.newest} LIMIT {d.p} OFFSET {d.p}",
            [*params, limit, offset],
        )
        return self._jobs(rows)

    def count_jobs(self, status: JobStatus | None = None) -> int:
        check_status(status)
        d = self.dialect
        if status is None:
            return self._count(d.jobs)
        return self._count(d.jobs, f"WHERE status = {d.p}", (status,))

    def count_active(self) -> int:
        """Queued plus running jobs: what admission control compares with its limits."""
        return self._count(self.dialect.jobs, "WHERE status IN ('queued', 'running')")

    def count_queued(self) -> int:
        """Jobs waiting for a slot or a worker."""
        return self._count(self.dialect.jobs, "WHERE status = 'queued'")

    def jobs_to_resume(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: the work a restarted service picks up."""
        d = self.dialect
        rows = self._rows(
            f"SELECT {JOB_COLUMNS} FROM {d.jobs} WHERE status IN ('queued', 'running') {d.oldest}"
        )
        return self._jobs(rows)

    def get_metrics(self, job_id: str, after_step: int = -1) -> list[MetricPoint]:
        """The job's points with ``step > after_step``, by step (for incremental polling)."""
        if not valid_id(job_id):
            return []
        d = self.dialect
        rows = self._rows(
            f"SELECT step, elapsed_s, train_loss, val_loss, {', '.join(METRIC_DIAGNOSTICS)} "
            f"FROM {d.metrics} WHERE job_id = {d.p} AND step > {d.p} ORDER BY step",
            (job_id, after_step),
        )
        return readable(rows, metric_from_row, "metric", self._reported)

    def evaluations(self, job_ids: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
        """Each job's validation losses as (step, loss), by step: how its run is going."""
        ids = [i for i in job_ids if valid_id(i)]
        out: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
        if not ids:
            return out
        d = self.dialect
        rows = self._rows(
            f"SELECT job_id, step, val_loss FROM {d.metrics} WHERE val_loss IS NOT NULL AND "
            f"job_id IN ({', '.join([d.p] * len(ids))}) ORDER BY job_id, step",
            ids,
        )
        for row in rows:
            try:
                out[str(row["job_id"])].append((int(row["step"]), float(row["val_loss"])))
            except (KeyError, TypeError, ValueError):
                continue  # an unreadable point: the summary just has one fewer
        return out

    # -- models -----------------------------------------------------------------

    def get_model(self, model_id: str) -> ModelRecord | None:
        if not valid_id(model_id):
            return None
        d = self.dialect
        query = f"SELECT {MODEL_COLUMNS} FROM {d.models} WHERE id = {d.p}"
        return self._first_model(self._rows(query, (model_id,)))

    def list_models(self, limit: int = 50, offset: int = 0) -> list[ModelRecord]:
        """Models newest first."""
        check_page(limit, offset)
        d = self.dialect
        rows = self._rows(
            f"SELECT {MODEL_COLUMNS} FROM {d.models} {d.newest} LIMIT {d.p} OFFSET {d.p}",
            (limit, offset),
        )
        return self._models(rows)

    def count_models(self) -> int:
        return self._count(self.dialect.models)

    def resolve_model(self, id_or_name: str) -> ModelRecord | None:
        """The model with this id, else the newest readable model with this name, else None."""
        model = self.get_model(id_or_name)
        if model is not None:
            return model
        if "\x00" in id_or_name:
            return None  # no stored name has one (and PostgreSQL text cannot)
        d = self.dialect
        rows = self._rows(
            f"SELECT {MODEL_COLUMNS} FROM {d.models} WHERE name = {d.p} {d.newest} "
            f"LIMIT {NEWEST_OF}",
            (id_or_name,),
        )
        return self._first_model(rows)

    def newest_model(self) -> ModelRecord | None:
        """The newest readable model (a damaged newest row does not hide the others)."""
        d = self.dialect
        rows = self._rows(f"SELECT {MODEL_COLUMNS} FROM {d.models} {d.newest} LIMIT {NEWEST_OF}")
        return self._first_model(rows)
