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
ordering, pagination and ``update_job`` checks, ``update_progress`` only
forwards, ``delete_job`` only for finished jobs, ``purge_job_files`` keeping
rows and metrics, idempotent metrics, NaN/inf stored as NULL, unreadable rows
skipped and logged rather than failing a listing). The queue's room
(``create_job(max_queued=...)``) is checked under a transaction-scoped advisory
lock, so it holds across any number of API replicas.

A failure of the database rather than of the request (unreachable, read-only,
out of disk, ...) is ``StoreUnavailable`` with a plain reason, never the
server's message (it names hosts, users and databases; it is logged instead).

The extra methods (``claim_job``, ``heartbeat``, ``request_cancel``,
``requeue_stale``, ``finish_owned``, ``hand_back``, ...) are what distributed
workers coordinate with; each is one transaction, so racing replicas and
workers never both win, and those a worker writes with check that it still
owns the job, so a worker that lost it writes nothing.

Times are seconds since the epoch (DOUBLE PRECISION), taken from the
*database's* clock, so machines whose clocks disagree still agree on which
heartbeat is stale and which job is newest.

The schema is created or migrated at construction, under a transaction-scoped
advisory lock, so any number of processes may start at once.

``models_version`` (read by the model cache before every prediction) costs no
query while the store's ``VersionListener`` is fresh: every bump also sends
``pg_notify`` on a channel named for this ``charnn_meta`` table (its OID: one per
database and schema), and the listener, started at the first read, keeps the
highest version heard (``app/store/listen.py``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow

from .base import (
    JOB_STATUSES,
    UNFINISHED_STATUSES,
    JobActiveError,
    JobRecord,
    JobStatus,
    MetricPoint,
    ModelRecord,
    NewModel,
    StoreError,
    StoreUnavailable,
    check_finish,
    check_room,
    checked_progress,
    checked_update,
    dump_json,
    finishable,
    finite_or_none,
    model_from_row,
    new_id,
    valid_id,
)
from .idempotency import POSTGRES_DDL, POSTGRES_KEYS, IdempotencyKey, answer, claim, find
from .listen import VersionListener
from .pool import Pool
from .sql import JOB_COLUMNS, MODEL_COLUMNS, POSTGRES, SqlReads

TERMINAL = ("succeeded", "failed", "cancelled")  # the rows purge_job_files empties

__all__ = ["PG_SCHEMA_VERSION", "PostgresStore"]

log = logging.getLogger("charnn.store")

PG_SCHEMA_VERSION = 2
# Keys of the advisory locks (database-wide, any constants unique to charnn): one
# serialises schema creation/migration ("charnn" in ASCII), one the queue's admission
# checks ("charnnq").
_SCHEMA_LOCK = 0x636861726E6E
_ADMISSION_LOCK = 0x636861726E6E71
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

# base.METRIC_DIAGNOSTICS, as PostgreSQL columns.
_METRIC_COLUMNS = {
    "grad_norm": "DOUBLE PRECISION",
    "clipped": "BOOLEAN",
    "learning_rate": "DOUBLE PRECISION",
    "chars_per_sec": "DOUBLE PRECISION",
    "sample": "TEXT",
}

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
    # Pause (issue 19): the status CHECK lets ``paused`` in, and a worker learns of a
    # pause from its heartbeat, as of a cancel.
    2: (
        "ALTER TABLE charnn_jobs DROP CONSTRAINT IF EXISTS charnn_jobs_status_check",
        "ALTER TABLE charnn_jobs ADD CONSTRAINT charnn_jobs_status_check "
        f"CHECK (status IN ({', '.join(repr(s) for s in JOB_STATUSES)}))",
        "ALTER TABLE charnn_jobs ADD COLUMN IF NOT EXISTS pause_requested BOOLEAN NOT NULL "
        "DEFAULT false",
    ),
}

_CLOSED = "the PostgreSQL store is closed"


_DAMAGED = "the job's stored row is damaged (it cannot be read back)"
_UNKNOWN_COMMIT = (
    "the database became unreachable while committing; the change may or may not be stored"
)
# Failures of the database, not of the request: their plain reasons. Checked in order;
# other OperationalErrors are "unreachable" (no SQLSTATE: the connection failed, or
# class 08/57P: connection exception, shutdown) or a failure named by its class.
_REASONS: tuple[tuple[type[psycopg.Error], str], ...] = (
    (errors.ReadOnlySqlTransaction, "the database refused the write (read-only)"),
    (errors.DiskFull, "the database refused the write (its disk is full)"),
    (errors.OutOfMemory, "the database is out of memory"),
    (errors.TooManyConnections, "the database has no free connections"),
    (errors.QueryCanceled, "the database cancelled the statement (a timeout)"),
    (errors.InsufficientPrivilege, "the database refused access (insufficient privilege)"),
)


def _unavailable(exc: psycopg.Error) -> StoreUnavailable | None:
    """``StoreUnavailable`` with a plain reason for a failure of the database, or None
    (the error is the request's or a bug: it stays what it is). The server's own
    message is logged, never put in the reason: it may name hosts, users, databases."""
    reason = next((r for kind, r in _REASONS if isinstance(exc, kind)), None)
    if reason is None:
        if not isinstance(exc, psycopg.OperationalError):
            return None
        state = exc.sqlstate or ""
        if not state or state.startswith(("08", "57P")):
            reason = "the database is unreachable"
        else:
            reason = f"the database failed ({type(exc).__name__})"
    log.warning("PostgreSQL store: %s (%s: %s)", reason, type(exc).__name__, str(exc).strip())
    return StoreUnavailable(reason)


def _no_nul(what: str, value: str | None) -> None:
    # PostgreSQL text cannot hold U+0000; say so as a ValueError, like other bad input.
    if value is not None and "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")


def _bump_models_version(cur: Cursor, channel: str) -> int:
    """Bump ``models_version`` in the caller's transaction and notify the listeners of the
    new value; NOTIFY is delivered at COMMIT, so nobody hears of a change that rolled back.
    Last in its transaction, so the meta row is locked only for the moment before COMMIT."""
    row = cur.execute(
        "WITH bumped AS (UPDATE charnn_meta SET models_version = models_version + 1 "
        "RETURNING models_version) "
        "SELECT models_version, pg_notify(%s, models_version::text) FROM bumped",
        (channel,),
    ).fetchone()
    assert row is not None
    return int(row["models_version"])


def _read_models_version(conn: psycopg.Connection[Any]) -> int:
    """The version in the table, on the listener's own connection (tuple rows)."""
    row = conn.execute("SELECT models_version FROM charnn_meta").fetchone()
    assert row is not None
    return int(row[0])


def _insert_model(cur: Cursor, model: NewModel, job_id: str | None) -> ModelRecord:
    """Insert one model row, bytes included, in the caller's transaction."""
    _no_nul("the model name", model.name)
    row = cur.execute(
        f"INSERT INTO charnn_models ({MODEL_COLUMNS}, data) "
        f"VALUES (%s, %s, {_NOW}, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {MODEL_COLUMNS}",
        (
            new_id(),
            model.name,
            job_id,
            dump_json(model.hyperparameters),
            dump_json(model.metrics),
            dump_json(list(model.vocab)),
            model.param_count,
            len(model.data),
            model.dtype,
            model.data,
        ),
    ).fetchone()
    assert row is not None
    return model_from_row(row)  # what charnn just wrote: a failure here is a bug, and rolls back


class PostgresStore(SqlReads):
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
        self._reported: set[str] = set()  # unreadable rows already logged
        self._pool = Pool(database_url, kwargs, pool_size)
        try:
            self._init_schema()
            self._init_idempotency()
            row = self._one("SELECT 'charnn_meta'::regclass::oid::bigint AS oid")
        except BaseException:
            self._pool.close()
            raise
        assert row is not None
        listen_kwargs = {**kwargs, "application_name": "charnn-listener"}
        if "tcp_user_timeout" not in given and psycopg.pq.version() >= 120000:
            # A peer gone silent (no RST) fails the ping within 10 s, not TCP's minutes.
            listen_kwargs["tcp_user_timeout"] = 10_000

        def listen_connect() -> psycopg.Connection[Any]:
            return psycopg.connect(database_url, autocommit=True, **listen_kwargs)

        self._versions = VersionListener(
            listen_connect, f"charnn_models_{row['oid']}", _read_models_version
        )

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    def _run(self, body: Callable[[Cursor], _T], *, write: bool) -> _T:
        """Run ``body`` on a pooled connection, in one transaction when ``write``.

        A connection found broken (server restart, failover, idle timeout) is
        replaced and ``body`` run once more — but never when the break came during
        COMMIT, whose outcome is then unknown. A failure of the database (after that
        one retry) is ``StoreUnavailable`` with a plain reason; other errors (bad
        input, bugs, what ``body`` raises) propagate as they are.
        """
        try:
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
                        if committing and conn.broken:
                            log.warning("PostgreSQL store: the connection broke during COMMIT")
                            raise StoreUnavailable(_UNKNOWN_COMMIT) from None
                        if attempt == 2 or committing or not conn.broken:
                            raise
                self._pool.discard_idle()
        except psycopg.Error as exc:
            unavailable = _unavailable(exc)
            if unavailable is None:
                raise
            raise unavailable from None
        raise AssertionError("unreachable")

    def _one(self, query: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> DictRow | None:
        def body(cur: Cursor) -> DictRow | None:
            return cur.execute(cast(Any, query), params).fetchone()

        return self._run(body, write=False)

    dialect = POSTGRES

    def _rows(self, query: str, params: Sequence[Any] = ()) -> list[DictRow]:
        return self._all(query, params)

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

    def _first_job(self, row: DictRow | None) -> JobRecord | None:
        jobs = self._jobs([row]) if row is not None else []
        return jobs[0] if jobs else None

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
            if row["schema_version"] == PG_SCHEMA_VERSION and not self._missing_metric_columns():
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
            for name in self._missing_metric_columns(cur):
                column = f"{name} {_METRIC_COLUMNS[name]}"
                cur.execute(cast(Any, f"ALTER TABLE charnn_metrics ADD COLUMN {column}"))

        self._run(body, write=True)

    def _missing_metric_columns(self, cur: Cursor | None = None) -> list[str]:
        """The diagnostics columns an older ``charnn_metrics`` lacks (added in place,
        nullable, without a schema version: an older charnn still reads and writes it)."""
        query = (
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'charnn_metrics'"
        )
        rows = cur.execute(query).fetchall() if cur is not None else self._rows(query)
        have = {r["column_name"] for r in rows}
        return [name for name in _METRIC_COLUMNS if name not in have]

    # -- jobs -------------------------------------------------------------------

    def create_job(
        self,
        name: str,
        corpus: str,
        hyperparameters: Mapping[str, Any],
        seed: int,
        init_from: str | None,
        vocab_size: int,
        *,
        max_queued: int | None = None,
        idempotency: IdempotencyKey | None = None,
    ) -> JobRecord:
        """Insert the job as ``queued``, its corpus in the same row.

        With ``max_queued``, the queue's room is checked in the insert's transaction
        under an advisory lock that every replica takes, so concurrent submissions
        anywhere can never overfill it; a refused job (``QueueFullError``) leaves
        nothing. The row is inserted *before* the lock is taken and counted with the
        others (a transaction sees its own row; each lock holder sees the commits of
        the ones before it), so the lock is never held while a 10M-character corpus
        travels. A corpus with lone surrogates raises ``UnicodeEncodeError`` and one
        with NUL characters ``ValueError`` (both ``ValueError``) before anything is
        written. With ``idempotency``, the key is claimed after the row and before the
        admission lock (a racing request with the key waits here for this transaction's
        end, then answers its job: a replay is never refused for a full queue).
        """
        corpus.encode("utf-8")
        _no_nul("the corpus", corpus)
        _no_nul("the job name", name)
        if idempotency is not None and (live := self.idempotency_key(idempotency.key)):
            answer(idempotency, {"fingerprint": live[0], "job_id": live[1]})
        if max_queued is not None:
            check_room(self.count_queued(), max_queued)  # cheap, before the corpus is sent

        def body(cur: Cursor) -> DictRow | None:
            row = cur.execute(
                "INSERT INTO charnn_jobs (id, name, status, created_at, hyperparameters, seed, "
                "init_from, corpus_chars, vocab_size, corpus) "
                f"VALUES (%s, %s, 'queued', {_NOW}, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {JOB_COLUMNS}",
                (
                    new_id(),
                    name,
                    dump_json(hyperparameters),
                    seed,
                    init_from,
                    len(corpus),
                    vocab_size,
                    corpus,
                ),
            ).fetchone()
            if idempotency is not None:
                assert row is not None
                execute = lambda q, p: cur.execute(cast(Any, q), p)  # noqa: E731
                claim(execute, POSTGRES_KEYS, idempotency, str(row["id"]))
            if max_queued is not None:
                # Held to the end of the transaction: count and COMMIT are one step for
                # every replica. The count includes this (uncommitted) row.
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_ADMISSION_LOCK,))
                n = cur.execute(
                    "SELECT count(*) AS n FROM charnn_jobs WHERE status = 'queued'"
                ).fetchone()
                assert n is not None
                check_room(int(n["n"]) - 1, max_queued)
            return row

        job = self._first_job(self._run(body, write=True))
        assert job is not None
        return job

    def idempotency_key(self, key: str) -> tuple[str, str] | None:
        row = find(self._all, POSTGRES_KEYS, key)
        return None if row is None else (str(row["fingerprint"]), str(row["job_id"]))

    def _init_idempotency(self) -> None:
        """The idempotency keys' table, beside the versioned schema (``idempotency.py``):
        created if missing, under the schema lock, so a database of any version gains it."""
        row = self._one("SELECT to_regclass(%s) IS NOT NULL AS ok", (POSTGRES_KEYS.table,))
        if row is not None and row["ok"]:
            return

        def body(cur: Cursor) -> None:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in POSTGRES_DDL:
                cur.execute(cast(Any, statement))

        self._run(body, write=True)

    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Set the given columns; the updated job, or None if there is no such job.

        Only progress and outcome columns may change; any other name is a
        ``ValueError`` (a typo must not be silently dropped). NUL characters in
        ``error`` (an exception's text) become U+FFFD rather than lose the reason.
        """
        names = checked_update(fields)  # whitelisted, so safe to splice into SQL
        if isinstance(fields.get("error"), str):
            fields["error"] = fields["error"].replace("\x00", "\ufffd")
        for text in ("name", "model_id"):
            if isinstance(fields.get(text), str):
                _no_nul(text, fields[text])
        if not valid_id(job_id):
            return None
        if not names:
            return self.get_job(job_id)
        assignments = ", ".join(f"{n} = %s" for n in names)
        row = self._write_one(
            f"UPDATE charnn_jobs SET {assignments} WHERE id = %s RETURNING {JOB_COLUMNS}",
            [*(finite_or_none(fields[n]) for n in names), job_id],
        )
        return self._first_job(row)

    def update_progress(self, job_id: str, **fields: Any) -> bool:
        """Set progress columns (``PROGRESS_FIELDS``, ``step`` required) only if ``step``
        is past the stored one: a job resumed from an older checkpoint replays steps,
        and its progress must not go backwards or repeat. True if the row changed
        (the caller then records and announces the point). One conditional UPDATE,
        so two writers racing (a worker that lost its job and its successor) cannot
        move the step backwards either."""
        names = checked_progress(fields)
        if not valid_id(job_id):
            return False
        assignments = ", ".join(f"{n} = %s" for n in names)

        def body(cur: Cursor) -> bool:
            cur.execute(
                f"UPDATE charnn_jobs SET {assignments} WHERE id = %s AND step < %s",
                [*(finite_or_none(fields[n]) for n in names), job_id, fields["step"]],
            )
            return cur.rowcount > 0

        return self._run(body, write=True)

    def delete_job(self, job_id: str) -> bool:
        """Delete a finished job: its row with corpus and state, and its metric points (the
        foreign key cascades), in one transaction; True if it existed. ``JobActiveError``
        for a queued or running job (cancel it first). Models it produced are kept."""
        if not valid_id(job_id):
            return False

        def body(cur: Cursor) -> bool:
            row = cur.execute(
                "SELECT status FROM charnn_jobs WHERE id = %s FOR UPDATE", (job_id,)
            ).fetchone()
            if row is None:
                return False
            if row["status"] in UNFINISHED_STATUSES:
                raise JobActiveError(row["status"])
            cur.execute("DELETE FROM charnn_jobs WHERE id = %s", (job_id,))
            return True

        return self._run(body, write=True)

    def discard_job(self, job_id: str) -> bool:
        """Delete a job whatever its status; True if it existed. Only for a job that was
        never handed to anyone (``CeleryRunner.submit`` when the broker refused it):
        a client then learns that nothing was stored, and nothing was."""
        if not valid_id(job_id):
            return False

        def body(cur: Cursor) -> bool:
            cur.execute("DELETE FROM charnn_jobs WHERE id = %s", (job_id,))
            return cur.rowcount > 0

        return self._run(body, write=True)

    def purge_job_files(self, finished_before: float) -> list[str]:
        """Empty the corpus and drop the resume state of jobs that finished before the
        given time (the ``job_files_retention_s`` setting); their rows and metrics stay.
        The ids that had something to purge, oldest first; rows already purged are not
        written again (``octet_length`` reads the stored size, not the text)."""
        terminal = ", ".join(f"'{s}'" for s in TERMINAL)
        rows = self._run(
            lambda cur: cur.execute(
                "UPDATE charnn_jobs SET corpus = '', state = NULL "
                f"WHERE status IN ({terminal}) AND finished_at IS NOT NULL "
                "AND finished_at < %s AND (octet_length(corpus) > 0 OR state IS NOT NULL) "
                "RETURNING id, created_at, seq",
                (float(finished_before),),
            ).fetchall(),
            write=True,
        )
        return [r["id"] for r in sorted(rows, key=lambda r: (r["created_at"], r["seq"]))]

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

    def write_state(self, job_id: str, data: bytes, *, worker: str | None = None) -> bool:
        """Replace the job's resume checkpoint: one UPDATE, so readers see the old
        checkpoint or the new one, never a mix. With ``worker``, only while that worker
        owns the running job (one that lost it must not overwrite its successor's).
        True if stored; an unknown job stores nothing."""
        if not valid_id(job_id):
            return False
        owned = "" if worker is None else " AND worker = %s AND status = 'running'"
        params = (data, job_id) if worker is None else (data, job_id, worker)

        def body(cur: Cursor) -> bool:
            cur.execute(f"UPDATE charnn_jobs SET state = %s WHERE id = %s{owned}", params)
            return cur.rowcount > 0

        return self._run(body, write=True)

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

        def body(cur: Cursor) -> JobRecord | None:
            row = cur.execute(
                f"UPDATE charnn_jobs SET status = 'running', worker = %(worker)s, "
                f"heartbeat_at = {_NOW}, started_at = COALESCE(started_at, {_NOW}) "
                f"WHERE id = %(id)s AND (status = 'queued' OR {_STALE}) "
                f"RETURNING {JOB_COLUMNS}",
                {"worker": worker, "id": job_id, "stale": float(stale_after_s)},
            ).fetchone()
            job = self._first_job(row)
            if row is not None and job is None:
                # Unreadable: no worker can run it, and left running it would be
                # re-queued and re-sent forever. It fails, in the claim's transaction.
                cur.execute(
                    f"UPDATE charnn_jobs SET status = 'failed', finished_at = {_NOW}, "
                    "error = %s WHERE id = %s",
                    (_DAMAGED, job_id),
                )
            return job

        return self._run(body, write=True)

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
                f"RETURNING {JOB_COLUMNS}",
                (job_id,),
            ).fetchone()
            if row is None:
                row = cur.execute(
                    f"SELECT {JOB_COLUMNS} FROM charnn_jobs WHERE id = %s", (job_id,)
                ).fetchone()
            return row

        return self._first_job(self._run(body, write=True))

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

    def finish_job(
        self,
        job_id: str,
        status: JobStatus,
        *,
        worker: str | None = None,
        error: str | None = None,
        model: NewModel | None = None,
    ) -> ModelRecord | bool | None:
        """Record the outcome of a job ``worker`` runs, only if it still owns it (without
        ``worker``: only while the job is active).

        In one transaction, with the job's row locked (FOR UPDATE, so a concurrent
        claim or re-queue waits for it, or it for them): if the job is ``running``
        and owned by ``worker``, insert ``model`` (bytes and validated fields; only
        with ``succeeded``), bumping ``models_version``, and set the job's
        ``status``, ``finished_at`` (the database's clock), ``model_id`` and
        ``error``. Otherwise nothing is written, so a worker that lost its job (it
        was re-queued and claimed by another) can never store a duplicate model or
        overwrite its successor's outcome.

        Returns the stored ``ModelRecord`` when a model was given, ``True`` when the
        outcome was recorded without one, ``False`` when ``worker`` no longer owns
        the running job, and ``None`` when there is no such job. Safe to retry after
        a ``StoreUnavailable``: if the first attempt did commit, the job is no longer
        running and the retry writes nothing (``False``).
        """
        check_finish(status, model)
        if isinstance(error, str):
            error = error.replace("\x00", "\ufffd")
        if not valid_id(job_id):
            return None

        bumped: list[int] = []

        def body(cur: Cursor) -> ModelRecord | bool | None:
            bumped.clear()  # a retried body starts afresh
            row = cur.execute(
                "SELECT status, worker FROM charnn_jobs WHERE id = %s FOR UPDATE", (job_id,)
            ).fetchone()
            if row is None:
                return None
            if worker is None:
                if row["status"] not in finishable(status):
                    return False
            elif row["status"] != "running" or row["worker"] != worker:
                return False
            stored = _insert_model(cur, model, job_id) if model is not None else None
            cur.execute(
                f"UPDATE charnn_jobs SET status = %s, finished_at = {_NOW}, model_id = %s, "
                "error = %s WHERE id = %s",
                (status, stored.id if stored else None, error, job_id),
            )
            if stored is not None:
                bumped.append(_bump_models_version(cur, self._versions.channel))
                return stored
            return True

        result = self._run(body, write=True)
        if bumped:  # committed: this process sees its own change at once
            self._versions.observe(bumped[-1])
        return result

    def requeue_job(
        self, job_id: str, *, worker: str | None = None, state: bytes | None = None
    ) -> bool:
        """Put a job back to ``queued`` with its latest checkpoint (``state``, if given),
        only while ``worker`` owns it running (its machine is shutting down): one UPDATE,
        so a worker that lost its job never re-queues its successor's. Without
        ``worker``: any active job. True if requeued (the caller then sends it again)."""
        if not valid_id(job_id):
            return False
        owned = "worker = %(worker)s AND status = 'running'"
        active = "status IN ('queued', 'running')"

        def body(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE charnn_jobs SET status = 'queued', worker = NULL, "
                "state = COALESCE(%(state)s, state) "
                f"WHERE id = %(id)s AND {owned if worker is not None else active}",
                {"state": state, "id": job_id, "worker": worker},
            )
            return cur.rowcount > 0

        return self._run(body, write=True)

    def pause_job(
        self, job_id: str, *, worker: str | None = None, state: bytes | None = None
    ) -> bool:
        """To ``paused`` with its checkpoint (``state``, if given), worker and pause
        request cleared: a queued job, or (with ``worker``) a running one that worker
        owns and stopped. One UPDATE, as ``requeue_job``."""
        if not valid_id(job_id):
            return False
        owned = "worker = %(worker)s AND status = 'running'"
        queued = "status = 'queued'"

        def body(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE charnn_jobs SET status = 'paused', worker = NULL, eta_s = NULL, "
                "pause_requested = false, state = COALESCE(%(state)s, state) "
                f"WHERE id = %(id)s AND {owned if worker is not None else queued}",
                {"state": state, "id": job_id, "worker": worker},
            )
            return cur.rowcount > 0

        return self._run(body, write=True)

    def resume_job(self, job_id: str, *, max_queued: int | None = None) -> bool:
        """A paused job back to ``queued``; the queue's room counted under the same
        advisory lock as ``create_job``'s, so it holds across replicas."""
        if not valid_id(job_id):
            return False

        def body(cur: Cursor) -> bool:
            if max_queued is not None:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_ADMISSION_LOCK,))
                n = cur.execute(
                    "SELECT count(*) AS n FROM charnn_jobs WHERE status = 'queued'"
                ).fetchone()
                check_room(int(n["n"]) if n else 0, max_queued)
            cur.execute(
                "UPDATE charnn_jobs SET status = 'queued', pause_requested = false "
                "WHERE id = %s AND status = 'paused'",
                (job_id,),
            )
            return cur.rowcount > 0

        return self._run(body, write=True)

    def request_pause(self, job_id: str) -> bool:
        """Pause a job: a queued one at once, a running one by setting
        ``pause_requested`` for its worker (``pause_asked``); False if not active."""
        if not valid_id(job_id):
            return False

        def body(cur: Cursor) -> bool:
            cur.execute(
                "UPDATE charnn_jobs SET pause_requested = (status = 'running'), "
                "status = CASE WHEN status = 'queued' THEN 'paused' ELSE status END "
                "WHERE id = %s AND status IN ('queued', 'running')",
                (job_id,),
            )
            return cur.rowcount > 0

        return self._run(body, write=True)

    def pause_asked(self, job_id: str) -> bool:
        """Whether a pause of the running job was requested (read with each heartbeat)."""
        if not valid_id(job_id):
            return False
        row = self._one(
            "SELECT pause_requested FROM charnn_jobs WHERE id = %s AND status = 'running'",
            (job_id,),
        )
        return bool(row and row["pause_requested"])

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
                "INSERT INTO charnn_metrics (job_id, step, elapsed_s, train_loss, val_loss, "
                "grad_norm, clipped, learning_rate, chars_per_sec, sample) "
                "SELECT j.id, p.step, p.elapsed_s, p.train_loss, p.val_loss, p.grad_norm, "
                "p.clipped, p.learning_rate, p.chars_per_sec, p.sample "
                "FROM (SELECT id FROM charnn_jobs WHERE id = %s FOR KEY SHARE) AS j, "
                "unnest(%s::bigint[], %s::double precision[], %s::double precision[], "
                "%s::double precision[], %s::double precision[], %s::boolean[], "
                "%s::double precision[], %s::double precision[], %s::text[]) WITH ORDINALITY "
                "AS p(step, elapsed_s, train_loss, val_loss, grad_norm, clipped, learning_rate, "
                "chars_per_sec, sample, n) ORDER BY p.n ON CONFLICT (job_id, step) DO NOTHING",
                (
                    job_id,
                    [p.step for p in points],
                    [float(p.elapsed_s) for p in points],
                    [finite_or_none(float(p.train_loss)) for p in points],
                    [finite_or_none(p.val_loss) for p in points],
                    [finite_or_none(p.grad_norm) for p in points],
                    [p.clipped for p in points],
                    [finite_or_none(p.learning_rate) for p in points],
                    [finite_or_none(p.chars_per_sec) for p in points],
                    [p.sample for p in points],
                ),
            )
            return max(cur.rowcount, 0)

        return self._run(body, write=True)

    # -- models -----------------------------------------------------------------

    def add_model(self, model: NewModel, job_id: str | None = None) -> ModelRecord:
        """Insert the model, bytes included, and bump ``models_version`` in the same
        transaction: a replica that sees the new version sees the model.

        The bytes are stored as given: callers validate them (``app.serving.validation``)
        and pass what they learned (vocab, dtype, ...).
        """

        def body(cur: Cursor) -> tuple[ModelRecord, int]:
            stored = _insert_model(cur, model, job_id)
            return stored, _bump_models_version(cur, self._versions.channel)

        stored, version = self._run(body, write=True)
        self._versions.observe(version)  # committed: this process sees its own change at once
        return stored

    @property
    def models_version(self) -> int:
        """Bumped in the transaction of every model insert and delete, by any replica or
        worker, so a replica knows when its model caches are stale.

        From memory while the listener is fresh (no query: this is read before every
        prediction); from the table otherwise (the first read, which starts the
        listener, and every read while it is down). Never decreases. A change made by
        another process is seen when its notification arrives, not at its COMMIT;
        this process's own changes at once."""
        versions = self._versions
        if versions.fresh():
            return versions.version
        versions.start()
        row = self._one("SELECT models_version FROM charnn_meta")
        assert row is not None
        return versions.observe(int(row["models_version"]))

    def delete_model(self, model_id: str) -> bool:
        """Delete the model (row and bytes at once); True if it existed."""
        if not valid_id(model_id):
            return False

        def body(cur: Cursor) -> int | None:
            cur.execute("DELETE FROM charnn_models WHERE id = %s", (model_id,))
            if cur.rowcount <= 0:
                return None
            return _bump_models_version(cur, self._versions.channel)

        version = self._run(body, write=True)
        if version is None:
            return False
        self._versions.observe(version)  # committed: this process sees its own change at once
        return True

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
        """Stop the models listener (thread and connection), close the idle connections and
        refuse further use; idempotent."""
        self._versions.close()
        self._pool.close()
