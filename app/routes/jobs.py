"""Training jobs: submit a corpus, follow the loss, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from model.data import check_trainable, split_lengths
from model.errors import UnknownCharactersError
from model.params import hidden_size_for
from model.train import TrainConfig
from model.vocab import Vocab

from ..deps import AppState, AuthDep, StateDep
from ..errors import (
    SURROGATE_MESSAGE,
    Conflict,
    Invalid,
    NotFound,
    QueueFull,
    Unavailable,
    clear_message,
    documented,
)
from ..events import sse_event
from ..runner import QueueFullError
from ..schemas import (
    CorpusInfo,
    Hyperparameters,
    JobConfig,
    JobCreate,
    JobList,
    JobMetrics,
    JobOut,
    JobProgress,
    JobStatus,
    MetricPointOut,
    MetricsOut,
)
from ..store import JobRecord

router = APIRouter(prefix="/jobs", tags=["jobs"])

TERMINAL = ("succeeded", "failed", "cancelled")
RETRY_AFTER_S = "10"
_WHY = {
    400: "the body could not be parsed (broken multipart)",
    401: "API key missing or wrong",
    404: "no such job (POST /jobs: no init_from model by that id or name)",
    409: "the job is already finished",
    413: "request body over max_body_bytes",
    422: "invalid corpus, hyperparameters or request",
    429: "the job queue is full (see Retry-After)",
    503: "the store is not writable",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error statuses a route can answer: its own, plus 413 and 422 that any can."""
    return documented({s: _WHY[s] for s in sorted({*statuses, 413, 422})})


def job_out(job: JobRecord) -> JobOut:
    total = job.total_steps or job.hyperparameters.get("max_steps")
    return JobOut(
        id=job.id,
        name=job.name,
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        hyperparameters=Hyperparameters.model_validate(job.hyperparameters),
        seed=job.seed,
        init_from=job.init_from,
        corpus=CorpusInfo(chars=job.corpus_chars, vocab_size=job.vocab_size),
        progress=JobProgress(
            step=job.step,
            total_steps=total,
            fraction=min(job.step / total, 1.0) if total else None,
            eta_s=job.eta_s if job.status == "running" else None,
        ),
        metrics=JobMetrics(
            train_loss=job.train_loss, val_loss=job.val_loss, chars_per_sec=job.chars_per_sec
        ),
        model_id=job.model_id,
        error=job.error,
    )


def _get(state: AppState, job_id: str) -> JobRecord:
    job = state.store.get_job(job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id[:64]!r}")
    return job


async def _read_body(request: Request) -> JobCreate:
    """JSON, or multipart (see _read_form); validation problems become one 422."""
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            async with request.form() as form:
                return await _read_form(form)
        return JobCreate.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        details = [
            {"loc": [str(p) for p in x["loc"]], "msg": clear_message(x["msg"], x["type"])}
            for x in e.errors()
        ]
        message = f"{where}: {details[0]['msg']}"
        if first["type"] == "json_invalid" and details[0]["msg"] != SURROGATE_MESSAGE:
            message += (
                "; POST /jobs takes a JSON object (application/json) or multipart/form-data "
                "with a 'corpus' file and an optional 'config' JSON part"
            )
        raise Invalid(message, details) from None


async def _read_form(form: FormData) -> JobCreate:
    """The multipart body: a ``corpus`` file (UTF-8) and an optional ``config`` JSON part."""
    part = form.get("corpus")
    if part is None:
        raise Invalid("multipart body needs a 'corpus' part (UTF-8 text)")
    raw = await part.read() if isinstance(part, UploadFile) else part.encode()
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


def _check_limits(state: AppState, body: JobCreate) -> None:
    s, hp = state.settings, body.hyperparameters
    problems = [
        f"{name} {value} is over this server's limit of {limit}"
        for name, value, limit in (
            ("hidden_size", hp.hidden_size, s.max_hidden_size),
            ("seq_length", hp.seq_length, s.max_seq_length),
            ("batch_size", hp.batch_size, s.max_batch_size),
            ("max_steps", hp.max_steps or 0, s.max_steps),
            ("time_limit_s", hp.time_limit_s or 0, s.max_time_limit_s),
        )
        if value > limit
    ]
    if len(body.corpus) > s.max_corpus_chars:
        problems.append(
            f"corpus has {len(body.corpus)} characters; this server allows "
            f"{s.max_corpus_chars} (max_corpus_chars)"
        )
    if problems:
        raise Invalid("; ".join(problems))


def _create(state: AppState, body: JobCreate, response: Response) -> JobOut:
    _check_limits(state, body)
    corpus = body.corpus
    try:
        corpus.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid("corpus contains lone UTF-16 surrogates (e.g. \\ud800)") from None
    if "\x00" in corpus:
        raise Invalid("corpus contains NUL characters")
    if body.name is not None and "\x00" in body.name:
        raise Invalid("name must not contain NUL characters")
    if not corpus.strip():
        raise Invalid("the corpus is empty or only whitespace")
    hp = body.hyperparameters.model_dump()
    init_id = None
    if body.init_from is not None:
        base = state.store.resolve_model(body.init_from)
        if base is None:
            raise NotFound(f"no model with id or name {body.init_from[:64]!r} to start from")
        vocab = Vocab(tuple(base.vocab))
        init_id, hp["hidden_size"] = base.id, hidden_size_for(base.param_count, len(vocab))
        unknown = vocab.unknown(corpus)
        if unknown:
            raise UnknownCharactersError(unknown)
    else:
        vocab = Vocab.from_text(corpus)
    config = TrainConfig.from_dict({**hp, "seed": body.seed})  # ConfigError -> 422
    # Sized, not encoded: the job process encodes the corpus; a 10M-character request
    # need not pay for it twice. A fine-tuning vocabulary may hold more than the corpus.
    n_train, _ = split_lengths(len(corpus), config.val_fraction)
    n_distinct = len(Vocab.from_text(corpus)) if init_id is not None else len(vocab)
    check_trainable(n_train, n_distinct, config.seq_length)  # CorpusError -> 422

    if state.runner.queued() >= state.settings.max_queued_jobs:
        raise QueueFull(
            f"{state.settings.max_queued_jobs} jobs are already waiting; try again later",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if not state.store.writable():
        raise Unavailable("the data directory is not writable; no new jobs can be stored")
    try:
        job = state.store.create_job(
            body.name or "untitled", corpus, hp, body.seed, init_id, len(vocab)
        )
    except OSError as e:  # e.g. the disk filled up since the check: nothing was stored
        raise Unavailable(
            f"the data directory is not writable ({e.strerror}); no new jobs can be stored"
        ) from None
    try:
        state.runner.submit(job.id)
    except QueueFullError as e:
        state.store.update_job(job.id, status="failed", error="the job queue was full")
        raise QueueFull(str(e), headers={"Retry-After": RETRY_AFTER_S}) from None
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_out(job)


_JOB_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": JobCreate.model_json_schema()},
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


@router.post(
    "",
    status_code=202,
    dependencies=[AuthDep],
    responses=_errors(400, 401, 404, 429, 503),
    openapi_extra=_JOB_BODY_DOC,
)
async def create_job(request: Request, response: Response, state: StateDep) -> JobOut:
    """Start training on a corpus (JSON body, or multipart with a corpus file)."""
    body = await _read_body(request)
    return await run_in_threadpool(_create, state, body, response)


@router.get("", responses=_errors())
def list_jobs(
    state: StateDep,
    status: JobStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
) -> JobList:
    """Jobs, newest first."""
    jobs = state.store.list_jobs(status, limit, offset)
    total = state.store.count_jobs(status)
    return JobList(items=[job_out(j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", responses=_errors(404))
def get_job(job_id: str, state: StateDep) -> JobOut:
    """One job: status, progress, latest losses, model id when done."""
    return job_out(_get(state, job_id))


@router.get("/{job_id}/metrics", responses=_errors(404))
def get_metrics(
    job_id: str, state: StateDep, after_step: int = Query(-1, ge=-1, le=10**12)
) -> MetricsOut:
    """The loss curve, optionally only the points after a step."""
    _get(state, job_id)
    points = state.store.get_metrics(job_id, after_step)
    return MetricsOut(
        job_id=job_id,
        points=[
            MetricPointOut(
                step=p.step, elapsed_s=p.elapsed_s, train_loss=p.train_loss, val_loss=p.val_loss
            )
            for p in points
        ],
    )


@router.post("/{job_id}/cancel", dependencies=[AuthDep], responses=_errors(401, 404, 409))
async def cancel_job(job_id: str, state: StateDep) -> JobOut:
    """Stop a queued or running job; answers once it is cancelled (about a second)."""
    job = await run_in_threadpool(_get, state, job_id)
    if job.status in TERMINAL:
        raise Conflict(
            f"job {job_id} is already {job.status}; only queued or running jobs can be cancelled"
        )
    state.runner.cancel(job_id)
    for _ in range(100):  # up to ~5 s
        job = await run_in_threadpool(_get, state, job_id)
        if job.status in TERMINAL:
            break
        await asyncio.sleep(0.05)
    return job_out(job)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,  # no application/json in the schema: it never sends one
    responses={**_errors(404), 200: {"content": {"text/event-stream": {}}, "description": "SSE"}},
)
async def job_events(job_id: str, state: StateDep) -> StreamingResponse:
    """Server-Sent Events: `progress` while running, then one `status` with the final job."""
    await run_in_threadpool(_get, state, job_id)  # 404 before the stream starts

    async def stream() -> AsyncIterator[str]:
        # Subscribe inside the stream, so one that never starts (client gone)
        # leaves no subscription behind; before the snapshot, so nothing is missed.
        queue = state.events.subscribe(job_id)
        try:
            current = await run_in_threadpool(_get, state, job_id)
            snapshot = job_out(current).model_dump()
            if current.status in TERMINAL:
                yield sse_event("status", snapshot, current.step)
                return
            yield sse_event("progress", {"step": current.step, "job": snapshot}, current.step)
            while True:
                try:
                    m = await asyncio.wait_for(queue.get(), timeout=15)
                except TimeoutError:
                    # An event missed (e.g. a scale-out replica's Redis subscription
                    # reconnecting) must not leave the stream open forever: ask the store.
                    now = await run_in_threadpool(_get, state, job_id)
                    if now.status in TERMINAL:
                        yield sse_event("status", job_out(now).model_dump(), now.step)
                        return
                    yield ": keep-alive\n\n"
                    continue
                if m.get("type") == "progress":
                    data = {k: v for k, v in m.items() if k != "type"}
                    yield sse_event("progress", data, int(m["step"]))
                elif m.get("type") == "status" and m.get("status") in TERMINAL:
                    final = await run_in_threadpool(_get, state, job_id)
                    yield sse_event("status", job_out(final).model_dump(), final.step)
                    return
        finally:
            state.events.unsubscribe(job_id, queue)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
