"""Scale-out, the API side: the Celery app's configuration and ``CeleryRunner``.

With ``CHARNN_BROKER_URL`` and ``CHARNN_DATABASE_URL`` set, API replicas keep
no job state of their own: jobs live in PostgreSQL (``app/store/postgres.py``),
run on ``charnn worker`` processes (``tasks.py``) anywhere, and their events
reach every replica over Redis (``fanout.py``). A job the broker refuses (Redis
unreachable) is deleted again and the request answered 503
(``StoreUnavailable``): nothing is stored that no worker would ever run.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from ..settings import Settings
from ..store.base import SharedStore, StoreUnavailable
from .fanout import EventPublisher, EventSubscriber, events_channel
from .lifecycle import Announce

log = logging.getLogger("charnn.jobs")

TRAIN_TASK = "charnn.train"
TASK_QUEUE = "charnn"
_PING_TIMEOUT_S = 0.5
_ALIVE_CACHE_S = 1.0  # /readyz may be polled often; one ping per second is plenty


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for both ends (API replicas send, workers consume).

    Late acknowledgement + reject on worker loss: a message is only gone once
    its job ended, so a worker that dies mid-job leaves it to be delivered again
    (after ``visibility_timeout_s``; the heartbeat reaper in app/tasks.py is the
    faster path). Prefetch 1: a busy worker does not hoard queued jobs that an
    idle one could start.
    """
    return {
        "broker_url": settings.broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": TASK_QUEUE,
        "task_serializer": "json",  # job ids only; never pickles
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


def make_celery(settings: Settings, *, main: str = "charnn") -> Any:
    """A Celery app for these settings (``Any``: celery ships no type information)."""
    from celery import Celery  # type: ignore[import-untyped]

    app = Celery(main)
    app.conf.update(celery_config(settings))
    return app


class CeleryRunner:
    """The runner interface of the routes, for jobs that Celery workers run.

    There is no local queue: ``submit`` sends a ``charnn.train`` message, the
    queue length is the number of ``queued`` rows in the shared store (so the
    429 limit holds across replicas), and ``cancel`` marks the row; the worker
    running the job sees the mark at its next heartbeat and stops between steps.
    """

    def __init__(
        self, store: SharedStore, settings: Settings, on_event: Announce | None = None
    ) -> None:
        assert settings.broker_url is not None and settings.database_url is not None
        self.store = store
        self.settings = settings
        self.on_event = on_event
        self.channel = events_channel(settings)
        self._celery = make_celery(settings, main="charnn-api")
        self._publisher = EventPublisher(settings.broker_url, self.channel)
        self._subscriber = (
            EventSubscriber(settings.broker_url, self.channel, on_event) if on_event else None
        )
        self._ping = redis.Redis.from_url(
            settings.broker_url,
            socket_timeout=_PING_TIMEOUT_S,
            socket_connect_timeout=_PING_TIMEOUT_S,
        )
        self._alive_at = -1.0
        self._alive = False

    def start(self) -> None:
        if self._subscriber is not None:
            self._subscriber.start()

    def begin_stop(self) -> None:
        """Nothing to ask of anyone: workers own the running jobs, not this replica (a
        worker's own shutdown hands its job back)."""

    def stop(self) -> None:
        if self._subscriber is not None:
            self._subscriber.stop()
        self._publisher.close()
        self._ping.close()

    def alive(self) -> bool:
        """The broker answers (cached for a second) and the event subscriber runs."""
        if self._subscriber is not None and not self._subscriber.alive():
            return False
        now = time.monotonic()
        if now - self._alive_at > _ALIVE_CACHE_S:
            try:
                self._alive = bool(self._ping.ping())
            except (redis.RedisError, OSError):
                self._alive = False
            self._alive_at = now
        return self._alive

    def submit(self, job_id: str) -> None:
        """Send the stored job to the workers. When the broker refuses, the job is
        deleted again (no message: no worker would ever run it, and a ``failed`` row
        would tell of a job the client was refused) and ``StoreUnavailable`` raised, so
        the request is a 503 with nothing stored."""
        try:
            self._celery.send_task(TRAIN_TASK, args=[job_id])
        except Exception:
            log.warning("job %s: the broker refused it", job_id, exc_info=True)
            try:
                self.store.discard_job(job_id)
            except Exception:  # the database is down too: the row stays queued, unsent
                log.error("job %s: could not delete it after the broker refused it", job_id)
            raise StoreUnavailable(
                "the job queue (broker) is unreachable; nothing was stored"
            ) from None

    def pause(self, job_id: str) -> bool:
        """True if the job was queued (now ``paused``) or running (its worker sees the
        request at its next heartbeat, checkpoints at that step and pauses it)."""
        if not self.store.request_pause(job_id):
            return False
        job = self.store.get_job(job_id)
        if job is not None and job.status == "paused":  # it never started: nobody says so
            self._publisher.publish(job_id, {"type": "status", "status": "paused"})
        return True

    def resume(self, job_id: str) -> None:
        """Send the resumed (now ``queued``) job to the workers: any of them continues it
        from its checkpoint in the database. A broker that refuses leaves it paused."""
        try:
            self._celery.send_task(TRAIN_TASK, args=[job_id])
        except Exception:
            log.warning("job %s: the broker refused its resume", job_id, exc_info=True)
            try:
                self.store.pause_job(job_id)
            except Exception:
                log.error("job %s: could not pause it again after the broker refused", job_id)
            raise StoreUnavailable(
                "the job queue (broker) is unreachable; the job stays paused"
            ) from None

    def cancel(self, job_id: str) -> bool:
        """True if the job was queued (now ``cancelled``) or running (it will be)."""
        job = self.store.request_cancel(job_id)
        if job is None or job.status not in ("queued", "running", "cancelled"):
            return False
        if job.status == "cancelled":  # it never started: no worker will say so
            message: dict[str, Any] = {"type": "status", "status": "cancelled"}
            self._publisher.publish(job_id, message)
        return True
