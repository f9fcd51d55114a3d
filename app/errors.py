"""One error shape for every failure: ``{"error": {"code", "message", "details"}}``.

Services raise :class:`ServiceError` subclasses (each a status and a code);
``model/`` and the store raise their own plain exceptions (unknown characters,
bad corpus, bad checkpoint, a full queue, a store that cannot write), which are
mapped here to a status in one place. (The client's ``app.client.ApiError`` is
what a caller of the API catches: a different thing, on the other side.)
Nothing a client sends may produce a 500, and no message carries a path or a
stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import CheckpointError, ConfigError, CorpusError, UnknownCharactersError

from .store.base import QueueFullError, StoreError, StoreUnavailable

log = logging.getLogger("charnn.errors")
# The id of the request being answered (app/api/observe.py sets it): every error body
# carries it, so a client's failure can be found in the server's log.
REQUEST_ID: ContextVar[str | None] = ContextVar("charnn_request_id", default=None)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None
    request_id: str | None = Field(
        None, description="this request's X-Request-ID: the server's log lines carry it too"
    )


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx response."""

    error: ErrorDetail


class ServiceError(Exception):
    """A refusal the service answers with ``status``, ``code`` and a message."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class Invalid(ServiceError):
    status, code = 422, "invalid"


class QueueFull(ServiceError):
    status, code = 429, "queue_full"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


RETRY_AFTER_S = "10"
RETRY_AFTER = {"Retry-After": RETRY_AFTER_S}


# model/ exceptions a client can cause, and how they answer.
_MODEL_ERRORS: dict[type[Exception], tuple[int, str]] = {
    UnknownCharactersError: (422, "unknown_characters"),
    CorpusError: (422, "invalid_corpus"),
    ConfigError: (422, "invalid_hyperparameters"),
    CheckpointError: (422, "invalid_checkpoint"),
}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    detail = ErrorDetail(code=code, message=message, details=details, request_id=REQUEST_ID.get())
    body = ErrorBody(error=detail)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_payload(exc: Exception, doing: str) -> dict[str, Any]:
    """The error shape for a failure after a stream's 200 was sent (its ``error`` event):
    the code the same failure would have answered, in words; never a trace."""
    if isinstance(exc, ServiceError):
        code, message, details = exc.code, exc.message, exc.details
    elif type(exc) in _MODEL_ERRORS:
        code, message, details = _MODEL_ERRORS[type(exc)][1], str(exc), None
    elif isinstance(exc, StoreUnavailable):
        code, message, details = Unavailable.code, str(exc), None
    else:
        log.error("%s failed midway", doing, exc_info=exc)
        code, message, details = "internal", "internal error; the server log has the details", None
    detail = ErrorDetail(
        code=code,
        message=f"{doing} failed midway: {message}",
        details=details,
        request_id=REQUEST_ID.get(),
    )
    return ErrorBody(error=detail).model_dump()


SURROGATE_MESSAGE = (
    "contains a lone UTF-16 surrogate (\\ud800-\\udfff) or a broken \\u escape; "
    "strings must be valid Unicode text"
)


def clear_message(msg: str, type_: object = None) -> str:
    """pydantic's message, or a plainer one where pydantic's does not say what is wrong."""
    if type_ == "string_unicode" or "surrogate" in msg or "hex escape" in msg:
        return SURROGATE_MESSAGE  # json.loads lets "\ud800" through; pydantic cannot encode it
    return msg


def validation_details(errors: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Location, message and type of each of pydantic's problems; never the input (it may
    be a corpus). For HTTP bodies and typing-session messages alike."""
    return [
        {
            "loc": [str(p) for p in e.get("loc", ())],
            "msg": clear_message(str(e.get("msg")), e.get("type")),
            "type": e.get("type"),
        }
        for e in errors
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = validation_details(exc.errors())
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"][1:]) or "body"
        return error_response(422, "invalid", f"{where}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "malformed_body",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI/Starlette: a JSON body not UTF-8, broken multipart
            message = f"the request body could not be parsed: {message}"
        if exc.status_code == 404 and message == "Not Found":  # no route matched
            message = "no such route: check the method and path (the API is listed at /docs)"
        return error_response(exc.status_code, code, message, headers=headers)

    for exc_type, (status, code) in _MODEL_ERRORS.items():

        async def model_error(
            _: Request, exc: Exception, status: int = status, code: str = code
        ) -> JSONResponse:
            details = {"chars": exc.chars} if isinstance(exc, UnknownCharactersError) else None
            return error_response(status, code, str(exc), details)

        app.add_exception_handler(exc_type, model_error)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        message = f"{exc}; try again later"
        return error_response(429, QueueFull.code, message, headers=RETRY_AFTER)

    @app.exception_handler(StoreError)
    async def store_unavailable(_: Request, exc: StoreError) -> JSONResponse:
        # The machine's fault, not the client's: 503 with the plain reason; nothing was
        # half done (the store's promise), so the client may simply try again.
        log.warning("store unavailable: %s", exc)
        # StoreUnavailable says it in plain words; other store errors (start-up ones) may
        # name the data directory: the client gets the general statement only.
        message = str(exc) if isinstance(exc, StoreUnavailable) else "the store is unavailable"
        return error_response(503, Unavailable.code, message, headers=RETRY_AFTER)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal", "internal error; the server log has the details")
