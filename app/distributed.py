"""Scale-out plumbing: the Celery app, job events over Redis, and ``CeleryRunner``.

With ``CHARNN_BROKER_URL`` and ``CHARNN_DATABASE_URL`` set, API replicas keep
no job state of their own: jobs live in PostgreSQL (``app.store_pg``), run on
``charnn worker`` processes (``app.tasks``) anywhere, and every message a job
sends is published on one Redis pub/sub channel. Each API replica subscribes
to it and feeds its ``EventHub``, so ``GET /jobs/{id}/events`` works on any
replica whichever worker runs the job.

Pub/sub is fire-and-forget: a replica that is disconnected from Redis misses
the events of that moment. The store stays the truth (``GET /jobs/{id}``); the
events only make progress visible sooner.

A job the broker refuses (Redis unreachable) is deleted again and the request
answered 503 (``StoreUnavailable``): nothing is stored that no worker would ever
run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import redis

from .runner import OnEvent
from .settings import Settings
from .store import JobRecord, JobStatus, ModelRecord, Store, StoreUnavailable

if TYPE_CHECKING:
    from .store_pg import NewModel

log = logging.getLogger("charnn.distributed")

TRAIN_TASK = "charnn.train"
TASK_QUEUE = "charnn"
_PING_TIMEOUT_S = 0.5
_ALIVE_CACHE_S = 1.0  # /readyz may be polled often; one ping per second is plenty


class SharedStore(Store, Protocol):
    """A store that machines share (``app.store_pg.PostgresStore``): the files live in
    it too, and it arbitrates which worker owns a running job."""

    def read_corpus(self, job_id: str) -> str | None: ...
    def read_state(self, job_id: str) -> bytes | None: ...
    def write_state(self, job_id: str, data: bytes, *, worker: str | None = None) -> bool: ...
    def claim_job(self, job_id: str, worker: str, stale_after_s: float) -> JobRecord | None: ...
    def heartbeat(self, job_id: str, worker: str) -> tuple[bool, bool]: ...
    def request_cancel(self, job_id: str) -> JobRecord | None: ...
    def requeue_stale(self, stale_after_s: float) -> list[str]: ...
    def finish_owned(
        self,
        job_id: str,
        worker: str,
        status: JobStatus,
        *,
        error: str | None = None,
        model: NewModel | None = None,
    ) -> ModelRecord | bool | None: ...
    def hand_back(self, job_id: str, worker: str, state: bytes | None) -> bool: ...
    def discard_job(self, job_id: str) -> bool: ...
    def count_queued(self) -> int: ...


def events_channel(settings: Settings) -> str:
    """The pub/sub channel of one deployment: named after its database.

    Redis pub/sub ignores the database number of the URL, so two deployments (or
    two test runs) sharing a Redis server would otherwise hear each other's jobs.
    """
    assert settings.database_url is not None
    name = urlsplit(settings.database_url).path.lstrip("/") or "default"
    return f"charnn:events:{name}"


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


class EventPublisher:
    """Publishes ``{"job_id", "message"}`` JSON on the deployment's channel."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.channel = channel
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30
        )

    def publish(self, job_id: str, message: dict[str, Any]) -> None:
        """Best effort: a lost event costs a late progress bar, never the job."""
        payload = json.dumps({"job_id": job_id, "message": message}, allow_nan=False)
        try:
            self._redis.publish(self.channel, payload)
        except (redis.RedisError, OSError):
            log.warning("could not publish an event of job %s", job_id, exc_info=True)

    def close(self) -> None:
        self._redis.close()


class EventSubscriber:
    """A daemon thread that hands every event on the channel to ``on_event``.

    It reconnects after a Redis failure (once a second), so a restarted Redis
    costs the events of that moment, not the replica's event stream.
    """

    def __init__(self, redis_url: str, channel: str, on_event: OnEvent) -> None:
        self.redis_url = redis_url
        self.channel = channel
        self.on_event = on_event
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, wait_s: float = 5.0) -> None:
        """Start, and wait (briefly) until subscribed so early events are not missed."""
        self._thread = threading.Thread(target=self._run, name="charnn-events", daemon=True)
        self._thread.start()
        self._subscribed.wait(wait_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(
                self.redis_url, socket_connect_timeout=5, health_check_interval=30
            )
            pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self._subscribed.set()
                while not self._stop.is_set():
                    raw = pubsub.get_message(timeout=1.0)
                    if raw is not None and raw.get("type") == "message":
                        self._dispatch(raw["data"])
            except (redis.RedisError, OSError):
                log.warning("job events: lost the connection to Redis; reconnecting", exc_info=True)
                self._stop.wait(1.0)
            finally:
                pubsub.close()
                client.close()

    def _dispatch(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            job_id, message = event["job_id"], event["message"]
            if not isinstance(job_id, str) or not isinstance(message, dict):
                raise TypeError("job_id must be a string and message an object")
        except (ValueError, KeyError, TypeError):
            log.warning("job events: ignored a malformed event %.200r", data)
            return
        try:
            self.on_event(job_id, message)
        except Exception:  # a subscriber's problem must not end the stream for everyone
            log.exception("event subscriber failed")


class CeleryRunner:
    """The runner interface of the routes, for jobs that Celery workers run.

    There is no local queue: ``submit`` sends a ``charnn.train`` message, the
    queue length is the number of ``queued`` rows in the shared store (so the
    429 limit holds across replicas), and ``cancel`` marks the row; the worker
    running the job sees the mark at its next heartbeat and stops between steps.
    """

    def __init__(
        self, store: SharedStore, settings: Settings, on_event: OnEvent | None = None
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

    def queued(self) -> int:
        return self.store.count_queued()

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

    def cancel(self, job_id: str) -> bool:
        """True if the job was queued (now ``cancelled``) or running (it will be)."""
        job = self.store.request_cancel(job_id)
        if job is None or job.status not in ("queued", "running", "cancelled"):
            return False
        if job.status == "cancelled":  # it never started: no worker will say so
            message: dict[str, Any] = {"type": "status", "status": "cancelled"}
            self._publisher.publish(job_id, message)
        return True
