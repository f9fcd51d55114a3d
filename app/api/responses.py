"""The error responses each route documents in the OpenAPI document: one helper.

Every route lists exactly the statuses it can answer (schemathesis checks the
answers against them), plus 413 and 422, which any request can earn (a body over
``max_body_bytes``, a parameter out of range). Each router gives its own texts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ErrorBody

Responses = dict[int | str, dict[str, Any]]


def documented(statuses: Mapping[int, str]) -> Responses:
    """OpenAPI ``responses=`` entries for error statuses, each with the ErrorBody schema."""
    return {code: {"model": ErrorBody, "description": text} for code, text in statuses.items()}


def errors_for(why: Mapping[int, str]) -> Callable[..., Responses]:
    """``errors(404, 409)``: those statuses with the router's texts, plus 413 and 422."""

    def errors(*statuses: int) -> Responses:
        return documented({s: why[s] for s in sorted({*statuses, 413, 422})})

    return errors
