"""Typing sessions over WebSocket: ``/sessions``, the server keeping each client's state.

A client opens ``ws://host/sessions?model=&top_k=&temperature=``, gets a
``ready`` message, then sends operations (``feed``, ``back``, ``set``,
``reset``) as JSON text messages and gets one ``next`` message per operation, in
order; a refused operation gets an ``error`` message and changes nothing. The
model math is ``app/serving/sessions.py``; this module is the connection: the
open-time checks, the count and idle limits, and the close codes, which mirror
HTTP statuses (4000 + status) so a browser, which cannot read a refused
handshake's status, still learns why:

    4403  the page's Origin is neither this server nor in CHARNN_CORS_ORIGINS
    4404  no such model (or no model yet)
    4408  idle for CHARNN_SESSION_IDLE_S
    4422  invalid query parameters
    4429  CHARNN_MAX_SESSIONS sessions are open already
    4503  the store or the model's checkpoint cannot be read
    1001  the server is shutting down
    1011  an error of the server's own (logged)

Like ``/predict``, sessions are open when CHARNN_API_KEY is set (they read,
never change, what the server stores). Unlike HTTP, a WebSocket is not protected
by CORS, so a page from another origin could open one in a visitor's browser:
the Origin header is checked against the CORS setting instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, WebSocket
from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocketDisconnect

from model.errors import UnknownCharactersError

from ..errors import SURROGATE_MESSAGE, NotFound, ServiceError, validation_details
from ..metrics import SESSION_MESSAGES, SESSIONS_CLOSED, SESSIONS_OPEN
from ..serving.schemas import (
    BackOp,
    FeedOp,
    ResetOp,
    SessionError,
    SessionErrorDetail,
    SessionNext,
    SessionOp,
    SessionOpen,
    SessionReady,
    SetOp,
)
from ..serving.sessions import Session
from ..store.base import StoreError
from .deps import AppState

log = logging.getLogger("charnn.sessions")
router = APIRouter(tags=["models"])
_OPS: TypeAdapter[FeedOp | BackOp | SetOp | ResetOp] = TypeAdapter(SessionOp)

FORBIDDEN_ORIGIN, NOT_FOUND, IDLE, INVALID, FULL, UNAVAILABLE = 4403, 4404, 4408, 4422, 4429, 4503
GOING_AWAY, INTERNAL = 1001, 1011
MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason fits in 125 bytes with its code


@dataclass(eq=False)
class _Open:
    ws: WebSocket
    last: float = field(default_factory=time.monotonic)  # the last message's arrival
    ending: str | None = None  # why the server is closing it (idle, shutdown)


class SessionRegistry:
    """The sessions open in this process: at most ``max_sessions``, none idle for longer
    than ``idle_s`` (one sweeper task while any is open: a message only stamps a time)."""

    def __init__(self, max_sessions: int, idle_s: float) -> None:
        self.max_sessions = max_sessions
        self.idle_s = idle_s
        self._open: set[_Open] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, ws: WebSocket) -> _Open | None:
        if self._closing or len(self._open) >= self.max_sessions:
            return None
        entry = _Open(ws)
        self._open.add(entry)
        SESSIONS_OPEN.set(len(self._open))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return entry

    def leave(self, entry: _Open) -> None:
        self._open.discard(entry)
        SESSIONS_OPEN.set(len(self._open))

    def close_all(self) -> None:
        """At shutdown: every session is told so and closed; none opens any more."""
        self._closing = True
        for entry in list(self._open):
            self._end(entry, "shutdown", GOING_AWAY, "the server is shutting down")

    def _end(self, entry: _Open, why: str, code: int, reason: str) -> None:
        if entry.ending is None:
            entry.ending = why
            task = asyncio.get_running_loop().create_task(_close(entry.ws, code, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        try:
            while self._open:
                await asyncio.sleep(min(1.0, self.idle_s / 4))
                now = time.monotonic()
                for entry in list(self._open):
                    if now - entry.last > self.idle_s:
                        reason = f"idle for {self.idle_s:g} s; open a new session"
                        self._end(entry, "idle", IDLE, reason)
        finally:
            self._sweeper = None


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    raw = reason.encode()[:MAX_REASON_BYTES]
    try:
        await ws.close(code, raw.decode("utf-8", "ignore"))
    except (RuntimeError, OSError, WebSocketDisconnect):
        pass  # closed already, or the client is gone


def origin_allowed(ws: WebSocket, cors_origins: list[str]) -> bool:
    """No Origin (not a browser), this server's own origin, or one CORS allows."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True
    if "*" in cors_origins or origin in cors_origins:
        return True
    host = ws.headers.get("host", "")
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


def _error(code: str, message: str, details: Any = None, id: Any = None) -> str:
    detail = SessionErrorDetail(code=code, message=message, details=details)
    return SessionError(id=id, error=detail).model_dump_json()


async def _refuse(ws: WebSocket, close_code: int, code: str, message: str) -> None:
    """The whole reason as an error message, then the close with its first words."""
    try:
        await ws.send_text(_error(code, message))
    except (RuntimeError, OSError, WebSocketDisconnect):
        return
    await _close(ws, close_code, message)


def _problem(e: ValidationError, where: str) -> tuple[str, list[dict[str, Any]]]:
    """pydantic's first problem in words ("field: what is wrong"), and all of them."""
    details = validation_details(e.errors())
    first = details[0] if details else {"loc": [], "msg": "invalid", "type": None}
    return f"{'.'.join(first['loc']) or where}: {first['msg']}", details


def _invalid(e: ValidationError) -> str:
    message, details = _problem(e, "message")
    clear = details[0]["msg"] if details else ""
    if details and details[0]["type"] == "json_invalid" and clear != SURROGATE_MESSAGE:
        message = (
            f"not JSON ({clear}): send one JSON object per message, "
            'e.g. {"op": "feed", "text": "a"}'
        )
    return _error("invalid", message, details)


async def answer(session: Session, raw: str | bytes, top_k: int | None) -> str:
    """One operation applied, and its answer; a refused one changes nothing."""
    try:
        op = _OPS.validate_json(raw)
    except ValidationError as e:
        SESSION_MESSAGES.labels("invalid").inc()
        return _invalid(e)
    try:
        if isinstance(op, FeedOp):
            await session.feed(op.text)
        elif isinstance(op, BackOp):
            await session.back(op.n)
        elif isinstance(op, SetOp):
            await session.set(op.text)
        else:
            session.reset()
    except UnknownCharactersError as e:
        SESSION_MESSAGES.labels("invalid").inc()
        return _error("unknown_characters", str(e), {"chars": e.chars}, op.id)
    except ServiceError as e:
        SESSION_MESSAGES.labels("invalid").inc()
        return _error(e.code, e.message, e.details, op.id)
    SESSION_MESSAGES.labels(op.op).inc()
    nxt, entropy = session.next(op.top_k if op.top_k is not None else top_k)
    answer = {"id": op.id, "length": len(session.text), "next": nxt, "entropy_bits": entropy}
    return SessionNext.model_validate(answer).model_dump_json()


@router.websocket("/sessions")
async def typing_session(ws: WebSocket) -> None:
    """A typing session (see the module's docstring and the README)."""
    state: AppState = ws.app.state.charnn
    settings = state.settings
    registry = state.sessions
    await ws.accept()
    if not origin_allowed(ws, settings.cors_origins):
        SESSIONS_CLOSED.labels("refused").inc()
        message = "this page's origin may not open sessions here (see CHARNN_CORS_ORIGINS)"
        return await _refuse(ws, FORBIDDEN_ORIGIN, "forbidden_origin", message)
    try:
        params = SessionOpen.model_validate(dict(ws.query_params))
    except ValidationError as e:
        SESSIONS_CLOSED.labels("refused").inc()
        return await _refuse(ws, INVALID, "invalid", _problem(e, "query")[0])
    entry = registry.admit(ws)
    if entry is None:
        SESSIONS_CLOSED.labels("full").inc()
        message = (
            f"{registry.max_sessions} sessions are open, the most this server allows; "
            "try again later"
        )
        return await _refuse(ws, FULL, "too_many_sessions", message)
    why = "client"
    try:
        try:
            loaded = await state.models.loaded(params.model)
        except NotFound as e:
            why = "refused"
            return await _refuse(ws, NOT_FOUND, e.code, e.message)
        except (ServiceError, StoreError) as e:
            why = "refused"
            message = e.message if isinstance(e, ServiceError) else "the store is unavailable"
            return await _refuse(ws, UNAVAILABLE, "unavailable", message)
        session = Session(
            loaded,
            history=settings.session_history,
            max_chars=settings.session_max_chars,
            temperature=params.temperature,
        )
        nxt, entropy = session.next(params.top_k)
        ready = SessionReady.model_validate(
            {
                "model": loaded.id,
                "vocab": list(loaded.ckpt.vocab.chars),
                "max_chars": settings.session_max_chars,
                "history": settings.session_history,
                "idle_s": settings.session_idle_s,
                "next": nxt,
                "entropy_bits": entropy,
            }
        )
        await ws.send_text(ready.model_dump_json())
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                break
            entry.last = time.monotonic()
            raw = frame.get("text")
            if raw is None:
                raw = frame.get("bytes") or b""
            await ws.send_text(await answer(session, raw, params.top_k))
    except (WebSocketDisconnect, OSError):
        pass  # the client went away, perhaps mid-answer: nothing to keep
    except Exception as e:
        if isinstance(e, RuntimeError) and entry.ending is not None:
            return  # the server closed it (idle, shutdown) while an answer was on its way
        why = "error"
        log.exception("typing session failed")
        await _close(ws, INTERNAL, "internal error; the server log has the details")
    finally:
        registry.leave(entry)
        SESSIONS_CLOSED.labels(entry.ending or why).inc()
