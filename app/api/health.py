"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from ..errors import Unavailable
from .deps import StateDep
from .responses import documented

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


_TOO_BIG = "request body over max_body_bytes (any request can carry one)"


@router.get("/healthz", responses=documented({413: _TOO_BIG}))
async def healthz() -> Health:
    """The process is alive (no I/O: cheap enough to poll)."""
    return Health(status="ok")


@router.get("/readyz", responses=documented({413: _TOO_BIG, 503: "not ready"}))
async def readyz(state: StateDep) -> Health:
    """Ready when the store is writable and the job runner is alive."""
    problems = []
    if not await run_in_threadpool(state.store.writable):
        problems.append("the data directory is not writable")
    if not state.runner.alive():
        problems.append("the job runner is not running")
    if problems:
        raise Unavailable("; ".join(problems), details={"problems": problems})
    return Health(status="ready")
