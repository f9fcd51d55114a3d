"""Typing sessions (WebSocket ``/sessions``) for the Python client: ``Client.session()``
and ``AsyncClient.session()``.

Each operation sends one message and reads its answer (the server answers in order),
so a method returns the distribution after the text it leaves. A refused operation
(unknown characters, ``back`` past the start) raises :class:`~app.client.ApiError`
with the server's code and leaves the session as it was; a session the server closes
raises ApiError with ``status`` = close code - 4000 where the code mirrors an HTTP
status (4404 -> 404, 4429 -> 429, ...), else 0. The ``websockets`` package (installed
with charnn) is imported on first use.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from pydantic import ValidationError

from ..serving.schemas import SessionError, SessionNext, SessionReady
from . import ApiError

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection as AsyncConnection
    from websockets.sync.client import ClientConnection as SyncConnection


def session_url(
    http_url: str, model: str | None, top_k: int | None, temperature: float | None
) -> str:
    query = {
        k: str(v)
        for k, v in (("model", model), ("top_k", top_k), ("temperature", temperature))
        if v is not None
    }
    ws = "wss" + http_url[5:] if http_url.startswith("https") else "ws" + http_url[4:]
    return f"{ws}/sessions" + (f"?{urllib.parse.urlencode(query)}" if query else "")


def _closed(e: Exception) -> ApiError:
    rcvd = getattr(e, "rcvd", None)
    if rcvd is None:
        return ApiError(0, "transport_error", f"the session's connection was lost: {e}")
    code, reason = int(rcvd.code), str(rcvd.reason)
    status = code - 4000 if 4000 <= code < 5000 else 0
    return ApiError(status, f"closed_{code}", reason or f"the server closed the session ({code})")


def _refused(first: str | bytes | None, e: Exception) -> ApiError:
    """A session closed at its start: the error message's words, the close's status."""
    closed = _closed(e)
    if first is None:
        return closed
    try:
        _parse(first, ready=True)
    except ApiError as refused:
        return type(refused)(closed.status, refused.code, refused.message, refused.details)
    return closed


def _parse(raw: str | bytes, ready: bool = False) -> SessionNext | SessionReady:
    try:
        data = json.loads(raw)
        if data.get("type") == "error":
            err = SessionError.model_validate(data).error
            raise ApiError(0, err.code, err.message, err.details)
        return SessionReady.model_validate(data) if ready else SessionNext.model_validate(data)
    except (ValueError, AttributeError, ValidationError) as e:
        raise ApiError(0, "bad_response", f"not a session message: {e}") from e


def _op(op: str, **fields: Any) -> str:
    return json.dumps({"op": op, **{k: v for k, v in fields.items() if v is not None}})


def _transport(url: str, e: Exception) -> ApiError:
    return ApiError(0, "unreachable", f"cannot open a session at {url}: {e}")


class TypingSession:
    """A blocking typing session; use ``with client.session(...) as s``."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        self.url, self._headers, self._timeout = url, headers, timeout
        self._ws: SyncConnection | None = None
        self._stack = contextlib.ExitStack()
        self.ready: SessionReady | None = None

    def __enter__(self) -> Self:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake
        from websockets.sync.client import connect

        try:  # entered as a context manager: websockets 17.1 deprecates plain calls
            self._ws = self._stack.enter_context(
                connect(self.url, additional_headers=self._headers, open_timeout=self._timeout)
            )
        except (OSError, InvalidHandshake, TimeoutError) as e:
            raise _transport(self.url, e) from e
        first: str | bytes | None = None
        try:
            first = self._ws.recv(self._timeout)
            try:
                ready = _parse(first, ready=True)
            except ApiError as refused:  # the reason in full; the close frame has the status
                self._ws.recv(self._timeout)
                raise refused from None
        except ConnectionClosed as e:
            self._stack.close()
            raise _refused(first, e) from e
        assert isinstance(ready, SessionReady)
        self.ready = ready
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stack.close()

    def _ask(self, message: str) -> SessionNext:
        from websockets.exceptions import ConnectionClosed

        assert self._ws is not None, "use the session in a with block"
        try:
            self._ws.send(message)
            answer = _parse(self._ws.recv(self._timeout))
        except ConnectionClosed as e:
            raise _closed(e) from e
        assert isinstance(answer, SessionNext)
        return answer

    def feed(self, text: str, *, top_k: int | None = None) -> SessionNext:
        return self._ask(_op("feed", text=text, top_k=top_k))

    def back(self, n: int = 1, *, top_k: int | None = None) -> SessionNext:
        return self._ask(_op("back", n=n, top_k=top_k))

    def set(self, text: str, *, top_k: int | None = None) -> SessionNext:
        return self._ask(_op("set", text=text, top_k=top_k))

    def reset(self, *, top_k: int | None = None) -> SessionNext:
        return self._ask(_op("reset", top_k=top_k))


class AsyncTypingSession:
    """:class:`TypingSession` for asyncio; ``async with client.session(...) as s``."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        self.url, self._headers, self._timeout = url, headers, timeout
        self._ws: AsyncConnection | None = None
        self.ready: SessionReady | None = None

    async def __aenter__(self) -> Self:
        import asyncio

        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        try:
            self._ws = await connect(
                self.url, additional_headers=self._headers, open_timeout=self._timeout
            )
        except (OSError, InvalidHandshake, TimeoutError) as e:
            raise _transport(self.url, e) from e
        first: str | bytes | None = None
        try:
            first = await asyncio.wait_for(self._ws.recv(), self._timeout)
            try:
                ready = _parse(first, ready=True)
            except ApiError as refused:
                await asyncio.wait_for(self._ws.recv(), self._timeout)
                raise refused from None
        except ConnectionClosed as e:
            raise _refused(first, e) from e
        assert isinstance(ready, SessionReady)
        self.ready = ready
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def _ask(self, message: str) -> SessionNext:
        from websockets.exceptions import ConnectionClosed

        assert self._ws is not None, "use the session in an async with block"
        try:
            await self._ws.send(message)
            answer = _parse(await self._ws.recv())
        except ConnectionClosed as e:
            raise _closed(e) from e
        assert isinstance(answer, SessionNext)
        return answer

    async def feed(self, text: str, *, top_k: int | None = None) -> SessionNext:
        return await self._ask(_op("feed", text=text, top_k=top_k))

    async def back(self, n: int = 1, *, top_k: int | None = None) -> SessionNext:
        return await self._ask(_op("back", n=n, top_k=top_k))

    async def set(self, text: str, *, top_k: int | None = None) -> SessionNext:
        return await self._ask(_op("set", text=text, top_k=top_k))

    async def reset(self, *, top_k: int | None = None) -> SessionNext:
        return await self._ask(_op("reset", top_k=top_k))
