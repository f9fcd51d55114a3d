"""Response headers that keep browsers safe, and CORS refusals in the one error shape.

Every response says ``X-Content-Type-Options: nosniff`` (a JSON answer is never
sniffed into HTML) and ``Referrer-Policy: no-referrer``; every response but the
API documentation pages also carries a Content-Security-Policy that allows only
this origin's own scripts, styles and connections, and forbids framing (the demo
page ships no inline script or style, so it runs under it unchanged).
``/docs`` and ``/redoc`` (Swagger UI and ReDoc, from assets served here: see
``docs.py``) start with inline scripts that policy would block, so they get only
the framing ban.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import error_response

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_DOC_PAGES = ("/docs", "/redoc")


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        docs = path.startswith(_DOC_PAGES)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")
                if not docs:  # the doc pages set their own (app/api/docs.py)
                    headers.setdefault("Content-Security-Policy", CSP)
            await send(message)

        await self.app(scope, receive, with_headers)


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, but a refused preflight answers in the one error shape."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        what = bytes(response.body).decode("utf-8", "replace").removeprefix("Disallowed CORS ")
        allowed = "an origin in CHARNN_CORS_ORIGINS, methods GET, POST, DELETE"
        message = f"CORS preflight refused ({what} not allowed); this server allows {allowed}"
        headers = {
            k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")
        }
        return error_response(400, "cors_refused", message, headers=headers or None)
