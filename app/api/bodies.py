"""Request bodies, read the same way at every door.

A JSON body is parsed as JSON whatever its ``Content-Type`` says (``curl -d``
sends ``application/x-www-form-urlencoded``; FastAPI's own body parameters would
then answer "Input should be a valid dictionary"), validated by its pydantic
model in strict mode, and every problem becomes one 422 that names the field,
never echoing the input. The OpenAPI document still describes each body: routes
declare it with :func:`json_body_doc`, and ``app.openapi`` puts the models in
``components/schemas`` so every ``$ref`` resolves.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from ..errors import SURROGATE_MESSAGE, Invalid, clear_message

M = TypeVar("M", bound=BaseModel)


def invalid_body(e: ValidationError, hint: str = "") -> Invalid:
    """One 422 for a body that did not validate: the first problem in the message,
    every problem in ``details`` (locations and messages, never the input)."""
    errors = e.errors()
    details = [
        {"loc": [str(p) for p in x["loc"]], "msg": clear_message(x["msg"], x["type"])}
        for x in errors
    ]
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    message = f"{where}: {details[0]['msg']}"
    if first["type"] == "json_invalid" and details[0]["msg"] != SURROGATE_MESSAGE and hint:
        message += f"; {hint}"
    return Invalid(message, details)


def parse_json(model: type[M], raw: bytes, hint: str = "") -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise invalid_body(e, hint) from None


def json_body(model: type[M]) -> Any:
    """A dependency yielding the request body as ``model`` (see the module docstring)."""
    hint = f"this endpoint takes a JSON object ({model.__name__})"

    async def read(request: Request) -> M:
        return parse_json(model, await request.body(), hint)

    return Depends(read)


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` describing a JSON request body of ``model``."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema_ref(model)}},
        }
    }
