"""Request ids: on every answer, in every error body, in the access log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from app.api.observe import SANE_ID

from ..conftest import asgi_client, settings_for


def test_every_answer_and_error_carries_the_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        settings = settings_for(tmp_path, api_key="k", max_body_bytes=1024)
        async with asgi_client(settings) as c:
            mine = {"X-Request-ID": "client-42.a:b/c+d=e"}
            r = await c.get("/healthz", headers=mine)
            assert r.headers["x-request-id"] == "client-42.a:b/c+d=e"
            fresh = {(await c.get("/healthz")).headers["x-request-id"] for _ in range(3)}
            assert len(fresh) == 3 and all(SANE_ID.fullmatch(i) for i in fresh)
            # an id that is not sane (too long, spaces, control characters) is replaced
            for bad in ("x" * 129, "has space", "new\tline", ""):
                got = (await c.get("/healthz", headers={"X-Request-ID": bad})).headers
                assert got["x-request-id"] != bad and SANE_ID.fullmatch(got["x-request-id"])

            errors = [
                await c.get("/models/nope", headers=mine),  # 404
                await c.post("/predict", json={"top_k": 0}, headers=mine),  # 422 (a list)
                await c.post("/jobs", json={"corpus": "ab"}, headers=mine),  # 401
                await c.post("/predict", content=b"x" * 2000, headers=mine),  # 413
                await c.get("/no/such/route", headers=mine),  # 404 from the router
            ]
            for r in errors:
                assert r.status_code >= 400, r.text
                assert r.headers["x-request-id"] == mine["X-Request-ID"], r.status_code
                assert r.json()["error"]["request_id"] == mine["X-Request-ID"], r.text

    with caplog.at_level(logging.INFO, logger="charnn.access"):
        asyncio.run(go())
    lines = [r for r in caplog.records if r.name == "charnn.access"]
    ours = [r for r in lines if getattr(r, "request_id", None) == "client-42.a:b/c+d=e"]
    assert len(ours) == 6, [r.getMessage() for r in lines]
    routes = {(r.route, r.status) for r in ours}  # type: ignore[attr-defined]
    assert ("/models/{model_id}", 404) in routes and ("unmatched", 404) in routes
    assert ("/predict", 422) in routes and ("/jobs", 401) in routes
    assert all("id=client-42.a:b/c+d=e" in r.getMessage() for r in ours)
