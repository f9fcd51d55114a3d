"""Fan-out of job events from the runner's thread to subscribers on the event loop.

Every message a job sends (``app/jobs/lifecycle.py`` announces them) reaches the
``EventHub`` of each API process: directly from the embedded runner's thread,
over Redis pub/sub in scale-out (``app/jobs/fanout.py``), or, under ``charnn
serve --workers N``, as datagrams from the process that runs the jobs to those
following them (``app/jobs/role.py``). The event stream of ``GET
/jobs/{id}/events`` reads a subscription.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# What a subscriber's queue yields last when the server shuts down: every open event
# stream ends at once, so a stopping server never waits for a client to hang up.
CLOSING: dict[str, Any] = {"type": "closing"}
Subscription = asyncio.Queue[dict[str, Any]]


class EventHub:
    """``publish`` is thread-safe; each subscriber gets its own bounded queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 1000) -> None:
        self.loop = loop
        self.max_pending = max_pending
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()
        self._closed = False
        # Told of a job's first subscriber (a process that does not run the jobs asks the
        # one that does for the job's events); called on the loop, so it must be quick.
        self.on_subscribe: Callable[[str], None] | None = None

    def subscribe(self, job_id: str) -> Subscription:
        """A queue of the job's events (``CLOSING`` first if the hub is closed)."""
        q: Subscription = asyncio.Queue(self.max_pending + 1)  # room for CLOSING
        with self._lock:
            first = job_id not in self._subs
            self._subs[job_id].add(q)
            if self._closed:
                q.put_nowait(CLOSING)
        if first and self.on_subscribe is not None:
            self.on_subscribe(job_id)
        return q

    def followed(self) -> list[str]:
        """The jobs someone is subscribed to now; thread-safe."""
        with self._lock:
            return list(self._subs)

    def close(self) -> None:
        """End every subscription (the server is shutting down); thread-safe."""
        with self._lock:
            self._closed = True
            queues = [q for subs in self._subs.values() for q in subs]
        for q in queues:
            self.loop.call_soon_threadsafe(self._offer, q, CLOSING)

    def unsubscribe(self, job_id: str, q: Subscription) -> None:
        with self._lock:
            self._subs[job_id].discard(q)
            if not self._subs[job_id]:
                del self._subs[job_id]

    def publish(self, job_id: str, message: dict[str, Any]) -> None:
        with self._lock:
            queues = list(self._subs.get(job_id, ()))
        for q in queues:
            self.loop.call_soon_threadsafe(self._offer, q, message)

    @staticmethod
    def _offer(q: Subscription, message: dict[str, Any]) -> None:
        if q.full():  # a slow reader loses old progress, never the final status
            q.get_nowait()
        q.put_nowait(message)
