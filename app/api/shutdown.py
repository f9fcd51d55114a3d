"""Knowing at once that the server was told to stop, so a shutdown always finishes.

uvicorn answers SIGTERM/SIGINT by closing its listeners and then *waiting for
every open connection to close* before it runs the lifespan's shutdown. An SSE
client following a job never closes its connection, and the job only stopped
in the lifespan's shutdown: the server never exited. So the lifespan chains a
handler in front of the server's own for both signals: it ends every event
stream and asks every job to checkpoint at once (on the event loop, not inside
the signal handler), then lets the server's handler do the rest.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("charnn.shutdown")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownWatch:
    """Runs ``on_shutdown`` on ``loop`` the first time SIGTERM or SIGINT arrives."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_shutdown: Callable[[], None]) -> None:
        self.loop = loop
        self.on_shutdown = on_shutdown
        self._previous: dict[int, Any] = {}
        self._fired = False

    def install(self) -> None:
        """Chain in front of the current handlers (only possible in the main thread; a
        handler that is not a Python function, e.g. SIG_DFL, is left alone)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if callable(previous):
                self._previous[sig] = previous
                signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, previous)
        self._previous.clear()

    def fire(self) -> None:
        """Run ``on_shutdown`` now (once), from the loop's thread."""
        if not self._fired:
            self._fired = True
            try:
                self.on_shutdown()
            except Exception:
                log.exception("shutting down")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.loop.call_soon_threadsafe(self.fire)
        previous = self._previous.get(signum)
        if previous is not None:
            previous(signum, frame)
