"""Resumable job event streams (Last-Event-ID) on a real server, the events' shapes, and the
/generate stream's ``error`` event when generation fails midway."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import ServerSentEvent

from app.client import ApiError, Client, _chunk
from app.jobs.schemas import JobOut, MetricPointOut
from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.params import init_params
from model.vocab import Vocab

from ...event_cuts import (
    Uninterrupted,
    check_increasing,
    check_same_sequence,
    follow_with_cuts,
    parse,
    read,
    with_ids,
)
from ..conftest import CORPUS, QUICK, Server, asgi_client, settings_for

# Until cancelled; a point every 5 steps, so a cut falls among many events.
ENDLESS = {**QUICK, "max_steps": 10**6, "log_every": 5, "eval_every": 50}
PROGRESS_EXTRA = {"total_steps", "best_step", "best_val_loss"}


def submit(url: str, hp: dict[str, Any]) -> str:
    r = httpx.post(f"{url}/jobs", json={"corpus": CORPUS, "hyperparameters": hp})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def job(url: str, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}").json()
    return body


def running_past(url: str, job_id: str, step: int) -> None:
    deadline = time.monotonic() + 60  # bounds a failure only
    while not (
        job(url, job_id)["status"] == "running" and job(url, job_id)["progress"]["step"] >= step
    ):
        assert time.monotonic() < deadline, job(url, job_id)
        time.sleep(0.05)


@pytest.mark.slow  # a real server and real jobs
def test_a_stream_cut_at_random_bytes_resumes_exactly(serve: Callable[..., Server]) -> None:
    server = serve()
    job_id = submit(server.url, ENDLESS)
    running_past(server.url, job_id, 20)
    whole = Uninterrupted(server.url, job_id)
    whole.start()
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    def live() -> None:  # every cut and reconnect happens while the job trains
        assert job(server.url, job_id)["status"] == "running"
        time.sleep(rng.uniform(0, 0.2))

    cut, after = follow_with_cuts(lambda i: server.url, job_id, rng, 25, live)
    r = httpx.post(f"{server.url}/jobs/{job_id}/cancel")
    assert r.status_code in (200, 202), r.text
    deadline = time.monotonic() + 60  # bounds a failure only
    while job(server.url, job_id)["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cut += read(server.url, job_id, after)  # the rest, to the final status
    replay = read(server.url, job_id, 0)  # after the end: all from the store
    check_same_sequence(cut, whole.result(), replay)
    assert replay[-1].data["status"] == "cancelled", seed
    assert len(with_ids(replay)) > 25, seed  # the cuts fell among live events
    # a client that has everything gets nothing more, at once
    assert read(server.url, job_id, replay[-1].id) == []
    middle = with_ids(replay)[len(with_ids(replay)) // 2]
    assert with_ids(read(server.url, job_id, middle.id)) == [
        e
        for e in with_ids(replay)
        if e.id is not None and middle.id is not None and e.id > middle.id
    ]


@pytest.mark.slow  # a real server and real jobs
def test_event_shapes_first_event_and_resume_parameters(serve: Callable[..., Server]) -> None:
    server = serve()
    job_id = submit(server.url, ENDLESS)
    running_past(server.url, job_id, 20)
    with httpx.stream("GET", f"{server.url}/jobs/{job_id}/events", timeout=60) as r:
        raw = b""
        for chunk in r.iter_raw():
            raw += chunk
            if raw.count(b"\n\n") >= 4:
                break
    first, *rest = parse(raw)
    # A new stream's first event is a status event: the job as GET /jobs/{id} has it,
    # with the job's step as its id (resuming from it misses no point).
    assert first.event == "status"
    JobOut.model_validate(first.data)
    assert set(first.data) == set(job(server.url, job_id))
    assert first.data["status"] == "running" and first.id == first.data["progress"]["step"]
    assert rest and all(e.event == "progress" for e in rest)
    assert rest[0].id is not None and first.id is not None and rest[0].id > first.id
    check_increasing([first, *rest])
    points = {
        p["step"]: p for p in httpx.get(f"{server.url}/jobs/{job_id}/metrics").json()["points"]
    }
    for e in rest:
        # each progress event is one metric point, as /metrics has it, plus three fields
        assert set(e.data) == set(MetricPointOut.model_fields) | PROGRESS_EXTRA
        assert {k: e.data[k] for k in points[e.data["step"]]} == points[e.data["step"]]
        assert e.data["total_steps"] == ENDLESS["max_steps"] and e.id == e.data["step"]

    # the query parameter resumes as the header does; the header wins when both are sent
    url = f"{server.url}/jobs/{job_id}/events"
    k = rest[0].id
    assert k is not None
    with httpx.stream("GET", url, params={"last_event_id": k}, timeout=60) as r:
        head = next(r.iter_lines())
    assert head == f"id: {points[min(s for s in points if s > k)]['step']}"
    headers = {"Last-Event-ID": "0"}
    with httpx.stream("GET", url, params={"last_event_id": k}, headers=headers, timeout=60) as r:
        head = next(r.iter_lines())
    assert head == f"id: {min(points)}"
    for bad in ("x", "-1", "1.5", "10" * 10):
        r = httpx.get(url, headers={"Last-Event-ID": bad})
        assert r.status_code == 422, (bad, r.text)
        assert (
            "Last-Event-ID" in r.json()["error"]["message"] and "0" in r.json()["error"]["message"]
        )
    assert httpx.get(url, params={"last_event_id": -1}).status_code == 422

    # the client resumes after an id, and its wait ends at the final status
    with Client(server.url) as c:
        events = c.job(job_id).events(after=k)
        resumed = next(iter(events))
        assert resumed.event == "progress" and resumed.id is not None and resumed.id > k
        events.close()  # type: ignore[attr-defined]
        httpx.post(f"{server.url}/jobs/{job_id}/cancel")
        finished = list(c.job(job_id).events())
        assert [e.event for e in finished] == ["status"] and finished[0].job is not None
        assert finished[0].job.status == "cancelled"
        assert finished[0].id == finished[0].job.progress.step + 1


@pytest.mark.slow  # a real server and real jobs
def test_a_finished_job_replays_its_whole_curve(serve: Callable[..., Server]) -> None:
    server = serve()
    job_id = submit(server.url, QUICK)
    deadline = time.monotonic() + 60
    while job(server.url, job_id)["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    late = read(server.url, job_id, None)  # no Last-Event-ID: just the final job
    assert [(e.event, e.id) for e in late] == [("status", 41)]
    assert late[0].data["status"] == "succeeded"
    everything = read(server.url, job_id, 0)
    assert [(e.event, e.id) for e in everything] == [
        ("progress", 10),
        ("progress", 20),
        ("progress", 30),
        ("progress", 40),
        ("status", 41),
    ]
    assert everything[-1].data == late[0].data
    bests = [(e.data["best_step"], e.data["best_val_loss"]) for e in everything[:-1]]
    vals = [e.data["val_loss"] for e in everything[:-1]]
    assert all(v is not None for v in vals)  # eval_every 10: every point measured it
    for i, (best_step, best_val) in enumerate(bests):
        assert best_val == min(vals[: i + 1])
        assert best_step == 10 * (vals.index(best_val) + 1)


# ------------------------------------------------------------------ /generate error event


def _model_bytes() -> bytes:
    vocab = Vocab(tuple("abcd"))
    # H = 256: a slice is 61 steps here, so a long sample takes many slices
    params = init_params(256, len(vocab), np.random.default_rng(0))
    return model_to_bytes(ModelCheckpoint(params=params, vocab=vocab))


def test_generate_stream_ends_with_an_error_event_when_it_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.serving.batcher as batcher

    real = batcher.advance_rows  # type: ignore[attr-defined]
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:  # the first slice's text went out; the second one fails
            raise RuntimeError("injected batcher failure")
        return real(*args, **kwargs)

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            up = await c.post(
                "/models",
                files={"file": ("m.npz", _model_bytes(), "application/octet-stream")},
                data={"name": "random"},
            )
            assert up.status_code == 201, up.text
            body = {"prompt": "ab", "max_chars": 2000, "seed": 1, "stream": True}
            ok = (await c.post("/generate", json={**body, "stream": False})).json()
            monkeypatch.setattr(batcher, "advance_rows", failing)
            async with c.stream("POST", "/generate", json=body) as s:
                assert s.status_code == 200
                raw = (await s.aread()).decode()
        events = []
        for block in raw.split("\n\n")[:-1]:
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((lines["event"], json.loads(lines["data"])))
        kinds = [k for k, _ in events]
        assert kinds[-1] == "error" and "done" not in kinds, kinds[-3:]
        assert kinds.count("chunk") > 1  # it failed midway, after some text
        text = "".join(d["text"] for k, d in events if k == "chunk")
        assert ok["text"].startswith(text)  # what was sent was the real sample
        error = events[-1][1]["error"]
        assert error["code"] == "internal"
        assert error["message"].startswith("generation failed midway")
        assert "injected" not in error["message"]  # no internals in the answer
        assert set(error) == {"code", "message", "details", "request_id"}
        # the client's stream_generate raises it, with the server's code and message
        with pytest.raises(ApiError) as raised:
            _chunk(ServerSentEvent(event="error", data=json.dumps(events[-1][1])))
        assert raised.value.code == "internal" and raised.value.message == error["message"]

    asyncio.run(go())
