"""Every request observed once: its id, its access-log line, its HTTP metrics.

The id is the client's ``X-Request-ID`` when it sent a sane one (1-128 characters
of letters, digits and ``-_.:/+=``), else a fresh one; it is sent back in the
answer's ``X-Request-ID``, set for the error bodies (``app/errors.py``), and
written in the access line, so a client's failed request can be found in the
server's log. Metrics are labelled by route template (``/jobs/{job_id}``), never
by raw path: a scan of random URLs cannot grow them ("unmatched").
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import REQUEST_ID
from ..metrics import HTTP_DURATION, HTTP_REQUESTS

access = logging.getLogger("charnn.access")
SANE_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
HEADER = "X-Request-ID"


def request_id(headers: Headers) -> str:
    sent = headers.get(HEADER)
    if sent is not None and SANE_ID.fullmatch(sent):
        return sent
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


class ObserveMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope))
        token = REQUEST_ID.set(rid)
        start = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            elapsed = time.perf_counter() - start
            route, method = route_of(scope), scope.get("method", "")
            HTTP_REQUESTS.labels(route, method, str(status)).inc()
            HTTP_DURATION.labels(route, method).observe(elapsed)
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
