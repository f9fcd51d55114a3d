"""Trained models: predict, generate, score; list, inspect, download, upload, delete.

Model math runs on the event loop in short slices (see serving.py); store and
file access runs in the thread pool, so the loop is never blocked for long.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from model.errors import CheckpointError
from model.inference import entropy_bits, iter_sample, next_distribution, score_summary
from model.params import hidden_size_for
from model.vocab import Vocab

from .. import serving
from ..bodies import json_body, json_body_doc
from ..deps import AppState, AuthDep, StateDep
from ..errors import Invalid, NotFound, Unavailable, documented
from ..events import sse_event
from ..model_cache import LoadedModel
from ..model_meta import validate_model_bytes
from ..model_schemas import (
    GenerateIn,
    GenerateOut,
    ModelList,
    ModelOut,
    NextChar,
    PredictIn,
    PredictOut,
    ScoreIn,
    ScoreOut,
)
from ..store import ModelRecord, readable
from ..text import MAX_NAME_CHARS, Name

_NAME: TypeAdapter[str] = TypeAdapter(Name)

log = logging.getLogger("charnn.models")
router = APIRouter(tags=["models"])

# Float weights barely compress (~10 %), so a genuine compressed .npz never expands 4x.
UPLOAD_EXPANSION = 4

_WHY = {
    400: "the body could not be parsed (JSON not UTF-8, broken multipart)",
    401: "API key missing or wrong",
    404: "no such model (or no model at all yet)",
    413: "request body over max_body_bytes",
    422: "invalid request, characters outside the vocabulary, or a malformed checkpoint",
    503: "the store cannot be read or written (disk full, read-only, unreachable)",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error statuses a route can answer: its own, plus 413 and 422 that any can."""
    return documented({s: _WHY[s] for s in sorted({*statuses, 413, 422})})


def model_out(m: ModelRecord) -> ModelOut:
    V = len(m.vocab)
    return ModelOut(
        id=m.id,
        name=m.name,
        created_at=m.created_at,
        job_id=m.job_id,
        vocab=m.vocab,
        vocab_size=V,
        hidden_size=hidden_size_for(m.param_count, V),
        hyperparameters=m.hyperparameters,
        train_loss=m.metrics.get("train_loss"),
        val_loss=m.metrics.get("val_loss"),
        metrics=m.metrics,
        param_count=m.param_count,
        size_bytes=m.size_bytes,
        dtype=m.dtype,
    )


async def _loaded(state: AppState, ref: str | None) -> LoadedModel:
    """The model ``ref`` names (None: the newest), loaded; the store decides existence,
    through a lookup cache that a model's deletion or addition invalidates."""
    found, record = state.models.cached_record(ref)
    if not found:
        record = await run_in_threadpool(state.models.resolve, ref)
    if record is None:
        if ref is None:
            raise NotFound("there is no trained model yet: train one with POST /jobs")
        raise NotFound(f"no model with id or name {ref[:64]!r}")
    loaded = state.models.cached(record.id)
    if loaded is None:
        try:
            loaded = await run_in_threadpool(state.models.get, record.id)
        except CheckpointError:  # it was valid when stored: the file was damaged since
            log.error("model %s: its stored checkpoint no longer loads", record.id, exc_info=True)
            raise Unavailable(
                f"model {record.id}'s stored checkpoint is damaged; the operator can find "
                "out more with `charnn check`"
            ) from None
    if loaded is None:
        raise NotFound(f"model {record.id} has no checkpoint")
    return loaded


@router.post("/predict", responses=_errors(400, 404, 503), openapi_extra=json_body_doc(PredictIn))
async def predict(state: StateDep, body: Annotated[PredictIn, json_body(PredictIn)]) -> PredictOut:
    """The probability of every next character after a prefix."""
    loaded = await _loaded(state, body.model)
    vocab: Vocab = loaded.ckpt.vocab
    text = body.text if body.unknown == "error" else vocab.drop_unknown(body.text)
    h = await serving.state_after(loaded, text)  # UnknownCharactersError -> 422 naming them
    probs = next_distribution(loaded.weights, h, body.temperature)
    order = np.argsort(-probs, kind="stable")
    if body.top_k is not None:
        order = order[: body.top_k]
    chars, top = vocab.chars, probs[order].tolist()
    return PredictOut(
        model=loaded.id,
        text=body.text,
        next=[NextChar(char=chars[i], prob=p) for i, p in zip(order.tolist(), top, strict=True)],
        entropy_bits=entropy_bits(probs),
    )


@router.post(
    "/generate",
    responses={**_errors(400, 404, 503), 200: {"content": {"text/event-stream": {}}}},
    response_model=GenerateOut,
    openapi_extra=json_body_doc(GenerateIn),
)
async def generate(state: StateDep, body: Annotated[GenerateIn, json_body(GenerateIn)]) -> Any:
    """Sample text after a prompt; ``stream: true`` sends it as Server-Sent Events."""
    loaded = await _loaded(state, body.model)
    if any(not s for s in body.stop):
        raise Invalid("stop strings must not be empty")
    prompt_state = await serving.state_after(loaded, body.prompt)  # unknown characters: 422
    stream = iter_sample(
        loaded.weights,
        loaded.ckpt.vocab,
        body.prompt,
        state=prompt_state,
        max_chars=body.max_chars,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop,
    )
    if not body.stream:
        text = await serving.sample_all(stream, loaded.weights.n_a)
        reason = stream.finish_reason or "length"
        return GenerateOut(model=loaded.id, text=text, finish_reason=reason)

    async def events() -> AsyncIterator[str]:
        parts: list[str] = []
        while chunk := await serving.sample_slice(stream, loaded.weights.n_a):
            for ch in chunk:
                parts.append(ch)
                yield sse_event("chunk", {"text": ch})
        final = {"model": loaded.id, "text": "".join(parts)}
        yield sse_event("done", {**final, "finish_reason": stream.finish_reason or "length"})

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/score", responses=_errors(400, 404, 503), openapi_extra=json_body_doc(ScoreIn))
async def score_text(state: StateDep, body: Annotated[ScoreIn, json_body(ScoreIn)]) -> ScoreOut:
    """One natural-log probability per character, the first given the empty prefix."""
    loaded = await _loaded(state, body.model)
    logprobs = await serving.score_text(loaded, body.text)
    s = score_summary(logprobs)
    return ScoreOut(
        model=loaded.id,
        chars=s.chars,
        logprobs=logprobs.tolist(),
        mean_nats=s.mean_nats,
        bits_per_char=s.bits_per_char,
        perplexity=s.perplexity,
    )


_UNREADABLE: set[str] = set()


def models_out(records: list[ModelRecord]) -> list[ModelOut]:
    """The models that can be shown; one that cannot (an old bug's row) is logged, skipped."""
    return readable(records, model_out, "model", _UNREADABLE)


@router.get("/models", responses=_errors(503))
def list_models(
    state: StateDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
) -> ModelList:
    """Models, newest first."""
    items = models_out(state.store.list_models(limit, offset))
    return ModelList(items=items, total=state.store.count_models(), limit=limit, offset=offset)


@router.get("/models/{model_id}", responses=_errors(404, 503))
def get_model(model_id: str, state: StateDep) -> ModelOut:
    """One model: name, vocabulary in index order, hyperparameters, losses, size."""
    record = state.store.get_model(model_id)
    shown = models_out([record]) if record is not None else []
    if not shown:
        raise NotFound(f"no model with id {model_id[:64]!r}")
    return shown[0]


@router.delete(
    "/models/{model_id}",
    status_code=204,
    dependencies=[AuthDep],
    responses=_errors(401, 404, 503),
)
def delete_model(model_id: str, state: StateDep) -> Response:
    """Delete a model and its checkpoint."""
    if not state.store.delete_model(model_id):
        raise NotFound(f"no model with id {model_id[:64]!r}")
    state.models.forget(model_id)
    return Response(status_code=204)


@router.get(
    "/models/{model_id}/checkpoint",
    response_class=Response,  # no application/json in the schema: it never sends one
    responses={
        **_errors(404, 503),
        200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
    },
)
def download_checkpoint(model_id: str, state: StateDep) -> Response:
    """The model's .npz: arrays Wax, Waa, Wya, ba, by and a JSON meta string."""
    data = state.store.read_model_bytes(model_id)
    if data is None:
        raise NotFound(f"no model with id {model_id[:64]!r}")
    headers = {"Content-Disposition": f'attachment; filename="{model_id}.npz"'}
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.post(
    "/models",
    status_code=201,
    dependencies=[AuthDep],
    responses=_errors(400, 401, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "name": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_CHARS},
                        },
                    }
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def upload_model(request: Request, response: Response, state: StateDep) -> ModelOut:
    """Upload a .npz checkpoint; validated strictly (as a trained one) and never unpickled."""
    name = request.query_params.get("name")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        async with request.form() as form:
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise Invalid("multipart body needs a 'file' part holding the .npz")
            data = await part.read()
            form_name = form.get("name")
            if isinstance(form_name, str):
                name = form_name
    else:
        data = await request.body()
    if name is not None:
        try:
            name = _NAME.validate_python(name)
        except ValidationError as e:
            raise Invalid(f"name: {e.errors()[0]['msg']}") from None
    # Uncompressed, an upload may be at most UPLOAD_EXPANSION times the body limit: a
    # small zip bomb must not make the server allocate the loader's 512 MB default.
    limit = UPLOAD_EXPANSION * state.settings.max_body_bytes

    def store_it() -> ModelRecord:
        # CheckpointError -> 422 saying which field or ceiling; StoreError -> 503.
        valid = validate_model_bytes(data, state.settings.model_limits, max_bytes=limit)
        return state.store.add_model(
            name or valid.name or "uploaded",
            None,
            data,
            valid.hyperparameters,
            valid.metrics,
            valid.vocab,
            valid.param_count,
            valid.dtype,
        )

    record = await run_in_threadpool(store_it)
    response.headers["Location"] = f"/models/{record.id}"
    return model_out(record)
