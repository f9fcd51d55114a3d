"""A typed client for the charnn HTTP API: :class:`Client` (blocking) and :class:`AsyncClient`.

It imports httpx, httpx-sse, pydantic and the schema modules only (never the app, its
routes, the store or numpy: ``tests/test_repo.py`` checks), so a command-line tool
starts without building a server.
Answers are the service's own response models, validated on arrival.

Every failure is one exception, :class:`ApiError`, whose ``str()`` is one line:

* a non-2xx answer carries the server's ``status``, ``code``, ``message`` and ``details``;
* no answer at all has ``status`` 0 and ``code`` ``unreachable``, ``timeout`` or
  ``transport_error`` (connection refused, the server too slow, the connection lost);
* a 2xx answer that is not what charnn sends has ``code`` ``bad_response``;
* :meth:`Job.wait` raises :class:`JobFailed` (``status`` 0, ``code`` ``job_failed`` or
  ``job_cancelled``) when the job does not succeed, so a finished ``wait`` means a model.

A request that is safe to repeat is sent once more, on another connection (httpx drops
the dead one from its pool), when the connection it went out on was found dead before an
answer came: ``httpx.RemoteProtocolError``, ``ReadError`` or ``WriteError``, what a
kept-alive connection gives when the server closes it, idle, just as a request goes out on
it. Safe to repeat are every plain GET, ``delete_model`` (a DELETE), and ``predict``,
``score`` and ``generate``, which compute an answer and change nothing (an unseeded
``generate`` sent again answers a new sample, as good as the lost one; a ``delete_model``
sent again after its first try did reach the server answers 404). Only once: if the repeat
fails too, its failure is the ApiError. ``train`` is repeated too, and also after a read or
write timeout (the server may be storing the job just then), because it carries an
``Idempotency-Key`` (its ``idempotency_key``, else a new uuid4 per call): the server answers
a repeat with the first attempt's job, so a retried submit never starts two jobs. To retry a
``train`` that failed yourself, pass the same ``idempotency_key`` again. Never repeated:
``Job.cancel`` and ``upload``, which change the server (one that failed so may or may not
have happened: look before trying again); timeouts (but ``train``'s) and refused
connections (a server slow or not there); and the event streams (``Job.events``,
``stream_generate``; :meth:`Job.wait` reconnects by itself).

Both clients build each request with the same helpers (``_Call``, which also says whether
it is safe to repeat) and read each answer with the same parsers; only sending differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import urllib.parse
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, Self, TypeVar

import httpx
from httpx_sse import EventSource, ServerSentEvent, SSEError
from pydantic import BaseModel

from ..domain import DEFAULT_URL, TERMINAL_STATUSES, JobStatus
from ..jobs.schemas import HyperparametersInfo, JobList, JobOut, MetricsOut
from ..serving.schemas import GenerateOut, ModelList, ModelOut, PredictOut, ScoreOut

if TYPE_CHECKING:
    from .sessions import AsyncTypingSession, TypingSession

__all__ = [
    "DEFAULT_URL",
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "Client",
    "Health",
    "Job",
    "JobEvent",
    "JobFailed",
]

TERMINAL = TERMINAL_STATUSES
# The job event stream sends a keep-alive every 15 s, so a longer silence means trouble.
_EVENTS_READ_TIMEOUT = 60.0
_RECONNECT_DELAY_S = 0.5
# A kept-alive connection found dead only once the request was on it (the server closed it,
# idle, just then): no answer came, so a request that is safe to repeat is sent again.
# Not timeouts, nor ConnectError: those are a server that is slow or not there at all.
_DEAD_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# The request went out and no answer came in time: repeated only when idempotent by key.
_TIMED_OUT = (httpx.ReadTimeout, httpx.WriteTimeout)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
Unknown = Literal["error", "skip"]


class ApiError(Exception):
    """A request that did not give what was asked; ``status`` is 0 when there was no answer."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details

    def __str__(self) -> str:
        where = f"HTTP {self.status} {self.code}" if self.status else self.code
        return " ".join(f"{self.message} ({where})".split())  # one line, whatever the message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.code!r}, {self.message!r})"


class JobFailed(ApiError):
    """``wait`` on a job that ended ``failed`` or ``cancelled``; ``job`` is its final record."""

    def __init__(self, job: JobOut) -> None:
        code = "job_cancelled" if job.status == "cancelled" else "job_failed"
        super().__init__(0, code, job.error or f"job {job.id} was {job.status}")
        self.job = job


class Health(BaseModel):
    """``GET /healthz`` (``ok``) or ``GET /readyz`` (``ready``)."""

    status: str


@dataclass(frozen=True)
class JobEvent:
    """One Server-Sent Event of ``GET /jobs/{id}/events``.

    ``event`` is ``progress`` (one metric point: ``step``, ``train_loss``, ``val_loss``,
    the diagnostics, ``total_steps``, ``best_step``, ``best_val_loss``) or ``status``
    (``data`` is the job, also in ``job``): the first event of a new stream, each change
    of status, and last the final one. ``id`` is the event's id (None on a change of
    status): pass the last one seen to :meth:`Job.events` to resume without a gap.
    """

    event: str
    data: dict[str, Any]
    job: JobOut | None = None
    id: int | None = None

    @property
    def step(self) -> int | None:
        if isinstance(self.data.get("step"), int):
            return int(self.data["step"])
        return self.job.progress.step if self.job else None

    @property
    def total_steps(self) -> int | None:
        if self.job is not None:
            return self.job.progress.total_steps
        total = self.data.get("total_steps")
        return total if isinstance(total, int) else None


# --- requests and answers, shared by both clients ---------------------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and how to read its (2xx) answer.

    ``retry_safe``: sending it twice does no harm (it changes nothing on the server, or the
    second time changes nothing more), so ``_run`` sends it again when its connection was
    dead (``_DEAD_CONNECTION``). Each endpoint says so here, for both clients.
    """

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    retry_safe: bool = field(kw_only=True)
    retry_timeout: bool = field(default=False, kw_only=True)  # also after ``_TIMED_OUT``
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("json", "params", "content", "headers"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out


def _as(model: type[M]) -> Callable[[httpx.Response], M]:
    def parse(r: httpx.Response) -> M:
        return model.model_validate(r.json())

    return parse


def _nothing(_: httpx.Response) -> None:
    return None


def _content(r: httpx.Response) -> bytes:
    return r.content


def _seg(value: str) -> str:
    """An id as one path segment: ``/`` or ``..`` in it must not walk to another route."""
    return urllib.parse.quote(value, safe="")


def _given(**fields: Any) -> dict[str, Any]:
    """The fields that were given; omitted ones take the server's defaults."""
    return {k: v for k, v in fields.items() if v is not None}


def _health(ready: bool) -> _Call[Health]:
    return _Call("GET", "/readyz" if ready else "/healthz", _as(Health), retry_safe=True)


def _train(
    corpus: str,
    name: str | None,
    seed: int | None,
    init_from: str | None,
    hyperparameters: dict[str, Any],
    idempotency_key: str | None,
) -> _Call[JobOut]:
    body = _given(corpus=corpus, name=name, seed=seed, init_from=init_from)
    if hyperparameters:  # sent as given: an explicit None (e.g. max_steps) means something
        body["hyperparameters"] = hyperparameters
    # One key per call, sent again by the repeat: the server answers it with the first job.
    key = idempotency_key if idempotency_key is not None else str(uuid.uuid4())
    headers = {"Idempotency-Key": key}
    return _Call(
        "POST",
        "/jobs",
        _as(JobOut),
        json=body,
        headers=headers,
        retry_safe=True,
        retry_timeout=True,
    )


def _repeatable(call: _Call[Any], error: Exception) -> bool:
    """Whether ``_send`` may send ``call`` once more after ``error`` (no answer came)."""
    return call.retry_safe and (isinstance(error, _DEAD_CONNECTION) or call.retry_timeout)


def _jobs(status: JobStatus | None, limit: int, offset: int) -> _Call[JobList]:
    params = _given(status=status, limit=limit, offset=offset)
    return _Call("GET", "/jobs", _as(JobList), params=params, retry_safe=True)


def _job(job_id: str) -> _Call[JobOut]:
    return _Call("GET", f"/jobs/{_seg(job_id)}", _as(JobOut), retry_safe=True)


def _metrics(job_id: str, after_step: int) -> _Call[MetricsOut]:
    path = f"/jobs/{_seg(job_id)}/metrics"
    params = {"after_step": after_step}
    return _Call("GET", path, _as(MetricsOut), params=params, retry_safe=True)


def _stopped(r: httpx.Response) -> JobOut:
    """A cancel's or pause's job: 200 once it took effect; 202 (a ``JobStopping``) while
    the job is still stopping, then its ``job`` (still ``running``: ``wait`` for it)."""
    body = r.json()
    return JobOut.model_validate(body["job"] if r.status_code == 202 else body)


def _cancel(job_id: str) -> _Call[JobOut]:
    # A repeat could answer 409 for a cancel that did happen.
    return _Call("POST", f"/jobs/{_seg(job_id)}/cancel", _stopped, retry_safe=False)


def _pause(job_id: str) -> _Call[JobOut]:
    # A repeat could answer 409 ("already paused") for a pause that did happen.
    return _Call("POST", f"/jobs/{_seg(job_id)}/pause", _stopped, retry_safe=False)


def _resume(job_id: str) -> _Call[JobOut]:
    return _Call("POST", f"/jobs/{_seg(job_id)}/resume", _as(JobOut), retry_safe=False)


def _events(job_id: str, after: int | None = None) -> _Call[None]:
    # A stream: not repeated by _run (Job.wait reconnects by itself, resuming after
    # ``after``, the last event id it saw).
    headers = None if after is None else {"Last-Event-ID": str(after)}
    return _Call("GET", f"/jobs/{_seg(job_id)}/events", _nothing, retry_safe=False, headers=headers)


def _predict(
    text: str, model: str | None, top_k: int | None, temperature: float, unknown: Unknown
) -> _Call[PredictOut]:
    body = _given(model=model, text=text, top_k=top_k, temperature=temperature, unknown=unknown)
    return _Call("POST", "/predict", _as(PredictOut), json=body, retry_safe=True)  # pure


def _generate(
    prompt: str,
    model: str | None,
    max_chars: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop: Sequence[str],
    stream: bool,
    include_prompt: bool = False,
) -> _Call[GenerateOut]:
    if isinstance(stop, str):  # a lone string would be sent as a list of its characters
        stop = [stop]
    body = _given(
        model=model,
        prompt=prompt,
        max_chars=max_chars,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
        stream=stream,
        include_prompt=include_prompt or None,
    )
    # Pure compute, the same text again given a seed (unseeded: another sample, just as
    # good). Streamed, it is not repeated by _run: the stream may have started.
    return _Call("POST", "/generate", _as(GenerateOut), json=body, retry_safe=not stream)


def _score(text: str, model: str | None) -> _Call[ScoreOut]:
    body = _given(model=model, text=text)
    return _Call("POST", "/score", _as(ScoreOut), json=body, retry_safe=True)  # pure


def _models(limit: int, offset: int) -> _Call[ModelList]:
    params = {"limit": limit, "offset": offset}
    return _Call("GET", "/models", _as(ModelList), params=params, retry_safe=True)


def _hyperparameters(corpus_chars: int | None) -> _Call[HyperparametersInfo]:
    params = {"corpus_chars": corpus_chars} if corpus_chars is not None else None
    return _Call(
        "GET", "/hyperparameters", _as(HyperparametersInfo), params=params, retry_safe=True
    )


def _model(model_id: str) -> _Call[ModelOut]:
    return _Call("GET", f"/models/{_seg(model_id)}", _as(ModelOut), retry_safe=True)


def _delete_model(model_id: str) -> _Call[None]:
    # Idempotent: a repeat deletes nothing more (404 if the first one did reach the server).
    return _Call("DELETE", f"/models/{_seg(model_id)}", _nothing, retry_safe=True)


def _download(model_id: str) -> _Call[bytes]:
    return _Call("GET", f"/models/{_seg(model_id)}/checkpoint", _content, retry_safe=True)


def _upload(data_or_path: bytes | str | os.PathLike[str], name: str | None) -> _Call[ModelOut]:
    if isinstance(data_or_path, bytes):
        data = data_or_path
    else:
        data = Path(data_or_path).read_bytes()
    return _Call(
        "POST",
        "/models",
        _as(ModelOut),
        content=data,
        params=_given(name=name),
        headers={"Content-Type": "application/octet-stream"},
        retry_safe=False,  # a second copy of the model
    )


def _http_error(r: httpx.Response) -> ApiError:
    """The server's ``{"error": {code, message, details}}``, or a stand-in for a proxy's page."""
    try:
        err = r.json()["error"]
        return ApiError(r.status_code, str(err["code"]), str(err["message"]), err.get("details"))
    except (ValueError, KeyError, TypeError):
        message = r.reason_phrase or "error"
        text = " ".join(r.text.split())[:200]
        if text and not text.startswith("<"):  # an HTML error page says nothing useful here
            message += f": {text}"
        return ApiError(r.status_code, f"http_{r.status_code}", message)


def _reason(e: Exception) -> str:
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(e)).strip() or type(e).__name__
    return text[:1].lower() + text[1:]


def _transport_error(url: str, timeout: float, e: httpx.TransportError) -> ApiError:
    if isinstance(e, httpx.TimeoutException):
        return ApiError(0, "timeout", f"{url} did not answer in time (timeout {timeout:g} s)")
    if isinstance(e, httpx.ConnectError):
        return ApiError(0, "unreachable", f"cannot reach {url}: {_reason(e)}")
    if isinstance(e, SSEError):
        return ApiError(0, "bad_response", f"{url} did not send an event stream: {_reason(e)}")
    return ApiError(0, "transport_error", f"lost the connection to {url}: {_reason(e)}")


def _bad_response(r: httpx.Response, e: Exception) -> ApiError:
    where = f"{r.request.method} {r.request.url.path}"
    return ApiError(
        r.status_code, "bad_response", f"{where}: not a charnn answer ({_reason(e)[:200]})"
    )


def _job_event(sse: ServerSentEvent) -> JobEvent:
    data = sse.json()
    if not isinstance(data, dict):
        raise ValueError(f"{sse.event} event data is not an object")
    job = JobOut.model_validate(data) if sse.event == "status" else None
    return JobEvent(sse.event, data, job, int(sse.id) if sse.id.isdigit() else None)


def _chunk(sse: ServerSentEvent) -> tuple[str | None, bool]:
    """A ``/generate`` stream event: its text (``chunk``), and whether it was ``done``."""
    if sse.event == "chunk":
        return str(sse.json()["text"]), False
    if sse.event == "done":
        GenerateOut.model_validate(sse.json())
        return None, True
    if sse.event == "error":  # generation failed midway: the error shape, after the 200
        e = sse.json()["error"]
        raise ApiError(200, str(e["code"]), str(e["message"]), e.get("details"))
    return None, False


_INCOMPLETE = "the generate stream ended before its 'done' event"


def _decoding(
    r: httpx.Response, decode: Callable[[ServerSentEvent], T]
) -> Callable[[ServerSentEvent], T]:
    """``decode``, with a malformed event becoming ApiError ``bad_response``."""

    def run(sse: ServerSentEvent) -> T:
        try:
            return decode(sse)
        except (ValueError, KeyError, TypeError) as e:
            raise _bad_response(r, e) from e

    return run


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _wait_timeout(job_id: str, timeout: float | None) -> ApiError:
    return ApiError(0, "timeout", f"job {job_id} did not finish within {timeout:g} s")


def _final(event: JobEvent) -> JobOut | None:
    """The finished job, if ``event`` is the final ``status``."""
    if event.event == "status" and event.job is not None and event.job.status in TERMINAL:
        return event.job
    return None


def _settled(job: JobOut) -> JobOut:
    if job.status != "succeeded":
        raise JobFailed(job)
    return job


class _Base:
    """What both clients hold: where the server is, how to authenticate, how long to wait."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        if not re.match(r"https?://[^/]", url):
            raise ApiError(0, "bad_url", f"{url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = {"User-Agent": "charnn-client"}
        if api_key:  # sent on every request; the server checks it on POST and DELETE
            self.headers["Authorization"] = f"Bearer {api_key}"

    def _events_timeout(self, read: float = _EVENTS_READ_TIMEOUT) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=read)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as e:
            raise _transport_error(self.url, self.timeout, e) from e

    @staticmethod
    def _parsed(call: _Call[T], r: httpx.Response) -> T:
        if not r.is_success:
            raise _http_error(r)
        try:
            return call.parse(r)
        except ValueError as e:  # bad JSON, or JSON of another shape (pydantic's is a ValueError)
            raise _bad_response(r, e) from e


# --- blocking ---------------------------------------------------------------------------


class Client(_Base):
    """The charnn API over blocking HTTP; use as a context manager, or ``close()`` it."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout)
        self._http = httpx.Client(
            base_url=self.url, headers=self.headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, call: _Call[T]) -> T:
        with self._translated():
            r = self._send(call)
        return self._parsed(call, r)

    def _send(self, call: _Call[Any]) -> httpx.Response:
        """The answer, asking a second time if ``retry_safe`` and the connection was dead."""
        try:
            return self._http.request(call.method, call.path, **call.kwargs())
        except (*_DEAD_CONNECTION, *_TIMED_OUT) as e:
            if not _repeatable(call, e):
                raise
            # Inside ``except``: a second failure is raised, with the first as its context.
            return self._http.request(call.method, call.path, **call.kwargs())

    def _stream(
        self,
        call: _Call[Any],
        decode: Callable[[ServerSentEvent], T],
        timeout: httpx.Timeout | None = None,
    ) -> Generator[T, None, None]:
        """The stream's events, decoded; an error answer raises before the first."""
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        with (
            self._translated(),
            self._http.stream(call.method, call.path, **call.kwargs(), **extra) as r,
        ):
            if not r.is_success:
                r.read()
                raise _http_error(r)
            yield from map(_decoding(r, decode), EventSource(r).iter_sse())

    def health(self, *, ready: bool = False) -> Health:
        """Alive (``/healthz``), or with ``ready`` also able to take jobs (``/readyz``)."""
        return self._run(_health(ready))

    def train(
        self,
        corpus: str,
        *,
        name: str | None = None,
        seed: int | None = None,
        init_from: str | None = None,
        idempotency_key: str | None = None,
        **hyperparameters: Any,
    ) -> Job:
        """Submit a training job; hyperparameters are ``Hyperparameters`` fields.

        ``idempotency_key`` (else a new uuid4): the same key and request answer the first
        job, within the server's ``idempotency_ttl_s``; this call's own repeat uses it."""
        call = _train(corpus, name, seed, init_from, hyperparameters, idempotency_key)
        record = self._run(call)
        return Job(self, record.id, record)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job (no request: a wrong id fails on first use, 404)."""
        return Job(self, job_id)

    def jobs(self, *, status: JobStatus | None = None, limit: int = 50, offset: int = 0) -> JobList:
        return self._run(_jobs(status, limit, offset))

    def predict(
        self,
        text: str = "",
        *,
        model: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        unknown: Unknown = "error",
    ) -> PredictOut:
        """Next-character probabilities, most likely first; ``model`` None means the newest."""
        return self._run(_predict(text, model, top_k, temperature, unknown))

    def generate(
        self,
        prompt: str = "",
        *,
        model: str | None = None,
        max_chars: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        include_prompt: bool = False,
    ) -> GenerateOut:
        """Sampled text after ``prompt`` (with ``include_prompt``, the prompt first).

        Sent again if its connection was found dead (see the module's docstring): with a
        ``seed`` that answers the same text; without one, maybe another sample.
        """
        call = _generate(
            prompt, model, max_chars, temperature, top_k, top_p, seed, stop, False, include_prompt
        )
        return self._run(call)

    def stream_generate(
        self,
        prompt: str = "",
        *,
        model: str | None = None,
        max_chars: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        include_prompt: bool = False,
    ) -> Iterator[str]:
        """``generate`` as it is sampled: text pieces that join to the same text."""
        call = _generate(
            prompt, model, max_chars, temperature, top_k, top_p, seed, stop, True, include_prompt
        )
        done = False
        for text, done in self._stream(call, _chunk):
            if text:
                yield text
            if done:
                return
        raise ApiError(0, "transport_error", _INCOMPLETE)

    def score(self, text: str, *, model: str | None = None) -> ScoreOut:
        """The log-probability of each character of ``text``."""
        return self._run(_score(text, model))

    def models(self, *, limit: int = 50, offset: int = 0) -> ModelList:
        return self._run(_models(limit, offset))

    def hyperparameters(self, corpus_chars: int | None = None) -> HyperparametersInfo:
        """Every hyperparameter with its default and the server's bounds; with
        ``corpus_chars``, settings sized to a text that long (``suggested``)."""
        return self._run(_hyperparameters(corpus_chars))

    def model(self, model_id: str) -> ModelOut:
        """One model by id or name (a name: the newest model with it)."""
        return self._run(_model(model_id))

    def delete_model(self, model_id: str) -> None:
        self._run(_delete_model(model_id))

    def download(self, model_id: str, path: str | os.PathLike[str] | None = None) -> bytes:
        """The ``.npz`` checkpoint of a model by id or name; also written to ``path``."""
        data = self._run(_download(model_id))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def upload(
        self, data_or_path: bytes | str | os.PathLike[str], *, name: str | None = None
    ) -> ModelOut:
        """Add a ``.npz`` checkpoint (bytes, or a file path); ``name`` overrides its own."""
        return self._run(_upload(data_or_path, name))

    def session(
        self,
        model: str | None = None,
        *,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> TypingSession:
        """A typing session (WebSocket ``/sessions``): ``with client.session() as s:
        s.feed("a")``; each call answers the next-character distribution."""
        from .sessions import TypingSession, session_url

        url = session_url(self.url, model, top_k, temperature)
        return TypingSession(url, self.headers, self.timeout)


class Job:
    """A training job on a :class:`Client`; ``last`` is its record as last seen."""

    def __init__(self, client: Client, job_id: str, last: JobOut | None = None) -> None:
        self.client = client
        self.id = job_id
        self.last = last

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def refresh(self) -> JobOut:
        self.last = self.client._run(_job(self.id))
        return self.last

    def metrics(self, *, after_step: int = -1) -> MetricsOut:
        """The loss curve, optionally only after a step."""
        return self.client._run(_metrics(self.id, after_step))

    def cancel(self) -> JobOut:
        """Stop the job; the answer comes once it is cancelled (after 5 s, the job still
        ``running`` while it stops: ``wait()`` for it). 409 if already finished."""
        self.last = self.client._run(_cancel(self.id))
        return self.last

    def pause(self) -> JobOut:
        """Checkpoint the job at its next step and free its slot: ``paused`` (after 5 s,
        still ``running`` while it checkpoints). 409 unless queued or running; 429 when
        the server keeps as many paused jobs as it allows."""
        self.last = self.client._run(_pause(self.id))
        return self.last

    def resume(self) -> JobOut:
        """Queue the paused job again; it continues exactly where it paused. 409 unless
        paused; 429 when the job queue is full."""
        self.last = self.client._run(_resume(self.id))
        return self.last

    def events(self, *, after: int | None = None) -> Iterator[JobEvent]:
        """The job's events until its final ``status`` (at once if it has already finished);
        ``after`` (an event's ``id``) resumes after that event: none missed, none twice."""
        return self._events(_EVENTS_READ_TIMEOUT, after)

    def _events(
        self, read_timeout: float, after: int | None = None
    ) -> Generator[JobEvent, None, None]:
        timeout = self.client._events_timeout(read_timeout)
        return self.client._stream(_events(self.id, after), _job_event, timeout)

    def wait(
        self, progress: Callable[[JobEvent], None] | None = None, timeout: float | None = None
    ) -> JobOut:
        """Follow the events until the job ends; ``progress`` sees each progress event.

        Returns the succeeded job; raises :class:`JobFailed` if it failed or was cancelled,
        and ApiError ``timeout`` if it is still going after ``timeout`` seconds.
        If the stream ends early (the server restarting), it asks again and follows on from
        the last event it saw (``Last-Event-ID``): ``progress`` sees each point once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        after: int | None = None
        while True:
            read = _EVENTS_READ_TIMEOUT
            if deadline is not None:
                read = max(0.01, min(read, deadline - time.monotonic()))
            try:
                with contextlib.closing(self._events(read, after)) as events:
                    for event in events:
                        after = event.id if event.id is not None else after
                        if (job := _final(event)) is not None:
                            self.last = job
                            return _settled(job)
                        if event.event == "progress" and progress is not None:
                            progress(event)
                        if _past(deadline):
                            break
            except ApiError as e:
                if e.code != "timeout" or not _past(deadline):
                    raise
            if _past(deadline):
                raise _wait_timeout(self.id, timeout)
            # The stream ended before the final status (the server restarting?): ask, follow on.
            if (job := self.refresh()).status in TERMINAL:
                return _settled(job)
            time.sleep(_RECONNECT_DELAY_S)


# --- asyncio ----------------------------------------------------------------------------


class AsyncClient(_Base):
    """:class:`Client` for asyncio: the same methods, awaited; ``async with`` or ``aclose()``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout)
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, call: _Call[T]) -> T:
        with self._translated():
            r = await self._send(call)
        return self._parsed(call, r)

    async def _send(self, call: _Call[Any]) -> httpx.Response:
        try:
            return await self._http.request(call.method, call.path, **call.kwargs())
        except (*_DEAD_CONNECTION, *_TIMED_OUT) as e:
            if not _repeatable(call, e):
                raise
            return await self._http.request(call.method, call.path, **call.kwargs())

    async def _stream(
        self,
        call: _Call[Any],
        decode: Callable[[ServerSentEvent], T],
        timeout: httpx.Timeout | None = None,
    ) -> AsyncGenerator[T, None]:
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        with self._translated():
            async with self._http.stream(call.method, call.path, **call.kwargs(), **extra) as r:
                if not r.is_success:
                    await r.aread()
                    raise _http_error(r)
                run = _decoding(r, decode)
                events = EventSource(r).aiter_sse()
                async with contextlib.aclosing(events):
                    async for sse in events:
                        yield run(sse)

    async def health(self, *, ready: bool = False) -> Health:
        return await self._run(_health(ready))

    async def train(
        self,
        corpus: str,
        *,
        name: str | None = None,
        seed: int | None = None,
        init_from: str | None = None,
        idempotency_key: str | None = None,
        **hyperparameters: Any,
    ) -> AsyncJob:
        call = _train(corpus, name, seed, init_from, hyperparameters, idempotency_key)
        record = await self._run(call)
        return AsyncJob(self, record.id, record)

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, job_id)

    async def jobs(
        self, *, status: JobStatus | None = None, limit: int = 50, offset: int = 0
    ) -> JobList:
        return await self._run(_jobs(status, limit, offset))

    async def predict(
        self,
        text: str = "",
        *,
        model: str | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        unknown: Unknown = "error",
    ) -> PredictOut:
        return await self._run(_predict(text, model, top_k, temperature, unknown))

    async def generate(
        self,
        prompt: str = "",
        *,
        model: str | None = None,
        max_chars: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        include_prompt: bool = False,
    ) -> GenerateOut:
        call = _generate(
            prompt, model, max_chars, temperature, top_k, top_p, seed, stop, False, include_prompt
        )
        return await self._run(call)

    async def stream_generate(
        self,
        prompt: str = "",
        *,
        model: str | None = None,
        max_chars: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        include_prompt: bool = False,
    ) -> AsyncIterator[str]:
        call = _generate(
            prompt, model, max_chars, temperature, top_k, top_p, seed, stop, True, include_prompt
        )
        events = self._stream(call, _chunk)
        async with contextlib.aclosing(events):
            async for text, done in events:
                if text:
                    yield text
                if done:
                    return
        raise ApiError(0, "transport_error", _INCOMPLETE)

    async def score(self, text: str, *, model: str | None = None) -> ScoreOut:
        return await self._run(_score(text, model))

    async def models(self, *, limit: int = 50, offset: int = 0) -> ModelList:
        return await self._run(_models(limit, offset))

    async def hyperparameters(self, corpus_chars: int | None = None) -> HyperparametersInfo:
        return await self._run(_hyperparameters(corpus_chars))

    async def model(self, model_id: str) -> ModelOut:
        return await self._run(_model(model_id))

    async def delete_model(self, model_id: str) -> None:
        await self._run(_delete_model(model_id))

    async def download(self, model_id: str, path: str | os.PathLike[str] | None = None) -> bytes:
        data = await self._run(_download(model_id))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def upload(
        self, data_or_path: bytes | str | os.PathLike[str], *, name: str | None = None
    ) -> ModelOut:
        return await self._run(_upload(data_or_path, name))

    def session(
        self,
        model: str | None = None,
        *,
        top_k: int | None = None,
        temperature: float | None = None,
    ) -> AsyncTypingSession:
        """:meth:`Client.session` for asyncio: ``async with client.session() as s``."""
        from .sessions import AsyncTypingSession, session_url

        url = session_url(self.url, model, top_k, temperature)
        return AsyncTypingSession(url, self.headers, self.timeout)


class AsyncJob:
    """:class:`Job` for an :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient, job_id: str, last: JobOut | None = None) -> None:
        self.client = client
        self.id = job_id
        self.last = last

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def refresh(self) -> JobOut:
        self.last = await self.client._run(_job(self.id))
        return self.last

    async def metrics(self, *, after_step: int = -1) -> MetricsOut:
        return await self.client._run(_metrics(self.id, after_step))

    async def cancel(self) -> JobOut:
        self.last = await self.client._run(_cancel(self.id))
        return self.last

    async def pause(self) -> JobOut:
        self.last = await self.client._run(_pause(self.id))
        return self.last

    async def resume(self) -> JobOut:
        self.last = await self.client._run(_resume(self.id))
        return self.last

    def events(self, *, after: int | None = None) -> AsyncIterator[JobEvent]:
        return self._events(after)

    def _events(self, after: int | None = None) -> AsyncGenerator[JobEvent, None]:
        timeout = self.client._events_timeout()
        return self.client._stream(_events(self.id, after), _job_event, timeout)

    async def wait(
        self, progress: Callable[[JobEvent], None] | None = None, timeout: float | None = None
    ) -> JobOut:
        """As :meth:`Job.wait`; ``progress`` is a plain (not async) callable."""
        limit = asyncio.timeout(timeout)
        after: int | None = None
        try:
            async with limit:
                while True:
                    async with contextlib.aclosing(self._events(after)) as events:
                        async for event in events:
                            after = event.id if event.id is not None else after
                            if (job := _final(event)) is not None:
                                self.last = job
                                return _settled(job)
                            if event.event == "progress" and progress is not None:
                                progress(event)
                    if (job := await self.refresh()).status in TERMINAL:
                        return _settled(job)
                    await asyncio.sleep(_RECONNECT_DELAY_S)
        except TimeoutError:
            if not limit.expired():  # not ours (e.g. from ``progress``)
                raise
            raise _wait_timeout(self.id, timeout) from None
