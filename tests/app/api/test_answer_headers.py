"""One pass over each answer's headers (app/api/observe.py with security.py's headers): every
header once, the app's own kept, the id last; WebSocket sessions pass through untouched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from app.api.observe import answer_headers
from app.api.security import CSP, security_headers

from ..conftest import Server
from .test_concurrent_predict import model_bytes

SECURITY = ["x-content-type-options", "referrer-policy", "x-frame-options"]


def test_missing_headers_are_added_once_and_the_apps_own_are_kept() -> None:
    app_set = [(b"content-type", b"text/html"), (b"content-security-policy", b"img-src 'self'")]
    out = answer_headers(app_set, b"rid-1", security_headers("/"))
    assert [k for k, _ in out] == [
        b"content-type",
        b"content-security-policy",
        *(k.encode() for k in SECURITY),
        b"x-request-id",
    ]
    assert dict(out)[b"content-security-policy"] == b"img-src 'self'"  # the page's own policy
    assert dict(out)[b"x-request-id"] == b"rid-1"
    # an id the app set is replaced in place (duplicates dropped), as MutableHeaders sets it
    twice = [(b"x-request-id", b"a"), (b"x-frame-options", b"SAMEORIGIN"), (b"x-request-id", b"b")]
    out = answer_headers(twice, b"rid-2", security_headers("/docs"))
    assert out[0] == (b"x-request-id", b"rid-2")
    assert [k for k, _ in out].count(b"x-request-id") == 1
    assert dict(out)[b"x-frame-options"] == b"SAMEORIGIN"
    assert b"content-security-policy" not in dict(out)  # /docs sets its own (docs.py)


@pytest.mark.slow
def test_a_real_servers_answers_carry_each_header_once_and_sessions_still_work(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    data, _ = model_bytes(3, 16)
    model = httpx.post(server.url + "/models", content=data).json()["id"]
    with httpx.Client(base_url=server.url) as c:
        answers = [
            c.post(
                "/predict", json={"model": model, "text": "ab"}, headers={"X-Request-ID": "r-1"}
            ),
            c.post("/predict", json={"model": model, "top_k": 0}, headers={"X-Request-ID": "r-1"}),
            c.get("/healthz", headers={"X-Request-ID": "r-1"}),
        ]
    for r in answers:
        names = [k.lower() for k, _ in r.headers.multi_items()]
        for name in [*SECURITY, "content-security-policy", "x-request-id"]:
            assert names.count(name) == 1, (r.request.url, name, names)
        assert r.headers["x-request-id"] == "r-1"
        assert r.headers["content-security-policy"] == CSP
    assert answers[0].status_code == 200 and answers[1].status_code == 422
    assert answers[1].json()["error"]["request_id"] == "r-1"

    async def session() -> list[dict[str, Any]]:
        url = f"ws://127.0.0.1:{server.port}/sessions?model={model}&top_k=3"
        async with connect(url, proxy=None) as ws:
            got = [json.loads(await ws.recv())]
            await ws.send(json.dumps({"op": "feed", "text": "ab"}))
            got.append(json.loads(await ws.recv()))
            return got

    ready, nxt = asyncio.run(session())
    assert ready["type"] == "ready" and nxt["type"] == "next", (ready, nxt)
    assert len(nxt["next"]) == 3
    with httpx.Client(base_url=server.url) as c:  # counted once, by route, as before
        metrics = c.get("/metrics").text
    counted = [m for m in metrics.splitlines() if m.startswith("charnn_http_requests_total{")]
    assert 'charnn_http_requests_total{method="POST",route="/predict",status="200"} 1.0' in counted
    assert 'charnn_http_requests_total{method="POST",route="/predict",status="422"} 1.0' in counted
    assert not [m for m in counted if "/sessions" in m], counted  # a WebSocket is no HTTP answer
