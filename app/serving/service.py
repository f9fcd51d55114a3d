"""Serving models: find and load one, predict, generate, score; list, upload, delete.

The HTTP routes (``app/api/models.py``) parse a request, call one method here
and send what it returns. Model math runs on the event loop in short slices
(``slices.py``: why not threads); store and file access are plain methods the
routes run in the thread pool. Refusals are the service errors of
``app/errors.py``; characters outside a vocabulary are model/'s
``UnknownCharactersError``; a checkpoint that fails validation is
``CheckpointError``: both map to 422 there.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.concurrency import run_in_threadpool
from pydantic import TypeAdapter, ValidationError

from model.errors import CheckpointError
from model.inference import Chooser, make_chooser, next_distribution, score_summary
from model.params import hidden_size_for

from ..domain import ModelLimits, Name
from ..errors import Invalid, NotFound, Unavailable, error_payload
from ..metrics import GENERATIONS, MODEL_CACHE, PREDICTIONS, SCORES
from ..store.base import ModelRecord, Store, readable
from ..store.validation import validate_model_bytes
from . import slices
from .cache import LoadedModel, ModelCache
from .numbers import ranked, significant, significant1
from .schemas import (
    GenerateIn,
    GenerateOut,
    ModelList,
    ModelOut,
    PredictIn,
    PredictOut,
    ScoreIn,
    ScoreOut,
)

log = logging.getLogger("charnn.serving")

# Float weights barely compress (~10 %), so a genuine compressed .npz never expands 4x.
UPLOAD_EXPANSION = 4
_NAME: TypeAdapter[str] = TypeAdapter(Name)
Event = tuple[str, dict[str, Any]]  # (event name, data): the route makes it Server-Sent
_UNREADABLE: set[str] = set()


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


def models_out(records: list[ModelRecord]) -> list[ModelOut]:
    """The models that can be shown; one that cannot (an old bug's row) is logged, skipped."""
    return readable(records, model_out, "model", _UNREADABLE)


def _not_found(model_id: str) -> NotFound:
    return NotFound(f"no model with id {model_id[:64]!r}")


class ModelService:
    def __init__(
        self, store: Store, cache: ModelCache, limits: ModelLimits, max_body_bytes: int
    ) -> None:
        self.store = store
        self.cache = cache
        self.limits = limits
        # Uncompressed, an upload may be at most UPLOAD_EXPANSION times the body limit: a
        # small zip bomb must not make the server allocate the loader's 512 MB default.
        self.max_upload_bytes = UPLOAD_EXPANSION * max_body_bytes

    # ------------------------------------------------------------------ computing

    async def loaded(self, ref: str | None) -> LoadedModel:
        """The model ``ref`` names (None: the newest), loaded; the store decides existence,
        through a lookup cache that a model's deletion or addition invalidates."""
        found, record = self.cache.cached_record(ref)
        if not found:
            record = await run_in_threadpool(self.cache.resolve, ref)
        if record is None:
            if ref is None:
                raise NotFound("there is no trained model yet: train one with POST /jobs")
            raise NotFound(f"no model with id or name {ref[:64]!r}")
        loaded = self.cache.cached(record.id)
        if loaded is not None:
            MODEL_CACHE.labels("hit").inc()
        else:
            try:
                loaded = await run_in_threadpool(self.cache.get, record.id)
            except CheckpointError:  # it was valid when stored: the file was damaged since
                log.error("model %s: its stored checkpoint no longer loads", record.id)
                raise Unavailable(
                    f"model {record.id}'s stored checkpoint is damaged; the operator can find "
                    "out more with `charnn check`"
                ) from None
        if loaded is None:
            raise NotFound(f"model {record.id} has no checkpoint")
        return loaded

    async def predict(self, body: PredictIn) -> PredictOut:
        loaded = await self.loaded(body.model)
        vocab = loaded.ckpt.vocab
        text = body.text if body.unknown == "error" else vocab.drop_unknown(body.text)
        h = await slices.state_after(loaded, text)  # UnknownCharactersError -> 422 naming them
        probs = next_distribution(loaded.weights, h, body.temperature)
        nxt, entropy = ranked(probs, vocab.chars, body.top_k)
        PREDICTIONS.labels(loaded.id).inc()
        answer = {"model": loaded.id, "text": body.text, "next": nxt, "entropy_bits": entropy}
        return PredictOut.model_validate(answer)

    async def _sampler(self, body: GenerateIn) -> tuple[LoadedModel, np.ndarray, Chooser]:
        loaded = await self.loaded(body.model)
        if any(not s for s in body.stop):
            raise Invalid("stop strings must not be empty")
        chooser = make_chooser(
            loaded.weights,
            loaded.ckpt.vocab,
            max_chars=body.max_chars,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop,
        )
        prompt_state = await slices.state_after(loaded, body.prompt)  # unknown characters: 422
        GENERATIONS.labels(loaded.id).inc()
        return loaded, prompt_state, chooser

    async def generate(self, body: GenerateIn) -> GenerateOut:
        loaded, h, chooser = await self._sampler(body)
        text = await slices.sample_all(loaded, h, chooser)
        if body.include_prompt:
            text = body.prompt + text
        return GenerateOut(
            model=loaded.id, text=text, finish_reason=chooser.finish_reason or "length"
        )

    async def generate_events(self, body: GenerateIn) -> AsyncIterator[Event]:
        """The sample as events: one ``chunk`` per character, then ``done``. Refusals (no
        such model, unknown characters) are raised here, before the first event; a
        failure midway is a last ``error`` event (the error shape), not a cut stream."""
        loaded, h, chooser = await self._sampler(body)

        async def events() -> AsyncIterator[Event]:
            parts: list[str] = []
            if body.include_prompt and body.prompt:
                parts.append(body.prompt)
                yield "chunk", {"text": body.prompt}
            pieces = slices.sample(loaded, h, chooser)
            try:
                async for piece in pieces:
                    for ch in piece:
                        parts.append(ch)
                        yield "chunk", {"text": ch}
            except Exception as e:  # the 200 is sent: the client is told in the stream
                yield "error", error_payload(e, "generation")
                return
            finally:
                await pieces.aclose()  # a client gone: leave the batch now
            final = {"model": loaded.id, "text": "".join(parts)}
            yield "done", {**final, "finish_reason": chooser.finish_reason or "length"}

        return events()

    async def score(self, body: ScoreIn) -> ScoreOut:
        loaded = await self.loaded(body.model)
        logprobs = await slices.score_text(loaded, body.text)
        s = score_summary(logprobs)
        SCORES.labels(loaded.id).inc()
        return ScoreOut(
            model=loaded.id,
            chars=s.chars,
            logprobs=significant(logprobs),
            mean_nats=significant1(s.mean_nats),
            bits_per_char=significant1(s.bits_per_char),
            perplexity=significant1(s.perplexity),
        )

    # ------------------------------------------------------------------ managing (blocking)

    def list(self, limit: int, offset: int) -> ModelList:
        items = models_out(self.store.list_models(limit, offset))
        return ModelList(items=items, total=self.store.count_models(), limit=limit, offset=offset)

    def _record(self, ref: str) -> ModelRecord:
        """The model ``ref`` names: an id, or a name (the newest model with it), as
        ``/predict`` reads ``model``."""
        record = self.cache.resolve(ref)
        if record is None:
            raise NotFound(f"no model with id or name {ref[:64]!r}")
        return record

    def get(self, ref: str) -> ModelOut:
        shown = models_out([self._record(ref)])
        if not shown:
            raise NotFound(f"model {ref[:64]!r} cannot be shown (see the server log)")
        return shown[0]

    def delete(self, model_id: str) -> None:
        """By id only: a name may mean another model by the time the request runs."""
        if not self.store.delete_model(model_id):
            record = self.cache.resolve(model_id)
            if record is not None:
                raise NotFound(
                    f"{model_id[:64]!r} is a name, and DELETE takes a model id: the newest "
                    f"model with this name is {record.id}"
                )
            raise _not_found(model_id)
        self.cache.forget(model_id)

    def checkpoint(self, ref: str) -> tuple[str, bytes]:
        """(model id, .npz bytes) of the model ``ref`` names."""
        record = self._record(ref)
        data = self.store.read_model_bytes(record.id)
        if data is None:
            raise _not_found(record.id)
        return record.id, data

    def upload(self, data: bytes, name: str | None) -> ModelOut:
        """Store an uploaded checkpoint, validated as a trained one (CheckpointError ->
        422 naming the field or ceiling; a store that cannot write -> 503)."""
        if name is not None:
            try:
                name = _NAME.validate_python(name)
            except ValidationError as e:
                raise Invalid(f"name: {e.errors()[0]['msg']}") from None
        valid = validate_model_bytes(data, self.limits, max_bytes=self.max_upload_bytes)
        record = self.store.add_model(valid.to_store(name or valid.name or "uploaded", data))
        return model_out(record)
