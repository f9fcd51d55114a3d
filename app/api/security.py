"""Response headers that keep browsers safe, and CORS refusals in the one error shape.

Every response says ``X-Content-Type-Options: nosniff`` (a JSON answer is never
sniffed into HTML) and ``Referrer-Policy: no-referrer``; every response but the
API documentation pages also carries a Content-Security-Policy that allows only
this origin's own scripts, styles and connections, and forbids framing (the demo
page ships no inline script or style, so it runs under it unchanged). It allows
``'wasm-unsafe-eval'``: charnn.js compiles its WebAssembly SIMD kernel from bytes
(that keyword lets a page compile WebAssembly, not evaluate JavaScript strings).
``/docs`` and ``/redoc`` (Swagger UI and ReDoc, from assets served here: see
``docs.py``) start with inline scripts that policy would block, so they get only
the framing ban (and their own policy, which ``docs.py`` sets). A header the app
set already is left as it is.

``security_headers(path)`` names them; ``ObserveMiddleware`` (``observe.py``) adds
them in its one pass over each answer's headers, beside the request id
(``app/main.py`` wires it): a middleware of its own here cost a second ``send``
wrapper on every request.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from ..errors import error_response

CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
    "img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_DOC_PAGES = ("/docs", "/redoc")


_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
_WITH_CSP = (*_ALWAYS, (b"content-security-policy", CSP.encode("latin-1")))


def security_headers(path: str) -> tuple[tuple[bytes, bytes], ...]:
    """The headers an answer to ``path`` carries (raw, in the order they are added)."""
    return _ALWAYS if path.startswith(_DOC_PAGES) else _WITH_CSP


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
