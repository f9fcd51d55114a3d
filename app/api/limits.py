"""Request body limit that answers 413 in the one error shape, before the body is read whole.

Starlette's own ``max_body_size`` answers a plain-text 413; this one keeps the
JSON error body. A declared Content-Length over the limit is refused before a
byte is read (and one within it is not counted again: the server reads no more than
it); a chunked body is counted as it arrives and refused when it crosses the limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PayloadTooLarge, error_response


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    def _message(self) -> str:
        return f"request body over this server's limit of {self.limit} bytes (max_body_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit():
            if int(declared) > self.limit:
                response = error_response(413, PayloadTooLarge.code, self._message())
                await response(scope, receive, send)
                return
            # The server reads exactly a declared length (the rest would be the next
            # request), so nothing more arrives to count: no wrapper on the hot path.
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self._message())
            return message

        await self.app(scope, counted, send)
