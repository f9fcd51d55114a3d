"""app.client sends a request once more when its kept-alive connection was already dead.

The server is a few lines of raw HTTP/1.1 on a loopback socket, because the failure is
the transport's: on each connection it answers the first request and keeps the connection
alive; when the next request arrives on that connection it reads it and closes the
connection without answering, as a server does whose keep-alive timeout ends just as the
client reuses the connection. Nothing here waits for time to pass.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import BaseModel

from app.client import ApiError, AsyncClient, Client
from app.jobs.schemas import JobList, JobOut, MetricPointOut, MetricsOut
from app.serving.schemas import GenerateOut, ModelList, ModelOut, NextChar, PredictOut, ScoreOut

from .test_client import job_record

T = TypeVar("T")


@dataclass(frozen=True)
class Answer:
    """A whole HTTP/1.1 response, sized by ``content-length`` so the connection stays open."""

    body: bytes = b""
    status: str = "200 OK"
    content_type: str = "application/json"

    def encode(self) -> bytes:
        head = [f"HTTP/1.1 {self.status}"]
        if not self.status.startswith("204"):
            head += [f"content-type: {self.content_type}", f"content-length: {len(self.body)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


def as_json(value: BaseModel | dict[str, Any]) -> Answer:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return Answer(json.dumps(data).encode())


def as_events(*events: tuple[str, BaseModel | dict[str, Any]]) -> Answer:
    body = ""
    for name, value in events:
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        body += f"event: {name}\ndata: {json.dumps(data)}\n\n"
    return Answer(body.encode(), content_type="text/event-stream")


NOT_FOUND = Answer(b'{"error": {"code": "not_found", "message": "no route"}}', "404 Not Found")


@dataclass(frozen=True)
class Seen:
    connection: int  # 0 for the first connection accepted, 1 for the next...
    method: str
    path: str


class DroppingServer:
    """Answers the first request on each connection; closes it, unanswered, on the next.

    ``reset``: close with a TCP reset instead of a FIN, so that the client reads
    ECONNRESET (``httpx.ReadError``) rather than an end of stream
    (``httpx.RemoteProtocolError``). ``answered``: how many connections get their first
    request answered; later ones are closed, unanswered, as soon as a request arrives.
    """

    def __init__(
        self, answers: dict[tuple[str, str], Answer], *, reset: bool, answered: int | None = None
    ) -> None:
        self.answers = answers
        self.reset = reset
        self.answered = answered
        self.seen: list[Seen] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # how soon the accept loop sees ``stop``
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stopping = threading.Event()
        self._handlers: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        with self._lock:
            index = self.connections
            self.connections += 1
        handler = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
        self._handlers.append(handler)
        handler.start()

    def stop(self) -> None:
        """Stop, counting every connection made, even one still in the listen backlog."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._accepter.join()
        self._listener.setblocking(False)
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                break
            self._start(conn)
        self._listener.close()
        for handler in self._handlers:
            handler.join()

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(10)  # only so that a broken test cannot hang
        try:
            with conn, conn.makefile("rb") as stream:
                if (first := self._read(stream, index)) is None:
                    return
                if self.answered is None or index < self.answered:
                    conn.sendall(self.answers.get(first, NOT_FOUND).encode())
                    if self._read(stream, index) is None:
                        return  # the client closed it
                if self.reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:  # the client went away
            pass

    def _read(self, stream: Any, index: int) -> tuple[str, str] | None:
        """One whole request (line, headers, body), so that closing after it is a clean FIN."""
        line: bytes = stream.readline()
        if not line:
            return None
        method, target, _ = line.decode().split(" ", 2)
        length = 0
        while (header := stream.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        stream.read(length)
        path = target.split("?")[0]
        with self._lock:
            self.seen.append(Seen(index, method, path))
        return method, path


MODEL = ModelOut(
    id="m1",
    name="abcd",
    created_at=0.0,
    job_id="j1",
    vocab=list("abcd"),
    vocab_size=4,
    hidden_size=16,
    hyperparameters={},
    train_loss=1.0,
    val_loss=None,
    metrics={},
    param_count=100,
    size_bytes=1000,
    dtype="float32",
)
JOB = JobOut.model_validate(job_record("running"))
GENERATED = GenerateOut(model="m1", text="cd", finish_reason="length")
ANSWERS = {
    ("GET", "/healthz"): as_json({"status": "ok"}),
    ("GET", "/readyz"): as_json({"status": "ready"}),
    ("GET", "/jobs"): as_json(JobList(items=[JOB], total=1, limit=50, offset=0)),
    ("GET", "/jobs/j1"): as_json(JOB),
    ("GET", "/jobs/j1/metrics"): as_json(
        MetricsOut(
            job_id="j1", points=[MetricPointOut(step=1, elapsed_s=0.1, train_loss=1, val_loss=None)]
        )
    ),
    ("POST", "/predict"): as_json(
        PredictOut(model="m1", text="ab", next=[NextChar(char="c", prob=1.0)], entropy_bits=0)
    ),
    ("POST", "/generate"): as_json(GENERATED),
    ("POST", "/score"): as_json(
        ScoreOut(
            model="m1", chars=1, logprobs=[-0.5], mean_nats=0.5, bits_per_char=0.7, perplexity=1.6
        )
    ),
    ("GET", "/models"): as_json(ModelList(items=[MODEL], total=1, limit=50, offset=0)),
    ("GET", "/models/m1"): as_json(MODEL),
    ("DELETE", "/models/m1"): Answer(status="204 No Content"),
    ("GET", "/models/m1/checkpoint"): Answer(b"PK\x03\x04", content_type="application/zip"),
    ("POST", "/jobs"): as_json(JobOut.model_validate(job_record("queued"))),
    ("POST", "/jobs/j1/cancel"): as_json(JobOut.model_validate(job_record("cancelled"))),
    ("POST", "/models"): as_json(MODEL),
    ("GET", "/jobs/j1/events"): as_events(("status", JOB)),
}
# For the streamed generate: the same path as the plain one, so it has a server of its own.
STREAM_ANSWERS = {
    **ANSWERS,
    ("POST", "/generate"): as_events(("chunk", {"text": "cd"}), ("done", GENERATED)),
}


async def collect(items: AsyncIterator[T]) -> list[T]:
    return [item async for item in items]


@dataclass(frozen=True)
class Case:
    """One client method, blocking and awaited, and the request it sends.

    ``before``: the call that leaves the kept-alive connection behind, when the case's own
    does not (a ``stream_generate`` left at its ``done`` event closes its connection).
    """

    method: str
    path: str
    sync: Callable[[Client], object]
    async_: Callable[[AsyncClient], Awaitable[object]]
    before: Case | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


async def _train_id(c: AsyncClient) -> str:
    return (await c.train("abcd" * 300)).id


HEALTH = Case("GET", "/healthz", lambda c: c.health(), lambda c: c.health())
SAFE = [
    HEALTH,
    Case("GET", "/readyz", lambda c: c.health(ready=True), lambda c: c.health(ready=True)),
    Case("GET", "/jobs", lambda c: c.jobs(), lambda c: c.jobs()),
    Case("GET", "/jobs/j1", lambda c: c.job("j1").refresh(), lambda c: c.job("j1").refresh()),
    Case(
        "GET", "/jobs/j1/metrics", lambda c: c.job("j1").metrics(), lambda c: c.job("j1").metrics()
    ),
    Case("POST", "/predict", lambda c: c.predict("ab"), lambda c: c.predict("ab")),
    Case(
        "POST", "/generate", lambda c: c.generate("ab", seed=1), lambda c: c.generate("ab", seed=1)
    ),
    Case("POST", "/score", lambda c: c.score("a"), lambda c: c.score("a")),
    Case("GET", "/models", lambda c: c.models(), lambda c: c.models()),
    Case("GET", "/models/m1", lambda c: c.model("m1"), lambda c: c.model("m1")),
    Case("DELETE", "/models/m1", lambda c: c.delete_model("m1"), lambda c: c.delete_model("m1")),
    Case("GET", "/models/m1/checkpoint", lambda c: c.download("m1"), lambda c: c.download("m1")),
    # with its Idempotency-Key, resent: the server answers the first attempt's job
    Case("POST", "/jobs", lambda c: c.train("abcd" * 300).id, lambda c: _train_id(c)),
]
NOT_SAFE = [
    Case("POST", "/jobs/j1/cancel", lambda c: c.job("j1").cancel(), lambda c: c.job("j1").cancel()),
    Case("POST", "/models", lambda c: c.upload(b"PK\x03\x04"), lambda c: c.upload(b"PK\x03\x04")),
    # streams: Job.wait reconnects by itself; a started stream_generate must not start again
    Case(
        "GET",
        "/jobs/j1/events",
        lambda c: list(c.job("j1").events()),
        lambda c: collect(c.job("j1").events()),
    ),
    Case(
        "POST",
        "/generate",
        lambda c: list(c.stream_generate("ab")),
        lambda c: collect(c.stream_generate("ab")),
        before=HEALTH,
    ),
]


@pytest.fixture
def dropping() -> Iterator[Callable[..., DroppingServer]]:
    servers: list[DroppingServer] = []

    def start(answers: dict[tuple[str, str], Answer], **kwargs: Any) -> DroppingServer:
        servers.append(DroppingServer(answers, **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def twice(case: Case, url: str, asynchronous: bool) -> tuple[object, object | ApiError]:
    """``case`` (or its ``before``) then ``case`` on one client: the first answer, and the
    second or its error."""
    before = case.before or case
    if not asynchronous:
        with Client(url) as c:
            first = before.sync(c)
            try:
                return first, case.sync(c)
            except ApiError as e:
                return first, e

    async def go() -> tuple[object, object | ApiError]:
        async with AsyncClient(url) as c:
            first = await before.async_(c)
            try:
                return first, await case.async_(c)
            except ApiError as e:
                return first, e

    return asyncio.run(go())


CLIENTS = pytest.mark.parametrize("asynchronous", [False, True], ids=["Client", "AsyncClient"])
CLOSES = pytest.mark.parametrize("reset", [False, True], ids=["fin", "reset"])


@CLIENTS
@CLOSES
@pytest.mark.parametrize("case", SAFE, ids=str)
def test_a_safe_request_on_a_dead_connection_is_sent_again_on_a_new_one(
    dropping: Callable[..., DroppingServer], case: Case, reset: bool, asynchronous: bool
) -> None:
    server = dropping(ANSWERS, reset=reset)
    first, second = twice(case, server.url, asynchronous)
    assert not isinstance(second, ApiError) and second == first
    request = (case.method, case.path)
    assert server.seen == [Seen(0, *request), Seen(0, *request), Seen(1, *request)]
    server.stop()
    assert server.connections == 2


@CLIENTS
@CLOSES
@pytest.mark.parametrize("case", NOT_SAFE, ids=str)
def test_a_request_that_changes_state_or_streams_is_not_sent_again(
    dropping: Callable[..., DroppingServer], case: Case, reset: bool, asynchronous: bool
) -> None:
    server = dropping(STREAM_ANSWERS if case.path == "/generate" else ANSWERS, reset=reset)
    _, second = twice(case, server.url, asynchronous)
    assert isinstance(second, ApiError)
    assert (second.status, second.code) == (0, "transport_error")
    before = case.before or case
    assert server.seen == [Seen(0, before.method, before.path), Seen(0, case.method, case.path)]
    server.stop()
    assert server.connections == 1  # the request was not repeated


@CLIENTS
@CLOSES
def test_a_repeat_that_fails_too_is_the_error(
    dropping: Callable[..., DroppingServer], reset: bool, asynchronous: bool
) -> None:
    """The new connection drops the request as well: one more try, and that failure shows."""
    server = dropping(ANSWERS, reset=reset, answered=1)
    _, second = twice(HEALTH, server.url, asynchronous)
    assert isinstance(second, ApiError)
    assert (second.status, second.code) == (0, "transport_error")
    assert second.message.startswith(f"lost the connection to {server.url}: ")
    kind = httpx.ReadError if reset else httpx.RemoteProtocolError
    assert isinstance(second.__cause__, kind)  # the second failure...
    chain: list[BaseException] = []
    link: BaseException | None = second
    while link is not None:
        chain.append(link)
        link = link.__context__
    assert sum(isinstance(link, kind) for link in chain) == 2  # ... and the first, chained
    assert server.seen == [Seen(0, "GET", "/healthz")] * 2 + [Seen(1, "GET", "/healthz")]
    server.stop()
    assert server.connections == 2  # one repeat only


@CLIENTS
@pytest.mark.parametrize(
    ("error", "sends", "code"),
    [
        (httpx.RemoteProtocolError, 2, "transport_error"),
        (httpx.ReadError, 2, "transport_error"),
        (httpx.WriteError, 2, "transport_error"),
        (httpx.ConnectError, 1, "unreachable"),
        (httpx.ConnectTimeout, 1, "timeout"),
        (httpx.ReadTimeout, 1, "timeout"),
        (httpx.WriteTimeout, 1, "timeout"),
        (httpx.PoolTimeout, 1, "timeout"),
        (httpx.LocalProtocolError, 1, "transport_error"),
    ],
)
def test_only_a_dead_connection_is_a_reason_to_send_again(
    error: type[httpx.TransportError], sends: int, code: str, asynchronous: bool
) -> None:
    """A timeout or a refused connection is a server that is slow or not there: said at once."""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        raise error("boom", request=request)

    if asynchronous:

        async def go() -> None:
            transport = httpx.MockTransport(handler)
            async with AsyncClient("http://x.test", transport=transport) as c:
                with pytest.raises(ApiError) as e:
                    await c.predict("ab")
            assert (e.value.status, e.value.code) == (0, code)

        asyncio.run(go())
    else:
        with Client("http://x.test", transport=httpx.MockTransport(handler)) as c:
            with pytest.raises(ApiError) as e:
                c.predict("ab")
        assert (e.value.status, e.value.code) == (0, code)
    assert sent == ["/predict"] * sends


@CLIENTS
@pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError])
def test_train_is_sent_again_after_a_timeout_with_the_same_key(
    error: type[httpx.TransportError], asynchronous: bool
) -> None:
    """A submit whose answer did not come may have stored the job: the repeat carries the
    same Idempotency-Key, so the server answers that job rather than start a second."""
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        if len(keys) == 1:
            raise error("boom", request=request)
        return httpx.Response(202, json=job_record("queued"))

    transport = httpx.MockTransport(handler)
    if asynchronous:

        async def go() -> str:
            async with AsyncClient("http://x.test", transport=transport) as c:
                return (await c.train("abcd" * 300)).id

        job_id = asyncio.run(go())
    else:
        with Client("http://x.test", transport=transport) as c:
            job_id = c.train("abcd" * 300).id
    assert job_id == "j1"
    assert len(keys) == 2 and keys[0] is not None and keys[0] == keys[1]
    with Client("http://x.test", transport=transport) as c:
        keys.clear()
        c.train("abcd" * 300, idempotency_key="mine")
    assert keys == ["mine", "mine"]
