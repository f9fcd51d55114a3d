"""The embedded job runner: one supervised, spawned process per training job.

Why processes, and why one per job: a training thread inside the API process
takes the GIL and the API with it, and a ``ProcessPoolExecutor`` is broken for
every later job by one crashed worker, cannot cancel a running future, and its
children outlive a SIGTERM of the server. Here a supervisor thread owns the
children: it starts queued jobs FIFO while fewer than ``max_concurrent_jobs``
run, reads their JSON messages (app/worker.py) from a pipe, persists progress
and metric points as they arrive, and notices a child that died without a last
word (OOM killer, SIGKILL): that job fails with the exit code as the reason.

Stopping the runner (the app's lifespan shutdown) asks every child to stop
between steps; they checkpoint, and their jobs go back to ``queued`` so the
next start resumes them from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.synchronize import Event
from typing import Any, Protocol

from .store import JobRecord, MetricPoint, ModelRecord, Store
from .worker import JobSpec, run_job

log = logging.getLogger("charnn.runner")

OnEvent = Callable[[str, dict[str, Any]], None]
STOP_GRACE_S = 10.0  # a child that does not stop within this after being asked is killed


class QueueFullError(Exception):
    """More jobs are waiting than ``max_queued_jobs`` allows."""


class Runner(Protocol):
    """What the routes and the lifespan use: ``ProcessRunner``, or ``CeleryRunner``
    (app/distributed.py) when jobs run on Celery workers."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def cancel(self, job_id: str) -> bool: ...
    def alive(self) -> bool: ...
    def queued(self) -> int: ...


def record_progress(store: Store, job_id: str, m: dict[str, Any]) -> None:
    """Persist a ``progress`` message: the job's latest figures and one metric point.

    Shared by every runner, so a job looks the same whichever one ran it."""
    total = m.get("total_steps")
    eta = None
    if total and m["step"] and m["elapsed_s"]:
        eta = m["elapsed_s"] / m["step"] * max(total - m["step"], 0)
    store.update_job(
        job_id,
        step=m["step"],
        total_steps=total,
        train_loss=m["train_loss"],
        val_loss=m.get("best_val_loss"),
        chars_per_sec=m.get("chars_per_sec"),
        eta_s=eta,
    )
    point = MetricPoint(m["step"], m["elapsed_s"], m["train_loss"], m.get("val_loss"))
    store.add_metrics(job_id, [point])


def store_model(store: Store, name: str, job_id: str, m: dict[str, Any]) -> ModelRecord:
    """Store the model a ``succeeded`` message names (its ``model_file``) as a new model."""
    with open(m["model_file"], "rb") as f:
        data = f.read()
    return store.add_model(
        name,
        job_id,
        data,
        m["hyperparameters"],
        m["metrics"],
        m["vocab"],
        m["param_count"],
        m["dtype"],
    )


def _job_main(spec: dict[str, Any], conn: Connection, stop: Event) -> None:
    """Entry point of a job process (spawned: a fresh interpreter)."""

    def send(message: dict[str, Any]) -> None:
        conn.send_bytes(json.dumps(message, allow_nan=False).encode())

    try:
        job = JobSpec(**spec)
        if job.nice:
            os.nice(job.nice)  # inherited by the job's shard process
        run_job(job, send, stop.is_set)
    except Exception as exc:  # a bug or an I/O failure: report it without a traceback
        log.exception("job %s crashed", spec.get("job_id"))
        name = type(exc).__name__
        send({"type": "failed", "error": f"internal error in the training process ({name})"})
    finally:
        conn.close()


@dataclass
class _Running:
    job: JobRecord
    process: mp.process.BaseProcess
    conn: Connection
    stop: Event
    cancelled: bool = False
    stop_asked_at: float | None = None
    finished: bool = False


class ProcessRunner:
    def __init__(
        self,
        store: Store,
        *,
        max_concurrent_jobs: int,
        max_queued_jobs: int,
        job_threads: int,
        job_nice: int = 0,
        checkpoint_every_s: float,
        on_event: OnEvent | None = None,
    ) -> None:
        self.store = store
        self.max_concurrent = max_concurrent_jobs
        self.max_queued = max_queued_jobs
        self.job_threads = job_threads
        self.job_nice = job_nice
        self.checkpoint_every_s = checkpoint_every_s
        self.on_event = on_event
        self._ctx = mp.get_context("spawn")
        self._queue: deque[str] = deque()
        self._running: dict[str, _Running] = {}
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

    def stop(self) -> None:
        """Ask every job to stop between steps (they checkpoint), then wait for them."""
        with self._lock:
            self._stopping = True
            for r in self._running.values():
                r.stop.set()
                r.stop_asked_at = time.monotonic()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    def submit(self, job_id: str) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queued:
                raise QueueFullError(f"{len(self._queue)} jobs are already waiting")
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
                    return
                while (
                    not self._stopping and self._queue and len(self._running) < self.max_concurrent
                ):
                    self._launch(self._queue.popleft())
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
                    except Exception as exc:  # e.g. the disk filled up: fail the job, not us
                        log.exception("supervising job %s failed", job_id)
                        self._abandon(job_id, r, f"the server could not record the job ({exc})")

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
        spec = JobSpec(
            job_id=job_id,
            corpus_path=str(corpus),
            state_path=str(state),
            model_path=str(state.with_name("model.npz")),
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            init_model_path=init_path,
            threads=self.job_threads,
            nice=self.job_nice,
            checkpoint_every_s=self.checkpoint_every_s,
            extra={"name": job.name, "job_id": job_id},
        )
        parent, child = self._ctx.Pipe(duplex=False)
        stop = self._ctx.Event()
        process = self._ctx.Process(
            target=_job_main, args=(spec.to_dict(), child, stop), name=f"charnn-job-{job_id[:8]}"
        )
        process.start()
        child.close()
        now = time.time()
        job = (
            self.store.update_job(
                job_id, status="running", started_at=job.started_at or now, error=None
            )
            or job
        )
        self._running[job_id] = _Running(job, process, parent, stop)
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
            record_progress(self.store, job_id, m)
            self._emit(job_id, m)
        elif kind == "succeeded":
            model = store_model(self.store, r.job.name, job_id, m)
            r.finished = True
            self._finish(job_id, "succeeded", model_id=model.id)
        elif kind == "failed":
            r.finished = True
            self._finish(job_id, "failed", error=m.get("error"))
        elif kind == "stopped":
            r.finished = True
            if r.cancelled:
                self._finish(job_id, "cancelled")
            else:  # the server is stopping: resume on the next start
                self.store.update_job(job_id, status="queued")

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
        try:
            self._finish(job_id, "failed", error=error)
        except Exception:
            log.exception("could not mark job %s failed", job_id)

    def _finish(self, job_id: str, status: str, **fields: Any) -> None:
        self.store.update_job(job_id, status=status, finished_at=time.time(), **fields)
        self._emit(job_id, {"type": "status", "status": status, **fields})

    def _emit(self, job_id: str, message: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(job_id, message)
            except Exception:  # a subscriber's problem must not stop supervision
                log.exception("event subscriber failed")
