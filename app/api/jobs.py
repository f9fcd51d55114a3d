"""Training jobs over HTTP: submit a corpus, follow the loss, cancel, delete.

Each route parses its request, calls one method of ``JobService`` and sends the
answer; the rules live in ``app/jobs/service.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from ..errors import Invalid, clear_message
from ..jobs.replay import MAX_EVENT_ID
from ..jobs.replay import last_event_id as last_event_id_of
from ..jobs.schemas import (
    JobConfig,
    JobCreate,
    JobList,
    JobOut,
    JobStatus,
    JobStopping,
    MetricsOut,
)
from ..store.idempotency import KEY_RULE
from .bodies import invalid_body, parse_json, schema_ref
from .deps import AuthDep, StateDep
from .responses import errors_for
from .sse import sse_event

router = APIRouter(prefix="/jobs", tags=["jobs"])

errors = errors_for(
    {
        400: "the body could not be parsed (broken multipart)",
        401: "API key missing or wrong",
        404: "no such job (POST /jobs: no init_from model by that id or name)",
        409: "the job is already finished (cancel, pause), not finished yet (delete), not "
        "queued or running (pause), or not paused (resume); "
        "POST /jobs: the Idempotency-Key was used with a different request",
        413: "request body over max_body_bytes",
        422: "invalid corpus, hyperparameters or request, or over this server's limits",
        429: "the job queue is full (see Retry-After); pause: max_paused_jobs are paused",
        503: "the store is not writable (disk full, read-only) or unreachable; nothing was stored",
    }
)
_BODY_HINT = (
    "POST /jobs takes a JSON object (application/json) or multipart/form-data "
    "with a 'corpus' file and an optional 'config' JSON part"
)
_JOB_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": schema_ref(JobCreate)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["corpus"],
                    "properties": {
                        "corpus": {"type": "string", "format": "binary"},
                        "config": {"type": "string", "description": "JobConfig as JSON"},
                    },
                }
            },
        },
    }
}


async def _read_body(request: Request) -> JobCreate:
    """JSON (whatever the content type), or multipart (see _read_form); one 422 per problem."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            async with request.form() as form:
                return await _read_form(form)
        except ValidationError as e:
            raise invalid_body(e, _BODY_HINT) from None
    return parse_json(JobCreate, await request.body(), _BODY_HINT)


async def _read_form(form: FormData) -> JobCreate:
    """The multipart body: a ``corpus`` file (UTF-8) and an optional ``config`` JSON part."""
    part = form.get("corpus")
    if part is None:
        raise Invalid("multipart body needs a 'corpus' part (UTF-8 text)")
    raw = await part.read() if isinstance(part, UploadFile) else part.encode("utf-8", "replace")
    try:
        corpus = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Invalid(f"corpus is not valid UTF-8 (byte {e.start})") from None
    config_part = form.get("config")
    if isinstance(config_part, UploadFile):
        config_part = (await config_part.read()).decode("utf-8", "replace")
    try:
        config = JobConfig.model_validate_json(config_part or "{}")
    except ValidationError as e:
        first = e.errors()[0]
        if first["loc"]:
            raise  # a field of the config: _read_body names it
        msg = clear_message(first["msg"], first["type"])
        raise Invalid(f"config: {msg}; the 'config' part must be a JobConfig JSON object") from None
    return JobCreate(corpus=corpus, **config.model_dump(exclude_unset=True))


_IDEMPOTENCY_KEY = Header(
    None,
    alias="Idempotency-Key",
    description=(
        f"Stripe's convention: a client-chosen key ({KEY_RULE}). The same key with the same "
        "request (the same corpus, name, hyperparameters with defaults filled in, seed and "
        "init_from; JSON or multipart alike) answers the first one's job, 200 with "
        "`Idempotent-Replayed: true`, instead of a second job; with another request, 409. "
        "Keys are server-wide and hold for idempotency_ttl_s (24 h)."
    ),
    # Documented, not validated here: the service says what is wrong, in words (422).
    json_schema_extra={"minLength": 1, "maxLength": 255, "pattern": "^[ -~]{1,255}$"},
)


@router.post(
    "",
    status_code=202,
    dependencies=[AuthDep],
    responses={
        200: {
            "model": JobOut,
            "description": "a replay: the job this Idempotency-Key and request created",
        },
        **errors(400, 401, 404, 409, 429, 503),
    },
    openapi_extra=_JOB_BODY_DOC,
)
async def create_job(
    request: Request,
    response: Response,
    state: StateDep,
    idempotency_key: str | None = _IDEMPOTENCY_KEY,
) -> JobOut:
    """Start training on a corpus (JSON body, or multipart with a corpus file)."""
    body = await _read_body(request)
    job, replayed = await run_in_threadpool(state.jobs.submit, body, idempotency_key)
    response.headers["Location"] = f"/jobs/{job.id}"
    if replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("", responses=errors(503))
def list_jobs(
    state: StateDep,
    status: JobStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
) -> JobList:
    """Jobs, newest first."""
    return state.jobs.list(status, limit, offset)


@router.get("/{job_id}", responses=errors(404, 503))
def get_job(job_id: str, state: StateDep) -> JobOut:
    """One job: status, progress, latest losses, model id when done."""
    return state.jobs.get(job_id)


@router.delete(
    "/{job_id}", status_code=204, dependencies=[AuthDep], responses=errors(401, 404, 409, 503)
)
def delete_job(job_id: str, state: StateDep) -> Response:
    """Delete a finished job: its record, loss curve, corpus and state (its model stays)."""
    state.jobs.delete(job_id)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", responses=errors(404, 503))
def get_metrics(
    job_id: str, state: StateDep, after_step: int = Query(-1, ge=-1, le=10**12)
) -> MetricsOut:
    """The loss curve, optionally only the points after a step."""
    return state.jobs.metrics(job_id, after_step)


def _stopping_doc(what: str) -> dict[int | str, dict[str, Any]]:
    return {
        202: {
            "model": JobStopping,
            "description": f"the job is still stopping after the wait ({what}); poll GET "
            "/jobs/{id} or follow its events",
        }
    }


def _answer(result: JobOut | JobStopping) -> JobOut | JSONResponse:
    """200 with the job once it stopped; 202 with a JobStopping while it is stopping."""
    if isinstance(result, JobStopping):
        return JSONResponse(result.model_dump(mode="json"), status_code=202)
    return result


@router.post(
    "/{job_id}/cancel",
    dependencies=[AuthDep],
    response_model=JobOut,
    responses={**errors(401, 404, 409, 503), **_stopping_doc("cancelling")},
)
async def cancel_job(job_id: str, state: StateDep) -> Any:
    """Stop a queued, running or paused job: 200 once it is cancelled (about a second),
    never with the job still running; 202 with `state: "cancelling"` if it is still
    stopping after 5 s."""
    return _answer(await state.jobs.cancel(job_id))


@router.post(
    "/{job_id}/pause",
    dependencies=[AuthDep],
    response_model=JobOut,
    responses={**errors(401, 404, 409, 429, 503), **_stopping_doc("pausing")},
)
async def pause_job(job_id: str, state: StateDep) -> Any:
    """Checkpoint a queued or running job at its next step and free its slot: 200 with
    the `paused` job; 202 with `state: "pausing"` if the checkpoint takes longer than 5 s.
    409: not queued or running; 429: `max_paused_jobs` are paused already."""
    return _answer(await state.jobs.pause(job_id))


@router.post(
    "/{job_id}/resume",
    dependencies=[AuthDep],
    responses=errors(401, 404, 409, 429, 503),
)
async def resume_job(job_id: str, state: StateDep) -> JobOut:
    """Queue a paused job again: it continues exactly where it paused (same loss curve
    and model as an uninterrupted run). 409: not paused; 429: the job queue is full."""
    return await state.jobs.resume(job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,  # no application/json in the schema: it never sends one
    responses={
        **errors(404, 422, 503),
        200: {"content": {"text/event-stream": {}}, "description": "SSE"},
    },
)
async def job_events(
    job_id: str,
    state: StateDep,
    last_event_id: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_EVENT_ID,
            description="resume after this event id (as the Last-Event-ID header, which wins "
            "when both are sent); 0: every event from the start",
        ),
    ] = None,
    last_event_header: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="the id of the last event received: the stream sends only later ones",
        ),
    ] = None,
) -> StreamingResponse:
    """Server-Sent Events: a `status` snapshot (or, resuming, the events after
    `Last-Event-ID`), `progress` per metric point, `status` on changes, the final `status`.

    When the server shuts down, the stream ends at once (after a comment saying so):
    clients reconnect with Last-Event-ID, to this server once it is back or to another
    replica, and miss nothing."""
    after = last_event_id_of(last_event_header, last_event_id)
    events = await state.jobs.follow(job_id, after)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        async for event, data, event_id in events:
            if event == "keep-alive":
                yield ": keep-alive\n\n"
            elif event == "closing":
                yield "retry: 2000\n: the server is shutting down; reconnect\n\n"
            else:
                yield sse_event(event, data, event_id)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
