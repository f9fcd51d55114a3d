"""``PostgresStore``: the shared ``Store`` for scale-out (several API replicas, Celery workers).

Selected by ``CHARNN_DATABASE_URL=postgresql://...``. Jobs, metric points, model
metadata *and the bytes* live in the database: each job's corpus (TEXT) and its
resume checkpoint (BYTEA), and each model's ``.npz`` (BYTEA). Why in the
database: every replica and worker then reaches everything with the one
connection string; there is no shared file system to provision, mount and keep
consistent, and a row and its bytes are written in one transaction, so neither
can exist without the other (the file-before-row ordering of ``SqliteStore`` is
not needed). The trade-off is size: a value is read and written whole, through
memory, and BYTEA/TEXT stop at 1 GB. charnn's corpora (at most 10M characters)
and models (at most a few hundred MB) are well inside that; anything much
bigger would belong in an object store with only its key here.

Semantics match ``SqliteStore`` (ids, ``valid_id`` checks, newest-first
ordering, pagination and ``update_job`` checks, idempotent metrics, NaN/inf
stored as NULL), except that the file-path methods raise
``NotImplementedError``: use ``read_corpus``/``read_state``/``read_model_bytes``.
The extra methods (``claim_job``, ``heartbeat``, ``request_cancel``,
``requeue_stale``, ...) are what distributed workers coordinate with; each is
one atomic statement, so racing replicas and workers never both win.

Times are seconds since the epoch (DOUBLE PRECISION), taken from the
*database's* clock, so machines whose clocks disagree still agree on which
heartbeat is stale and which job is newest.

The schema is created or migrated at construction, under a transaction-scoped
advisory lock, so any number of processes may start at once.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row

from app.store import (
    _JOB_UPDATABLE,
    JOB_STATUSES,
    JobRecord,
    JobStatus,
    MetricPoint,
    ModelRecord,
    StoreError,
    _check_page,
    _check_status,
    _dump,
    _finite_or_none,
    _metric_point,
    _new_id,
    valid_id,
)

__all__ = ["PG_SCHEMA_VERSION", "PostgresStore"]

PG_SCHEMA_VERSION = 1
# Key of the advisory lock that serialises schema creation/migration (any constant
# unique to charnn; "charnn" in ASCII).
_SCHEMA_LOCK = 0x636861726E6E
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_T = TypeVar("_T")
Conn = psycopg.Connection[DictRow]
Cursor = psycopg.Cursor[DictRow]

# "Now" on the database's clock, evaluated once per statement (an uncorrelated
# scalar subquery is an init-plan), so one statement's timestamps agree.
_NOW = "(SELECT extract(epoch FROM clock_timestamp())::double precision)"
# A running job whose heartbeat is older than %(stale)s seconds (or was never
# sent: no live owner proves it is alive) has lost its worker.
_STALE = f"(status = 'running' AND (heartbeat_at IS NULL OR heartbeat_at < {_NOW} - %(stale)s))"

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE IF NOT EXISTS charnn_jobs (
            id TEXT PRIMARY KEY,
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            name TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in JOB_STATUSES)})),
            created_at DOUBLE PRECISION NOT NULL,
            started_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            hyperparameters JSON NOT NULL,
            seed BIGINT NOT NULL,
            init_from TEXT,
            corpus_chars BIGINT NOT NULL,
            vocab_size BIGINT NOT NULL,
            step BIGINT NOT NULL DEFAULT 0,
            total_steps BIGINT,
            train_loss DOUBLE PRECISION,
            val_loss DOUBLE PRECISION,
            chars_per_sec DOUBLE PRECISION,
            eta_s DOUBLE PRECISION,
            model_id TEXT,
            error TEXT,
            corpus TEXT NOT NULL,
            state BYTEA,
            worker TEXT,
            heartbeat_at DOUBLE PRECISION,
            cancel_requested BOOLEAN NOT NULL DEFAULT false
        )""",
        "CREATE INDEX IF NOT EXISTS charnn_jobs_created ON charnn_jobs (created_at, seq)",
        "CREATE INDEX IF NOT EXISTS charnn_jobs_status_created "
        "ON charnn_jobs (status, created_at, seq)",
        """CREATE TABLE IF NOT EXISTS charnn_metrics (
            job_id TEXT NOT NULL REFERENCES charnn_jobs (id) ON DELETE CASCADE,
            step BIGINT NOT NULL,
            elapsed_s DOUBLE PRECISION NOT NULL,
            train_loss DOUBLE PRECISION,
            val_loss DOUBLE PRECISION,
            PRIMARY KEY (job_id, step)
        )""",
        """CREATE TABLE IF NOT EXISTS charnn_models (
            id TEXT PRIMARY KEY,
            seq BIGINT GENERATED ALWAYS AS IDENTITY,
            name TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            job_id TEXT,
            hyperparameters JSON NOT NULL,
            metrics JSON NOT NULL,
            vocab JSON NOT NULL,
            param_count BIGINT NOT NULL,
            size_bytes BIGINT NOT NULL,
            dtype TEXT NOT NULL,
            data BYTEA NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS charnn_models_created ON charnn_models (created_at, seq)",
        "CREATE INDEX IF NOT EXISTS charnn_models_name_created "
        "ON charnn_models (name, created_at, seq)",
    ),
}

# The bulk columns (corpus, state, data) are never in these lists: listing jobs or
# models must not drag megabytes out of TOAST.
_JOB_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, hyperparameters, seed, init_from, "
    "corpus_chars, vocab_size, step, total_steps, train_loss, val_loss, chars_per_sec, eta_s, "
    "model_id, error"
)
_MODEL_COLUMNS = (
    "id, name, created_at, job_id, hyperparameters, metrics, vocab, param_count, size_bytes, dtype"
)
# Newest first; seq breaks ties between rows created within one clock tick.
_NEWEST = "ORDER BY created_at DESC, seq DESC"
_OLDEST = "ORDER BY created_at ASC, seq ASC"
_CLOSED = "the PostgreSQL store is closed"
_NO_FILES = (
    "the PostgreSQL store keeps files in the database; use read_corpus/read_state/read_model_bytes"
)


def _job(row: DictRow) -> JobRecord:
    return JobRecord(**{k: row[k] for k in JobRecord.__slots__})


def _model(row: DictRow) -> ModelRecord:
    return ModelRecord(**{k: row[k] for k in ModelRecord.__slots__})


def _no_nul(what: str, value: str | None) -> None:
    # PostgreSQL text cannot hold U+0000; say so as a ValueError, like other bad input.
    if value is not None and "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")


class _Pool:
    """A few reusable connections, at most ``size`` in use at once (psycopg_pool is not a
    dependency). Connections are autocommit: single reads need no BEGIN/COMMIT round
    trips, and writes open explicit transactions (``conn.transaction()``)."""

    def __init__(self, conninfo: str, kwargs: dict[str, Any], size: int) -> None:
        self._conninfo, self._kwargs, self._size = conninfo, kwargs, size
        self._reset()
        self._closed = False
        # Connections inherited through fork() are never closed by the child: closing
        # would send Terminate on the parent's socket. They are kept alive, unused.
        self._inherited: list[Conn] = []

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._size)
        self._idle: list[Conn] = []

    def _connect(self) -> Conn:
        return psycopg.connect(
            self._conninfo, autocommit=True, row_factory=dict_row, **self._kwargs
        )

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        if self._pid != os.getpid():
            self._inherited.extend(self._idle)
            self._reset()
        if self._closed:
            raise StoreError(_CLOSED)
        if not self._slots.acquire(timeout=60):
            raise StoreError("no database connection became free within 60 s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            try:
                yield conn
            finally:
                self._release(conn)
        finally:
            self._slots.release()

    def _release(self, conn: Conn) -> None:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:
                conn.close()
        if conn.closed or conn.broken:
            conn.close()
            return
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def discard_idle(self) -> None:
        """Close the idle connections: after one broke (a server restart, a failover),
        the others are most likely dead too."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.discard_idle()


class PostgresStore:
    """``Store`` on PostgreSQL, shared by API replicas and workers; safe between threads.

    ``database_url`` is a libpq connection string or URL. ``schema`` (a plain
    lowercase identifier) puts charnn's tables in that schema, created if
    needed: e.g. to isolate tests or share a database. ``pool_size`` bounds
    this instance's connections; the API calls the store from many threads.
    """

    def __init__(self, database_url: str, *, schema: str | None = None, pool_size: int = 8) -> None:
        if schema is not None and _SCHEMA_NAME.fullmatch(schema) is None:
            raise ValueError("schema must be a lowercase SQL identifier ([a-z_][a-z0-9_]*)")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        kwargs: dict[str, Any] = {"application_name": "charnn"}
        try:
            given = conninfo_to_dict(database_url)
        except psycopg.ProgrammingError as exc:
            raise ValueError(f"invalid database URL: {exc}") from None
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = 10  # an unreachable server is an error, not a hang
        if schema is not None:
            # Appended to the URL's own options (a libpq keyword given twice: last wins).
            kwargs["options"] = f"{given.get('options') or ''} -c search_path={schema}".strip()
        self.schema = schema
        self._pool = _Pool(database_url, kwargs, pool_size)
        try:
            self._init_schema()
        except BaseException:
            self._pool.close()
            raise

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    def _run(self, body: Callable[[Cursor], _T], *, write: bool) -> _T:
        """Run ``body`` on a pooled connection, in one transaction when ``write``.

        A connection found broken (server restart, failover, idle timeout) is
        replaced and ``body`` run once more — but never when the break came during
        COMMIT, whose outcome is then unknown: that error propagates.
        """
        for attempt in (1, 2):
            with self._pool.connection() as conn:
                committing = False
                try:
                    with conn.cursor() as cur:
                        if not write:
                            return body(cur)
                        with conn.transaction():
                            result = body(cur)
                            committing = True
                        return result
                except psycopg.OperationalError:
                    if attempt == 2 or committing or not conn.broken:
                        raise
            self._pool.discard_idle()
        raise AssertionError("unreachable")

    def _one(self, query: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> DictRow | None:
        def body(cur: Cursor) -> DictRow | None:
            return cur.execute(cast(Any, query), params).fetchone()

        return self._run(body, write=False)

    def _all(self, query: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[DictRow]:
        def body(cur: Cursor) -> list[DictRow]:
            return cur.execute(cast(Any, query), params).fetchall()

        return self._run(body, write=False)

    def _write_one(
        self, query: str, params: Mapping[str, Any] | Sequence[Any] = ()
    ) -> DictRow | None:
        def body(cur: Cursor) -> DictRow | None:
            cur.execute(cast(Any, query), params)
            return cur.fetchone() if cur.description is not None else None

        return self._run(body, write=True)

    def _check_version(self, version: int) -> None:
        if version > PG_SCHEMA_VERSION:
            raise StoreError(
                f"the PostgreSQL database has charnn schema version {version}; "
                f"this charnn understands up to {PG_SCHEMA_VERSION}"
            )

    def _init_schema(self) -> None:
        # Fast path, read-only: an up-to-date schema needs no lock (replicas start
        # without queueing behind each other, and a read-only standby can be opened).
        try:
            row = self._one("SELECT schema_version FROM charnn_meta")
        except errors.UndefinedTable:
            row = None
        if row is not None:
            self._check_version(int(row["schema_version"]))
            if row["schema_version"] == PG_SCHEMA_VERSION:
                return

        def body(cur: Cursor) -> None:
            # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalogs;
            # the lock makes creators (and migrators) take turns. It is released at
            # the end of the transaction.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            if self.schema is not None:
                cur.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            cur.execute(
                "CREATE TABLE IF NOT EXISTS charnn_meta ("
                " id BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),"
                " schema_version INTEGER NOT NULL,"
                " models_version BIGINT NOT NULL)"
            )
            cur.execute(
                "INSERT INTO charnn_meta (id, schema_version, models_version) "
                "VALUES (true, 0, 0) ON CONFLICT DO NOTHING"
            )
            row = cur.execute("SELECT schema_version FROM charnn_meta FOR UPDATE").fetchone()
            assert row is not None
            version = int(row["schema_version"])
            self._check_version(version)  # again: another process may have migrated
            for step in range(version + 1, PG_SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    cur.execute(cast(Any, statement))
            if version < PG_SCHEMA_VERSION:
                cur.execute("UPDATE charnn_meta SET schema_version = %s", (PG_SCHEMA_VERSION,))

        self._run(body, write=True)

    # -- jobs -------------------------------------------------------------------

    def create_job(
        self,
        name: str,
        corpus: str,
        hyperparameters: Mapping[str, Any],
        seed: int,
        init_from: str | None,
        vocab_size: int,
    ) -> JobRecord:
        """Insert the job as ``queued``, its corpus in the same row.

        A corpus with lone surrogates raises ``UnicodeEncodeError`` and one with
        NUL characters ``ValueError`` (both ``ValueError``) before anything is written.
        """
        corpus.encode("utf-8")
        _no_nul("the corpus", corpus)
        _no_nul("the job name", name)
        row = self._write_one(
            f"INSERT INTO charnn_jobs (id, name, status, created_at, hyperparameters, seed, "
            f"init_from, corpus_chars, vocab_size, corpus) "
            f"VALUES (%s, %s, 'queued', {_NOW}, %s, %s, %s, %s, %s, %s) RETURNING {_JOB_COLUMNS}",
            (
                _new_id(),
                name,
                _dump(hyperparameters),
                seed,
                init_from,
                len(corpus),
                vocab_size,
                corpus,
            ),
        )
        assert row is not None
        return _job(row)

    def get_job(self, job_id: str) -> JobRecord | None:
        if not valid_id(job_id):
            return None
        row = self._one(f"SELECT {_JOB_COLUMNS} FROM charnn_jobs WHERE id = %s", (job_id,))
        return _job(row) if row else None

    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs newest first, optionally only those with ``status``."""
        _check_status(status)
        _check_page(limit, offset)
        where, params = ("WHERE status = %s", [status]) if status is not None else ("", [])
        rows = self._all(
            f"SELECT {_JOB_COLUMNS} FROM charnn_jobs {where} {_NEWEST} LIMIT %s OFFSET %s",
            [*params, limit, offset],
        )
        return [_job(r) for r in rows]

    def count_jobs(self, status: JobStatus | None = None) -> int:
        _check_status(status)
        if status is None:
            row = self._one("SELECT count(*) AS n FROM charnn_jobs")
        else:
            row = self._one("SELECT count(*) AS n FROM charnn_jobs WHERE status = %s", (status,))
        assert row is not None
        return int(row["n"])

    def count_active(self) -> int:
        """Queued plus running jobs: what admission control compares with its limits."""
        row = self._one(
            "SELECT count(*) AS n FROM charnn_jobs WHERE status IN ('queued', 'running')"
        )
        assert row is not None
        return int(row["n"])

    def count_queued(self) -> int:
        """Jobs waiting for a worker."""
        row = self._one("SELECT count(*) AS n FROM charnn_jobs WHERE status = 'queued'")
        assert row is not None
        return int(row["n"])

    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Set the given columns; the updated job, or None if there is no such job.

        Only progress and outcome columns may change; any other name is a
        ``ValueError`` (a typo must not be silently dropped). NUL characters in
        ``error`` (an exception's text) become U+FFFD rather than lose the reason.
        """
        unknown = sorted(set(fields) - _JOB_UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update job field(s): {', '.join(unknown)}")
        if "status" in fields:
            if fields["status"] is None:
                raise ValueError("status cannot be None")
            _check_status(fields["status"])
        if isinstance(fields.get("error"), str):
            fields["error"] = fields["error"].replace("\x00", "\ufffd")
        for text in ("name", "model_id"):
            if isinstance(fields.get(text), str):
                _no_nul(text, fields[text])
        if not valid_id(job_id):
            return None
        if not fields:
            return self.get_job(job_id)
        names = sorted(fields)  # whitelisted above, so safe to splice into SQL
        assignments = ", ".join(f"{n} = %s" for n in names)
        row = self._write_one(
            f"UPDATE charnn_jobs SET {assignments} WHERE id = %s RETURNING {_JOB_COLUMNS}",
            [*(_finite_or_none(fields[n]) for n in names), job_id],
        )
        return _job(row) if row else None

    def jobs_to_resume(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: the work a restarted service picks up."""
        rows = self._all(
            f"SELECT {_JOB_COLUMNS} FROM charnn_jobs "
            f"WHERE status IN ('queued', 'running') {_OLDEST}"
        )
        return [_job(r) for r in rows]

    def corpus_path(self, job_id: str) -> Path | None:
        raise NotImplementedError(_NO_FILES)

    def state_path(self, job_id: str) -> Path | None:
        raise NotImplementedError(_NO_FILES)

    def read_corpus(self, job_id: str) -> str | None:
        """The job's training text, or None for an unknown job."""
        if not valid_id(job_id):
            return None
        row = self._one("SELECT corpus FROM charnn_jobs WHERE id = %s", (job_id,))
        return cast(str, row["corpus"]) if row else None

    def read_state(self, job_id: str) -> bytes | None:
        """The job's resume checkpoint, or None (unknown job, or none written yet)."""
        if not valid_id(job_id):
            return None
        row = self._one("SELECT state FROM charnn_jobs WHERE id = %s", (job_id,))
        return bytes(row["state"]) if row and row["state"] is not None else None

    def write_state(self, job_id: str, data: bytes) -> None:
        """Replace the job's resume checkpoint: one UPDATE, so readers see the old
        checkpoint or the new one, never a mix. An unknown job stores nothing."""
        if valid_id(job_id):
            self._write_one("UPDATE charnn_jobs SET state = %s WHERE id = %s", (data, job_id))

    # -- distributed execution --------------------------------------------------

    def claim_job(self, job_id: str, worker: str, stale_after_s: float) -> JobRecord | None:
        """Make ``worker`` the job's owner and mark it running; the job, or None.

        Claimable: a queued job, or a running one whose heartbeat is older than
        ``stale_after_s`` (its worker died). One conditional UPDATE: of racing
        claims exactly one matches, the others see the winner's row and get None.
        """
        if not valid_id(job_id):
            return None
        _no_nul("worker", worker)
        row = self._write_one(
            f"UPDATE charnn_jobs SET status = 'running', worker = %(worker)s, "
            f"heartbeat_at = {_NOW}, started_at = COALESCE(started_at, {_NOW}) "
            f"WHERE id = %(id)s AND (status = 'queued' OR {_STALE}) RETURNING {_JOB_COLUMNS}",
            {"worker": worker, "id": job_id, "stale": float(stale_after_s)},
        )
        return _job(row) if row else None

    def heartbeat(self, job_id: str, worker: str) -> tuple[bool, bool]:
        """``(owned, cancel_requested)``: whether ``worker`` still owns the running job
        (then its heartbeat is refreshed), and whether a cancel was requested. A worker
        that is no longer the owner must stop without writing anything more."""
        if not valid_id(job_id):
            return False, False

        def body(cur: Cursor) -> tuple[bool, bool]:
            row = cur.execute(
                f"UPDATE charnn_jobs SET heartbeat_at = {_NOW} "
                "WHERE id = %s AND worker = %s AND status = 'running' "
                "RETURNING cancel_requested",
                (job_id, worker),
            ).fetchone()
            if row is not None:
                return True, bool(row["cancel_requested"])
            row = cur.execute(
                "SELECT cancel_requested FROM charnn_jobs WHERE id = %s", (job_id,)
            ).fetchone()
            return False, bool(row and row["cancel_requested"])

        return self._run(body, write=True)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a job: a queued one at once (``cancelled``), a running one by setting
        ``cancel_requested`` for its worker to act on; a finished one is left as is.
        The job after the change, or None if unknown."""
        if not valid_id(job_id):
            return None

        def body(cur: Cursor) -> DictRow | None:
            row = cur.execute(
                "UPDATE charnn_jobs SET cancel_requested = true, "
                "status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, "
                f"finished_at = CASE WHEN status = 'queued' THEN {_NOW} ELSE finished_at END "
                "WHERE id = %s AND status IN ('queued', 'running') "
                f"RETURNING {_JOB_COLUMNS}",
                (job_id,),
            ).fetchone()
            if row is None:
                row = cur.execute(
                    f"SELECT {_JOB_COLUMNS} FROM charnn_jobs WHERE id = %s", (job_id,)
                ).fetchone()
            return row

        row = self._run(body, write=True)
        return _job(row) if row else None

    def requeue_stale(self, stale_after_s: float) -> list[str]:
        """Put running jobs whose worker stopped heart-beating back to ``queued``
        (worker cleared); their ids, oldest first, for the caller to re-send.

        Rows are locked with SKIP LOCKED, so concurrent callers split the stale jobs
        between them (never both get one) and never deadlock.
        """
        rows = self._run(
            lambda cur: cur.execute(
                "UPDATE charnn_jobs SET status = 'queued', worker = NULL "
                "WHERE id IN (SELECT id FROM charnn_jobs "
                f"WHERE {_STALE} ORDER BY id FOR UPDATE SKIP LOCKED) "
                "RETURNING id, created_at, seq",
                {"stale": float(stale_after_s)},
            ).fetchall(),
            write=True,
        )
        return [r["id"] for r in sorted(rows, key=lambda r: (r["created_at"], r["seq"]))]

    # -- metrics ----------------------------------------------------------------

    def add_metrics(self, job_id: str, points: Sequence[MetricPoint]) -> int:
        """Append loss-curve points; returns how many were new.

        A step already stored is ignored (the first report wins), so a resumed
        job that re-reports steps is harmless. Unknown jobs store nothing.
        """
        if not valid_id(job_id) or not points:
            return 0

        def body(cur: Cursor) -> int:
            # One statement for the whole batch; the job's row is locked (FOR KEY
            # SHARE, as the foreign key would) so it cannot vanish in between.
            cur.execute(
                "INSERT INTO charnn_metrics (job_id, step, elapsed_s, train_loss, val_loss) "
                "SELECT j.id, p.step, p.elapsed_s, p.train_loss, p.val_loss "
                "FROM (SELECT id FROM charnn_jobs WHERE id = %s FOR KEY SHARE) AS j, "
                "unnest(%s::bigint[], %s::double precision[], %s::double precision[], "
                "%s::double precision[]) WITH ORDINALITY AS p(step, elapsed_s, train_loss, "
                "val_loss, n) ORDER BY p.n ON CONFLICT (job_id, step) DO NOTHING",
                (
                    job_id,
                    [p.step for p in points],
                    [float(p.elapsed_s) for p in points],
                    [_finite_or_none(float(p.train_loss)) for p in points],
                    [_finite_or_none(p.val_loss) for p in points],
                ),
            )
            return max(cur.rowcount, 0)

        return self._run(body, write=True)

    def get_metrics(self, job_id: str, after_step: int = -1) -> list[MetricPoint]:
        """The job's points with ``step > after_step``, by step (for incremental polling)."""
        if not valid_id(job_id):
            return []
        rows = self._all(
            "SELECT step, elapsed_s, train_loss, val_loss FROM charnn_metrics "
            "WHERE job_id = %s AND step > %s ORDER BY step",
            (job_id, after_step),
        )
        return [_metric_point(r) for r in rows]

    # -- models -----------------------------------------------------------------

    def add_model(
        self,
        name: str,
        job_id: str | None,
        checkpoint_bytes: bytes,
        hyperparameters: Mapping[str, Any],
        metrics: Mapping[str, Any],
        vocab: Sequence[str],
        param_count: int,
        dtype: str,
    ) -> ModelRecord:
        """Insert the model, bytes included, and bump ``models_version`` in the same
        transaction: a replica that sees the new version sees the model.

        The bytes are stored as given: callers validate them (``model_from_bytes``)
        and pass what they learned (vocab, dtype, ...).
        """
        _no_nul("the model name", name)

        def body(cur: Cursor) -> DictRow | None:
            row = cur.execute(
                f"INSERT INTO charnn_models ({_MODEL_COLUMNS}, data) "
                f"VALUES (%s, %s, {_NOW}, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {_MODEL_COLUMNS}",
                (
                    _new_id(),
                    name,
                    job_id,
                    _dump(hyperparameters),
                    _dump(metrics),
                    _dump(list(vocab)),
                    param_count,
                    len(checkpoint_bytes),
                    dtype,
                    checkpoint_bytes,
                ),
            ).fetchone()
            # Last, so the meta row is locked only for the moment before COMMIT.
            cur.execute("UPDATE charnn_meta SET models_version = models_version + 1")
            return row

        row = self._run(body, write=True)
        assert row is not None
        return _model(row)

    def get_model(self, model_id: str) -> ModelRecord | None:
        if not valid_id(model_id):
            return None
        row = self._one(f"SELECT {_MODEL_COLUMNS} FROM charnn_models WHERE id = %s", (model_id,))
        return _model(row) if row else None

    def list_models(self, limit: int = 50, offset: int = 0) -> list[ModelRecord]:
        _check_page(limit, offset)
        rows = self._all(
            f"SELECT {_MODEL_COLUMNS} FROM charnn_models {_NEWEST} LIMIT %s OFFSET %s",
            (limit, offset),
        )
        return [_model(r) for r in rows]

    def count_models(self) -> int:
        row = self._one("SELECT count(*) AS n FROM charnn_models")
        assert row is not None
        return int(row["n"])

    def resolve_model(self, id_or_name: str) -> ModelRecord | None:
        """The model with this id, else the newest model with this name, else None."""
        model = self.get_model(id_or_name)
        if model is not None:
            return model
        if "\x00" in id_or_name:
            return None  # no stored name has one (and PostgreSQL text cannot)
        row = self._one(
            f"SELECT {_MODEL_COLUMNS} FROM charnn_models WHERE name = %s {_NEWEST} LIMIT 1",
            (id_or_name,),
        )
        return _model(row) if row else None

    def newest_model(self) -> ModelRecord | None:
        row = self._one(f"SELECT {_MODEL_COLUMNS} FROM charnn_models {_NEWEST} LIMIT 1")
        return _model(row) if row else None

    @property
    def models_version(self) -> int:
        """Bumped in the transaction of every model insert and delete, by any replica or
        worker: one tiny query tells a replica whether its model caches are stale."""
        row = self._one("SELECT models_version FROM charnn_meta")
        assert row is not None
        return int(row["models_version"])

    def delete_model(self, model_id: str) -> bool:
        """Delete the model (row and bytes at once); True if it existed."""
        if not valid_id(model_id):
            return False

        def body(cur: Cursor) -> bool:
            cur.execute("DELETE FROM charnn_models WHERE id = %s", (model_id,))
            if cur.rowcount <= 0:
                return False
            cur.execute("UPDATE charnn_meta SET models_version = models_version + 1")
            return True

        return self._run(body, write=True)

    def model_path(self, model_id: str) -> Path | None:
        raise NotImplementedError(_NO_FILES)

    def read_model_bytes(self, model_id: str) -> bytes | None:
        """The checkpoint bytes, or None if there is no such model."""
        if not valid_id(model_id):
            return None
        row = self._one("SELECT data FROM charnn_models WHERE id = %s", (model_id,))
        return bytes(row["data"]) if row else None

    # -- health -----------------------------------------------------------------

    def writable(self) -> bool:
        """Whether the database accepts writes (for the readiness probe).

        Cheap: a row lock on the meta row inside a transaction that is rolled back.
        A read-only server (a standby, ``default_transaction_read_only``) refuses
        row locks; an unreachable one fails to connect. FOR KEY SHARE does not wait
        for the version bumps of concurrent model writes.
        """

        try:
            with self._pool.connection() as conn:
                conn.execute("BEGIN")
                conn.execute("SELECT 1 FROM charnn_meta FOR KEY SHARE").fetchone()
                conn.execute("ROLLBACK")
        except (psycopg.Error, StoreError):
            return False
        return True

    def close(self) -> None:
        """Close the idle connections and refuse further use; idempotent."""
        self._pool.close()
