"""Persistent state of the service: jobs, their metrics, and models.

Routes and the job runner talk to the ``Store`` protocol only, so a PostgreSQL
store can replace ``SqliteStore`` without touching them. ``SqliteStore`` keeps
rows in ``data_dir/charnn.db`` (WAL, ``synchronous=FULL``) and bulk bytes in
files::

    data_dir/jobs/<job_id>/corpus.txt   UTF-8 training text
    data_dir/jobs/<job_id>/state.npz    resume checkpoint (written by the job process)
    data_dir/models/<model_id>.npz      model checkpoint

A file is written atomically *before* the row that names it is inserted, so a
row never points at a missing or half-written file; a crash in between leaves
at worst an orphan file. Ids are opaque ``uuid4().hex``; any other string is
"not found", and no path is ever built from an unvalidated id.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast, get_args

from model.atomic import atomic_write_bytes

from .faults import describe_os_error

log = logging.getLogger("charnn.store")

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("queued", "running")
TERMINAL_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")

SCHEMA_VERSION = 1
DB_NAME = "charnn.db"
LOCK_NAME = "charnn.lock"
_ID = re.compile(r"[0-9a-f]{32}")
# A file or job folder renamed aside while its row is deleted: ".<name>.deleting".
_DELETING = ".deleting"


class StoreError(RuntimeError):
    """The store cannot be used as is (e.g. a database written by a newer version)."""


class DataDirInUse(StoreError):
    """Another process (another charnn server) owns this data directory."""


class StoreDamaged(StoreError):
    """The database is damaged or lost; ``charnn check DIR`` says what, ``--repair`` mends."""


class StoreUnavailable(StoreError):
    """A read or write failed for a reason of the machine (disk full, read-only, damage):
    the service answers 503 with the plain reason, and nothing was half done."""


class QueueFullError(Exception):
    """As many jobs wait as ``max_queued_jobs`` allows; nothing was stored."""


class JobActiveError(Exception):
    """The job is queued or running: it must be cancelled before it can be deleted."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One training job as stored; progress fields are the latest reported values."""

    id: str
    name: str
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    hyperparameters: dict[str, Any]
    seed: int
    init_from: str | None
    corpus_chars: int
    vocab_size: int
    step: int
    total_steps: int | None
    train_loss: float | None
    val_loss: float | None
    chars_per_sec: float | None
    eta_s: float | None
    model_id: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One point of a job's loss curve."""

    step: int
    elapsed_s: float
    train_loss: float
    val_loss: float | None = None


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A stored model checkpoint's metadata; the bytes live in ``model_path(id)``."""

    id: str
    name: str
    created_at: float
    job_id: str | None
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    vocab: list[str]
    param_count: int
    size_bytes: int
    dtype: str


class Store(Protocol):
    """What routes and the job runner may ask of persistent storage.

    Every method either does all it says or nothing: a failure of the machine
    (full or read-only disk, a damaged database) raises ``StoreUnavailable``
    with a plain reason, and a row that cannot be read back is skipped and
    logged, never fatal to a listing.
    """

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
    ) -> JobRecord: ...
    def get_job(self, job_id: str) -> JobRecord | None: ...
    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]: ...
    def count_jobs(self, status: JobStatus | None = None) -> int: ...
    def count_active(self) -> int: ...
    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None: ...
    def update_progress(self, job_id: str, **fields: Any) -> bool: ...
    def delete_job(self, job_id: str) -> bool: ...
    def purge_job_files(self, finished_before: float) -> list[str]: ...
    def jobs_to_resume(self) -> list[JobRecord]: ...
    def corpus_path(self, job_id: str) -> Path | None: ...
    def state_path(self, job_id: str) -> Path | None: ...
    def add_metrics(self, job_id: str, points: Sequence[MetricPoint]) -> int: ...
    def get_metrics(self, job_id: str, after_step: int = -1) -> list[MetricPoint]: ...
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
    ) -> ModelRecord: ...
    def get_model(self, model_id: str) -> ModelRecord | None: ...
    def list_models(self, limit: int = 50, offset: int = 0) -> list[ModelRecord]: ...
    def count_models(self) -> int: ...
    def resolve_model(self, id_or_name: str) -> ModelRecord | None: ...
    def newest_model(self) -> ModelRecord | None: ...
    @property
    def models_version(self) -> int:
        """Changes whenever a model is added or deleted: lets callers cache lookups."""
        ...

    def delete_model(self, model_id: str) -> bool: ...
    def model_path(self, model_id: str) -> Path | None: ...
    def read_model_bytes(self, model_id: str) -> bytes | None: ...
    def writable(self) -> bool: ...
    def close(self) -> None: ...


# Progress columns ``update_progress`` sets, only ever forwards in steps.
PROGRESS_FIELDS = frozenset(
    {"step", "total_steps", "train_loss", "val_loss", "chars_per_sec", "eta_s"}
)


def valid_id(value: object) -> bool:
    """True for the ids this store hands out (32 lowercase hex digits), nothing else."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def _new_id() -> str:
    return uuid.uuid4().hex


def _finite_json(value: Any) -> Any:
    # NaN/inf become null: they are not JSON, and PostgreSQL jsonb would reject them.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def _dump(value: Any) -> str:
    return json.dumps(_finite_json(value), ensure_ascii=False, allow_nan=False)


def _check_page(limit: int, offset: int) -> None:
    # SQLite reads LIMIT -1 as "no limit"; refuse rather than surprise.
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")


def _check_status(status: str | None) -> None:
    if status is not None and status not in JOB_STATUSES:
        raise ValueError(f"status must be one of {', '.join(JOB_STATUSES)}")


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    f"""CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in JOB_STATUSES)})),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        hyperparameters TEXT NOT NULL,
        seed INTEGER NOT NULL,
        init_from TEXT,
        corpus_chars INTEGER NOT NULL,
        vocab_size INTEGER NOT NULL,
        step INTEGER NOT NULL DEFAULT 0,
        total_steps INTEGER,
        train_loss REAL,
        val_loss REAL,
        chars_per_sec REAL,
        eta_s REAL,
        model_id TEXT,
        error TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at)",
    "CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created_at)",
    """CREATE TABLE IF NOT EXISTS metrics (
        job_id TEXT NOT NULL REFERENCES jobs (id),
        step INTEGER NOT NULL,
        elapsed_s REAL NOT NULL,
        train_loss REAL,
        val_loss REAL,
        PRIMARY KEY (job_id, step)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS models (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at REAL NOT NULL,
        job_id TEXT,
        hyperparameters TEXT NOT NULL,
        metrics TEXT NOT NULL,
        vocab TEXT NOT NULL,
        param_count INTEGER NOT NULL,
        size_bytes INTEGER NOT NULL,
        dtype TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS models_created ON models (created_at)",
    "CREATE INDEX IF NOT EXISTS models_name_created ON models (name, created_at)",
)

# Columns update_job may set; id, corpus and creation facts are immutable.
_JOB_UPDATABLE = frozenset(
    {
        "name",
        "status",
        "started_at",
        "finished_at",
        "step",
        "total_steps",
        "train_loss",
        "val_loss",
        "chars_per_sec",
        "eta_s",
        "model_id",
        "error",
    }
)
_JOB_COLUMNS = (
    "id, name, status, created_at, started_at, finished_at, hyperparameters, seed, init_from, "
    "corpus_chars, vocab_size, step, total_steps, train_loss, val_loss, chars_per_sec, eta_s, "
    "model_id, error"
)
_MODEL_COLUMNS = (
    "id, name, created_at, job_id, hyperparameters, metrics, vocab, param_count, size_bytes, dtype"
)
# Newest first; rowid breaks ties between rows created within one clock tick.
_NEWEST = "ORDER BY created_at DESC, rowid DESC"
_OLDEST = "ORDER BY created_at ASC, rowid ASC"


def _opt_number(value: Any, what: str) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{what} is not a number")
    return value


def _job(row: sqlite3.Row | Mapping[str, Any]) -> JobRecord:
    """A job row as a record; ValueError/TypeError if the row is not what charnn writes."""
    hp = row["hyperparameters"]
    hp = json.loads(hp) if isinstance(hp, str) else hp
    if not isinstance(hp, dict):
        raise ValueError("hyperparameters is not a JSON object")
    if row["status"] not in JOB_STATUSES:
        raise ValueError(f"unknown status {row['status']!r}")
    for key in ("name",):
        if not isinstance(row[key], str):
            raise ValueError(f"{key} is not text")
    for key in ("seed", "corpus_chars", "vocab_size", "step"):
        if isinstance(row[key], bool) or not isinstance(row[key], int):
            raise ValueError(f"{key} is not an integer")
    for key in ("created_at", "started_at", "finished_at", "train_loss", "val_loss"):
        _opt_number(row[key], key)
    for key in ("chars_per_sec", "eta_s", "total_steps"):
        _opt_number(row[key], key)
    return JobRecord(
        id=row["id"],
        name=row["name"],
        status=cast(JobStatus, row["status"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        hyperparameters=hp,
        seed=row["seed"],
        init_from=row["init_from"],
        corpus_chars=row["corpus_chars"],
        vocab_size=row["vocab_size"],
        step=row["step"],
        total_steps=row["total_steps"],
        train_loss=row["train_loss"],
        val_loss=row["val_loss"],
        chars_per_sec=row["chars_per_sec"],
        eta_s=row["eta_s"],
        model_id=row["model_id"],
        error=row["error"],
    )


def _model(row: sqlite3.Row | Mapping[str, Any]) -> ModelRecord:
    """A model row as a record; ValueError/TypeError if the row is not what charnn writes."""

    def parsed(key: str) -> Any:
        value = row[key]
        return json.loads(value) if isinstance(value, str) else value

    hp, metrics, vocab = parsed("hyperparameters"), parsed("metrics"), parsed("vocab")
    if not isinstance(hp, dict) or not isinstance(metrics, dict):
        raise ValueError("hyperparameters and metrics must be JSON objects")
    if not isinstance(vocab, list) or not all(isinstance(c, str) and len(c) == 1 for c in vocab):
        raise ValueError("vocab is not a list of characters")
    for key in ("param_count", "size_bytes"):
        if isinstance(row[key], bool) or not isinstance(row[key], int):
            raise ValueError(f"{key} is not an integer")
    if not isinstance(row["name"], str) or row["dtype"] not in ("float32", "float64"):
        raise ValueError("name or dtype is not what charnn writes")
    return ModelRecord(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        job_id=row["job_id"],
        hyperparameters=hp,
        metrics=metrics,
        vocab=vocab,
        param_count=row["param_count"],
        size_bytes=row["size_bytes"],
        dtype=row["dtype"],
    )


_T = TypeVar("_T")


def readable(
    rows: Sequence[Any], convert: Callable[[Any], _T], what: str, reported: set[str]
) -> list[_T]:
    """The rows that convert; the others are logged once each and skipped, so one
    damaged row (a disk error, an old bug) never takes a listing down with it."""
    out: list[_T] = []
    for row in rows:
        try:
            out.append(convert(row))
        except (ValueError, TypeError, KeyError, IndexError, RecursionError) as e:
            key = f"{what}:{row['id'] if 'id' in row.keys() else '?'}"
            if key not in reported:
                reported.add(key)
                log.error("skipping unreadable %s row %s: %s", what, key.split(":")[1], e)
    return out


def _sqlite_unavailable(e: sqlite3.Error, doing: str) -> StoreUnavailable:
    return StoreUnavailable(f"the store could not {doing}: {describe_os_error(e)}")


class SqliteStore:
    """``Store`` on SQLite plus files under ``data_dir``; safe to share between threads.

    One connection guarded by a lock: FastAPI calls the store from its
    threadpool, and SQLite serialises writers anyway. The busy timeout covers
    other processes (e.g. job processes) holding the write lock briefly.

    Opening takes an exclusive lock on ``data_dir/charnn.lock`` for the life of the
    store (released by the kernel when the process dies, however it dies): a second
    server on the same directory refuses to start instead of resuming the same jobs
    and deleting the first one's files in flight. Opening also checks the database
    (SQLite's quick check; a lost or emptied database beside model files) and
    refuses a damaged one with what to do (``charnn check DIR``).
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, check: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self._jobs_dir = self.data_dir / "jobs"
        self._models_dir = self.data_dir / "models"
        self._reported: set[str] = set()
        try:
            self._jobs_dir.mkdir(parents=True, exist_ok=True)
            self._models_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(
                f"cannot use {self.data_dir} as the data directory: {describe_os_error(e)}"
            ) from None
        self._lock_fd = _lock_data_dir(self.data_dir)
        self._lock = threading.Lock()
        self._models_version = 0
        db = self.data_dir / DB_NAME
        existed = db.is_file() and db.stat().st_size > 0
        if not existed and check:
            try:
                _refuse_lost_database(self.data_dir)  # before a new database is created
            except BaseException:
                self._unlock()
                raise
        try:
            self._conn = sqlite3.connect(
                db, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as e:
            self._unlock()
            raise StoreDamaged(f"cannot open {db}: {e}") from None
        try:
            self._conn.row_factory = sqlite3.Row
            if existed and check:
                _quick_check(self._conn, db)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
            _remove_temp_files(self.data_dir)
            self._finish_deletions()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            self._unlock()
            raise StoreDamaged(
                f"{db} is damaged ({e}); run `charnn check {self.data_dir}` for details"
            ) from None
        except BaseException:
            self._conn.close()
            self._unlock()
            raise

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; IMMEDIATE so it never fails half-way on a lock.

        A failure of the database (full disk, read-only, damage) is rolled back and
        raised as ``StoreUnavailable``; constraint errors stay what they are (bugs).
        """
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (e.g. busy) can leave the transaction open.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
                if isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                    raise
                raise _sqlite_unavailable(e, "write") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
                if isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                    raise
                raise _sqlite_unavailable(e, "read") from None

    def _jobs(self, rows: Sequence[sqlite3.Row]) -> list[JobRecord]:
        return readable(rows, _job, "job", self._reported)

    def _models(self, rows: Sequence[sqlite3.Row]) -> list[ModelRecord]:
        return readable(rows, _model, "model", self._reported)

    def _init_schema(self) -> None:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
                version = row[0]
                if version is None:
                    conn.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                    )
                elif version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.data_dir / DB_NAME} has schema version {version}; "
                        f"this charnn understands up to {SCHEMA_VERSION}"
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _finish_deletions(self) -> None:
        """Deletions a crash interrupted: a file or folder renamed aside whose row still
        exists goes back (the delete never committed); one whose row is gone is removed."""
        for folder, table in ((self._models_dir, "models"), (self._jobs_dir, "jobs")):
            for aside in folder.glob(f".*{_DELETING}"):
                final = aside.name[1 : -len(_DELETING)]
                item_id = final.removesuffix(".npz")
                row = self._conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (item_id,))
                try:
                    if row.fetchone() is not None:
                        aside.rename(folder / final)
                    else:
                        _remove(aside)
                except OSError:
                    log.warning("could not finish deleting %s", aside.name)

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
    ) -> JobRecord:
        """Write the corpus file, then insert the job as ``queued``.

        With ``max_queued``, the queue's room is checked in the same transaction as
        the insert, so concurrent submissions can never overfill it; a refused job
        (``QueueFullError``) leaves no row and no file. A corpus with lone surrogates
        cannot be UTF-8 and raises ``UnicodeEncodeError`` (a ``ValueError``) before
        anything is written.
        """
        data = corpus.encode("utf-8")
        if max_queued is not None:
            self._check_room(self._count_queued_now(), max_queued)  # cheap, before any write
        job_id = _new_id()
        job_dir = self._jobs_dir / job_id
        corpus_file = job_dir / "corpus.txt"
        try:
            job_dir.mkdir()
            atomic_write_bytes(corpus_file, data)
            with self._tx() as conn:
                if max_queued is not None:
                    n = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
                    self._check_room(int(n.fetchone()[0]), max_queued)
                conn.execute(
                    "INSERT INTO jobs (id, name, status, created_at, hyperparameters, seed, "
                    "init_from, corpus_chars, vocab_size) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        name,
                        time.time(),
                        _dump(hyperparameters),
                        seed,
                        init_from,
                        len(corpus),
                        vocab_size,
                    ),
                )
        except BaseException as exc:
            # No row names these files, so nothing can miss them.
            corpus_file.unlink(missing_ok=True)
            _rmdir_quietly(job_dir)
            if isinstance(exc, OSError):
                raise StoreUnavailable(
                    f"the corpus could not be stored: {describe_os_error(exc)}"
                ) from None
            raise
        job = self.get_job(job_id)
        assert job is not None
        return job

    @staticmethod
    def _check_room(queued: int, max_queued: int) -> None:
        if queued >= max_queued:
            raise QueueFullError(f"{queued} jobs are already waiting (max_queued_jobs)")

    def _count_queued_now(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")[0][0])

    def get_job(self, job_id: str) -> JobRecord | None:
        if not valid_id(job_id):
            return None
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        jobs = self._jobs(rows)
        return jobs[0] if jobs else None

    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]:
        """Jobs newest first, optionally only those with ``status``."""
        _check_status(status)
        _check_page(limit, offset)
        where, params = ("WHERE status = ?", [status]) if status is not None else ("", [])
        rows = self._query(
            f"SELECT {_JOB_COLUMNS} FROM jobs {where} {_NEWEST} LIMIT ? OFFSET ?",
            [*params, limit, offset],
        )
        return self._jobs(rows)

    def count_jobs(self, status: JobStatus | None = None) -> int:
        _check_status(status)
        if status is None:
            rows = self._query("SELECT COUNT(*) FROM jobs")
        else:
            rows = self._query("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,))
        return int(rows[0][0])

    def count_active(self) -> int:
        """Queued plus running jobs: what admission control compares with its limits."""
        rows = self._query("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")
        return int(rows[0][0])

    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Set the given columns; the updated job, or None if there is no such job.

        Only progress and outcome columns may change; any other name is a
        ``ValueError`` (a typo must not be silently dropped).
        """
        names = _checked_update(fields)
        if not valid_id(job_id):
            return None
        if names:
            assignments = ", ".join(f"{n} = ?" for n in names)
            values = [_finite_or_none(fields[n]) for n in names]
            with self._tx() as conn:
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job_id])
        return self.get_job(job_id)

    def update_progress(self, job_id: str, **fields: Any) -> bool:
        """Set progress columns (``PROGRESS_FIELDS``, ``step`` required) only if ``step``
        is past the stored one: a job that resumed from an older checkpoint replays
        steps (bit-identically), and its progress must not go backwards or repeat.
        True if the row changed (the caller then records and announces the point)."""
        names = _checked_progress(fields)
        if not valid_id(job_id):
            return False
        assignments = ", ".join(f"{n} = ?" for n in names)
        values = [_finite_or_none(fields[n]) for n in names]
        with self._tx() as conn:
            cur = conn.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND step < ?",
                [*values, job_id, fields["step"]],
            )
            return cur.rowcount > 0

    def delete_job(self, job_id: str) -> bool:
        """Delete a finished job: its row, metric points, corpus and state; True if it
        existed. ``JobActiveError`` for a queued or running job (cancel it first).

        The job's folder is renamed aside inside the transaction and removed after the
        commit: a read-only or full disk refuses the delete as a whole
        (``StoreUnavailable``), and a crash in between is finished at the next start.
        Models the job produced are kept (they are deleted on their own).
        """
        if not valid_id(job_id):
            return False
        folder = self._jobs_dir / job_id
        aside = self._jobs_dir / f".{job_id}{_DELETING}"
        moved = False
        try:
            with self._tx() as conn:
                row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    return False
                if row["status"] in ACTIVE_STATUSES:
                    raise JobActiveError(row["status"])
                if folder.exists():
                    folder.rename(aside)
                    moved = True
                conn.execute("DELETE FROM metrics WHERE job_id = ?", (job_id,))
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        except OSError as e:
            raise StoreUnavailable(
                f"the job could not be deleted: {describe_os_error(e)}"
            ) from None
        except StoreUnavailable:
            if moved:
                _rename_back(aside, folder)
            raise
        if moved:
            _remove(aside)
        return True

    def purge_job_files(self, finished_before: float) -> list[str]:
        """Remove the corpus and resume state of jobs that finished before the given time
        (the ``job_files_retention_s`` setting); their rows and metrics stay. The ids
        whose files went. Only folders that still exist are looked at."""
        present = {p.name for p in self._jobs_dir.iterdir() if valid_id(p.name)}
        if not present:
            return []
        rows = self._query(
            "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
            "AND finished_at IS NOT NULL AND finished_at < ?",
            (finished_before,),
        )
        purged = []
        for job_id in (r["id"] for r in rows if r["id"] in present):
            try:
                shutil.rmtree(self._jobs_dir / job_id)
                purged.append(job_id)
            except OSError as e:
                log.warning(
                    "could not remove the files of job %s: %s", job_id, describe_os_error(e)
                )
        return purged

    def jobs_to_resume(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: the work a restarted service picks up."""
        rows = self._query(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') {_OLDEST}"
        )
        return self._jobs(rows)

    def corpus_path(self, job_id: str) -> Path | None:
        return self._jobs_dir / job_id / "corpus.txt" if self._job_exists(job_id) else None

    def state_path(self, job_id: str) -> Path | None:
        """Where the job process keeps its resume checkpoint (the file may not exist yet)."""
        return self._jobs_dir / job_id / "state.npz" if self._job_exists(job_id) else None

    def _job_exists(self, job_id: str) -> bool:
        if not valid_id(job_id):
            return False
        return bool(self._query("SELECT 1 FROM jobs WHERE id = ?", (job_id,)))

    # -- metrics ----------------------------------------------------------------

    def add_metrics(self, job_id: str, points: Sequence[MetricPoint]) -> int:
        """Append loss-curve points; returns how many were new.

        A step already stored is ignored, so a resumed job that re-reports
        steps is harmless. Unknown jobs store nothing.
        """
        if not valid_id(job_id) or not points:
            return 0
        rows = [
            (
                job_id,
                p.step,
                p.elapsed_s,
                _finite_or_none(p.train_loss),
                _finite_or_none(p.val_loss),
            )
            for p in points
        ]
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                return 0
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO metrics (job_id, step, elapsed_s, train_loss, val_loss) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            return conn.total_changes - before

    def get_metrics(self, job_id: str, after_step: int = -1) -> list[MetricPoint]:
        """The job's points with ``step > after_step``, by step (for incremental polling)."""
        if not valid_id(job_id):
            return []
        rows = self._query(
            "SELECT step, elapsed_s, train_loss, val_loss FROM metrics "
            "WHERE job_id = ? AND step > ? ORDER BY step",
            (job_id, after_step),
        )
        return readable(rows, _metric_point, "metric", self._reported)

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
        """Write the checkpoint file, then insert its row.

        The bytes are stored as given: callers validate them (``app.model_meta``)
        and pass what they learned (vocab, dtype, ...). A full or read-only disk is
        ``StoreUnavailable``, with nothing stored.
        """
        model_id = _new_id()
        path = self._models_dir / f"{model_id}.npz"
        try:
            atomic_write_bytes(path, checkpoint_bytes)
            with self._tx() as conn:
                conn.execute(
                    f"INSERT INTO models ({_MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        model_id,
                        name,
                        time.time(),
                        job_id,
                        _dump(hyperparameters),
                        _dump(metrics),
                        _dump(list(vocab)),
                        param_count,
                        len(checkpoint_bytes),
                        dtype,
                    ),
                )
                self._models_version += 1
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreUnavailable(
                    f"the model could not be stored: {describe_os_error(exc)}"
                ) from None
            raise
        model = self.get_model(model_id)
        assert model is not None
        return model

    def get_model(self, model_id: str) -> ModelRecord | None:
        if not valid_id(model_id):
            return None
        rows = self._query(f"SELECT {_MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,))
        models = self._models(rows)
        return models[0] if models else None

    def list_models(self, limit: int = 50, offset: int = 0) -> list[ModelRecord]:
        _check_page(limit, offset)
        rows = self._query(
            f"SELECT {_MODEL_COLUMNS} FROM models {_NEWEST} LIMIT ? OFFSET ?", (limit, offset)
        )
        return self._models(rows)

    def count_models(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM models")[0][0])

    def resolve_model(self, id_or_name: str) -> ModelRecord | None:
        """The model with this id, else the newest readable model with this name."""
        model = self.get_model(id_or_name)
        if model is not None:
            return model
        rows = self._query(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE name = ? {_NEWEST} LIMIT 8",
            (id_or_name,),
        )
        models = self._models(rows)
        return models[0] if models else None

    def newest_model(self) -> ModelRecord | None:
        """The newest readable model (a damaged newest row does not hide the others)."""
        rows = self._query(f"SELECT {_MODEL_COLUMNS} FROM models {_NEWEST} LIMIT 8")
        models = self._models(rows)
        return models[0] if models else None

    @property
    def models_version(self) -> int:
        """Counts this store's model writes. One server owns a data directory (the
        lock) and job processes never write models rows, so an in-memory counter sees
        every change."""
        return self._models_version

    def delete_model(self, model_id: str) -> bool:
        """Delete the row and the file; True if the model existed.

        The file is renamed aside inside the transaction and removed after the
        commit, so a read-only or full disk refuses the delete as a whole
        (``StoreUnavailable``: the row and the file stay), and a crash in between is
        finished at the next start (the row decides).
        """
        if not valid_id(model_id):
            return False
        path = self._models_dir / f"{model_id}.npz"
        aside = self._models_dir / f".{model_id}.npz{_DELETING}"
        moved = False
        try:
            with self._tx() as conn:
                cur = conn.execute("DELETE FROM models WHERE id = ?", (model_id,))
                if cur.rowcount == 0:
                    return False
                if path.exists():
                    path.rename(aside)
                    moved = True
                self._models_version += 1
        except OSError as e:
            raise StoreUnavailable(
                f"the model could not be deleted: {describe_os_error(e)}"
            ) from None
        except StoreUnavailable:
            if moved:
                _rename_back(aside, path)
            raise
        if moved:
            _remove(aside)
        return True

    def model_path(self, model_id: str) -> Path | None:
        if self.get_model(model_id) is None:
            return None
        return self._models_dir / f"{model_id}.npz"

    def read_model_bytes(self, model_id: str) -> bytes | None:
        """The checkpoint bytes, or None if the model (or, racing a delete, its file) is gone."""
        path = self.model_path(model_id)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnavailable(f"the model could not be read: {describe_os_error(e)}") from None

    # -- health -----------------------------------------------------------------

    def writable(self) -> bool:
        """Whether new files and rows can be written in every directory the server
        writes (the data directory, ``models/``, ``jobs/``): the readiness probe."""
        try:
            for folder in (self.data_dir, self._models_dir, self._jobs_dir):
                fd, tmp = tempfile.mkstemp(prefix=".writable.", suffix=".tmp", dir=folder)
                try:  # an empty file needs no free space: write a block, or a full disk is "ready"
                    os.write(fd, bytes(4096))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(tmp)
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute("ROLLBACK")
        except (OSError, sqlite3.Error):
            return False
        return True

    def close(self) -> None:
        """Close the database connection and release the data directory; idempotent."""
        with self._lock:
            self._conn.close()
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)  # releases the flock


def _checked_update(fields: Mapping[str, Any]) -> list[str]:
    unknown = sorted(set(fields) - _JOB_UPDATABLE)
    if unknown:
        raise ValueError(f"cannot update job field(s): {', '.join(unknown)}")
    if "status" in fields:
        if fields["status"] is None:
            raise ValueError("status cannot be None")
        _check_status(fields["status"])
    return sorted(fields)  # whitelisted above, so safe to splice into SQL


def _checked_progress(fields: Mapping[str, Any]) -> list[str]:
    unknown = sorted(set(fields) - PROGRESS_FIELDS)
    if unknown:
        raise ValueError(f"not progress field(s): {', '.join(unknown)}")
    if not isinstance(fields.get("step"), int):
        raise ValueError("update_progress needs an integer step")
    return sorted(fields)


def _lock_data_dir(data_dir: Path) -> int:
    """An exclusive, non-blocking flock on ``charnn.lock``, holding the owner's pid."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:  # a read-only directory still allows a lock on an existing file
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(
                f"cannot lock the data directory {data_dir}: {describe_os_error(e)}"
            ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            owner = ""
        os.close(fd)
        who = f" (pid {owner})" if owner.isdigit() else ""
        raise DataDirInUse(
            f"the data directory {data_dir} is in use by another charnn server{who}; "
            "stop it, or give this one its own --data-dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the lock is what matters; the pid is only for the message
    return fd


def _quick_check(conn: sqlite3.Connection, db: Path) -> None:
    rows = conn.execute("PRAGMA quick_check(5)").fetchall()
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    if problems:
        raise StoreDamaged(
            f"{db} is damaged ({problems[0]}); run `charnn check {db.parent}` to see what "
            "can be saved, and `charnn check --repair` to rebuild the model list from the "
            "model files"
        )


def _refuse_lost_database(data_dir: Path) -> None:
    """A new (or emptied) database beside model files or job folders means the old one
    was lost: starting empty would silently orphan every model."""
    models = sum(1 for p in (data_dir / "models").glob("*.npz"))
    jobs = sum(1 for p in (data_dir / "jobs").iterdir() if valid_id(p.name))
    if models or jobs:
        raise StoreDamaged(
            f"{data_dir / DB_NAME} is new or empty, but the data directory holds {models} "
            f"model file(s) and {jobs} job folder(s): the database was lost. Run "
            f"`charnn check {data_dir} --repair` to rebuild the model list from the files"
        )


def _metric_point(r: sqlite3.Row | Mapping[str, Any]) -> MetricPoint:
    """A metrics row (SQLite's or PostgreSQL's, both indexable by name) as a point."""
    return MetricPoint(
        step=r["step"],
        elapsed_s=r["elapsed_s"],
        # NaN/inf were stored as NULL; a diverged point still has a (nan) loss.
        train_loss=math.nan if r["train_loss"] is None else r["train_loss"],
        val_loss=r["val_loss"],
    )


def _finite_or_none(value: Any) -> Any:
    # SQLite would store NaN as NULL anyway; make that explicit and cover inf too.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _remove_temp_files(data_dir: Path) -> None:
    # A crash (kill -9, power loss) in the middle of an atomic write leaves its temporary
    # file (".<name>.<random>.tmp", never read: only final names are) behind. One server
    # owns a data directory (the lock), and it opens the store before any job process
    # starts, so every temporary file found now is a dead writer's.
    patterns = (".*.tmp", "models/.*.tmp", "jobs/*/.*.tmp")
    for path in (p for pattern in patterns for p in data_dir.glob(pattern)):
        try:
            if path.is_file():
                path.unlink()
        except OSError:
            pass  # e.g. a read-only directory: harmless, the file is never read


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    except OSError as e:  # finished at the next start
        log.warning("could not remove %s: %s", path.name, describe_os_error(e))


def _rename_back(aside: Path, final: Path) -> None:
    try:
        aside.rename(final)
    except OSError:
        log.error("could not restore %s after a failed delete", final.name)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
