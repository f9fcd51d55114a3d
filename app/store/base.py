"""What every store is: the records, the ``Store`` protocol, its errors and shared rules.

The protocol speaks the domain (records, bytes), never storage: where the bytes
live is each store's business. ``app/store/sqlite.py`` keeps rows in SQLite and
bytes in files under the data directory; ``app/store/postgres.py`` keeps both in
PostgreSQL, and adds what workers on other machines coordinate with
(:class:`SharedStore`). Both convert rows with the same functions and check
updates with the same rules, defined here once.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from ..domain import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    TERMINAL_STATUSES,
    UNFINISHED_STATUSES,
    JobStatus,
)
from .idempotency import IdempotencyKey

__all__ = [  # re-exported
    "ACTIVE_STATUSES",
    "JOB_STATUSES",
    "TERMINAL_STATUSES",
    "UNFINISHED_STATUSES",
    "JobStatus",
]

log = logging.getLogger("charnn.store")

_ID = re.compile(r"[0-9a-f]{32}")


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
    # The step's diagnostics (None on points recorded before they were reported).
    grad_norm: float | None = None  # before clipping
    clipped: bool | None = None
    learning_rate: float | None = None
    chars_per_sec: float | None = None
    sample: str | None = None  # at evaluations, when the job's sample_length > 0


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A stored model checkpoint's metadata (its bytes: ``Store.read_model_bytes``)."""

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


@dataclass(frozen=True, slots=True)
class NewModel:
    """A validated model to store (``add_model``, or with its job's outcome in
    ``finish_job``): the bytes and what validating them learned."""

    name: str
    data: bytes
    hyperparameters: Mapping[str, Any]
    metrics: Mapping[str, Any]
    vocab: Sequence[str]
    param_count: int
    dtype: str


class Store(Protocol):
    """What the services may ask of persistent storage, in records and bytes.

    Every method either does all it says or nothing: a failure of the machine
    (full or read-only disk, a damaged or unreachable database) raises
    ``StoreUnavailable`` with a plain reason, and a row that cannot be read back
    is skipped and logged, never fatal to a listing. Ids are opaque 32-hex
    strings; any other string is "not found".
    """

    # -- jobs
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
        """Store a ``queued`` job; with ``max_queued``, refuse (``QueueFullError``, nothing
        stored) when that many already wait, checked atomically with the insert. With
        ``idempotency``, the key is recorded in the same transaction, or, when it is live
        already, nothing is stored and ``IdempotentReplay``/``IdempotencyMismatch`` raised."""
        ...

    def idempotency_key(self, key: str) -> tuple[str, str] | None:
        """(fingerprint, job id) of a live idempotency key, or None."""
        ...

    def get_job(self, job_id: str) -> JobRecord | None: ...
    def list_jobs(
        self, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> list[JobRecord]: ...
    def count_jobs(self, status: JobStatus | None = None) -> int: ...
    def count_active(self) -> int: ...
    def count_queued(self) -> int: ...
    def jobs_to_resume(self) -> list[JobRecord]: ...
    def update_job(self, job_id: str, **fields: Any) -> JobRecord | None: ...
    def update_progress(self, job_id: str, **fields: Any) -> bool:
        """Progress columns, applied only for a step past the stored one."""
        ...

    def finish_job(
        self,
        job_id: str,
        status: JobStatus,
        *,
        worker: str | None = None,
        error: str | None = None,
        model: NewModel | None = None,
    ) -> ModelRecord | bool | None:
        """A job's outcome (and, for ``succeeded``, its model) in one transaction, only
        while it is active (and, with ``worker``, owned by that worker): the stored model,
        True without one, False when it is not (any more) this caller's to finish, None
        for an unknown job."""
        ...

    def pause_job(
        self, job_id: str, *, worker: str | None = None, state: bytes | None = None
    ) -> bool:
        """A queued job, or a running one (with ``worker``: owned by it) that stopped
        checkpointed, to ``paused`` (``state`` written first, if given); held by no
        runner, not resumed at a restart. False if it was not the caller's to pause."""
        ...

    def resume_job(self, job_id: str, *, max_queued: int | None = None) -> bool:
        """A paused job back to ``queued`` (``QueueFullError`` when ``max_queued`` wait
        already, nothing changed); False if it is not paused."""
        ...

    def requeue_job(
        self, job_id: str, *, worker: str | None = None, state: bytes | None = None
    ) -> bool:
        """Back to ``queued`` (to resume from its checkpoint, ``state`` if given), only
        while it is active (and owned by ``worker``)."""
        ...

    def delete_job(self, job_id: str) -> bool: ...
    def purge_job_files(self, finished_before: float) -> list[str]: ...
    def read_corpus(self, job_id: str) -> str | None: ...
    def read_state(self, job_id: str) -> bytes | None: ...
    def write_state(self, job_id: str, data: bytes, *, worker: str | None = None) -> bool: ...

    # -- metrics
    def add_metrics(self, job_id: str, points: Sequence[MetricPoint]) -> int: ...
    def get_metrics(self, job_id: str, after_step: int = -1) -> list[MetricPoint]: ...
    def evaluations(self, job_ids: Sequence[str]) -> dict[str, list[tuple[int, float]]]: ...

    # -- models
    def add_model(self, model: NewModel, job_id: str | None = None) -> ModelRecord: ...
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
    def read_model_bytes(self, model_id: str) -> bytes | None: ...

    # -- health
    def writable(self) -> bool: ...
    def close(self) -> None: ...


class LocalStore(Store, Protocol):
    """A store on this machine's disk (``SqliteStore``): the embedded runner's job
    processes read and write a job's files in place, in its folder."""

    def job_folder(self, job_id: str) -> Path | None:
        """Where the job's ``corpus.txt`` is and its ``state.npz``/``model.npz`` go."""
        ...

    def model_file(self, model_id: str) -> Path | None: ...


class WorkerStore(LocalStore, Protocol):
    """The embedded store as each process of ``charnn serve --workers N`` opens it: the
    queue and the cancels as every process sees them, for the one that runs the jobs."""

    data_dir: Path

    def queued_job_ids(self) -> list[str]: ...
    def request_cancel(self, job_id: str) -> JobRecord | None: ...
    def cancel_requests(self) -> list[str]: ...
    def request_pause(self, job_id: str) -> bool: ...
    def pause_requests(self) -> list[str]: ...


class SharedStore(Store, Protocol):
    """A store that machines share (``PostgresStore``): it arbitrates which worker owns a
    running job, and every write a worker makes names it."""

    def claim_job(self, job_id: str, worker: str, stale_after_s: float) -> JobRecord | None: ...
    def heartbeat(self, job_id: str, worker: str) -> tuple[bool, bool]: ...
    def request_cancel(self, job_id: str) -> JobRecord | None: ...
    def request_pause(self, job_id: str) -> bool: ...
    def pause_asked(self, job_id: str) -> bool: ...
    def requeue_stale(self, stale_after_s: float) -> list[str]: ...
    def discard_job(self, job_id: str) -> bool: ...


# Progress columns ``update_progress`` sets, only ever forwards in steps.
PROGRESS_FIELDS = frozenset(
    {"step", "total_steps", "train_loss", "val_loss", "chars_per_sec", "eta_s"}
)


def check_room(queued: int, max_queued: int) -> None:
    if queued >= max_queued:
        raise QueueFullError(f"{queued} jobs are already waiting (max_queued_jobs)")


def finishable(status: str) -> tuple[JobStatus, ...]:
    """The statuses a job may finish ``status`` from: a paused job (held by no runner)
    can only be cancelled."""
    return UNFINISHED_STATUSES if status == "cancelled" else ACTIVE_STATUSES


def check_finish(status: str, model: NewModel | None) -> None:
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"a finished status is one of {', '.join(TERMINAL_STATUSES)}")
    if model is not None and status != "succeeded":
        raise ValueError("only a succeeded job stores a model")


def valid_id(value: object) -> bool:
    """True for the ids this store hands out (32 lowercase hex digits), nothing else."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def new_id() -> str:
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


def dump_json(value: Any) -> str:
    return json.dumps(_finite_json(value), ensure_ascii=False, allow_nan=False)


def check_page(limit: int, offset: int) -> None:
    # SQLite reads LIMIT -1 as "no limit"; refuse rather than surprise.
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")


def check_status(status: str | None) -> None:
    if status is not None and status not in JOB_STATUSES:
        raise ValueError(f"status must be one of {', '.join(JOB_STATUSES)}")


# Columns update_job may set; id, corpus and creation facts are immutable.
JOB_UPDATABLE = frozenset(
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


def _opt_number(value: Any, what: str) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{what} is not a number")
    return value


def job_from_row(row: Mapping[str, Any]) -> JobRecord:
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


def model_from_row(row: Mapping[str, Any]) -> ModelRecord:
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


def checked_update(fields: Mapping[str, Any]) -> list[str]:
    unknown = sorted(set(fields) - JOB_UPDATABLE)
    if unknown:
        raise ValueError(f"cannot update job field(s): {', '.join(unknown)}")
    if "status" in fields:
        if fields["status"] is None:
            raise ValueError("status cannot be None")
        check_status(fields["status"])
    return sorted(fields)  # whitelisted above, so safe to splice into SQL


def checked_progress(fields: Mapping[str, Any]) -> list[str]:
    unknown = sorted(set(fields) - PROGRESS_FIELDS)
    if unknown:
        raise ValueError(f"not progress field(s): {', '.join(unknown)}")
    if not isinstance(fields.get("step"), int):
        raise ValueError("update_progress needs an integer step")
    return sorted(fields)


def metric_from_row(r: Mapping[str, Any]) -> MetricPoint:
    """A metrics row (SQLite's or PostgreSQL's, both indexable by name) as a point."""
    return MetricPoint(
        step=r["step"],
        elapsed_s=r["elapsed_s"],
        # NaN/inf were stored as NULL; a diverged point still has a (nan) loss.
        train_loss=math.nan if r["train_loss"] is None else r["train_loss"],
        val_loss=r["val_loss"],
        grad_norm=_column(r, "grad_norm"),
        clipped=None if (c := _column(r, "clipped")) is None else bool(c),
        learning_rate=_column(r, "learning_rate"),
        chars_per_sec=_column(r, "chars_per_sec"),
        sample=_column(r, "sample"),
    )


# The diagnostics columns of a metrics row (added in place to older tables).
METRIC_DIAGNOSTICS = ("grad_norm", "clipped", "learning_rate", "chars_per_sec", "sample")


def _column(r: Mapping[str, Any], name: str) -> Any:
    """``r[name]``, None for a row read without that column (an older table)."""
    try:
        return r[name]
    except (KeyError, IndexError):
        return None


def finite_or_none(value: Any) -> Any:
    # SQLite would store NaN as NULL anyway; make that explicit and cover inf too.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
