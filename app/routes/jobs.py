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
from model.errors import CheckpointError, UnknownCharactersError
from model.memory import training_bytes
from model.params import hidden_size_for
from model.train import TrainConfig
from model.vocab import Vocab

from ..bodies import invalid_body, parse_json, schema_ref
from ..deps import AppState, AuthDep, StateDep
from ..errors import (
    Conflict,
    Invalid,
    NotFound,
    Unavailable,
    clear_message,
    documented,
)
from ..events import CLOSING, sse_event
from ..model_meta import check_limits
from ..schemas import (
    CorpusInfo,
    HyperparametersOut,
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
from ..store import TERMINAL_STATUSES, JobActiveError, JobRecord, readable
from ..text import text_problem

router = APIRouter(prefix="/jobs", tags=["jobs"])

TERMINAL = TERMINAL_STATUSES
_WHY = {
    400: "the body could not be parsed (broken multipart)",
    401: "API key missing or wrong",
    404: "no such job (POST /jobs: no init_from model by that id or name)",
    409: "the job is already finished (cancel), or not finished yet (delete)",
    413: "request body over max_body_bytes",
    422: "invalid corpus, hyperparameters or request, or over this server's limits",
    429: "the job queue is full (see Retry-After)",
    503: "the store is not writable (disk full, read-only) or unreachable; nothing was stored",
}
_BODY_HINT = (
    "POST /jobs takes a JSON object (application/json) or multipart/form-data "
    "with a 'corpus' file and an optional 'config' JSON part"
)


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
        hyperparameters=HyperparametersOut.model_validate(job.hyperparameters),
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


_UNREADABLE: set[str] = set()


def jobs_out(jobs: list[JobRecord]) -> list[JobOut]:
    """The jobs that can be shown; one that cannot (an old bug's row) is logged, skipped."""
    return readable(jobs, job_out, "job", _UNREADABLE)


def _get(state: AppState, job_id: str) -> JobRecord:
    job = state.store.get_job(job_id)
    if job is None or not jobs_out([job]):
        raise NotFound(f"no job with id {job_id[:64]!r}")
    return job


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


def _check_ceilings(state: AppState, body: JobCreate) -> None:
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
        # with init_from the base model decides the hidden size (checked in _create)
        if value > limit and not (name == "hidden_size" and body.init_from is not None)
    ]
    if len(body.corpus) > s.max_corpus_chars:
        problems.append(
            f"corpus has {len(body.corpus)} characters; this server allows "
            f"{s.max_corpus_chars} (max_corpus_chars)"
        )
    if problems:
        raise Invalid("; ".join(problems))


# The corpus in the job process: its text (up to 4 bytes a character) and about 25 bytes
# a character while it is encoded (model/memory.py says what training_bytes leaves out).
CORPUS_BYTES_PER_CHAR = 29


def _check_size(
    state: AppState, config: TrainConfig, n_x: int, corpus_chars: int, split: tuple[int, int]
) -> None:
    """The job's model and its training memory, bounded before anything is stored."""
    s = state.settings
    try:
        check_limits(config.hidden_size, n_x, config.dtype, s.model_limits, "this job's model")
    except CheckpointError as e:
        raise Invalid(str(e)) from None
    need = (
        training_bytes(
            config.hidden_size,
            n_x,
            config.seq_length,
            config.batch_size,
            config.dtype,
            config.optimizer,
            train_chars=split[0],
            val_chars=split[1],
        )
        + CORPUS_BYTES_PER_CHAR * corpus_chars
    )
    if need > s.max_job_memory_bytes:
        raise Invalid(
            f"this job would need about {need / 2**20:,.0f} MiB of memory (hidden_size "
            f"{config.hidden_size}, {n_x} distinct characters, batch_size {config.batch_size}, "
            f"seq_length {config.seq_length}); this server allows "
            f"{s.max_job_memory_bytes / 2**20:,.0f} MiB (max_job_memory_bytes)"
        )


def _create(state: AppState, body: JobCreate, response: Response) -> JobOut:
    _check_ceilings(state, body)
    corpus = body.corpus
    if problem := text_problem(corpus):
        raise Invalid(f"corpus {problem}")
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
        if hp["hidden_size"] > state.settings.max_hidden_size:
            raise Invalid(
                f"init_from model {base.id} has hidden size {hp['hidden_size']}, over this "
                f"server's limit of {state.settings.max_hidden_size} (max_hidden_size)"
            )
        unknown = vocab.unknown(corpus)
        if unknown:
            raise UnknownCharactersError(unknown)
        n_distinct = len(Vocab.from_text(corpus))  # a fine-tuning vocabulary may hold more
    else:
        vocab = Vocab.from_text(corpus)
        n_distinct = len(vocab)
        if n_distinct > state.settings.max_vocab_size:
            raise Invalid(
                f"the corpus has {n_distinct} distinct characters; this server allows "
                f"{state.settings.max_vocab_size} (max_vocab_size)"
            )
    config = TrainConfig.from_dict({**hp, "seed": body.seed})  # ConfigError -> 422
    # Sized, not encoded: the job process encodes the corpus; a 10M-character request
    # need not pay for it twice.
    split = split_lengths(len(corpus), config.val_fraction)
    check_trainable(split[0], n_distinct, config.seq_length)  # CorpusError -> 422
    _check_size(state, config, len(vocab), len(corpus), split)

    if not state.store.writable():
        raise Unavailable("the data directory is not writable; no new jobs can be stored")
    # The queue's room is checked in the store's insert transaction (QueueFullError -> 429,
    # nothing stored), so racing submissions never overfill it; a write that fails is a
    # 503 with nothing stored (StoreUnavailable).
    job = state.store.create_job(
        body.name or "untitled",
        corpus,
        hp,
        body.seed,
        init_id,
        len(vocab),
        max_queued=state.settings.max_queued_jobs,
    )
    state.runner.submit(job.id)
    response.headers["Location"] = f"/jobs/{job.id}"
    return job_out(job)


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


@router.get("", responses=_errors(503))
def list_jobs(
    state: StateDep,
    status: JobStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
) -> JobList:
    """Jobs, newest first."""
    jobs = state.store.list_jobs(status, limit, offset)
    total = state.store.count_jobs(status)
    return JobList(items=jobs_out(jobs), total=total, limit=limit, offset=offset)


@router.get("/{job_id}", responses=_errors(404, 503))
def get_job(job_id: str, state: StateDep) -> JobOut:
    """One job: status, progress, latest losses, model id when done."""
    return job_out(_get(state, job_id))


@router.delete(
    "/{job_id}", status_code=204, dependencies=[AuthDep], responses=_errors(401, 404, 409, 503)
)
def delete_job(job_id: str, state: StateDep) -> Response:
    """Delete a finished job: its record, loss curve, corpus and state (its model stays)."""
    try:
        deleted = state.store.delete_job(job_id)
    except JobActiveError as e:
        raise Conflict(
            f"job {job_id} is {e.status}; cancel it first (POST /jobs/{job_id}/cancel), "
            "then delete it"
        ) from None
    if not deleted:
        raise NotFound(f"no job with id {job_id[:64]!r}")
    return Response(status_code=204)


@router.get("/{job_id}/metrics", responses=_errors(404, 503))
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


@router.post("/{job_id}/cancel", dependencies=[AuthDep], responses=_errors(401, 404, 409, 503))
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


KEEP_ALIVE_S = 15.0


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,  # no application/json in the schema: it never sends one
    responses={
        **_errors(404, 503),
        200: {"content": {"text/event-stream": {}}, "description": "SSE"},
    },
)
async def job_events(job_id: str, state: StateDep) -> StreamingResponse:
    """Server-Sent Events: `progress` while running, then one `status` with the final job.

    When the server shuts down, the stream ends at once (after a comment saying so):
    clients reconnect, to this server once it is back or to another replica."""
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
                    m = await asyncio.wait_for(queue.get(), timeout=KEEP_ALIVE_S)
                except TimeoutError:
                    # An event missed (e.g. a scale-out replica's Redis subscription
                    # reconnecting) must not leave the stream open forever: ask the store.
                    now = await run_in_threadpool(_get, state, job_id)
                    if now.status in TERMINAL:
                        yield sse_event("status", job_out(now).model_dump(), now.step)
                        return
                    yield ": keep-alive\n\n"
                    continue
                if m is CLOSING:
                    yield "retry: 2000\n: the server is shutting down; reconnect\n\n"
                    return
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
