"""Job events between machines: published on one Redis pub/sub channel, fed to every
API replica's ``EventHub``.

With scale-out, a job runs on a Celery worker anywhere while its event stream is
read on any API replica: every message a job sends is published on the
deployment's channel, and each replica's subscriber thread hands it to its hub.
Pub/sub is fire-and-forget: a replica disconnected from Redis misses the events
of that moment. The store stays the truth (``GET /jobs/{id}``; an idle event
stream re-reads the job at each keep-alive); the events only make progress
visible sooner.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

import redis

from ..settings import Settings
from .lifecycle import Announce

log = logging.getLogger("charnn.jobs")


def events_channel(settings: Settings) -> str:
    """The pub/sub channel of one deployment: named after its database.

    Redis pub/sub ignores the database number of the URL, so two deployments (or
    two test runs) sharing a Redis server would otherwise hear each other's jobs.
    """
    assert settings.database_url is not None
    name = urlsplit(settings.database_url).path.lstrip("/") or "default"
    return f"charnn:events:{name}"


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

    def __init__(self, redis_url: str, channel: str, on_event: Announce) -> None:
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
            pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
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
