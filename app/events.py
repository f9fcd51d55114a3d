"""Fan-out of job events from the runner's thread to SSE subscribers on the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from typing import Any


class EventHub:
    """``publish`` is thread-safe; each subscriber gets its own bounded queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_pending: int = 1000) -> None:
        self.loop = loop
        self.max_pending = max_pending
        self._subs: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self._lock = threading.Lock()

    def subscribe(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.max_pending)
        with self._lock:
            self._subs[job_id].add(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue[dict[str, Any]]) -> None:
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
    def _offer(q: asyncio.Queue[dict[str, Any]], message: dict[str, Any]) -> None:
        if q.full():  # a slow reader loses old progress, never the final status
            q.get_nowait()
        q.put_nowait(message)


def sse_event(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One Server-Sent Event; an ``id`` lets a browser resume with Last-Event-ID."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"
