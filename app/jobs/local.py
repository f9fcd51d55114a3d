"""The embedded job runner: one supervised, spawned process per training job.

Why processes, and why one per job: a training thread inside the API process
takes the GIL and the API with it, and a ``ProcessPoolExecutor`` is broken for
every later job by one crashed worker, cannot cancel a running future, and its
children outlive a SIGTERM of the server. Here a supervisor thread owns the
children: it starts queued jobs FIFO while fewer than ``max_concurrent_jobs``
run, reads their JSON messages from a pipe and hands them to the ``Lifecycle``,
and notices a child that died without a last word (OOM killer, SIGKILL).

A job's files stay in its folder of the data directory (``LocalStore``): the
child reads the corpus and writes its checkpoints and model there, in place.
An outcome the store refuses (a full disk) is kept and written again every
second until it is. Stopping the runner (the server's shutdown signal, then the
lifespan's end) asks every child to stop between steps; they checkpoint, and
their jobs go back to ``queued`` so the next start resumes them. Every
``PURGE_EVERY_S`` the corpus and state of jobs finished longer ago than
``job_files_retention_s`` are removed. A job process dies with its runner
(``app/jobs/lifeline.py``): killed runner, killed job, resumed once elsewhere.

Under ``charnn serve --workers N`` one process runs a ``LocalRunner``
(``app/jobs/role.py``), which ``adopt``s the jobs the other processes stored.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from ..domain import ModelLimits
from ..store.base import LocalStore, ModelRecord, StoreError
from ..store.faults import describe_os_error
from . import lifeline
from .lifecycle import Announce, Lifecycle, Outcome, Run

log = logging.getLogger("charnn.jobs")

STOP_GRACE_S = 10.0  # a child that does not stop within this after being asked is killed
PENDING_RETRY_S = 1.0  # how often an outcome the store refused is written again
DRAIN_BATCH = 256  # messages of one child handled per pass of the supervisor
PURGE_EVERY_S = 600.0  # how often finished jobs' old files are looked for


@dataclass
class _Child:
    run: Run
    process: mp.process.BaseProcess
    conn: Connection
    stop: Event
    stop_asked_at: float | None = None


@dataclass
class _Pending:
    """Outcomes and requeues the store refused, written again until they are."""

    outcomes: dict[str, tuple[Run, Outcome]] = field(default_factory=dict)
    requeues: dict[str, Run] = field(default_factory=dict)
    pauses: dict[str, Run] = field(default_factory=dict)


class LocalRunner:
    def __init__(
        self,
        store: LocalStore,
        *,
        max_concurrent_jobs: int,
        job_threads: int,
        job_nice: int = 0,
        checkpoint_every_s: float,
        limits: ModelLimits,
        job_files_retention_s: float = 7 * 86_400,
        on_event: Announce | None = None,
    ) -> None:
        self.store = store
        self.max_concurrent = max_concurrent_jobs
        self.job_threads = job_threads
        self.job_nice = job_nice
        self.checkpoint_every_s = checkpoint_every_s
        self.retention_s = job_files_retention_s
        self.lifecycle = Lifecycle(store, limits, self._announce, self, unstorable_model_fails=True)
        self.on_event = on_event
        self._ctx = mp.get_context("spawn")
        self._queue: deque[str] = deque()
        self._running: dict[str, _Child] = {}
        self._pending = _Pending()
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
        with self._lock:
            self._stopping = True
            now = time.monotonic()
            for child in self._running.values():
                child.stop.set()
                child.stop_asked_at = child.stop_asked_at or now
        self._wake.set()

    def stop(self) -> None:
        """``begin_stop``, then wait for every job process (killed after STOP_GRACE_S)."""
        self.begin_stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job_id: str) -> None:
        """Queue a stored job; the store already checked the queue's room (``max_queued``)."""
        with self._lock:
            self._queue.append(job_id)
        self._wake.set()

    def resume(self, job_id: str) -> None:
        """Queue a job the store just moved from ``paused`` to ``queued``: it resumes
        from the checkpoint in its folder, at the step it paused at."""
        self.submit(job_id)

    def adopt(self, job_ids: Iterable[str]) -> int:
        """Queue, in the order given, the stored jobs this runner does not know yet
        (queued, running or waiting to be requeued): those another process of the server
        stored. How many were new; none once stopping (they resume at the next start).
        One already finished meanwhile is dropped at launch (its row says so)."""
        with self._lock:
            if self._stopping:
                return 0
            known = {*self._queue, *self._running, *self._pending.requeues, *self._pending.pauses}
            new = [job_id for job_id in job_ids if job_id not in known]
            self._queue.extend(new)
        if new:
            self._wake.set()
        return len(new)

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._settle_unstarted(job_id, Outcome("cancelled"))
                return True
            child = self._running.get(job_id)
            if child is None or child.run.ended:
                return False
            child.run.cancelled = True
            child.stop.set()
            child.stop_asked_at = time.monotonic()
        self._wake.set()
        return True

    def pause(self, job_id: str) -> bool:
        """Pause a queued job at once, or ask a running one to stop at its next step,
        checkpointed there (it becomes ``paused`` when it has). False if this runner
        holds no such job."""
        with self._lock:
            if job_id in self._queue:
                self._queue.remove(job_id)
                job = self.store.get_job(job_id)
                folder = self.store.job_folder(job_id)
                if job is None or folder is None:
                    return False
                self._pause(Run(job, folder))
                return True
            child = self._running.get(job_id)
            if child is None or child.run.ended or child.run.cancelled:
                return False
            child.run.pausing = True
            child.stop.set()
            child.stop_asked_at = child.stop_asked_at or time.monotonic()
        self._wake.set()
        return True

    # ------------------------------------------------------------------ Transport

    def checkpoint(self, run: Run) -> None:
        """Nothing to do: the job process wrote it in the job's folder, the store's own."""

    def requeue(self, run: Run) -> None:
        """Back to ``queued``, and next in line unless the server is stopping (then it
        resumes at the next start)."""
        try:
            requeued = self.store.requeue_job(run.job.id)
        except StoreError as e:
            log.warning("job %s: could not requeue it yet: %s", run.job.id, e)
            self._pending.requeues[run.job.id] = run
            return
        self._pending.requeues.pop(run.job.id, None)
        if requeued and not self._stopping:
            self._queue.appendleft(run.job.id)

    def keep_paused(self, run: Run) -> None:
        """To ``paused``: its checkpoint is already in the job's folder."""
        self._pause(run)

    def _pause(self, run: Run) -> None:
        try:
            paused = self.store.pause_job(run.job.id)
        except StoreError as e:
            log.warning("job %s: could not record its pause yet: %s", run.job.id, e)
            self._pending.pauses[run.job.id] = run
            return
        self._pending.pauses.pop(run.job.id, None)
        if paused:
            self.lifecycle.paused(run)

    def unrecorded(self, run: Run, outcome: Outcome) -> None:
        self._pending.outcomes[run.job.id] = (run, outcome)

    def base_model(self, run: Run, model: ModelRecord) -> Path | None:
        """The store's own file: the body reads it in place."""
        return self.store.model_file(model.id)

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
                        error = _could_not("start the job", exc)
                        self._settle_unstarted(job_id, Outcome("failed", error=error))
                waitables: list[Any] = [c.conn for c in self._running.values()]
                waitables += [c.process.sentinel for c in self._running.values()]
            if waitables:
                wait(waitables, timeout=0.2)
            else:
                self._wake.wait(timeout=0.2)
            self._wake.clear()
            with self._lock:
                for job_id, child in list(self._running.items()):
                    try:
                        self._drain(child)
                        self._reap(job_id, child)
                    except Exception as exc:  # a bug or the store: fail the job, not us
                        log.exception("supervising job %s failed", job_id)
                        self._abandon(job_id, child, _could_not("record the job", exc))
                self._retry_pending()
                self._purge_old_files()

    def _launch(self, job_id: str) -> None:
        job = self.store.get_job(job_id)
        folder = self.store.job_folder(job_id)
        if job is None or folder is None or job.status not in ("queued", "running"):
            return
        run = Run(job, folder)
        spec = self.lifecycle.spec(
            run,
            threads=self.job_threads,
            nice=self.job_nice,
            checkpoint_every_s=self.checkpoint_every_s,
        )
        if spec is None:
            return
        # Recorded first: a store that refuses leaves no process behind (the caller
        # fails the job), and a process that cannot start is failed by the caller too.
        started = job.started_at or time.time()
        self.store.update_job(job_id, status="running", started_at=started, error=None)
        parent, child_end = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        proc = self._ctx.Process(
            target=lifeline.job_main,
            args=(os.getpid(), spec.to_dict(), child_end, stop),
            name=f"charnn-job-{job_id[:8]}",
        )
        proc.start()
        child_end.close()
        self._running[job_id] = _Child(run, proc, parent, stop)
        self.lifecycle.started(run)

    def _settle_unstarted(self, job_id: str, outcome: Outcome) -> None:
        """The outcome of a job no process runs (cancelled in the queue, or unstartable)."""
        job = self.store.get_job(job_id)
        folder = self.store.job_folder(job_id)
        if job is not None and folder is not None:
            self.lifecycle.settle(Run(job, folder), outcome)

    def _drain(self, child: _Child) -> bool:
        """Handle what the child has sent so far, at most ``DRAIN_BATCH`` messages: a
        job that reports faster than the store records never holds the lock for long
        (cancels and submits wait for it), and its progress is recorded in one go."""
        messages: list[dict[str, Any]] = []
        while len(messages) < DRAIN_BATCH:
            try:
                if not child.conn.poll():
                    break
                messages.append(json.loads(child.conn.recv_bytes()))
            except (EOFError, OSError):
                break  # the child closed its end; _reap decides what that means
        if messages and not child.run.ended:
            self.lifecycle.handle_all(child.run, messages)
        return len(messages) == DRAIN_BATCH  # more may be waiting

    def _reap(self, job_id: str, child: _Child) -> None:
        if child.process.is_alive():
            asked = child.stop_asked_at
            if asked is not None and time.monotonic() - asked > STOP_GRACE_S:
                child.process.kill()
            return
        child.process.join()
        while self._drain(child):  # its last words, however many
            pass
        stopping = self._stopping and child.stop_asked_at is not None
        self.lifecycle.died(child.run, child.process.exitcode, stopping=stopping)
        child.conn.close()
        del self._running[job_id]

    def _abandon(self, job_id: str, child: _Child, error: str) -> None:
        if child.process.is_alive():
            child.process.kill()
        child.process.join()
        child.conn.close()
        self._running.pop(job_id, None)
        if not child.run.ended:
            child.run.ended = True
            self.lifecycle.settle(child.run, Outcome("failed", error=error))

    def _retry_pending(self, force: bool = False) -> None:
        now = time.monotonic()
        pending = self._pending
        if not (pending.outcomes or pending.requeues or pending.pauses) or (
            now < self._retry_at and not force
        ):
            return
        self._retry_at = now + PENDING_RETRY_S
        for job_id, (run, outcome) in list(pending.outcomes.items()):
            left = self.lifecycle.finish(run, outcome)
            if left is None:
                pending.outcomes.pop(job_id, None)
            else:
                pending.outcomes[job_id] = (run, left)
        for run in list(pending.requeues.values()):
            self.requeue(run)
        for run in list(pending.pauses.values()):
            self._pause(run)

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

    def _announce(self, job_id: str, message: dict[str, Any]) -> None:
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
