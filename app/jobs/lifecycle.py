"""A job's life, written once for both runners.

The job body (``app/jobs/body.py``) reports plain messages: ``progress``,
``checkpoint``, ``succeeded``, ``failed``, ``stopped``. Which message moves a job
to which status, what is stored and announced on the way, and what it means
when a job process dies without a last word or the body crashes: all of it is
here, in :class:`Lifecycle`. The embedded runner (``local.py``: a process per
job, files in the data directory) and the Celery worker (``tasks.py``: any
machine, bytes in PostgreSQL) differ only in a small :class:`Transport`: where
a checkpoint goes, how a stopped job is run again, and what to do when the
store cannot record an outcome yet. Adding a job status or a message type is
an edit here, in one place.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from model.errors import CheckpointError

from ..domain import JobStatus, ModelLimits
from ..metrics import JOBS_FINISHED, JOBS_STARTED
from ..store.base import JobRecord, MetricPoint, ModelRecord, NewModel, Store, StoreError
from ..store.validation import validate_model_bytes
from .body import JobSpec

log = logging.getLogger("charnn.jobs")

Announce = Callable[[str, dict[str, Any]], None]
# A job process killed by one of these was told to stop (before its own handlers were
# installed, in the interpreter's first milliseconds): it resumes, it does not fail.
STOP_SIGNALS = (-signal.SIGINT, -signal.SIGTERM)


@dataclass
class Run:
    """One execution of one job: a job process, or one Celery delivery."""

    job: JobRecord
    folder: Path  # the body's files: corpus.txt, state.npz, model.npz (JobSpec.in_folder)
    worker: str | None = None  # the owner the store checks (scale-out); None: embedded
    cancelled: bool = False  # the user asked: a stop ends it ``cancelled``
    pausing: bool = False  # the user asked: a stop ends it ``paused`` (unless cancelled)
    ended: bool = False  # its outcome was reached (recorded, or waiting to be)
    lost: bool = False  # no longer this execution's: it writes nothing more
    reported_step: int = -1  # the last step whose progress was recorded

    def __post_init__(self) -> None:
        self.reported_step = max(self.reported_step, self.job.step)

    @property
    def state_file(self) -> Path:
        return self.folder / "state.npz"

    @property
    def model_file(self) -> Path:
        return self.folder / "model.npz"


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    error: str | None = None
    model: NewModel | None = None


class Transport(Protocol):
    """What differs between the runners."""

    def checkpoint(self, run: Run) -> None:
        """The body wrote a resume checkpoint (``run.state_file``): keep it."""
        ...

    def requeue(self, run: Run) -> None:
        """The job stopped without being cancelled: queue it again, to resume."""
        ...

    def keep_paused(self, run: Run) -> None:
        """The job stopped, checkpointed, because it was asked to pause: keep the
        checkpoint and mark it ``paused`` (no runner holds it until it is resumed)."""
        ...

    def unrecorded(self, run: Run, outcome: Outcome) -> None:
        """The store refused ``outcome`` (a full disk, a database away): retry it."""
        ...

    def base_model(self, run: Run, model: ModelRecord) -> Path | None:
        """``model``'s checkpoint as a file the body can read (``init_from``); None if
        the store no longer has it."""
        ...


def record_progress(store: Store, job_id: str, messages: Sequence[dict[str, Any]]) -> bool:
    """Persist a run of ``progress`` messages: the job's latest figures and one metric
    point each, in two writes however many there are (a small model reports faster
    than a disk commits one at a time).

    A job resumed from an older checkpoint replays steps it already reported; the
    caller leaves those out, and the store refuses any that slip through (progress
    never goes backwards). True if recorded."""
    if not messages:
        return False
    m = messages[-1]
    total = m.get("total_steps")
    eta = None
    if total and m["step"] and m["elapsed_s"]:
        eta = m["elapsed_s"] / m["step"] * max(total - m["step"], 0)
    recorded = store.update_progress(
        job_id,
        step=m["step"],
        total_steps=total,
        train_loss=m["train_loss"],
        val_loss=m.get("best_val_loss"),
        chars_per_sec=m.get("chars_per_sec"),
        eta_s=eta,
    )
    if recorded:
        points = [metric_point(p) for p in messages]
        store.add_metrics(job_id, points)
    return recorded


def metric_point(m: dict[str, Any]) -> MetricPoint:
    """A progress message as stored: everything a live event says is read back."""
    return MetricPoint(
        m["step"],
        m["elapsed_s"],
        m["train_loss"],
        m.get("val_loss"),
        grad_norm=m.get("grad_norm"),
        clipped=m.get("clipped"),
        learning_rate=m.get("learning_rate"),
        chars_per_sec=m.get("chars_per_sec"),
        sample=m.get("sample"),
    )


def trained_model(run: Run, limits: ModelLimits) -> NewModel:
    """The model the body wrote, validated exactly as an upload is (CheckpointError if it
    is not something every route can read back)."""
    data = run.model_file.read_bytes()
    valid = validate_model_bytes(data, limits, max_bytes=max(len(data), 1))
    return valid.to_store(run.job.name, data)


class Lifecycle:
    """``unstorable_model_fails``: when the store cannot take a finished job's model, the
    job fails saying why (the embedded store: its write failures are the disk's, full or
    read-only, and last); otherwise the outcome, model included, is retried (the shared
    store: a database away for a moment)."""

    def __init__(
        self,
        store: Store,
        limits: ModelLimits,
        announce: Announce,
        transport: Transport,
        *,
        unstorable_model_fails: bool,
    ) -> None:
        self.store = store
        self.limits = limits
        self.announce = announce
        self.transport = transport
        self.unstorable_model_fails = unstorable_model_fails

    def spec(
        self, run: Run, *, threads: int, nice: int, checkpoint_every_s: float
    ) -> JobSpec | None:
        """What the body needs to run ``run`` in its folder, its ``init_from`` model
        resolved; None if the job cannot start (then it has failed, saying why)."""
        job = run.job
        init_model = None
        if job.init_from:
            base = self.store.resolve_model(job.init_from)
            init_model = self.transport.base_model(run, base) if base is not None else None
            if init_model is None:
                error = f"model {job.init_from!r} no longer exists"
                self.settle(run, Outcome("failed", error=error))
                return None
        return JobSpec.in_folder(
            job.id,
            job.name,
            job.hyperparameters,
            job.seed,
            run.folder,
            init_model=init_model,
            threads=threads,
            nice=nice,
            checkpoint_every_s=checkpoint_every_s,
        )

    def started(self, run: Run) -> None:
        JOBS_STARTED.inc()
        self.announce(run.job.id, {"type": "status", "status": "running"})

    def handle(self, run: Run, m: dict[str, Any]) -> None:
        """One message of the job body."""
        self.handle_all(run, [m])

    def handle_all(self, run: Run, messages: Sequence[dict[str, Any]]) -> None:
        """Messages of the job body, in order; a run of ``progress`` is recorded at once."""
        progress: list[dict[str, Any]] = []
        for m in messages:
            if run.ended:
                break  # nothing follows a last word
            if m.get("type") == "progress":
                progress.append(m)
                continue
            self._progress(run, progress)
            progress = []
            self._one(run, m)
        self._progress(run, progress)

    def _one(self, run: Run, m: dict[str, Any]) -> None:
        if run.lost:
            return
        kind = m.get("type")
        if kind == "checkpoint":
            self.transport.checkpoint(run)
        elif kind == "succeeded":
            run.ended = True
            try:
                outcome = Outcome("succeeded", model=trained_model(run, self.limits))
            except CheckpointError as e:
                outcome = Outcome("failed", error=f"the trained model is not valid: {e}")
            finally:
                _unlink_quietly(run.model_file)  # the store keeps the model, not the job
            self.settle(run, outcome)
        elif kind == "failed":
            run.ended = True
            self.settle(run, Outcome("failed", error=m.get("error")))
        elif kind == "stopped":
            run.ended = True
            if run.cancelled:
                self.settle(run, Outcome("cancelled"))
            elif run.pausing:  # checkpointed at the step it stopped at
                self.transport.keep_paused(run)
            else:  # its runner is stopping, or its process alone was told to stop
                self.transport.requeue(run)

    def died(self, run: Run, exitcode: int | None, *, stopping: bool) -> None:
        """The job process ended without a last word (killed, out of memory, ...)."""
        if run.ended or run.lost:
            return
        run.ended = True
        if run.cancelled:
            self.settle(run, Outcome("cancelled"))
        elif run.pausing:  # paused at its last checkpoint: the resume replays the rest
            self.transport.keep_paused(run)
        elif stopping or exitcode in STOP_SIGNALS:
            # Killed after the grace period of a stopping server, or told to stop before
            # it could say so: it resumes from its last checkpoint, like after a crash.
            self.transport.requeue(run)
        else:
            error = f"the training process died (exit code {exitcode})"
            self.settle(run, Outcome("failed", error=error))

    def crashed(self, run: Run, exc: BaseException, where: str) -> None:
        """The body raised (a bug, an I/O failure): failed, naming only the exception."""
        if run.ended or run.lost:
            return
        run.ended = True
        error = f"internal error in the training {where} ({type(exc).__name__})"
        self.settle(run, Outcome("failed", error=error))

    def settle(self, run: Run, outcome: Outcome) -> None:
        left = self.finish(run, outcome)
        if left is not None:
            self.transport.unrecorded(run, left)

    def finish(self, run: Run, outcome: Outcome) -> Outcome | None:
        """Record ``outcome`` (with its model, in one transaction) and announce it. None
        once settled: recorded, or no longer this run's to record (then the run is lost
        and writes nothing more); else the outcome still to record (the store refused it
        for now: retry it)."""
        if run.lost:
            return None
        try:
            result = self.store.finish_job(
                run.job.id,
                outcome.status,
                worker=run.worker,
                error=outcome.error,
                model=outcome.model,
            )
        except StoreError as e:
            if outcome.model is not None and self.unstorable_model_fails:
                return self.finish(run, Outcome("failed", error=str(e)))
            log.warning("job %s: could not record %s yet: %s", run.job.id, outcome.status, e)
            return outcome
        if result is None or result is False:
            log.warning("job %s: not this run's to finish any more", run.job.id)
            run.lost = True
            return None
        JOBS_FINISHED.labels(outcome.status).inc()
        fields: dict[str, Any] = {}
        if isinstance(result, ModelRecord):
            fields["model_id"] = result.id
        if outcome.error is not None:
            fields["error"] = outcome.error
        self.announce(run.job.id, {"type": "status", "status": outcome.status, **fields})
        return None

    def paused(self, run: Run) -> None:
        """The transport recorded the pause: tell the job's followers."""
        self.announce(run.job.id, {"type": "status", "status": "paused"})

    def _progress(self, run: Run, messages: list[dict[str, Any]]) -> None:
        # A resumed job replays steps it reported before: subscribers never see it go back.
        fresh = [m for m in messages if m["step"] > run.reported_step]
        if run.lost or not fresh:
            return
        try:
            recorded = record_progress(self.store, run.job.id, fresh)
        except StoreError as e:  # e.g. the disk is full: the points are lost, not the job
            first, last = fresh[0]["step"], fresh[-1]["step"]
            log.warning("job %s: steps %s-%s not recorded: %s", run.job.id, first, last, e)
            return
        if recorded:
            run.reported_step = fresh[-1]["step"]
            for m in fresh:
                self.announce(run.job.id, m)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
