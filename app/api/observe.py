"""Every request observed once: its id, its access-log line, its HTTP metrics, its headers.

The id is the client's ``X-Request-ID`` when it sent a sane one (1-128 characters
of letters, digits and ``-_.:/+=``), else a fresh one; it is sent back in the
answer's ``X-Request-ID``, set for the error bodies (``app/errors.py``), and
written in the access line, so a client's failed request can be found in the
server's log. Metrics are labelled by route template (``/jobs/{job_id}``), never
by raw path: a scan of random URLs cannot grow them ("unmatched").

The same pass over each answer's headers adds the ones ``headers(path)`` names
(the security headers of ``security.py``), each unless the app set it already:
one ``send`` wrapper per request instead of one per concern, on the hot path of
every /predict. WebSocket and lifespan scopes pass through untouched (a
WebSocket answer has no response headers to add).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence

from prometheus_client.metrics import Counter, Histogram
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import REQUEST_ID
from ..metrics import HTTP_DURATION, HTTP_REQUESTS

access = logging.getLogger("charnn.access")
SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
HEADER = "X-Request-ID"
_RAW_HEADER = HEADER.lower().encode("latin-1")
RawHeaders = Sequence[tuple[bytes, bytes]]
# Each (route, method, status)'s metric children, looked up once: ``labels()`` costs more
# than the increment. As bounded as the metrics' own label sets (route templates).
_CHILDREN: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def request_id(headers: RawHeaders) -> str:
    """The client's sane ``X-Request-ID`` (the first one sent), else a fresh id."""
    for name, value in headers:
        if name == _RAW_HEADER:
            sent = value.decode("latin-1")
            if SANE_ID.fullmatch(sent):
                return sent
            break
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The route template the router matched (FastAPI leaves it in the scope)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    if scope.get("path", "").startswith("/docs-assets/"):
        return "/docs-assets"
    return "unmatched"


def answer_headers(headers: RawHeaders, rid: bytes, extra: RawHeaders) -> list[tuple[bytes, bytes]]:
    """The answer's headers plus each of ``extra`` it lacks, then its request id (set, as
    ``MutableHeaders`` would: in that order, the bytes on the wire are as they were)."""
    out = list(headers)
    present = {name.lower() for name, _ in out}
    out += [(name, value) for name, value in extra if name not in present]
    if _RAW_HEADER in present:  # set by the app: replaced, as MutableHeaders[...] = does
        MutableHeaders(raw=out)[HEADER] = rid.decode("latin-1")
    else:
        out.append((_RAW_HEADER, rid))
    return out


def _count(route: str, method: str, status: int, elapsed: float) -> None:
    children = _CHILDREN.get((route, method, status))
    if children is None:
        children = _CHILDREN[route, method, status] = (
            HTTP_REQUESTS.labels(route, method, str(status)),
            HTTP_DURATION.labels(route, method),
        )
    children[0].inc()
    children[1].observe(elapsed)


class ObserveMiddleware:
    def __init__(
        self, app: ASGIApp, headers: Callable[[str], RawHeaders] = lambda path: ()
    ) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope["headers"])
        token = REQUEST_ID.set(rid)
        start = time.perf_counter()
        status = 500  # if the app fails before it answers
        raw_id, extra = rid.encode("latin-1"), self.headers(scope.get("path", ""))

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = answer_headers(message.get("headers", ()), raw_id, extra)
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            REQUEST_ID.reset(token)
            elapsed = time.perf_counter() - start
            route, method = route_of(scope), scope.get("method", "")
            _count(route, method, status, elapsed)
            if access.isEnabledFor(logging.INFO):  # off (log level warning): nothing to build
                client = scope.get("client")
                access.info(
                    '%s "%s %s" %d %.1f ms id=%s',
                    client[0] if client else "-",
                    method,
                    scope.get("path", ""),
                    status,
                    1000 * elapsed,
                    rid,
                    extra={
                        "request_id": rid,
                        "method": method,
                        "route": route,
                        "path": scope.get("path", ""),
                        "status": status,
                        "duration_ms": round(1000 * elapsed, 3),
                        "client": client[0] if client else None,
                    },
                )
