"""Trained models over HTTP: predict, generate, score; list, inspect, download, upload, delete.

Each route parses its request, calls one method of ``ModelService`` and sends the
answer; the serving rules live in ``app/serving/service.py``. Model math runs on
the event loop in short slices; store and file access run in the thread pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from ..domain import MAX_NAME_CHARS
from ..errors import Invalid
from ..serving.export import etag, web_export
from ..serving.schemas import (
    GenerateIn,
    GenerateOut,
    ModelList,
    ModelOut,
    PredictIn,
    PredictOut,
    ScoreIn,
    ScoreOut,
)
from .bodies import json_body, json_body_doc
from .deps import AuthDep, StateDep
from .responses import errors_for
from .sse import sse_event

router = APIRouter(tags=["models"])

errors = errors_for(
    {
        400: "the body could not be parsed (JSON not UTF-8, broken multipart)",
        401: "API key missing or wrong",
        404: "no such model (or no model at all yet)",
        413: "request body over max_body_bytes",
        422: "invalid request, characters outside the vocabulary, or a malformed checkpoint",
        503: "the store cannot be read or written (disk full, read-only, unreachable)",
    }
)


@router.post("/predict", responses=errors(400, 404, 503), openapi_extra=json_body_doc(PredictIn))
async def predict(state: StateDep, body: Annotated[PredictIn, json_body(PredictIn)]) -> PredictOut:
    """The probability of every next character after a prefix."""
    return await state.models.predict(body)


@router.post(
    "/generate",
    responses={**errors(400, 404, 503), 200: {"content": {"text/event-stream": {}}}},
    response_model=GenerateOut,
    openapi_extra=json_body_doc(GenerateIn),
)
async def generate(state: StateDep, body: Annotated[GenerateIn, json_body(GenerateIn)]) -> Any:
    """Sample text after a prompt; ``stream: true`` sends it as Server-Sent Events."""
    if not body.stream:
        return await state.models.generate(body)
    events = await state.models.generate_events(body)  # refusals before the stream starts

    async def stream() -> AsyncIterator[str]:
        async for event, data in events:
            yield sse_event(event, data)

    return StreamingResponse(stream(), media_type="text/event-stream")


@router.post("/score", responses=errors(400, 404, 503), openapi_extra=json_body_doc(ScoreIn))
async def score_text(state: StateDep, body: Annotated[ScoreIn, json_body(ScoreIn)]) -> ScoreOut:
    """One natural-log probability per character, the first given the empty prefix."""
    return await state.models.score(body)


@router.get("/models", responses=errors(503))
def list_models(
    state: StateDep,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10**9),
) -> ModelList:
    """Models, newest first."""
    return state.models.list(limit, offset)


@router.get("/models/{model_id}", responses=errors(404, 503))
def get_model(model_id: str, state: StateDep) -> ModelOut:
    """One model, by id or name (a name means the newest model with it): name,
    vocabulary in index order, hyperparameters, losses, size."""
    return state.models.get(model_id)


@router.delete(
    "/models/{model_id}",
    status_code=204,
    dependencies=[AuthDep],
    responses=errors(401, 404, 503),
)
def delete_model(model_id: str, state: StateDep) -> Response:
    """Delete a model and its checkpoint, by id only (a name could have come to mean
    another model)."""
    state.models.delete(model_id)
    return Response(status_code=204)


@router.get(
    "/models/{model_id}/checkpoint",
    response_class=Response,  # no application/json in the schema: it never sends one
    responses={
        **errors(404, 503),
        200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
    },
)
def download_checkpoint(model_id: str, state: StateDep) -> Response:
    """The .npz of a model, by id or name: arrays Wax, Waa, Wya, ba, by and a JSON meta
    string. ``X-Model-Id`` says which model a name meant."""
    model_id, data = state.models.checkpoint(model_id)
    headers = {
        "Content-Disposition": f'attachment; filename="{model_id}.npz"',
        "X-Model-Id": model_id,
    }
    return Response(data, media_type="application/octet-stream", headers=headers)


@router.get(
    "/models/{model_id}/web",
    response_class=Response,
    responses={
        **errors(404, 503),
        200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}},
        304: {"description": "the client's copy (If-None-Match) is current"},
    },
)
async def download_web(model_id: str, request: Request, state: StateDep) -> Response:
    """The model for the browser, by id or name: one file in the safetensors layout
    (float32 weights, vocabulary, hidden size, format version) that ``/static/charnn.js``
    loads. Cached for a year by id (a model never changes); by name, revalidated with
    its ETag, since a name can come to mean a newer model."""
    resolved, data = await web_export(state.models, model_id)
    tag = etag(resolved)
    headers = {
        "ETag": tag,
        "X-Model-Id": resolved,
        "Cache-Control": (
            "public, max-age=31536000, immutable" if resolved == model_id else "no-cache"
        ),
        "Content-Disposition": f'attachment; filename="{resolved}.safetensors"',
    }
    asked = request.headers.get("if-none-match", "")
    if tag in (t.strip().removeprefix("W/") for t in asked.split(",")) or asked.strip() == "*":
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="application/octet-stream", headers=headers)


_UPLOAD_DOC: dict[str, Any] = {
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
}


@router.post(
    "/models",
    status_code=201,
    dependencies=[AuthDep],
    responses=errors(400, 401, 503),
    openapi_extra=_UPLOAD_DOC,
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
    model = await run_in_threadpool(state.models.upload, data, name)
    response.headers["Location"] = f"/models/{model.id}"
    return model
