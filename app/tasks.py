"""The Celery side of scale-out: the ``charnn.train`` task and the heartbeat reaper.

Start workers with ``charnn worker`` (or ``celery -A app.tasks worker``); they
read the same ``CHARNN_*`` settings as the API and need both URLs.

Delivery is at-least-once, so the task is idempotent: it first *claims* the job
in the shared store (``queued``, or ``running`` with a heartbeat older than
``dead_after_s``). A duplicate delivery, a redelivery of a finished job or of
a job another worker is running claims nothing and returns. Training resumes
from the job's last checkpoint in the store, so a second run continues rather
than restarts.

Two ways a dead worker's job comes back: the broker redelivers the unacked
message after ``visibility_timeout_s`` (an hour by default, plus kombu's
restore scan), and, much sooner, the reaper that every worker's main process
runs re-queues running jobs whose heartbeat is older than ``dead_after_s`` and
sends them again. The visibility timeout stays long because a job that runs
longer than it is delivered twice (harmless, but a wasted claim).

A warm shutdown (SIGTERM to the worker, ``docker stop``) asks each pool process
to stop its job between steps: the job saves its checkpoint, goes back to
``queued`` and is sent again, so the worker exits within a few seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from model.checkpoint import state_from_bytes

from .distributed import TRAIN_TASK, EventPublisher, SharedStore, events_channel, make_celery
from .runner import record_progress, store_model
from .settings import Settings, get_settings
from .store import JobRecord
from .worker import JobSpec, run_job

log = logging.getLogger("charnn.tasks")


def _settings() -> Settings:
    settings = get_settings()
    if not settings.distributed:
        raise RuntimeError(
            "charnn workers need CHARNN_BROKER_URL and CHARNN_DATABASE_URL (the Redis broker "
            "and the shared PostgreSQL store)"
        )
    return settings


settings = _settings()
celery_app = make_celery(settings)


class _ProcessResources:
    """One store and one publisher per process: connections must not cross a fork."""

    def __init__(self) -> None:
        self._pid = -1
        self._store: SharedStore | None = None
        self._publisher: EventPublisher | None = None
        self._lock = threading.Lock()

    def get(self) -> tuple[SharedStore, EventPublisher]:
        with self._lock:
            if self._pid != os.getpid() or self._store is None or self._publisher is None:
                from .store_pg import PostgresStore

                assert settings.database_url is not None and settings.broker_url is not None
                self._store = PostgresStore(settings.database_url)
                self._publisher = EventPublisher(settings.broker_url, events_channel(settings))
                self._pid = os.getpid()
            return self._store, self._publisher


_resources = _ProcessResources()


class _Execution:
    """One delivery of one job: claim, run with heartbeats, record the outcome.

    ``send`` maps the job's messages to the store exactly as ``ProcessRunner``
    does, but only while the job is still ours: a worker that lost ownership
    (its heartbeats stopped reaching the store long enough for the job to be
    re-queued) goes quiet and stops, leaving the job to its new owner.
    """

    def __init__(self, job_id: str, store: SharedStore, publisher: EventPublisher) -> None:
        self.job_id = job_id
        self.store = store
        self.publisher = publisher
        # Unique per execution, so two deliveries in one process are still told apart.
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self.done = threading.Event()
        self.cancelled = False
        self.lost = False
        self.job: JobRecord | None = None
        self.state_file = Path()

    def run(self) -> None:
        job = self.store.claim_job(self.job_id, self.worker, settings.dead_after_s)
        if job is None:  # finished, cancelled, or running elsewhere: a duplicate delivery
            log.info("job %s: nothing to do (not queued, or owned by a live worker)", self.job_id)
            return
        self.job = job
        self._publish({"type": "status", "status": "running"})
        beat = threading.Thread(target=self._heartbeat, name="charnn-heartbeat", daemon=True)
        beat.start()
        try:
            with tempfile.TemporaryDirectory(prefix="charnn-job-") as tmp:
                spec = self._prepare(job, Path(tmp))
                if spec is not None:
                    # One BLAS thread per job: a worker's cores are its concurrency.
                    with threadpool_limits(1):
                        run_job(spec, self._send, self._should_stop)
        except Exception as exc:  # a bug or an I/O failure: fail the job, tell no traceback
            log.exception("job %s crashed", self.job_id)
            name = type(exc).__name__
            self._finish("failed", error=f"internal error in the training worker ({name})")
        finally:
            self.done.set()
            beat.join()

    def _prepare(self, job: JobRecord, tmp: Path) -> JobSpec | None:
        """The job's files in a private directory; None if the job cannot start."""
        corpus = self.store.read_corpus(self.job_id)
        if corpus is None:
            self._finish("failed", error="the job's corpus is missing from the store")
            return None
        (tmp / "corpus.txt").write_bytes(corpus.encode("utf-8"))
        self.state_file = tmp / "state.npz"
        state = self.store.read_state(self.job_id)
        if state is not None:
            self.state_file.write_bytes(state)
            step = state_from_bytes(state).step
            log.info("job %s: claimed by %s, resuming from step %d", self.job_id, self.worker, step)
        else:
            log.info("job %s: claimed by %s, starting", self.job_id, self.worker)
        init_path = None
        if job.init_from:
            model = self.store.resolve_model(job.init_from)
            data = self.store.read_model_bytes(model.id) if model is not None else None
            if data is None:
                self._finish("failed", error=f"model {job.init_from!r} no longer exists")
                return None
            init_path = tmp / "init.npz"
            init_path.write_bytes(data)
        return JobSpec(
            job_id=self.job_id,
            corpus_path=str(tmp / "corpus.txt"),
            state_path=str(self.state_file),
            model_path=str(tmp / "model.npz"),
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            init_model_path=str(init_path) if init_path else None,
            threads=1,
            nice=0,  # a worker process is reused: its niceness is set once (worker_process_init)
            checkpoint_every_s=settings.checkpoint_every_s,
            extra={"name": job.name, "job_id": self.job_id},
        )

    def _should_stop(self) -> bool:
        return self.stop.is_set() or _handing_back.is_set()

    def _heartbeat(self) -> None:
        """Tell the store we are alive; learn about cancellation and lost ownership."""
        while not self.done.wait(settings.heartbeat_s):
            try:
                ours, cancel = self.store.heartbeat(self.job_id, self.worker)
            except Exception:  # a database blip: keep training; the reaper judges staleness
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                continue
            if cancel and not self.cancelled:
                log.info("job %s: cancellation requested", self.job_id)
                self.cancelled = True
                self.stop.set()
            if not ours and not self.lost:
                log.warning("job %s: no longer ours (re-queued: missed heartbeats)", self.job_id)
                self.lost = True
                self.stop.set()

    def _still_ours(self) -> bool:
        if not self.lost:
            try:
                ours, cancel = self.store.heartbeat(self.job_id, self.worker)
            except Exception:
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                return True  # cannot tell; the store's claim is the arbiter next time
            self.lost = not ours
            self.cancelled = self.cancelled or cancel
        return not self.lost

    def _send(self, m: dict[str, Any]) -> None:
        if self.lost:
            return
        assert self.job is not None
        kind = m.get("type")
        if kind == "progress":
            record_progress(self.store, self.job_id, m)
            self._publish(m)
        elif kind == "checkpoint":
            self.store.write_state(self.job_id, self.state_file.read_bytes())
        elif kind == "succeeded":
            if not self._still_ours():  # narrows, not closes, the window for a duplicate model
                return
            model = store_model(self.store, self.job.name, self.job_id, m)
            self._finish("succeeded", model_id=model.id)
        elif kind == "failed":
            self._finish("failed", error=m.get("error"))
        elif kind == "stopped":
            if self.cancelled:
                self._finish("cancelled")
            elif self._still_ours():  # the worker is shutting down: hand the job back
                self.store.write_state(self.job_id, self.state_file.read_bytes())
                self.store.update_job(self.job_id, status="queued")
                celery_app.send_task(TRAIN_TASK, args=[self.job_id])

    def _finish(self, status: str, **fields: Any) -> None:
        if self.lost:
            return
        self.store.update_job(self.job_id, status=status, finished_at=time.time(), **fields)
        self._publish({"type": "status", "status": status, **fields})

    def _publish(self, message: dict[str, Any]) -> None:
        self.publisher.publish(self.job_id, message)


def train(job_id: str) -> None:
    """Run one training job to its end (or until cancelled or no longer ours)."""
    store, publisher = _resources.get()
    _Execution(job_id, store, publisher).run()


# Registered without the decorator syntax: celery is untyped, and a decorated
# function would lose its own type.
train_task = celery_app.task(name=TRAIN_TASK)(train)


class Reaper:
    """Re-queues running jobs whose worker stopped sending heartbeats, and sends them again.

    Runs in every worker's main process (which never trains, so it keeps
    beating while its children work); the store hands each stale job to one
    reaper only. A SIGKILLed machine's job thus resumes after about
    ``dead_after_s``, not after the broker's visibility timeout.
    """

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="charnn-reaper", daemon=True)
        self._store: SharedStore | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(settings.heartbeat_s):
            try:
                self.reap_once()
            except Exception:
                log.warning("reaper: could not check for dead workers", exc_info=True)

    def reap_once(self) -> list[str]:
        if self._store is None:
            from .store_pg import PostgresStore

            assert settings.database_url is not None
            self._store = PostgresStore(settings.database_url)
        job_ids = self._store.requeue_stale(settings.dead_after_s)
        for job_id in job_ids:
            log.warning("job %s: its worker stopped sending heartbeats; re-queued", job_id)
            celery_app.send_task(TRAIN_TASK, args=[job_id])
        return job_ids


_reaper: Reaper | None = None
# Set in a pool process when its worker shuts down (SIGTERM, `docker stop`): the
# running job checkpoints, goes back to ``queued`` and is sent again, instead of
# holding the shutdown until it ends or being killed after the grace period.
_handing_back = threading.Event()
HAND_BACK_SIGNAL = signal.SIGUSR2  # SIGUSR1 is billiard's soft time limit


def _on_worker_ready(**_: Any) -> None:
    global _reaper
    _reaper = Reaper()
    _reaper.start()


def _on_worker_shutdown(**_: Any) -> None:
    if _reaper is not None:
        _reaper.stop()


def _on_worker_shutting_down(**_: Any) -> None:
    """In the main process, at a warm shutdown: ask every pool process to hand back its job."""
    from billiard.process import active_children  # type: ignore[import-untyped]

    for child in active_children():
        try:
            os.kill(child.pid, HAND_BACK_SIGNAL)
        except OSError:
            pass  # already gone


def _on_process_init(**_: Any) -> None:
    # Training yields the CPU to anything else on the machine (e.g. an API replica).
    if settings.job_nice:
        os.nice(settings.job_nice)
    signal.signal(HAND_BACK_SIGNAL, lambda signum, frame: _handing_back.set())


def _connect_signals() -> None:
    from celery import signals  # type: ignore[import-untyped]

    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
    signals.worker_process_init.connect(_on_process_init, weak=False)


_connect_signals()
