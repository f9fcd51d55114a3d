"""The Celery side of scale-out: the ``charnn.train`` task and the heartbeat reaper.

Start workers with ``charnn worker`` (or ``celery -A app.jobs.tasks worker``);
they read the same ``CHARNN_*`` settings as the API and need both URLs. Nothing
happens at import: :func:`worker_app` builds the Celery app for given settings
(``celery -A`` gets one through the module's ``celery`` attribute, built on
first use).

Delivery is at-least-once, so the task is idempotent: it first *claims* the job
in the shared store (``queued``, or ``running`` with a heartbeat older than
``dead_after_s``). A duplicate delivery, a redelivery of a finished job or of
a job another worker is running claims nothing and returns. Training resumes
from the job's last checkpoint in the store, so a second run continues rather
than restarts. The job's messages go through the same ``Lifecycle`` as the
embedded runner's; every write that decides something names this worker
(``finish_job``, ``requeue_job``, ``write_state`` with ``worker``), so a worker
that lost its job can never store a second model or overwrite its successor's
work.

Two ways a dead worker's job comes back: the broker redelivers the unacked
message after ``visibility_timeout_s`` (an hour by default, plus kombu's
restore scan), and, much sooner, the reaper that every worker's main process
runs re-queues running jobs whose heartbeat is older than ``dead_after_s`` and
sends them again. The reaper also empties the corpus and state of jobs finished
longer than ``job_files_retention_s`` ago, as the embedded runner does.

A pool process whose main process died (SIGKILL of the main process alone)
notices that it was re-parented: it stops heart-beating at once, writes nothing
more, stops its job at the next step and exits, so the job is re-queued after
``dead_after_s`` and resumes elsewhere instead of being held by an orphan that
nobody supervises.

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

from ..settings import Settings, get_settings
from ..store.base import ModelRecord, SharedStore, StoreError
from .body import JobSpec, run_job
from .celery_runner import TRAIN_TASK, make_celery
from .fanout import EventPublisher, events_channel
from .lifecycle import Lifecycle, Outcome, Run
from .local import PURGE_EVERY_S

log = logging.getLogger("charnn.tasks")

# How often a running job's pool process checks that its main process is alive.
_PARENT_CHECK_S = 0.2
# How many times an outcome the store refused is tried (``heartbeat_s`` apart).
_FINISH_TRIES = 5
# The main process of a prefork pool process, remembered when the pool process starts
# (``worker_process_init``); None elsewhere (the main process, a solo pool, tests).
_pool_parent: int | None = None
# Set in a pool process when its worker shuts down (SIGTERM, `docker stop`): the
# running job checkpoints, goes back to ``queued`` and is sent again, instead of
# holding the shutdown until it ends or being killed after the grace period.
_handing_back = threading.Event()
HAND_BACK_SIGNAL = signal.SIGUSR2  # SIGUSR1 is billiard's soft time limit


class _Worker:
    """This process's worker configuration: the settings, the Celery app, and one store
    and one publisher per process (connections must not cross a fork)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.app: Any = None
        self._pid = -1
        self._store: SharedStore | None = None
        self._publisher: EventPublisher | None = None
        self._lock = threading.Lock()

    def configured(self) -> Settings:
        if self.settings is None:
            worker_app(get_settings())
        assert self.settings is not None
        return self.settings

    def resources(self) -> tuple[SharedStore, EventPublisher]:
        settings = self.configured()
        with self._lock:
            if self._pid != os.getpid() or self._store is None or self._publisher is None:
                from ..store.postgres import PostgresStore

                assert settings.database_url is not None and settings.broker_url is not None
                self._store = PostgresStore(settings.database_url)
                self._publisher = EventPublisher(settings.broker_url, events_channel(settings))
                self._pid = os.getpid()
            return self._store, self._publisher


_worker = _Worker()


def worker_app(settings: Settings) -> Any:
    """The Celery app of a ``charnn worker`` for these settings, with the ``charnn.train``
    task and the worker's signal handlers (the reaper, the hand-back) registered."""
    if not settings.distributed:
        raise RuntimeError(
            "charnn workers need CHARNN_BROKER_URL and CHARNN_DATABASE_URL (the Redis broker "
            "and the shared PostgreSQL store)"
        )
    if _worker.app is not None and _worker.settings == settings:
        return _worker.app
    app = make_celery(settings)
    # Registered without the decorator syntax: celery is untyped, and a decorated
    # function would lose its own type.
    app.task(name=TRAIN_TASK)(train)
    _worker.settings, _worker.app = settings, app
    _connect_signals()
    return app


def __getattr__(name: str) -> Any:
    """``celery -A app.jobs.tasks worker`` looks for ``celery`` (or ``app``)."""
    if name in ("celery", "app"):
        return worker_app(get_settings())
    raise AttributeError(name)


class _Execution:
    """One delivery of one job: claim, run with heartbeats, record the outcome.

    It is the ``Transport`` of its ``Lifecycle``: checkpoints and hand-backs go to
    the shared store under this worker's name, and an outcome the store refuses is
    tried a few times. A worker that lost ownership (its heartbeats stopped reaching
    the store long enough for the job to be re-queued, or its main process died)
    goes quiet and stops, leaving the job to its next owner.
    """

    def __init__(
        self, job_id: str, store: SharedStore, publisher: EventPublisher, settings: Settings
    ) -> None:
        self.job_id = job_id
        self.store = store
        self.settings = settings
        # Unique per execution, so two deliveries in one process are still told apart.
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.parent = _pool_parent
        self.stop = threading.Event()
        self.done = threading.Event()
        self.orphaned = False
        self.lifecycle = Lifecycle(
            store,
            settings.model_limits,
            publisher.publish,
            self,
            unstorable_model_fails=False,
        )
        self.run_: Run | None = None

    def run(self) -> None:
        job = self.store.claim_job(self.job_id, self.worker, self.settings.dead_after_s)
        if job is None:  # finished, cancelled, or running elsewhere: a duplicate delivery
            log.info("job %s: nothing to do (not queued, or owned by a live worker)", self.job_id)
            return
        beat = threading.Thread(target=self._heartbeat, name="charnn-heartbeat", daemon=True)
        try:
            with tempfile.TemporaryDirectory(prefix="charnn-job-") as tmp:
                run = self.run_ = Run(job, Path(tmp), worker=self.worker)
                self.lifecycle.started(run)
                beat.start()
                try:
                    spec = self._prepare(run)
                    if spec is not None:
                        # One BLAS thread per job: a worker's cores are its concurrency.
                        with threadpool_limits(1):
                            run_job(spec, lambda m: self.lifecycle.handle(run, m), self._stop)
                except Exception as exc:  # a bug or an I/O failure: no traceback to anyone
                    log.exception("job %s crashed", self.job_id)
                    self.lifecycle.crashed(run, exc, "worker")
        finally:
            self.done.set()
            if beat.is_alive():
                beat.join()
        if self.orphaned:
            # Nobody reads this process's results or sends it work: end it. Its job is
            # re-queued by a live worker's reaper once the heartbeat is stale.
            log.warning("job %s: exiting (this pool process's worker is gone)", self.job_id)
            logging.shutdown()
            os._exit(70)

    def _prepare(self, run: Run) -> JobSpec | None:
        """The job's files in its private folder; None if the job cannot start."""
        folder = run.folder
        corpus = self.store.read_corpus(self.job_id)
        if not corpus:  # '' once purged, but a purged job is finished: never claimed
            error = "the job's corpus is missing from the store"
            self.lifecycle.settle(run, Outcome("failed", error=error))
            return None
        (folder / "corpus.txt").write_bytes(corpus.encode("utf-8"))
        state = self.store.read_state(self.job_id)
        if state is not None:
            run.state_file.write_bytes(state)
            step = state_from_bytes(state).step
            log.info("job %s: claimed by %s, resuming from step %d", self.job_id, self.worker, step)
        else:
            log.info("job %s: claimed by %s, starting", self.job_id, self.worker)
        return self.lifecycle.spec(
            run,
            threads=1,
            nice=0,  # a worker process is reused: its niceness is set once (worker_process_init)
            checkpoint_every_s=self.settings.checkpoint_every_s,
        )

    def _stop(self) -> bool:
        return self.stop.is_set() or _handing_back.is_set()

    def _heartbeat(self) -> None:
        """Tell the store we are alive; learn about cancellation and lost ownership.

        The main process is checked more often than the store: once it is gone (this
        pool process was re-parented), not one more heartbeat may prove us alive."""
        every = self.settings.heartbeat_s
        next_beat = time.monotonic() + every
        while not self.done.wait(min(every, _PARENT_CHECK_S)):
            if self.parent is not None and os.getppid() != self.parent:
                log.warning(
                    "job %s: the worker's main process died; stopping without writing "
                    "more (a live worker re-queues the job)",
                    self.job_id,
                )
                self.orphaned = True
                self._lose(None)
                return
            run = self.run_
            if time.monotonic() < next_beat or (run is not None and run.ended):
                continue  # an ended run is not running any more: no "no longer ours"
            next_beat = time.monotonic() + every
            try:
                ours, cancel = self.store.heartbeat(self.job_id, self.worker)
            except Exception:  # a database blip: keep training; the reaper judges staleness
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                continue
            if cancel and run is not None and not run.cancelled:
                log.info("job %s: cancellation requested", self.job_id)
                run.cancelled = True
                self.stop.set()
            elif ours and run is not None and not run.pausing and self._pause_asked():
                log.info("job %s: pause requested", self.job_id)
                run.pausing = True
                self.stop.set()
            if not ours:
                self._lose("re-queued: missed heartbeats")

    def _lose(self, why: str | None) -> None:
        run = self.run_
        if run is not None:
            if not run.lost and why is not None:
                log.warning("job %s: no longer ours (%s); writing nothing more", self.job_id, why)
            run.lost = True
        self.stop.set()

    # ------------------------------------------------------------------ Transport

    def checkpoint(self, run: Run) -> None:
        try:
            data = run.state_file.read_bytes()
            if not self.store.write_state(self.job_id, data, worker=self.worker):
                self._lose("its checkpoint was refused")
        except StoreError as e:  # the previous checkpoint stays; the next one may work
            log.warning("job %s: checkpoint not stored: %s", self.job_id, e)

    def requeue(self, run: Run) -> None:
        """The worker is shutting down: hand the job back, with its latest checkpoint."""
        try:
            state = run.state_file.read_bytes() if run.state_file.exists() else None
            handed = self.store.requeue_job(self.job_id, worker=self.worker, state=state)
        except StoreError as e:  # still running in the store: the reaper re-queues it
            log.warning("job %s: could not hand it back: %s", self.job_id, e)
            return
        if handed:
            self.done.set()
            assert _worker.app is not None
            _worker.app.send_task(TRAIN_TASK, args=[self.job_id])
        else:
            self._lose("not running here any more when handed back")

    def _pause_asked(self) -> bool:
        try:
            return self.store.pause_asked(self.job_id)
        except Exception:  # a database blip: asked again at the next heartbeat
            log.warning("job %s: could not read its pause request", self.job_id, exc_info=True)
            return False

    def keep_paused(self, run: Run) -> None:
        """Paused: the checkpoint of the step it stopped at goes to the job's row with
        the ``paused`` status, in one UPDATE; any worker resumes it later."""
        try:
            state = run.state_file.read_bytes() if run.state_file.exists() else None
            paused = self.store.pause_job(self.job_id, worker=self.worker, state=state)
        except StoreError as e:  # still running in the store: the reaper re-queues it
            log.warning("job %s: could not record its pause: %s", self.job_id, e)
            return
        if paused:
            self.done.set()
            self.lifecycle.paused(run)
        else:
            self._lose("not running here any more when paused")

    def unrecorded(self, run: Run, outcome: Outcome) -> None:
        """Try again a few times (heartbeats go on meanwhile); a retry after a commit that
        did happen writes nothing. If the store stays down the job is left running: once
        its heartbeat is stale it is re-queued and resumes from its checkpoint."""
        for _ in range(_FINISH_TRIES - 1):
            time.sleep(self.settings.heartbeat_s)
            if self.lifecycle.finish(run, outcome) is None:
                self.done.set()
                return
        self._lose(f"its outcome ({outcome.status}) could not be recorded")

    def base_model(self, run: Run, model: ModelRecord) -> Path | None:
        """Copied from the store into the job's private folder."""
        data = self.store.read_model_bytes(model.id)
        if data is None:
            return None
        path = run.folder / "init.npz"
        path.write_bytes(data)
        return path


def train(job_id: str) -> None:
    """Run one training job to its end (or until cancelled or no longer ours)."""
    store, publisher = _worker.resources()
    _Execution(job_id, store, publisher, _worker.configured()).run()


class Reaper:
    """Re-queues running jobs whose worker stopped sending heartbeats, and sends them again.

    Runs in every worker's main process (which never trains, so it keeps
    beating while its children work); the store hands each stale job to one
    reaper only. A SIGKILLed machine's job thus resumes after about
    ``dead_after_s``, not after the broker's visibility timeout.
    """

    def __init__(self, settings: Settings, app: Any) -> None:
        self.settings = settings
        self.app = app
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="charnn-reaper", daemon=True)
        self._store: SharedStore | None = None
        self._purge_at = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_s):
            try:
                self.reap_once()
            except Exception:
                log.warning("reaper: could not check for dead workers", exc_info=True)
            try:
                self.purge_if_due()
            except Exception:
                log.warning("reaper: could not remove old job files", exc_info=True)

    def _shared(self) -> SharedStore:
        if self._store is None:
            from ..store.postgres import PostgresStore

            assert self.settings.database_url is not None
            self._store = PostgresStore(self.settings.database_url)
        return self._store

    def purge_if_due(self) -> list[str]:
        """Every ``PURGE_EVERY_S``: empty the corpus and state of jobs that finished more
        than ``job_files_retention_s`` ago (rows and metrics stay). Any number of
        workers may do it at once: a purged row is not written again."""
        now = time.monotonic()
        if now < self._purge_at:
            return []
        self._purge_at = now + PURGE_EVERY_S
        cutoff = time.time() - self.settings.job_files_retention_s
        purged = self._shared().purge_job_files(cutoff)
        if purged:
            log.info("removed the corpus and state of %d finished job(s)", len(purged))
        return purged

    def reap_once(self) -> list[str]:
        job_ids = self._shared().requeue_stale(self.settings.dead_after_s)
        for job_id in job_ids:
            log.warning("job %s: its worker stopped sending heartbeats; re-queued", job_id)
            self.app.send_task(TRAIN_TASK, args=[job_id])
        return job_ids


_reaper: Reaper | None = None
_signals_connected = False


def _on_worker_ready(**_: Any) -> None:
    global _reaper
    _reaper = Reaper(_worker.configured(), _worker.app)
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
    global _pool_parent
    _pool_parent = os.getppid()  # the main process: watched while a job runs
    # Training yields the CPU to anything else on the machine (e.g. an API replica).
    nice = _worker.configured().job_nice
    if nice:
        os.nice(nice)
    signal.signal(HAND_BACK_SIGNAL, lambda signum, frame: _handing_back.set())


def _connect_signals() -> None:
    global _signals_connected
    if _signals_connected:
        return
    from celery import signals  # type: ignore[import-untyped]

    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.worker_shutting_down.connect(_on_worker_shutting_down, weak=False)
    signals.worker_process_init.connect(_on_process_init, weak=False)
    _signals_connected = True
