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

import json
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast, get_args

from model.atomic import atomic_write_bytes

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("queued", "running")

SCHEMA_VERSION = 1
DB_NAME = "charnn.db"
_ID = re.compile(r"[0-9a-f]{32}")


class StoreError(RuntimeError):
    """The store cannot be used as is (e.g. a database written by a newer version)."""


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
    """What routes and the job runner may ask of persistent storage."""

    def create_job(
        self,
        name: str,
        corpus: str,
        hyperparameters: Mapping[str, Any],
        seed: int,
        init_from: str | None,
        vocab_size: int,
    ) -> JobRecord: ...
    def get_job(self, job_id: str) -> JobRecord | None: ...
    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]: ...
    def count_jobs(self, status: JobStatus | None = None) -> int: ...
    def count_active(self) -> int: ...
    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None: ...
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


def _job(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        name=row["name"],
        status=cast(JobStatus, row["status"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        hyperparameters=json.loads(row["hyperparameters"]),
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


def _model(row: sqlite3.Row) -> ModelRecord:
    return ModelRecord(
        id=row["id"],
        name=row["name"],
        created_at=row["created_at"],
        job_id=row["job_id"],
        hyperparameters=json.loads(row["hyperparameters"]),
        metrics=json.loads(row["metrics"]),
        vocab=json.loads(row["vocab"]),
        param_count=row["param_count"],
        size_bytes=row["size_bytes"],
        dtype=row["dtype"],
    )


class SqliteStore:
    """``Store`` on SQLite plus files under ``data_dir``; safe to share between threads.

    One connection guarded by a lock: FastAPI calls the store from its
    threadpool, and SQLite serialises writers anyway. The busy timeout covers
    other processes (e.g. job processes) holding the write lock briefly.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self._jobs_dir = self.data_dir / "jobs"
        self._models_dir = self.data_dir / "models"
        self._jobs_dir.mkdir(parents=True, exist_ok=True)
        self._models_dir.mkdir(parents=True, exist_ok=True)
        _remove_temp_files(self.data_dir)
        self._lock = threading.Lock()
        self._models_version = 0
        self._conn = sqlite3.connect(
            self.data_dir / DB_NAME, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        try:
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; IMMEDIATE so it never fails half-way on a lock."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (e.g. busy) can leave the transaction open.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _init_schema(self) -> None:
        with self._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.data_dir / DB_NAME} has schema version {version}; "
                    f"this charnn understands up to {SCHEMA_VERSION}"
                )

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
        """Write the corpus file, then insert the job as ``queued``.

        A corpus with lone surrogates cannot be UTF-8 and raises
        ``UnicodeEncodeError`` (a ``ValueError``) before anything is written.
        """
        data = corpus.encode("utf-8")
        job_id = _new_id()
        job_dir = self._jobs_dir / job_id
        job_dir.mkdir()
        corpus_file = job_dir / "corpus.txt"
        try:
            atomic_write_bytes(corpus_file, data)
            with self._tx() as conn:
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
        except BaseException:
            # No row names these files, so nothing can miss them.
            corpus_file.unlink(missing_ok=True)
            _rmdir_quietly(job_dir)
            raise
        job = self.get_job(job_id)
        assert job is not None
        return job

    def get_job(self, job_id: str) -> JobRecord | None:
        if not valid_id(job_id):
            return None
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

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
        return [_job(r) for r in rows]

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
        unknown = sorted(set(fields) - _JOB_UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update job field(s): {', '.join(unknown)}")
        if "status" in fields:
            if fields["status"] is None:
                raise ValueError("status cannot be None")
            _check_status(fields["status"])
        if not valid_id(job_id):
            return None
        if fields:
            names = sorted(fields)  # whitelisted above, so safe to splice into SQL
            assignments = ", ".join(f"{n} = ?" for n in names)
            values = [_finite_or_none(fields[n]) for n in names]
            with self._tx() as conn:
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job_id])
        return self.get_job(job_id)

    def jobs_to_resume(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: the work a restarted service picks up."""
        rows = self._query(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running') {_OLDEST}"
        )
        return [_job(r) for r in rows]

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
        """Write the checkpoint file, then insert its row.

        The bytes are stored as given: callers validate them (``model_from_bytes``)
        and pass what they learned (vocab, dtype, ...).
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
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        model = self.get_model(model_id)
        assert model is not None
        return model

    def get_model(self, model_id: str) -> ModelRecord | None:
        if not valid_id(model_id):
            return None
        rows = self._query(f"SELECT {_MODEL_COLUMNS} FROM models WHERE id = ?", (model_id,))
        return _model(rows[0]) if rows else None

    def list_models(self, limit: int = 50, offset: int = 0) -> list[ModelRecord]:
        _check_page(limit, offset)
        rows = self._query(
            f"SELECT {_MODEL_COLUMNS} FROM models {_NEWEST} LIMIT ? OFFSET ?", (limit, offset)
        )
        return [_model(r) for r in rows]

    def count_models(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM models")[0][0])

    def resolve_model(self, id_or_name: str) -> ModelRecord | None:
        """The model with this id, else the newest model with this name, else None."""
        model = self.get_model(id_or_name)
        if model is not None:
            return model
        rows = self._query(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE name = ? {_NEWEST} LIMIT 1",
            (id_or_name,),
        )
        return _model(rows[0]) if rows else None

    def newest_model(self) -> ModelRecord | None:
        rows = self._query(f"SELECT {_MODEL_COLUMNS} FROM models {_NEWEST} LIMIT 1")
        return _model(rows[0]) if rows else None

    @property
    def models_version(self) -> int:
        """Counts this store's model writes. The embedded store has one API process
        per data directory (job processes never write models rows), so an in-memory
        counter sees every change."""
        return self._models_version

    def delete_model(self, model_id: str) -> bool:
        """Delete the row, then the file; True if the model existed.

        Row first: a crash in between leaves an orphan file, never a row
        without its file.
        """
        if not valid_id(model_id):
            return False
        with self._tx() as conn:
            deleted = conn.execute("DELETE FROM models WHERE id = ?", (model_id,)).rowcount > 0
            self._models_version += deleted
        if deleted:
            (self._models_dir / f"{model_id}.npz").unlink(missing_ok=True)
        return deleted

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

    # -- health -----------------------------------------------------------------

    def writable(self) -> bool:
        """Whether new files and rows can be written (for the readiness probe)."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=".writable.", suffix=".tmp", dir=self.data_dir)
            try:  # an empty file needs no free space: write a block, or a full disk is "ready"
                os.write(fd, bytes(4096))
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
        """Close the database connection; idempotent."""
        with self._lock:
            self._conn.close()


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
    # owns a data directory, and it opens the store before any job process starts, so
    # every temporary file found now is a dead writer's.
    patterns = (".*.tmp", "models/.*.tmp", "jobs/*/.*.tmp")
    for path in (p for pattern in patterns for p in data_dir.glob(pattern)):
        try:
            if path.is_file():
                path.unlink()
        except OSError:
            pass  # e.g. a read-only directory: harmless, the file is never read


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
