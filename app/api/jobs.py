"""Training jobs over HTTP: submit a corpus, follow the loss, cancel, delete.

Each route parses its request, calls one method of ``JobService`` and sends the
answer; the rules live in ``app/jobs/service.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from ..errors import Invalid, clear_message
from ..jobs.schemas import JobConfig, JobCreate, JobList, JobOut, JobStatus, MetricsOut
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
        409: "the job is already finished (cancel), or not finished yet (delete)",
        413: "request body over max_body_bytes",
        422: "invalid corpus, hyperparameters or request, or over this server's limits",
        429: "the job queue is full (see Retry-After)",
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


@router.post(
    "",
    status_code=202,
    dependencies=[AuthDep],
    responses=errors(400, 401, 404, 429, 503),
    openapi_extra=_JOB_BODY_DOC,
)
async def create_job(request: Request, response: Response, state: StateDep) -> JobOut:
    """Start training on a corpus (JSON body, or multipart with a corpus file)."""
    body = await _read_body(request)
    job = await run_in_threadpool(state.jobs.submit, body)
    response.headers["Location"] = f"/jobs/{job.id}"
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


@router.post("/{job_id}/cancel", dependencies=[AuthDep], responses=errors(401, 404, 409, 503))
async def cancel_job(job_id: str, state: StateDep) -> JobOut:
    """Stop a queued or running job; answers once it is cancelled (about a second)."""
    return await state.jobs.cancel(job_id)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,  # no application/json in the schema: it never sends one
    responses={
        **errors(404, 503),
        200: {"content": {"text/event-stream": {}}, "description": "SSE"},
    },
)
async def job_events(job_id: str, state: StateDep) -> StreamingResponse:
    """Server-Sent Events: `progress` while running, then one `status` with the final job.

    When the server shuts down, the stream ends at once (after a comment saying so):
    clients reconnect, to this server once it is back or to another replica."""
    events = await state.jobs.follow(job_id)  # 404 before the stream starts

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
