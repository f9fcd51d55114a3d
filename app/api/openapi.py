"""The OpenAPI document: FastAPI's, plus the request bodies that routes read themselves.

Routes that parse their own bodies (``app/bodies.py``, multipart uploads) refer
to their models as ``#/components/schemas/<Model>``; this adds those models, and
the models they use, to ``components/schemas`` in the same flat layout FastAPI
uses, so every ``$ref`` resolves (a ``$ref`` into a nested ``$defs`` does not
for some tools: schemathesis could not fuzz the hyperparameters of ``POST /jobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema


def install_openapi(app: FastAPI, body_models: Sequence[type[BaseModel]]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        _, defs = models_json_schema(
            [(m, "validation") for m in body_models],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in defs.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
