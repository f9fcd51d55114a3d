"""A lean HTTP/1.1 load generator for the serving benches: open or closed loop, on loopback.

Open loop (``rate``): requests are sent at fixed arrival times whatever the server
does, and each latency counts from the time the request was *due*, not sent, so a
stalled server shows up in the percentiles instead of slowing the load down (a
closed loop of N clients measures its own queue: coordinated omission). Closed
loop (``clients``): N connections, each sends its next request when the last
answer arrived; it measures throughput. Raw asyncio streams with pre-encoded
requests: a request costs the generator tens of microseconds, so on two cores the
server gets nearly one to itself.
"""

from __future__ import annotations

import asyncio
import json
import platform
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_name() -> str:
    """The CPU's model name, for the header every bench prints (figures name their CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def post(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class Outcome:
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0  # non-2xx answers and broken connections
    elapsed_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + self.errors

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    def ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        return float(np.quantile(np.array(self.latencies_s), q) * 1e3)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_s, default=float("nan")) * 1e3


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


async def _connect(host: str, port: int) -> _Conn:
    return _Conn(*await asyncio.open_connection(host, port))


async def closed_loop(
    host: str, port: int, requests: Callable[[int], bytes], clients: int, seconds: float
) -> Outcome:
    """``clients`` connections, each sending ``requests(i)`` for i = its next number."""
    counter = iter(range(1 << 62))
    return await closed_loop_sessions(
        host, port, lambda c, k: requests(next(counter)), clients, seconds
    )


async def closed_loop_sessions(
    host: str, port: int, requests: Callable[[int, int], bytes], clients: int, seconds: float
) -> Outcome:
    """``clients`` connections, client c sending ``requests(c, k)`` for k = 0, 1, ...: each
    client is one user (a person typing sends the next keystroke after the last answer)."""
    out = Outcome()
    stop = time.perf_counter() + seconds

    async def client(c: int) -> None:
        conn = await _connect(host, port)
        k = 0
        try:
            while time.perf_counter() < stop:
                raw = requests(c, k)
                k += 1
                t0 = time.perf_counter()
                try:
                    ok = 200 <= await conn.request(raw) < 300
                except (OSError, asyncio.IncompleteReadError):
                    out.errors += 1
                    conn = await _connect(host, port)
                    continue
                if ok:
                    out.latencies_s.append(time.perf_counter() - t0)
                else:
                    out.errors += 1
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    out.elapsed_s = time.perf_counter() - start
    return out


async def open_loop(
    host: str,
    port: int,
    requests: Callable[[int], bytes],
    rate: float,
    seconds: float,
    max_connections: int = 512,
) -> Outcome:
    """Send ``requests(i)`` at times i / rate; latency from the due time to the answer."""
    out = Outcome()
    idle: list[_Conn] = []
    opened = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, due: float) -> None:
        nonlocal opened
        if idle:
            conn = idle.pop()
        elif opened < max_connections:
            opened += 1
            conn = await _connect(host, port)
        else:
            out.errors += 1  # the server is so far behind that the load cannot go on
            return
        try:
            ok = 200 <= await conn.request(requests(i)) < 300
        except (OSError, asyncio.IncompleteReadError):
            out.errors += 1
            conn.close()
            opened -= 1
            return
        if ok:
            out.latencies_s.append(time.perf_counter() - due)
        else:
            out.errors += 1
        idle.append(conn)

    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(i, due))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    out.elapsed_s = time.perf_counter() - start
    for conn in idle:
        conn.close()
    return out


def mixed(*makers: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """Requests taken in turn from several kinds: request i is of kind i mod len."""

    def make(i: int) -> bytes:
        return makers[i % len(makers)](i // len(makers))

    return make


def cycle(bodies: Sequence[bytes]) -> Callable[[int], bytes]:
    return lambda i: bodies[i % len(bodies)]


# ---------------------------------------------------------------- WebSocket sessions

WsMessage = Callable[[int, int], str]  # (session, k) -> the session's k-th message


def _answered(raw: str | bytes) -> bool:
    """An answer that is not an error (every answer is a JSON object with a ``type``)."""
    return bool(json.loads(raw).get("type") != "error")


async def ws_open(
    url: str, sessions: int, opening: Callable[[int], Sequence[str]]
) -> list[ClientConnection]:
    """``sessions`` WebSocket sessions, each past its first message (``ready``) and past
    the answers to ``opening(session)`` (its prefix, say): untimed. A refused handshake
    raises ``websockets.exceptions.InvalidStatus`` (its ``response.status_code``)."""

    async def one(s: int) -> ClientConnection:
        ws = await connect(url, proxy=None, max_queue=None)
        await ws.recv()  # ready
        for message in opening(s):
            await ws.send(message)
            if not _answered(await ws.recv()):
                raise RuntimeError(f"session {s} refused its opening message {message[:80]!r}")
        return ws

    return list(await asyncio.gather(*(one(s) for s in range(sessions))))


async def ws_close(conns: Sequence[ClientConnection]) -> None:
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


async def ws_closed_loop(
    conns: Sequence[ClientConnection], message: WsMessage, seconds: float
) -> Outcome:
    """Every session sends its next message when the last one was answered."""
    out = Outcome()
    stop = time.perf_counter() + seconds

    async def session(s: int, ws: ClientConnection) -> None:
        k = 0
        while time.perf_counter() < stop:
            raw = message(s, k)
            k += 1
            t0 = time.perf_counter()
            try:
                await ws.send(raw)
                ok = _answered(await ws.recv())
            except WebSocketException:
                out.errors += 1
                return
            if ok:
                out.latencies_s.append(time.perf_counter() - t0)
            else:
                out.errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(session(s, ws) for s, ws in enumerate(conns)))
    out.elapsed_s = time.perf_counter() - start
    return out


async def ws_open_loop(
    conns: Sequence[ClientConnection], message: WsMessage, rate: float, seconds: float
) -> Outcome:
    """Message i, due at i / rate, goes to session i mod n (its k = i // n) whatever the
    earlier ones' fate; answers come back in order, each timed from its message's due time."""
    out = Outcome()
    n = len(conns)
    pending: list[deque[float]] = [deque() for _ in conns]
    total = int(rate * seconds)
    expected = [len(range(s, total, n)) for s in range(n)]

    async def receive(s: int, ws: ClientConnection) -> None:
        for _ in range(expected[s]):
            try:
                raw = await ws.recv()
            except WebSocketException:
                out.errors += len(pending[s])
                return
            due = pending[s].popleft()
            if _answered(raw):
                out.latencies_s.append(time.perf_counter() - due)
            else:
                out.errors += 1

    receivers = [asyncio.create_task(receive(s, ws)) for s, ws in enumerate(conns)]
    start = time.perf_counter()
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        s, k = i % n, i // n
        pending[s].append(due)
        try:
            await conns[s].send(message(s, k))
        except WebSocketException:
            pending[s].pop()
            out.errors += 1
    await asyncio.gather(*receivers)
    out.elapsed_s = time.perf_counter() - start
    return out
