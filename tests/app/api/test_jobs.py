"""The jobs API through the ASGI transport (lifespan included), with real job processes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import CORPUS, LONG, QUICK, asgi_client, settings_for, wait_status


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class TestCreateAndFollow:
    def test_json_job_trains_to_a_model_with_a_falling_loss_curve(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path)) as c:
                body = {"corpus": CORPUS, "name": "fox", "hyperparameters": QUICK, "seed": 2}
                r = await c.post("/jobs", json=body)
                assert r.status_code == 202, r.text
                job = r.json()
                assert r.headers["location"] == f"/jobs/{job['id']}"
                assert job["status"] in ("queued", "running")
                assert job["corpus"] == {"chars": len(CORPUS), "vocab_size": len(set(CORPUS))}
                done = await wait_status(c, job["id"], ("succeeded", "failed"))
                assert done["status"] == "succeeded", done
                assert done["model_id"] and done["progress"]["fraction"] == 1.0
                points = (await c.get(f"/jobs/{job['id']}/metrics")).json()["points"]
                assert points[-1]["step"] == 40
                assert points[-1]["train_loss"] < points[0]["train_loss"]
                later = await c.get(f"/jobs/{job['id']}/metrics", params={"after_step": 30})
                assert [p["step"] for p in later.json()["points"]] == [40]
                assert [p["step"] for p in points] == [10, 20, 30, 40]
                listed = (await c.get("/jobs", params={"status": "succeeded"})).json()
                assert [j["id"] for j in listed["items"]] == [job["id"]]

        run(go())

    def test_multipart_upload_with_config(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path)) as c:
                config = json.dumps({"name": "upload", "hyperparameters": QUICK})
                r = await c.post(
                    "/jobs",
                    files={"corpus": ("fox.txt", CORPUS.encode(), "text/plain")},
                    data={"config": config},
                )
                assert r.status_code == 202, r.text
                assert r.json()["name"] == "upload"
                assert r.json()["hyperparameters"]["hidden_size"] == 16

        run(go())

    def test_sse_streams_progress_then_the_final_status(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path)) as c:
                job = (
                    await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
                ).json()
                events: list[tuple[str, dict[str, Any]]] = []
                async with c.stream("GET", f"/jobs/{job['id']}/events") as r:
                    assert r.headers["content-type"].startswith("text/event-stream")
                    kind = ""
                    async for line in r.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            events.append((kind, json.loads(line[6:])))
                kinds = [k for k, _ in events]
                assert kinds[0] == "status" and kinds[-1] == "status"  # the job, then its end
                assert "progress" in kinds and events[0][1]["status"] in ("queued", "running")
                assert events[-1][1]["status"] == "succeeded"
                # a late client gets the final state at once
                late = await c.get(f"/jobs/{job['id']}/events")
                assert late.text.startswith("id: 41\nevent: status\n")  # the last step + 1

        run(go())


class TestCancel:
    def test_cancel_a_running_job_then_409(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path)) as c:
                job = (
                    await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
                ).json()
                await wait_status(c, job["id"], ("running",))
                r = await c.post(f"/jobs/{job['id']}/cancel")
                assert r.status_code == 200 and r.json()["status"] == "cancelled"
                again = await c.post(f"/jobs/{job['id']}/cancel")
                assert again.status_code == 409
                assert again.json()["error"]["code"] == "conflict"

        run(go())


class TestLimits:
    def test_queue_full_is_429_with_retry_after(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path, max_queued_jobs=1)) as c:
                body = {"corpus": CORPUS, "hyperparameters": LONG}
                first = (await c.post("/jobs", json=body)).json()
                await wait_status(c, first["id"], ("running",))
                assert (await c.post("/jobs", json=body)).status_code == 202  # queued
                r = await c.post("/jobs", json=body)
                assert r.status_code == 429 and r.headers["retry-after"] == "10"
                assert r.json()["error"]["code"] == "queue_full"

        run(go())

    def test_body_over_the_limit_is_413(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path, max_body_bytes=10_000)) as c:
                r = await c.post("/jobs", json={"corpus": "ab" * 10_000})
                assert r.status_code == 413
                assert r.json()["error"]["code"] == "payload_too_large"

        run(go())

    def test_api_key_guards_mutations_only(self, tmp_path: Path) -> None:
        async def go() -> None:
            async with asgi_client(settings_for(tmp_path, api_key="s3cret")) as c:
                body = {"corpus": CORPUS, "hyperparameters": QUICK}
                r = await c.post("/jobs", json=body)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                bad = await c.post("/jobs", json=body, headers={"X-API-Key": "nope"})
                assert bad.status_code == 401
                ok = await c.post("/jobs", json=body, headers={"Authorization": "Bearer s3cret"})
                assert ok.status_code == 202
                also = await c.post("/jobs", json=body, headers={"X-API-Key": "s3cret"})
                assert also.status_code == 202
                assert (await c.get("/jobs")).status_code == 200

        run(go())


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("empty", {"corpus": ""}, "empty"),
    ("whitespace", {"corpus": " \n\t " * 50}, "empty or only whitespace"),
    ("one character", {"corpus": "a" * 500}, "only one distinct character"),
    ("too short", {"corpus": "abcdef"}, "lower seq_length to at most"),
    ("NUL", {"corpus": "ab\x00" * 100}, "NUL"),
    ("hidden zero", {"corpus": CORPUS, "hyperparameters": {"hidden_size": 0}}, "hidden_size"),
    ("hidden huge", {"corpus": CORPUS, "hyperparameters": {"hidden_size": 4000}}, "limit of"),
    ("negative lr", {"corpus": CORPUS, "hyperparameters": {"learning_rate": -1}}, "learning_rate"),
    ("wrong type", {"corpus": CORPUS, "hyperparameters": {"batch_size": "many"}}, "batch_size"),
    ("bad optimizer", {"corpus": CORPUS, "hyperparameters": {"optimizer": "rmsprop"}}, "optimizer"),
    ("unknown field", {"corpus": CORPUS, "colour": "red"}, "colour"),
    ("unknown hp", {"corpus": CORPUS, "hyperparameters": {"depth": 3}}, "depth"),
]


@pytest.mark.parametrize("label,body,message", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_input_is_a_422_saying_what_is_wrong(
    tmp_path: Path, label: str, body: dict[str, Any], message: str
) -> None:
    async def go() -> httpx.Response:
        async with asgi_client(settings_for(tmp_path)) as c:
            return await c.post("/jobs", json=body)

    r = run(go())
    assert r.status_code == 422, r.text
    assert message in r.text
    assert set(r.json()["error"]) == {"code", "message", "details", "request_id"}


def test_raw_bodies_lone_surrogates_invalid_utf8_and_ids(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            r = await c.post(
                "/jobs",
                content=b'{"corpus": "ab\\ud800cd"}',
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 422  # refused by the JSON parser or by our check
            assert r.json()["error"]["code"] == "invalid"
            r = await c.post(
                "/jobs", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert r.status_code == 422
            r = await c.post("/jobs", files={"corpus": ("x.txt", b"\xff\xfe" * 100, "text/plain")})
            assert r.status_code == 422 and "UTF-8" in r.text
            for job_id in ("../../etc/passwd", "a" * 5000, "abc%00def", "0" * 32):
                r = await c.get(f"/jobs/{job_id}")
                assert r.status_code == 404, job_id
                assert r.json()["error"]["code"] == "not_found"
            r = await c.post("/jobs", json={"corpus": CORPUS, "init_from": "no-such-model"})
            assert r.status_code == 404

    run(go())


def test_health_and_readiness(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            assert (await c.get("/healthz")).json() == {"status": "ok"}
            assert (await c.get("/readyz")).json() == {"status": "ready"}
            schema = (await c.get("/openapi.json")).json()
            assert "/jobs/{job_id}/events" in schema["paths"]

    run(go())


def test_cors_only_for_configured_origins(tmp_path: Path) -> None:
    async def go() -> None:
        settings = settings_for(tmp_path, cors_origins=["https://demo.example"])
        async with asgi_client(settings) as c:
            ok = await c.get("/jobs", headers={"Origin": "https://demo.example"})
            assert ok.headers.get("access-control-allow-origin") == "https://demo.example"
            other = await c.get("/jobs", headers={"Origin": "https://evil.example"})
            assert "access-control-allow-origin" not in other.headers
        async with asgi_client(settings_for(tmp_path / "b")) as c:
            none = await c.get("/jobs", headers={"Origin": "https://demo.example"})
            assert "access-control-allow-origin" not in none.headers

    run(go())


def test_fine_tune_from_a_finished_jobs_model_by_name(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            base = await c.post(
                "/jobs", json={"corpus": CORPUS, "name": "fox", "hyperparameters": QUICK}
            )
            done = await wait_status(c, base.json()["id"], ("succeeded", "failed"))
            assert done["status"] == "succeeded"
            tuned_body = {
                "corpus": "a lazy dog jumps over the quick fox. " * 40,
                "init_from": "fox",
                "hyperparameters": {**QUICK, "hidden_size": 99},  # the base model's size wins
            }
            r = await c.post("/jobs", json=tuned_body)
            assert r.status_code == 202, r.text
            assert r.json()["init_from"] == done["model_id"]
            assert r.json()["hyperparameters"]["hidden_size"] == 16
            tuned = await wait_status(c, r.json()["id"], ("succeeded", "failed"))
            assert tuned["status"] == "succeeded", tuned
            r = await c.post("/jobs", json={"corpus": "Zebras! " * 40, "init_from": "fox"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_characters"

    run(go())
