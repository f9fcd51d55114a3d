"""``VersionListener``: a counter kept current by PostgreSQL LISTEN/NOTIFY, read from memory.

Why: the model cache checks ``models_version`` before every prediction; as a
query that is one database round trip per request, on the event loop. Every
transaction that bumps the counter also sends ``pg_notify(channel, version)``,
which PostgreSQL delivers to listeners at COMMIT (never for a change that rolled
back), so a daemon thread holding one LISTEN connection can keep the highest
version it has heard and callers read it for free.

Trusted only while *fresh*: connected, and heard from (a notification, or the
table re-read by its idle ping every ``ping_s``) within ``alive_s``. Otherwise the
caller reads the table itself, so a listener that died, hung or was never started
makes reads slower, not stale (one whose connection died silently, with no error,
is trusted for at most ``alive_s``). On every (re)connect it LISTENs first and reads
the table second, so a change committed between the two is never missed; then it
is fresh again. Reconnects back off from ``retry_s`` to ``max_retry_s``.

What it cannot promise: a change committed by *another* process is seen once its
notification arrives (on loopback well under a millisecond, not synchronously at
that process's COMMIT). Changes this process commits are seen at once (the store
calls :meth:`observe` after its own COMMIT). The version only grows, whoever
reports it.

Fork: a child never uses the connection or thread it inherited (the thread does
not exist there, and closing the connection would end the parent's session); it
is not fresh until it starts its own listener.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

log = logging.getLogger("charnn.store")

Conn = psycopg.Connection[Any]

PING_S = 1.0  # an idle listener re-reads the table this often: proof it is alive
ALIVE_S = 3.0  # trusted for this long after it was last heard from
JOIN_S = 15.0  # close() waits this long for the thread (a connect in progress ends first)


class VersionListener:
    """One LISTEN connection on a daemon thread, keeping the highest version heard.

    ``connect`` opens an autocommit connection; ``read`` reads the current version
    on a given connection (the table, not the cache). Thread-safe; :meth:`fresh` and
    :attr:`version` never block and never do I/O, so the event loop may call them.
    """

    def __init__(
        self,
        connect: Callable[[], Conn],
        channel: str,
        read: Callable[[Conn], int],
        *,
        ping_s: float = PING_S,
        alive_s: float = ALIVE_S,
        retry_s: float = 0.1,
        max_retry_s: float = 5.0,
    ) -> None:
        self.channel = channel
        self._connect, self._read = connect, read
        self._ping_s, self._alive_s = ping_s, alive_s
        self._retry_s, self._max_retry_s = retry_s, max_retry_s
        self._version = -1  # nothing heard yet
        self._closed = False
        self._inherited: list[Conn] = []  # from a parent process: kept open, never used
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fresh_until = 0.0
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._conn: Conn | None = None
        self.backend_pid: int | None = None  # the LISTEN session's server pid, while connected

    # -- what callers read --------------------------------------------------------

    @property
    def version(self) -> int:
        """The highest version observed (-1 before any)."""
        return self._version

    def fresh(self) -> bool:
        """Whether :attr:`version` is current: this process's listener is connected and was
        heard from within ``alive_s``."""
        return (
            time.monotonic() < self._fresh_until and self._pid == os.getpid() and not self._closed
        )

    def observe(self, version: int) -> int:
        """Record a version read or committed elsewhere; the highest seen so far."""
        with self._lock:
            if version > self._version:
                self._version = version
            return self._version

    # -- life -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread if it is not running in this process (idempotent, cheap, never
        blocks on I/O: connecting happens on the thread). No-op once closed."""
        if self._pid != os.getpid():  # forked: the thread is the parent's
            if self._conn is not None:
                self._inherited.append(self._conn)
            self._reset()
        with self._lock:
            if self._thread is not None or self._closed:
                return
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wake = (r, w)
            self._thread = threading.Thread(
                target=self._run, name=f"charnn-listen-{self.channel}", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and close its connection; idempotent. Waits for the thread (at
        most ``JOIN_S``: a connect to an unreachable server ends at its own timeout, then
        the thread closes what it opened)."""
        with self._lock:
            self._closed = True
            self._fresh_until = 0.0
            if self._pid != os.getpid():
                return  # the parent's thread: not ours to stop
            thread = self._thread
            self._stop.set()
            if self._wake is not None:  # the thread closes the pipe, under this lock
                try:
                    os.write(self._wake[1], b"x")
                except OSError:  # full: it was woken already
                    pass
        if thread is not None:
            thread.join(JOIN_S)
            if thread.is_alive():
                log.warning("PostgreSQL store: the models listener is still connecting")

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._lock:
                wake, self._wake = self._wake, None
            if wake is not None:
                for fd in wake:
                    os.close(fd)

    def _loop(self) -> None:
        delay = self._retry_s
        down = False  # an outage is logged once, and its end once
        while not self._stop.is_set():
            conn: Conn | None = None
            try:
                conn = self._connect()
                with self._lock:
                    if self._stop.is_set():
                        break
                    self._conn, self.backend_pid = conn, conn.info.backend_pid
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                self._heard(self._read(conn))  # after LISTEN: nothing slips between
                delay = self._retry_s
                if down:
                    log.info("PostgreSQL store: the models listener is back")
                    down = False
                self._serve(conn)
            except Exception as exc:  # psycopg.Error, or a bug: never let the thread die
                if not down:
                    log.warning(
                        "PostgreSQL store: the models listener is not connected; the models "
                        "version is read from the table until it is back (%s: %s)",
                        type(exc).__name__,
                        str(exc).strip(),
                    )
                    down = True
            finally:
                self._fresh_until = 0.0
                with self._lock:
                    self._conn, self.backend_pid = None, None
                if conn is not None:
                    conn.close()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self._max_retry_s)

    def _serve(self, conn: Conn) -> None:
        """Wait for notifications; ping when idle. Returns when stopped; raises when the
        connection fails."""
        assert self._wake is not None
        with selectors.DefaultSelector() as sel:
            sel.register(conn.fileno(), selectors.EVENT_READ)
            sel.register(self._wake[0], selectors.EVENT_READ)
            while not self._stop.is_set():
                ready = sel.select(self._ping_s)
                if self._stop.is_set():
                    return
                if not ready:
                    self._heard(self._read(conn))  # idle: prove the session is alive
                    continue
                for notify in conn.notifies(timeout=0):
                    try:
                        version = int(notify.payload)
                    except ValueError:  # not charnn's: read the truth instead
                        version = self._read(conn)
                    self._heard(version)

    def _heard(self, version: int) -> None:
        self.observe(version)
        self._fresh_until = time.monotonic() + self._alive_s
