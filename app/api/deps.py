"""Typed dependencies: the app's state, read back from the request, and the API key guard."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request

from ..errors import Unauthorized
from ..jobs.runner import Runner
from ..jobs.service import JobService
from ..serving.service import ModelService
from ..settings import Settings
from ..store.base import Store

if TYPE_CHECKING:
    from .sessions import SessionRegistry


@dataclass
class AppState:
    """What the lifespan built (``app/main.py``): the two services and what they stand on."""

    settings: Settings
    store: Store
    runner: Runner  # LocalRunner (embedded) or CeleryRunner (scale-out)
    jobs: JobService
    models: ModelService
    sessions: SessionRegistry  # typing sessions open in this process (WebSocket /sessions)


# Both dependencies are ``async def`` although they never await: FastAPI runs a
# plain ``def`` dependency in its thread pool, a thread hop on every request.
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.charnn
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def require_api_key(request: Request, state: StateDep) -> None:
    """When CHARNN_API_KEY is set, mutating requests must carry it (compared in constant time)."""
    key = state.settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not secrets.compare_digest(given.encode(), key.get_secret_value().encode()):
        raise Unauthorized(
            "this server needs an API key: "
            "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


AuthDep = Depends(require_api_key)
