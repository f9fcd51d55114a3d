"""A real uvicorn server on a loopback port, real job processes, real signals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .conftest import CORPUS, QUICK, Server


def follow(url: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=60) as r:
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


@pytest.mark.slow  # over a second: the full suite runs it
def test_submit_follow_events_and_read_the_curve(serve: Callable[..., Server]) -> None:
    server = serve()
    r = httpx.post(f"{server.url}/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
    assert r.status_code == 202
    job_id = r.json()["id"]
    events = follow(server.url, job_id)
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded"
    assert any(kind == "progress" for kind, _ in events[:-1])
    points = httpx.get(f"{server.url}/jobs/{job_id}/metrics").json()["points"]
    assert points[-1]["train_loss"] < points[0]["train_loss"]
    # and the model it made answers over HTTP, as a file download too
    pred = httpx.post(f"{server.url}/predict", json={"text": "the quick brown f"}).json()
    assert pred["model"] == events[-1][1]["model_id"]
    assert abs(sum(n["prob"] for n in pred["next"]) - 1) < 1e-6  # 7 significant digits each
    ckpt = httpx.get(f"{server.url}/models/{pred['model']}/checkpoint")
    assert ckpt.status_code == 200 and ckpt.content[:2] == b"PK"  # a zip: the .npz


@pytest.mark.slow
def test_kill_9_then_restart_resumes_from_the_checkpoint(serve: Callable[..., Server]) -> None:
    server = serve()
    hp = {**QUICK, "max_steps": 15000, "eval_every": 5000}  # far from done when killed
    job_id = httpx.post(
        f"{server.url}/jobs", json={"corpus": CORPUS, "hyperparameters": hp}
    ).json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/jobs/{job_id}").json()["progress"]["step"] < 600:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # past at least one checkpoint (every 0.3 s)
    server.kill9()

    again = serve()  # same data directory
    job = httpx.get(f"{again.url}/jobs/{job_id}").json()
    assert job["status"] in ("queued", "running")
    before = job["progress"]["step"]
    events = follow(again.url, job_id)
    assert events[-1][1]["status"] == "succeeded"
    steps = [
        e["step"] for kind, e in events if kind == "progress" and "step" in e and "job" not in e
    ]
    assert steps and min(steps) > 10  # resumed from a checkpoint, not from step 0
    assert before >= 600
