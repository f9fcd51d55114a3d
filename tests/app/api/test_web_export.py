"""GET /models/{id}/web: the browser's copy of a model, cached as a thing that never changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from model.web import read_web

from ..conftest import asgi_client, settings_for
from .test_concurrent_predict import model_bytes


def test_web_export_by_id_and_by_name(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            data, ckpt = model_bytes(1, hidden=16)
            r = await c.post("/models?name=shown", content=data)
            model = r.json()["id"]
            r = await c.get(f"/models/{model}/web")
            assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
            assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert r.headers["x-model-id"] == model
            tag = r.headers["etag"]
            assert tag == f'"{model}.web1"'
            back, meta = read_web(r.content)
            assert back.vocab == ckpt.vocab and meta["model_id"] == model
            assert meta["name"] == "shown"
            again = await c.get(f"/models/{model}/web", headers={"If-None-Match": tag})
            assert again.status_code == 304 and again.content == b""
            assert again.headers["etag"] == tag
            other = await c.get(f"/models/{model}/web", headers={"If-None-Match": '"x"'})
            assert other.status_code == 200
            by_name = await c.get("/models/shown/web")
            assert by_name.status_code == 200 and by_name.headers["x-model-id"] == model
            assert by_name.headers["cache-control"] == "no-cache"  # a name can move on
            assert by_name.content == r.content
            newer = (await c.post("/models?name=shown", content=model_bytes(2, 16)[0])).json()
            moved = await c.get("/models/shown/web", headers={"If-None-Match": tag})
            assert moved.status_code == 200 and moved.headers["x-model-id"] == newer["id"]
            missing = await c.get("/models/nope/web")
            assert missing.status_code == 404
            assert missing.json()["error"]["message"] == "no model with id or name 'nope'"

    asyncio.run(go())
