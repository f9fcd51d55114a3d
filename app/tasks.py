"""The Celery side of scale-out: the ``charnn.train`` task and the heartbeat reaper.

Start workers with ``charnn worker`` (or ``celery -A app.tasks worker``); they
read the same ``CHARNN_*`` settings as the API and need both URLs.

Delivery is at-least-once, so the task is idempotent: it first *claims* the job
in the shared store (``queued``, or ``running`` with a heartbeat older than
``dead_after_s``). A duplicate delivery, a redelivery of a finished job or of
a job another worker is running claims nothing and returns. Training resumes
from the job's last checkpoint in the store, so a second run continues rather
than restarts. Every write that decides something is conditional on still
owning the job: the outcome and the model are stored by ``finish_owned`` (one
transaction that checks the owner), checkpoints and hand-backs name the worker,
and progress only moves forwards. A worker that lost its job can therefore never
store a second model or overwrite its successor's work; the trained model is
validated as an upload is (``app.model_meta``) before it is stored.

Two ways a dead worker's job comes back: the broker redelivers the unacked
message after ``visibility_timeout_s`` (an hour by default, plus kombu's
restore scan), and, much sooner, the reaper that every worker's main process
runs re-queues running jobs whose heartbeat is older than ``dead_after_s`` and
sends them again. The visibility timeout stays long because a job that runs
longer than it is delivered twice (harmless, but a wasted claim). The reaper
also empties the corpus and state of jobs finished longer than
``job_files_retention_s`` ago, as the embedded runner does.

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
from typing import TYPE_CHECKING, Any

from threadpoolctl import threadpool_limits

from model.checkpoint import state_from_bytes
from model.errors import CheckpointError

from .distributed import TRAIN_TASK, EventPublisher, SharedStore, events_channel, make_celery
from .runner import PURGE_EVERY_S, job_model, record_progress
from .settings import Settings, get_settings
from .store import JobRecord, JobStatus, ModelRecord, StoreError
from .worker import JobSpec, run_job

if TYPE_CHECKING:
    from .store_pg import NewModel

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
# How often a running job's pool process checks that its main process is alive.
_PARENT_CHECK_S = 0.2
# How many times an outcome the store refused is tried (``heartbeat_s`` apart).
_FINISH_TRIES = 5
# The main process of a prefork pool process, remembered when the pool process starts
# (``worker_process_init``); None elsewhere (the main process, a solo pool, tests).
_pool_parent: int | None = None


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

    ``send`` maps the job's messages to the store as ``ProcessRunner`` does, but
    only while the job is still ours, and every write that decides something
    checks that in the store too (``finish_owned``, ``hand_back``, ``write_state``
    with the worker). A worker that lost ownership (its heartbeats stopped
    reaching the store long enough for the job to be re-queued, or its main
    process died) goes quiet and stops, leaving the job to its next owner.
    """

    def __init__(self, job_id: str, store: SharedStore, publisher: EventPublisher) -> None:
        self.job_id = job_id
        self.store = store
        self.publisher = publisher
        # Unique per execution, so two deliveries in one process are still told apart.
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.parent = _pool_parent
        self.stop = threading.Event()
        self.done = threading.Event()
        self.cancelled = False
        self.lost = False
        self.orphaned = False
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
        if self.orphaned:
            # Nobody reads this process's results or sends it work: end it. Its job is
            # re-queued by a live worker's reaper once the heartbeat is stale.
            log.warning("job %s: exiting (this pool process's worker is gone)", self.job_id)
            logging.shutdown()
            os._exit(70)

    def _prepare(self, job: JobRecord, tmp: Path) -> JobSpec | None:
        """The job's files in a private directory; None if the job cannot start."""
        corpus = self.store.read_corpus(self.job_id)
        if not corpus:  # '' once purged, but a purged job is finished: never claimed
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
        """Tell the store we are alive; learn about cancellation and lost ownership.

        The main process is checked more often than the store: once it is gone (this
        pool process was re-parented), not one more heartbeat may prove us alive."""
        next_beat = time.monotonic() + settings.heartbeat_s
        while not self.done.wait(min(settings.heartbeat_s, _PARENT_CHECK_S)):
            if self.parent is not None and os.getppid() != self.parent:
                log.warning(
                    "job %s: the worker's main process died; stopping without writing "
                    "more (a live worker re-queues the job)",
                    self.job_id,
                )
                self.orphaned = self.lost = True
                self.stop.set()
                return
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + settings.heartbeat_s
            try:
                ours, cancel = self.store.heartbeat(self.job_id, self.worker)
            except Exception:  # a database blip: keep training; the reaper judges staleness
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)
                continue
            if cancel and not self.cancelled:
                log.info("job %s: cancellation requested", self.job_id)
                self.cancelled = True
                self.stop.set()
            if not ours:
                self._lose("re-queued: missed heartbeats")

    def _lose(self, why: str) -> None:
        if not self.lost:
            log.warning("job %s: no longer ours (%s); writing nothing more", self.job_id, why)
        self.lost = True
        self.stop.set()

    def _send(self, m: dict[str, Any]) -> None:
        if self.lost:
            return
        kind = m.get("type")
        if kind == "progress":
            try:
                recorded = record_progress(self.store, self.job_id, m)
            except StoreError as e:  # the point is lost, not the job
                log.warning(
                    "job %s: progress at step %s not recorded: %s", self.job_id, m["step"], e
                )
                recorded = False
            if recorded:  # a resumed job replays steps: subscribers never see it go back
                self._publish(m)
        elif kind == "checkpoint":
            try:
                data = self.state_file.read_bytes()
                if not self.store.write_state(self.job_id, data, worker=self.worker):
                    self._lose("its checkpoint was refused")
            except StoreError as e:  # the previous checkpoint stays; the next one may work
                log.warning(
                    "job %s: checkpoint at step %s not stored: %s", self.job_id, m["step"], e
                )
        elif kind == "succeeded":
            self._succeed(m)
        elif kind == "failed":
            self._finish("failed", error=m.get("error"))
        elif kind == "stopped":
            if self.cancelled:
                self._finish("cancelled")
            else:  # the worker is shutting down: hand the job back
                self._hand_back()

    def _succeed(self, m: dict[str, Any]) -> None:
        from .store_pg import NewModel

        assert self.job is not None
        try:
            data, valid = job_model(m, settings.model_limits)
        except CheckpointError as e:
            self._finish("failed", error=f"the trained model is not valid: {e}")
            return
        model = NewModel(
            self.job.name,
            data,
            valid.hyperparameters,
            valid.metrics,
            valid.vocab,
            valid.param_count,
            valid.dtype,
        )
        self._finish("succeeded", model=model)

    def _hand_back(self) -> None:
        try:
            handed = self.store.hand_back(self.job_id, self.worker, self.state_file.read_bytes())
        except StoreError as e:  # still running in the store: the reaper re-queues it
            log.warning("job %s: could not hand it back: %s", self.job_id, e)
            return
        if handed:
            self.done.set()
            celery_app.send_task(TRAIN_TASK, args=[self.job_id])
        else:
            self._lose("not running here any more when handed back")

    def _finish(
        self, status: JobStatus, *, error: str | None = None, model: NewModel | None = None
    ) -> None:
        """Record the outcome if the job is still ours (``finish_owned``), then announce it.

        A refusal of the store is retried a few times (heartbeats go on meanwhile);
        a retry after a commit that did happen writes nothing, so it never stores a
        model twice. If the store stays down the job is left running: once its
        heartbeat is stale it is re-queued and resumes from its checkpoint.
        """
        if self.lost:
            return
        for attempt in range(1, _FINISH_TRIES + 1):
            try:
                outcome = self.store.finish_owned(
                    self.job_id, self.worker, status, error=error, model=model
                )
                break
            except StoreError as e:
                log.warning(
                    "job %s: could not record %s (try %d): %s", self.job_id, status, attempt, e
                )
                if attempt == _FINISH_TRIES:
                    self._lose(f"its outcome ({status}) could not be recorded")
                    return
                time.sleep(settings.heartbeat_s)
        self.done.set()  # ended here: no more heartbeats (nor a false "no longer ours")
        if outcome is None or outcome is False:
            self._lose("not running here any more when it ended")
            return
        fields: dict[str, Any] = {}
        if isinstance(outcome, ModelRecord):
            fields["model_id"] = outcome.id
        if error is not None:
            fields["error"] = error
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
        self._purge_at = 0.0

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
            try:
                self.purge_if_due()
            except Exception:
                log.warning("reaper: could not remove old job files", exc_info=True)

    def _shared(self) -> SharedStore:
        if self._store is None:
            from .store_pg import PostgresStore

            assert settings.database_url is not None
            self._store = PostgresStore(settings.database_url)
        return self._store

    def purge_if_due(self) -> list[str]:
        """Every ``PURGE_EVERY_S``: empty the corpus and state of jobs that finished more
        than ``job_files_retention_s`` ago (rows and metrics stay). Any number of
        workers may do it at once: a purged row is not written again."""
        now = time.monotonic()
        if now < self._purge_at:
            return []
        self._purge_at = now + PURGE_EVERY_S
        purged = self._shared().purge_job_files(time.time() - settings.job_files_retention_s)
        if purged:
            log.info("removed the corpus and state of %d finished job(s)", len(purged))
        return purged

    def reap_once(self) -> list[str]:
        job_ids = self._shared().requeue_stale(settings.dead_after_s)
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
    global _pool_parent
    _pool_parent = os.getppid()  # the main process: watched while a job runs
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
