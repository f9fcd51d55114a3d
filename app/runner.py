"""The embedded job runner: one supervised, spawned process per training job.

Why processes, and why one per job: a training thread inside the API process
takes the GIL and the API with it, and a ``ProcessPoolExecutor`` is broken for
every later job by one crashed worker, cannot cancel a running future, and its
children outlive a SIGTERM of the server. Here a supervisor thread owns the
children: it starts queued jobs FIFO while fewer than ``max_concurrent_jobs``
run, reads their JSON messages (app/worker.py) from a pipe, persists progress
and metric points as they arrive, and notices a child that died without a last
word (OOM killer, SIGKILL): that job fails with the exit code as the reason.

Every job ends in a recorded state: an outcome the store refuses (a full disk)
is kept and written again every second until it is, and failure reasons are
plain words ("the disk is full"), never a path. Stopping the runner (the
server's shutdown signal, then the lifespan's end) asks every child to stop
between steps; they checkpoint, and their jobs go back to ``queued`` so the
next start resumes them. Job processes treat SIGINT and SIGTERM as that same
request, so a Ctrl-C meant for the server never fails a job. Every
``PURGE_EVERY_S`` the corpus and state of jobs finished longer ago than
``job_files_retention_s`` are removed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.synchronize import Event
from typing import Any, Protocol

from model.errors import CheckpointError

from . import job_process
from .faults import describe_os_error
from .model_meta import ModelLimits, ValidModel, validate_model_bytes
from .store import JobRecord, MetricPoint, ModelRecord, Store, StoreError
from .worker import JobSpec

log = logging.getLogger("charnn.runner")

OnEvent = Callable[[str, dict[str, Any]], None]
STOP_GRACE_S = 10.0  # a child that does not stop within this after being asked is killed
PENDING_RETRY_S = 1.0  # how often an outcome the store refused is written again
PURGE_EVERY_S = 600.0  # how often finished jobs' old files are looked for


class Runner(Protocol):
    """What the routes and the lifespan use: ``ProcessRunner``, or ``CeleryRunner``
    (app/distributed.py) when jobs run on Celery workers."""

    def start(self) -> None: ...
    def begin_stop(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def cancel(self, job_id: str) -> bool: ...
    def alive(self) -> bool: ...
    def queued(self) -> int: ...


def record_progress(store: Store, job_id: str, m: dict[str, Any]) -> bool:
    """Persist a ``progress`` message: the job's latest figures and one metric point.

    A job resumed from an older checkpoint replays steps it already reported; those
    are not recorded again (progress never goes backwards). True if recorded: then,
    and only then, the caller announces it. Shared by every runner, so a job looks
    the same whichever one ran it."""
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
        point = MetricPoint(m["step"], m["elapsed_s"], m["train_loss"], m.get("val_loss"))
        store.add_metrics(job_id, [point])
    return recorded


def job_model(m: dict[str, Any], limits: ModelLimits) -> tuple[bytes, ValidModel]:
    """The model a ``succeeded`` message names (its ``model_file``), validated exactly as
    an upload is (CheckpointError if it is not something every route can read back)."""
    with open(m["model_file"], "rb") as f:
        data = f.read()
    return data, validate_model_bytes(data, limits, max_bytes=max(len(data), 1))


def store_model(
    store: Store, name: str, job_id: str, m: dict[str, Any], limits: ModelLimits
) -> ModelRecord:
    """Store the model a ``succeeded`` message names as a new model."""
    data, valid = job_model(m, limits)
    return store.add_model(
        name,
        job_id,
        data,
        valid.hyperparameters,
        valid.metrics,
        valid.vocab,
        valid.param_count,
        valid.dtype,
    )


@dataclass
class _Running:
    job: JobRecord
    process: mp.process.BaseProcess
    conn: Connection
    stop: Event
    model_path: str
    cancelled: bool = False
    stop_asked_at: float | None = None
    finished: bool = False


class ProcessRunner:
    def __init__(
        self,
        store: Store,
        *,
        max_concurrent_jobs: int,
        job_threads: int,
        job_nice: int = 0,
        checkpoint_every_s: float,
        limits: ModelLimits,
        job_files_retention_s: float = 7 * 86_400,
        on_event: OnEvent | None = None,
    ) -> None:
        self.store = store
        self.max_concurrent = max_concurrent_jobs
        self.job_threads = job_threads
        self.job_nice = job_nice
        self.checkpoint_every_s = checkpoint_every_s
        self.limits = limits
        self.retention_s = job_files_retention_s
        self.on_event = on_event
        self._ctx = mp.get_context("spawn")
        self._queue: deque[str] = deque()
        self._running: dict[str, _Running] = {}
        # Outcomes that could not be recorded yet (e.g. the disk is full): retried until
        # they are, so a job never stays "running" once its process is gone.
        self._pending: dict[str, tuple[str, dict[str, Any]]] = {}
        self._retry_at = 0.0
        self._purge_at = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Start supervising, and requeue what was queued or running when we last died."""
        for job in self.store.jobs_to_resume():
            if job.status == "running":
                self.store.update_job(job.id, status="queued")
            self._queue.append(job.id)
        self._thread = threading.Thread(target=self._supervise, name="charnn-runner", daemon=True)
        self._thread.start()

    def begin_stop(self) -> None:
        """Ask every job to stop between steps (they checkpoint and go back to ``queued``);
        returns at once. Called as soon as the server is told to shut down, so jobs
        checkpoint while connections drain."""
        with self._lock:
            self._stopping = True
            now = time.monotonic()
            for r in self._running.values():
                r.stop.set()
                r.stop_asked_at = r.stop_asked_at or now
        self._wake.set()

    def stop(self) -> None:
        """``begin_stop``, then wait for every job process (killed after STOP_GRACE_S)."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def submit(self, job_id: str) -> None:
        """Queue a stored job; the store already checked the queue's room (``max_queued``)."""
        with self._lock:
            self._queue.append(job_id)
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """True if the job was queued or running (it ends ``cancelled``)."""
        with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._finish(job_id, "cancelled")
                return True
            r = self._running.get(job_id)
            if r is None or r.finished:
                return False
            r.cancelled = True
            r.stop.set()
            r.stop_asked_at = time.monotonic()
        self._wake.set()
        return True

    # ------------------------------------------------------------------ supervisor

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._stopping and not self._running:
                    self._retry_pending(force=True)
                    return
                while (
                    not self._stopping and self._queue and len(self._running) < self.max_concurrent
                ):
                    job_id = self._queue.popleft()
                    try:
                        self._launch(job_id)
                    except Exception as exc:  # the store or the OS refused: fail it, not us
                        log.exception("could not start job %s", job_id)
                        self._finish(job_id, "failed", error=_could_not("start the job", exc))
                waitables: list[Any] = [r.conn for r in self._running.values()]
                waitables += [r.process.sentinel for r in self._running.values()]
            if waitables:
                wait(waitables, timeout=0.2)
            else:
                self._wake.wait(timeout=0.2)
            self._wake.clear()
            with self._lock:
                for job_id, r in list(self._running.items()):
                    try:
                        self._drain(r)
                        self._reap(job_id, r)
                    except Exception as exc:  # a bug or the store: fail the job, not us
                        log.exception("supervising job %s failed", job_id)
                        self._abandon(job_id, r, _could_not("record the job", exc))
                self._retry_pending()
                self._purge_old_files()

    def _launch(self, job_id: str) -> None:
        job = self.store.get_job(job_id)
        if job is None or job.status not in ("queued", "running"):
            return
        corpus, state = self.store.corpus_path(job_id), self.store.state_path(job_id)
        assert corpus is not None and state is not None
        init_path = None
        if job.init_from:
            model = self.store.resolve_model(job.init_from)
            if model is None:
                self._finish(job_id, "failed", error=f"model {job.init_from!r} no longer exists")
                return
            init_path = str(self.store.model_path(model.id))
        model_path = str(state.with_name("model.npz"))
        spec = JobSpec(
            job_id=job_id,
            corpus_path=str(corpus),
            state_path=str(state),
            model_path=model_path,
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            init_model_path=init_path,
            threads=self.job_threads,
            nice=self.job_nice,
            checkpoint_every_s=self.checkpoint_every_s,
            extra={"name": job.name, "job_id": job_id},
        )
        # Recorded first: a store that refuses leaves no process behind (the caller
        # fails the job), and a process that cannot start is failed by the caller too.
        started = job.started_at or time.time()
        self.store.update_job(job_id, status="running", started_at=started, error=None)
        parent, child = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        process = self._ctx.Process(
            target=job_process.main,
            args=(spec.to_dict(), child, stop),
            name=f"charnn-job-{job_id[:8]}",
        )
        process.start()
        child.close()
        self._running[job_id] = _Running(job, process, parent, stop, model_path)
        self._emit(job_id, {"type": "status", "status": "running"})

    def _drain(self, r: _Running) -> None:
        while not r.finished:
            try:
                if not r.conn.poll():
                    return
                raw = r.conn.recv_bytes()
            except (EOFError, OSError):
                return  # the child closed its end; _reap decides what that means
            self._handle(r, json.loads(raw))

    def _handle(self, r: _Running, m: dict[str, Any]) -> None:
        job_id, kind = r.job.id, m.get("type")
        if kind == "progress":
            try:
                recorded = record_progress(self.store, job_id, m)
            except StoreError as e:  # e.g. the disk is full: the point is lost, not the job
                log.warning("job %s: progress at step %s not recorded: %s", job_id, m["step"], e)
                recorded = True
            if recorded:
                self._emit(job_id, m)
        elif kind == "succeeded":
            r.finished = True
            try:
                model = store_model(self.store, r.job.name, job_id, m, self.limits)
            except CheckpointError as e:
                self._finish(job_id, "failed", error=f"the trained model is not valid: {e}")
            except StoreError as e:  # "the model could not be stored: the disk is full"
                self._finish(job_id, "failed", error=str(e))
            else:
                self._finish(job_id, "succeeded", model_id=model.id)
            _unlink_quietly(r.model_path)  # a copy of what models/ now holds
        elif kind == "failed":
            r.finished = True
            self._finish(job_id, "failed", error=m.get("error"))
        elif kind == "stopped":
            r.finished = True
            if r.cancelled:
                self._finish(job_id, "cancelled")
            else:
                # The server is stopping (resume at the next start), or the job process
                # alone was told to stop (a signal): resume it now, next in line.
                self._record(job_id, "queued", {})
                if not self._stopping:
                    self._queue.appendleft(job_id)

    def _reap(self, job_id: str, r: _Running) -> None:
        if r.process.is_alive():
            if r.stop_asked_at is not None and time.monotonic() - r.stop_asked_at > STOP_GRACE_S:
                r.process.kill()
            return
        r.process.join()
        self._drain(r)
        if not r.finished:
            if r.cancelled:
                self._finish(job_id, "cancelled")
            elif self._stopping and r.stop_asked_at is not None:
                # Killed after the grace period while the server stops: it resumes from
                # its last checkpoint at the next start, like after a crash.
                self._record(job_id, "queued", {})
            elif r.process.exitcode in (-signal.SIGINT, -signal.SIGTERM):
                # Told to stop before its handlers were installed (the interpreter's
                # first milliseconds): a request to stop, like later; resume it.
                self._record(job_id, "queued", {})
                self._queue.appendleft(job_id)
            else:
                code = r.process.exitcode
                self._finish(
                    job_id, "failed", error=f"the training process died (exit code {code})"
                )
        r.conn.close()
        del self._running[job_id]

    def _abandon(self, job_id: str, r: _Running, error: str) -> None:
        r.finished = True
        if r.process.is_alive():
            r.process.kill()
        r.process.join()
        r.conn.close()
        self._running.pop(job_id, None)
        self._finish(job_id, "failed", error=error)

    def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        self._record(job_id, status, {"finished_at": time.time(), **fields})

    def _record(self, job_id: str, status: str, fields: dict[str, Any]) -> None:
        """Write the job's new status, or keep it to retry: announced once written."""
        try:
            self.store.update_job(job_id, status=status, **fields)
        except Exception as exc:
            log.warning("job %s: could not record %s yet: %s", job_id, status, exc)
            self._pending[job_id] = (status, fields)
            return
        self._pending.pop(job_id, None)
        if status != "queued":
            self._emit(job_id, {"type": "status", "status": status, **fields})

    def _retry_pending(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._pending or (now < self._retry_at and not force):
            return
        self._retry_at = now + PENDING_RETRY_S
        for job_id, (status, fields) in list(self._pending.items()):
            self._record(job_id, status, fields)

    def _purge_old_files(self) -> None:
        now = time.monotonic()
        if now < self._purge_at:
            return
        self._purge_at = now + PURGE_EVERY_S
        try:
            purged = self.store.purge_job_files(time.time() - self.retention_s)
        except Exception:
            log.warning("could not remove old job files", exc_info=True)
            return
        if purged:
            log.info("removed the corpus and state of %d finished job(s)", len(purged))

    def _emit(self, job_id: str, message: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(job_id, message)
            except Exception:  # a subscriber's problem must not stop supervision
                log.exception("event subscriber failed")


def _could_not(doing: str, exc: BaseException) -> str:
    """A job's failure reason in plain words: anyone may read it, so never a path."""
    if isinstance(exc, StoreError):
        return f"the server could not {doing}: {exc}"
    return f"the server could not {doing}: {describe_os_error(exc)}"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
