"""``SqliteStore``: the embedded store, SQLite rows and files in one data directory.

Rows live in ``data_dir/charnn.db`` (WAL, ``synchronous=FULL``), bulk bytes in
files::

    data_dir/charnn.lock                  held (flock) by the one server that owns the directory
    data_dir/runner.lock                  held by the one process that runs jobs (``--workers N``)
    data_dir/jobs/<job_id>/corpus.txt     UTF-8 training text
    data_dir/jobs/<job_id>/state.npz      resume checkpoint (written by the job process)
    data_dir/models/<model_id>.npz        model checkpoint

A file is written atomically *before* the row that names it is inserted, so a
row never points at a missing or half-written file; a crash in between leaves
at worst an orphan file. A delete renames the file aside inside its transaction
and removes it after the commit. ``LocalStore``'s ``job_folder`` and
``model_file`` let the embedded runner's job processes read and write a job's
files in place; everything else is the bytes-and-records ``Store`` protocol.

``charnn serve --workers N`` runs N API processes on one directory: the parent
holds ``charnn.lock`` and names itself in ``OWNER_ENV``; each worker opens the
store with ``owner=`` that pid, which is verified (the lock is held, by that
pid, the worker's parent) instead of taken. Then ``models_version`` is a row
bumped in each model write's transaction, read through ``PRAGMA data_version``
(almost free while nobody committed), and a cancel is recorded in
``cancel_requests`` for the one process that runs jobs (``app/jobs/role.py``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from model.atomic import atomic_write_bytes

from .base import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    UNFINISHED_STATUSES,
    DataDirInUse,
    JobActiveError,
    JobRecord,
    JobStatus,
    MetricPoint,
    ModelRecord,
    NewModel,
    StoreDamaged,
    StoreError,
    StoreUnavailable,
    check_finish,
    check_room,
    checked_progress,
    checked_update,
    dump_json,
    finishable,
    finite_or_none,
    new_id,
    valid_id,
)
from .faults import describe_os_error
from .idempotency import SQLITE_DDL, SQLITE_KEYS, IdempotencyKey, answer, claim, find
from .sql import MODEL_COLUMNS, SQLITE, SqlReads

log = logging.getLogger("charnn.store")

SCHEMA_VERSION = 1
DB_NAME = "charnn.db"
LOCK_NAME = "charnn.lock"
# Set by `charnn serve --workers N` for its workers: the pid of the process holding LOCK_NAME.
OWNER_ENV = "_CHARNN_DATA_DIR_OWNER"
# Written after the owner's pid in LOCK_NAME once it is stopping: no worker takes over jobs.
STOPPING = b"stopping\n"
# A file or job folder renamed aside while its row is deleted: ".<name>.deleting".
_DELETING = ".deleting"

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
    # Added without a version bump: new tables, which an older charnn simply ignores.
    # models_version for every process of a multi-worker server, bumped with each model write.
    """CREATE TABLE IF NOT EXISTS counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "INSERT OR IGNORE INTO counters (name, value) VALUES ('models', 0)",
    *SQLITE_DDL,  # POST /jobs's idempotency keys (app/store/idempotency.py)
    # Cancels asked of a process that does not run the jobs, for the one that does.
    """CREATE TABLE IF NOT EXISTS cancel_requests (
        job_id TEXT PRIMARY KEY,
        requested_at REAL NOT NULL
    ) WITHOUT ROWID""",
    # Pauses likewise (POST /jobs/{id}/pause under `charnn serve --workers N`).
    """CREATE TABLE IF NOT EXISTS pause_requests (
        job_id TEXT PRIMARY KEY,
        requested_at REAL NOT NULL
    ) WITHOUT ROWID""",
)


def _sqlite_unavailable(e: sqlite3.Error, doing: str) -> StoreUnavailable:
    return StoreUnavailable(f"the store could not {doing}: {describe_os_error(e)}")


class SqliteStore(SqlReads):
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

    ``owner``: the pid of this process's parent, which holds the lock for a server of
    several processes (``charnn serve --workers N``). The lock is verified, not taken;
    the checks and the clean-up of temporary files are the owner's, done once before
    any worker started (another worker's atomic write may be in flight now).
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], *, check: bool = True, owner: int | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.shared = owner is not None
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
        if owner is None:
            self._lock_fd = lock_data_dir(self.data_dir)
        else:
            trust_owner(self.data_dir, owner)
            self._lock_fd = -1
            check = False
        self._lock = threading.Lock()
        self._models_version = 0
        # Shared: models_version is the counters row, read on a connection of its own
        # (never behind a write transaction of self._conn) only when PRAGMA data_version
        # says some connection committed since the last read.
        self._version_conn: sqlite3.Connection | None = None
        self._version_lock = threading.Lock()
        self._data_version: int | None = None
        self._shared_version = 0
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
            if not self.shared:
                _remove_temp_files(self.data_dir)
            self._finish_deletions()
            if self.shared:
                self._version_conn = sqlite3.connect(
                    db, timeout=30.0, isolation_level=None, check_same_thread=False
                )
        except sqlite3.DatabaseError as e:
            self._close_connections()
            self._unlock()
            raise StoreDamaged(
                f"{db} is damaged ({e}); run `charnn check {self.data_dir}` for details"
            ) from None
        except BaseException:
            self._close_connections()
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

    dialect = SQLITE

    def _rows(self, query: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return self._query(query, params)

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except (sqlite3.OperationalError, sqlite3.DatabaseError) as e:
                if isinstance(e, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                    raise
                raise _sqlite_unavailable(e, "read") from None

    def _init_schema(self) -> None:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                _allow_every_status(conn)
                for statement in _SCHEMA:
                    conn.execute(statement)
                _add_metric_columns(conn)
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
        exists goes back (the delete never committed); one whose row is gone is removed.

        Under the write lock: another process of the server renames aside only inside its
        delete's write transaction, so none is half-way while this looks."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for folder, table in ((self._models_dir, "models"), (self._jobs_dir, "jobs")):
                for aside in folder.glob(f".*{_DELETING}"):
                    final = aside.name[1 : -len(_DELETING)]
                    item_id = final.removesuffix(".npz")
                    row = conn.execute(f"SELECT 1 FROM {table} WHERE id = ?", (item_id,))
                    try:
                        if row.fetchone() is not None:
                            aside.rename(folder / final)
                        else:
                            _remove(aside)
                    except OSError:
                        log.warning("could not finish deleting %s", aside.name)
        finally:
            conn.execute("ROLLBACK")  # nothing written: the lock was all it was for

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
        """Write the corpus file, then insert the job as ``queued``.

        With ``max_queued``, the queue's room is checked in the same transaction as
        the insert, so concurrent submissions can never overfill it; a refused job
        (``QueueFullError``) leaves no row and no file. A corpus with lone surrogates
        cannot be UTF-8 and raises ``UnicodeEncodeError`` (a ``ValueError``) before
        anything is written. With ``idempotency``, a live key is answered first (a replay
        is never refused for a full queue), in the same transaction too.
        """
        data = corpus.encode("utf-8")
        if idempotency is not None and (live := self.idempotency_key(idempotency.key)):
            answer(idempotency, {"fingerprint": live[0], "job_id": live[1]})
        if max_queued is not None:
            check_room(self.count_queued(), max_queued)  # cheap, before any write
        job_id = new_id()
        job_dir = self._jobs_dir / job_id
        corpus_file = job_dir / "corpus.txt"
        try:
            job_dir.mkdir()
            atomic_write_bytes(corpus_file, data)
            with self._tx() as conn:
                if idempotency is not None:
                    tx_rows = lambda q, p: conn.execute(q, p).fetchall()  # noqa: E731
                    if (row := find(tx_rows, SQLITE_KEYS, idempotency.key)) is not None:
                        answer(idempotency, row)
                if max_queued is not None:
                    n = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
                    check_room(int(n.fetchone()[0]), max_queued)
                conn.execute(
                    "INSERT INTO jobs (id, name, status, created_at, hyperparameters, seed, "
                    "init_from, corpus_chars, vocab_size) "
                    "VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        name,
                        time.time(),
                        dump_json(hyperparameters),
                        seed,
                        init_from,
                        len(corpus),
                        vocab_size,
                    ),
                )
                if idempotency is not None:  # writers take turns: no live key can appear
                    claim(conn.execute, SQLITE_KEYS, idempotency, job_id)
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

    def idempotency_key(self, key: str) -> tuple[str, str] | None:
        row = find(self._query, SQLITE_KEYS, key)
        return None if row is None else (str(row["fingerprint"]), str(row["job_id"]))

    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None:
        """Set the given columns; the updated job, or None if there is no such job.

        Only progress and outcome columns may change; any other name is a
        ``ValueError`` (a typo must not be silently dropped).
        """
        names = checked_update(fields)
        if not valid_id(job_id):
            return None
        if names:
            assignments = ", ".join(f"{n} = ?" for n in names)
            values = [finite_or_none(fields[n]) for n in names]
            with self._tx() as conn:
                conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job_id])
        return self.get_job(job_id)

    def update_progress(self, job_id: str, **fields: Any) -> bool:
        """Set progress columns (``PROGRESS_FIELDS``, ``step`` required) only if ``step``
        is past the stored one: a job that resumed from an older checkpoint replays
        steps (bit-identically), and its progress must not go backwards or repeat.
        True if the row changed (the caller then records and announces the point)."""
        names = checked_progress(fields)
        if not valid_id(job_id):
            return False
        assignments = ", ".join(f"{n} = ?" for n in names)
        values = [finite_or_none(fields[n]) for n in names]
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
                if row["status"] in UNFINISHED_STATUSES:
                    raise JobActiveError(row["status"])
                if folder.exists():
                    folder.rename(aside)
                    moved = True
                conn.execute("DELETE FROM metrics WHERE job_id = ?", (job_id,))
                conn.execute("DELETE FROM cancel_requests WHERE job_id = ?", (job_id,))
                conn.execute("DELETE FROM pause_requests WHERE job_id = ?", (job_id,))
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

    def job_folder(self, job_id: str) -> Path | None:
        """The job's folder: ``corpus.txt``, and ``state.npz``/``model.npz`` once written.
        The embedded runner's job processes read and write there directly."""
        if not valid_id(job_id):
            return None
        if not self._query("SELECT 1 FROM jobs WHERE id = ?", (job_id,)):
            return None
        return self._jobs_dir / job_id

    def read_corpus(self, job_id: str) -> str | None:
        folder = self.job_folder(job_id)
        if folder is None:
            return None
        try:  # bytes, then decode: text mode would turn "\r\n" into "\n"
            return (folder / "corpus.txt").read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None  # purged (job_files_retention_s), or deleted by hand

    def read_state(self, job_id: str) -> bytes | None:
        folder = self.job_folder(job_id)
        try:
            return (folder / "state.npz").read_bytes() if folder is not None else None
        except FileNotFoundError:
            return None

    def write_state(self, job_id: str, data: bytes, *, worker: str | None = None) -> bool:
        """Replace the job's resume checkpoint atomically (one server owns the directory:
        ``worker`` is not checked). False for an unknown job."""
        folder = self.job_folder(job_id)
        if folder is None:
            return False
        try:
            atomic_write_bytes(folder / "state.npz", data)
        except OSError as e:
            reason = describe_os_error(e)
            raise StoreUnavailable(f"the checkpoint could not be stored: {reason}") from None
        return True

    def finish_job(
        self,
        job_id: str,
        status: JobStatus,
        *,
        worker: str | None = None,
        error: str | None = None,
        model: NewModel | None = None,
    ) -> ModelRecord | bool | None:
        """The outcome of an active job, with its model (file first, then the model's
        row and the job's in one transaction); see ``Store.finish_job``. ``worker`` is
        not checked: one server owns the data directory and runs its jobs."""
        check_finish(status, model)
        if not valid_id(job_id):
            return None
        model_id = new_id() if model is not None else None
        path = self._models_dir / f"{model_id}.npz"
        try:
            if model is not None:
                atomic_write_bytes(path, model.data)
            with self._tx() as conn:
                row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["status"] not in finishable(status):
                    if model is not None:
                        path.unlink(missing_ok=True)
                    return None if row is None else False
                if model is not None:
                    assert model_id is not None
                    self._insert_model(conn, model_id, model, job_id)
                conn.execute(
                    "UPDATE jobs SET status = ?, finished_at = ?, model_id = ?, error = ? "
                    "WHERE id = ?",
                    (status, time.time(), model_id, error, job_id),
                )
                conn.execute("DELETE FROM cancel_requests WHERE job_id = ?", (job_id,))
                conn.execute("DELETE FROM pause_requests WHERE job_id = ?", (job_id,))
        except BaseException as exc:
            if model is not None:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                reason = describe_os_error(exc)
                raise StoreUnavailable(f"the model could not be stored: {reason}") from None
            raise
        if model_id is None:
            return True
        stored = self.get_model(model_id)
        assert stored is not None
        return stored

    def requeue_job(
        self, job_id: str, *, worker: str | None = None, state: bytes | None = None
    ) -> bool:
        """Back to ``queued`` (after ``state``, if given, is written); see the protocol."""
        if state is not None and not self.write_state(job_id, state):
            return False
        if not valid_id(job_id):
            return False
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'queued' WHERE id = ? "
                "AND status IN ('queued', 'running')",
                (job_id,),
            )
            return cur.rowcount > 0

    def pause_job(
        self, job_id: str, *, worker: str | None = None, state: bytes | None = None
    ) -> bool:
        """A queued job, or a running one that stopped checkpointed, to ``paused`` (after
        ``state``, if given, is written): no runner holds it until ``resume_job``."""
        if state is not None and not self.write_state(job_id, state):
            return False
        if not valid_id(job_id):
            return False
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET status = 'paused', eta_s = NULL WHERE id = ? "
                "AND status IN ('queued', 'running')",
                (job_id,),
            )
            conn.execute("DELETE FROM pause_requests WHERE job_id = ?", (job_id,))
            return cur.rowcount > 0

    def resume_job(self, job_id: str, *, max_queued: int | None = None) -> bool:
        """A paused job back to ``queued``, the queue's room checked in the same
        transaction (``QueueFullError``); False if it is not paused."""
        if not valid_id(job_id):
            return False
        with self._tx() as conn:
            if max_queued is not None:
                n = conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
                check_room(int(n.fetchone()[0]), max_queued)
            cur = conn.execute(
                "UPDATE jobs SET status = 'queued' WHERE id = ? AND status = 'paused'", (job_id,)
            )
            return cur.rowcount > 0

    def request_pause(self, job_id: str) -> bool:
        """Record that an active job is to be paused, for the process that runs jobs
        (``charnn serve --workers N``); False if it is not active."""
        if not valid_id(job_id):
            return False
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] not in ACTIVE_STATUSES:
                return False
            conn.execute(
                "INSERT OR IGNORE INTO pause_requests (job_id, requested_at) VALUES (?, ?)",
                (job_id, time.time()),
            )
            return True

    def pause_requests(self) -> list[str]:
        """Ids of the active jobs whose pause was requested, oldest request first."""
        rows = self._query(
            "SELECT p.job_id FROM pause_requests p JOIN jobs j ON j.id = p.job_id "
            "WHERE j.status IN ('queued', 'running') ORDER BY p.requested_at ASC"
        )
        return [r["job_id"] for r in rows]

    # -- the queue, as the processes of a multi-worker server share it ------------

    def queued_job_ids(self) -> list[str]:
        """Ids of the queued jobs, oldest first (the runner adopts those others stored)."""
        rows = self._query(
            "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at ASC, rowid ASC"
        )
        return [r["id"] for r in rows]

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Record that a queued or running job is to be cancelled, for the process that
        runs jobs (it answers with the job's outcome, which removes the request). The
        job as it is, or None if unknown; a finished job is left as it is."""
        if not valid_id(job_id):
            return None
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["status"] in ACTIVE_STATUSES:
                conn.execute(
                    "INSERT OR IGNORE INTO cancel_requests (job_id, requested_at) VALUES (?, ?)",
                    (job_id, time.time()),
                )
        return self.get_job(job_id)

    def cancel_requests(self) -> list[str]:
        """Ids of the active jobs whose cancel was requested, oldest request first."""
        rows = self._query(
            "SELECT c.job_id FROM cancel_requests c JOIN jobs j ON j.id = c.job_id "
            "WHERE j.status IN ('queued', 'running') ORDER BY c.requested_at ASC"
        )
        return [r["job_id"] for r in rows]

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
                finite_or_none(p.train_loss),
                finite_or_none(p.val_loss),
                finite_or_none(p.grad_norm),
                None if p.clipped is None else int(p.clipped),
                finite_or_none(p.learning_rate),
                finite_or_none(p.chars_per_sec),
                p.sample,
            )
            for p in points
        ]
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                return 0
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO metrics (job_id, step, elapsed_s, train_loss, val_loss, "
                "grad_norm, clipped, learning_rate, chars_per_sec, sample) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return conn.total_changes - before

    # -- models -----------------------------------------------------------------

    def add_model(self, model: NewModel, job_id: str | None = None) -> ModelRecord:
        """Write the checkpoint file, then insert its row.

        The bytes are stored as given: callers validate them (``app.serving.validation``)
        and pass what they learned. A full or read-only disk is ``StoreUnavailable``,
        with nothing stored.
        """
        model_id = new_id()
        path = self._models_dir / f"{model_id}.npz"
        try:
            atomic_write_bytes(path, model.data)
            with self._tx() as conn:
                self._insert_model(conn, model_id, model, job_id)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StoreUnavailable(
                    f"the model could not be stored: {describe_os_error(exc)}"
                ) from None
            raise
        stored = self.get_model(model_id)
        assert stored is not None
        return stored

    def _insert_model(
        self, conn: sqlite3.Connection, model_id: str, model: NewModel, job_id: str | None
    ) -> None:
        """The model's row, in the caller's transaction (its file is already written)."""
        conn.execute(
            f"INSERT INTO models ({MODEL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                model_id,
                model.name,
                time.time(),
                job_id,
                dump_json(model.hyperparameters),
                dump_json(model.metrics),
                dump_json(list(model.vocab)),
                model.param_count,
                len(model.data),
                model.dtype,
            ),
        )
        _bump_models(conn)
        self._models_version += 1

    @property
    def models_version(self) -> int:
        """Changes with every model insert or delete (the model cache's key).

        One process owning the data directory: an in-memory count of its own writes
        sees every change (job processes never write models rows). Several processes
        (``shared``): the ``counters`` row, re-read only when ``PRAGMA data_version``
        says another connection committed; a few microseconds per read."""
        conn = self._version_conn
        if conn is None:
            return self._models_version
        with self._version_lock:
            try:
                seen = conn.execute("PRAGMA data_version").fetchone()[0]
                if seen != self._data_version:
                    row = conn.execute("SELECT value FROM counters WHERE name = 'models'")
                    found = row.fetchone()
                    self._shared_version = int(found[0]) if found is not None else 0
                    self._data_version = seen
            except sqlite3.Error as e:
                self._data_version = None
                raise _sqlite_unavailable(e, "read") from None
            return self._shared_version

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
                _bump_models(conn)
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

    def model_file(self, model_id: str) -> Path | None:
        """The model's ``.npz`` (the embedded runner's job processes read it in place)."""
        if self.get_model(model_id) is None:
            return None
        return self._models_dir / f"{model_id}.npz"

    def read_model_bytes(self, model_id: str) -> bytes | None:
        """The checkpoint bytes, or None if the model (or, racing a delete, its file) is gone."""
        path = self.model_file(model_id)
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
        self._close_connections()
        self._unlock()

    def detach_lock(self) -> int:
        """Close the database but keep the data directory locked: the lock's descriptor,
        now the caller's (``charnn serve --workers N`` holds it while its workers serve)."""
        self._close_connections()
        fd, self._lock_fd = self._lock_fd, -1
        return fd

    def _close_connections(self) -> None:
        with self._lock:
            self._conn.close()
        with self._version_lock:
            if self._version_conn is not None:
                self._version_conn.close()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            os.close(fd)  # releases the flock


def lock_data_dir(data_dir: Path) -> int:
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
        owner = _lock_owner(fd)
        os.close(fd)
        who = f" (pid {owner})" if owner is not None else ""
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


def _lock_owner(fd: int) -> int | None:
    """The pid on the lock file's first line (the rest may say ``STOPPING``)."""
    try:
        first = os.pread(fd, 64, 0).split(b"\n", 1)[0].decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def trust_owner(data_dir: Path, owner: int) -> None:
    """Check that ``owner`` holds the data directory's lock for this process: it is this
    process's parent, the lock is held, and the lock file names it. ``StoreError`` if not
    (a stale variable in the environment, or a parent that lost the directory)."""
    problem = None
    fd = -1
    if owner != os.getppid():
        problem = f"pid {owner}, said to hold it, is not this process's parent"
    else:
        try:
            fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            problem = "nobody holds its lock"
        except OSError as e:
            raise StoreError(
                f"cannot check the lock of the data directory {data_dir}: {describe_os_error(e)}"
            ) from None
    if fd >= 0:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                problem = "nobody holds its lock"  # we could take it: the owner does not
            except OSError:
                holder = _lock_owner(fd)
                if holder != owner:
                    problem = f"its lock is held by pid {holder}, not by pid {owner}"
        finally:
            os.close(fd)  # releases the shared lock if we took it
    if problem is not None:
        raise StoreError(f"this worker cannot use the data directory {data_dir}: {problem}")


def mark_stopping(fd: int) -> None:
    """Say in the lock file (``fd``: the owner's) that the server is stopping, so that no
    worker takes over the jobs of one that already stopped."""
    try:
        os.pwrite(fd, f"{os.getpid()}\n".encode() + STOPPING, 0)
    except OSError:
        pass  # then a worker may still take the role over: its jobs stop again at once


def owner_stopping(data_dir: Path) -> bool:
    """Whether the owner of the data directory's lock said it is stopping."""
    try:
        return STOPPING in (data_dir / LOCK_NAME).read_bytes()[:64]
    except OSError:
        return False


def _allow_every_status(conn: sqlite3.Connection) -> None:
    """A jobs table made before a status existed (``paused``) has a CHECK that refuses
    it, and SQLite cannot alter a CHECK: rebuild the table in the open transaction (its
    rows kept, foreign keys checked at the commit), so an old data directory upgrades
    in place. Nothing to do for a new or current database."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'")
    found = row.fetchone()
    if found is None or all(f"'{s}'" in found[0] for s in JOB_STATUSES):
        return
    old = [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
    conn.execute("PRAGMA defer_foreign_keys=ON")
    table = next(st for st in _SCHEMA if "EXISTS jobs (" in st)
    conn.execute(table.replace("EXISTS jobs (", "EXISTS jobs_rebuilt (", 1))
    new = {r[1] for r in conn.execute("PRAGMA table_info(jobs_rebuilt)")}
    columns = ", ".join(c for c in old if c in new)
    conn.execute(f"INSERT INTO jobs_rebuilt ({columns}) SELECT {columns} FROM jobs")
    conn.execute("DROP TABLE jobs")
    conn.execute("ALTER TABLE jobs_rebuilt RENAME TO jobs")


# The diagnostics of a metric point (base.METRIC_DIAGNOSTICS), added in place to a
# metrics table made before them: nullable, so an older charnn still reads and writes it.
_METRIC_COLUMNS = {
    "grad_norm": "REAL",
    "clipped": "INTEGER",
    "learning_rate": "REAL",
    "chars_per_sec": "REAL",
    "sample": "TEXT",
}


def _add_metric_columns(conn: sqlite3.Connection) -> None:
    have = {r[1] for r in conn.execute("PRAGMA table_info(metrics)")}
    for name, kind in _METRIC_COLUMNS.items():
        if name not in have:
            conn.execute(f"ALTER TABLE metrics ADD COLUMN {name} {kind}")


def _bump_models(conn: sqlite3.Connection) -> None:
    """``models_version``'s row, in the caller's model write transaction."""
    conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'models'")


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
