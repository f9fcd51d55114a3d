"""A small pool of PostgreSQL connections that survives fork (psycopg_pool is not a dependency).

Celery's prefork workers fork after the store is built: a child must never use,
nor close, a connection it inherited (closing sends Terminate on the parent's
socket), so the pool notices the new pid and starts afresh.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row

from .base import StoreError, StoreUnavailable

Conn = psycopg.Connection[DictRow]
_CLOSED = "the PostgreSQL store is closed"


class Pool:
    """A few reusable connections, at most ``size`` in use at once (psycopg_pool is not a
    dependency). Connections are autocommit: single reads need no BEGIN/COMMIT round
    trips, and writes open explicit transactions (``conn.transaction()``)."""

    def __init__(self, conninfo: str, kwargs: dict[str, Any], size: int) -> None:
        self._conninfo, self._kwargs, self._size = conninfo, kwargs, size
        self._reset()
        self._closed = False
        # Connections inherited through fork() are never closed by the child: closing
        # would send Terminate on the parent's socket. They are kept alive, unused.
        self._inherited: list[Conn] = []

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._size)
        self._idle: list[Conn] = []

    def _connect(self) -> Conn:
        return psycopg.connect(
            self._conninfo, autocommit=True, row_factory=dict_row, **self._kwargs
        )

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        if self._pid != os.getpid():
            self._inherited.extend(self._idle)
            self._reset()
        if self._closed:
            raise StoreError(_CLOSED)
        if not self._slots.acquire(timeout=60):
            raise StoreUnavailable("no database connection became free within 60 s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = self._connect()
            try:
                yield conn
            finally:
                self._release(conn)
        finally:
            self._slots.release()

    def _release(self, conn: Conn) -> None:
        if not conn.closed and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                conn.rollback()
            except psycopg.Error:
                conn.close()
        if conn.closed or conn.broken:
            conn.close()
            return
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def discard_idle(self) -> None:
        """Close the idle connections: after one broke (a server restart, a failover),
        the others are most likely dead too."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.discard_idle()
