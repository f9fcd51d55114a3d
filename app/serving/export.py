"""A model for the browser: its web export (``model/web.py``), made once per loaded model.

A model never changes, so the bytes are cached with the loaded model and answered
with an ETag that names the model and the export's format version.
"""

from __future__ import annotations

from fastapi.concurrency import run_in_threadpool

from model.web import WEB_FORMAT_VERSION, web_bytes

from .service import ModelService


def etag(model_id: str) -> str:
    return f'"{model_id}.web{WEB_FORMAT_VERSION}"'


async def web_export(models: ModelService, ref: str) -> tuple[str, bytes]:
    """(model id, web export bytes) of the model ``ref`` (id or name) names."""
    loaded = await models.loaded(ref)
    if loaded.web is None:
        found, record = models.cache.cached_record(loaded.id)
        if not found:
            record = await run_in_threadpool(models.cache.resolve, loaded.id)
        extra = {"model_id": loaded.id}
        if record is not None:
            extra["name"] = record.name  # the store's (an upload may rename its file's)
        loaded.web = await run_in_threadpool(web_bytes, loaded.ckpt, extra)
    return loaded.id, loaded.web
