"""Live diagnostics through a real server: every log point's gradient norm, clipping,
learning rate and speed, and every evaluation's sample, in the job's events and in its
metrics, the same numbers in both."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from .conftest import CORPUS, LONG, QUICK, Server

pytestmark = pytest.mark.slow  # a real server

DIAGNOSTICS = ("grad_norm", "clipped", "learning_rate", "chars_per_sec", "sample")


def stream(url: str, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", timeout=120) as r:
        assert r.status_code == 200
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])


def followed_from_the_start(server: Server, hp: dict[str, Any]) -> tuple[str, list[Any]]:
    """A job's every live progress event: it waits behind a blocker (one slot) while the
    stream opens, and starts only once the blocker is cancelled."""
    post = f"{server.url}/jobs"
    blocker = httpx.post(post, json={"corpus": CORPUS, "hyperparameters": LONG}).json()["id"]
    job_id = httpx.post(post, json={"corpus": CORPUS, "hyperparameters": hp}).json()["id"]
    events = stream(server.url, job_id)
    next(events)  # the stream is open (its first event: the job as it is now)
    assert httpx.get(f"{post}/{job_id}").json()["status"] == "queued"  # still waiting
    httpx.post(f"{post}/{blocker}/cancel", timeout=60)
    got = [data for kind, data in events if kind == "progress"]
    job = httpx.get(f"{post}/{job_id}").json()
    assert job["status"] == "succeeded"
    return job_id, [e for e in got if "job" not in e]  # the live ones (no snapshot)


def test_events_and_metrics_carry_the_diagnostics(serve: Callable[..., Server]) -> None:
    server = serve()
    hp: dict[str, Any] = {**QUICK, "max_steps": 60, "eval_every": 20, "log_every": 5}
    hp |= {"sample_length": 30, "learning_rate": 0.02}
    job_id, events = followed_from_the_start(server, hp)
    assert [e["step"] for e in events] == list(range(5, 61, 5))
    for e in events:
        assert e["grad_norm"] > 0 and isinstance(e["clipped"], bool)
        assert e["clipped"] == (e["grad_norm"] > 5.0)  # grad_clip's default
        assert e["chars_per_sec"] > 0
        assert 0 < e["learning_rate"] <= 0.02
        done = (e["step"] - 1) / 60
        expected = 0.02 * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done)))
        assert math.isclose(e["learning_rate"], expected, rel_tol=1e-12)
        if e["step"] % 20 == 0:
            assert len(e["sample"]) == 30 and set(e["sample"]) <= set(CORPUS)
        else:
            assert e["sample"] is None
    points = httpx.get(f"{server.url}/jobs/{job_id}/metrics").json()["points"]
    assert [p["step"] for p in points] == [e["step"] for e in events]
    for p, e in zip(points, events, strict=True):
        assert {k: p[k] for k in DIAGNOSTICS} == {k: e[k] for k in DIAGNOSTICS}
    # The same seed trains the same run: its samples are the same too.
    again = httpx.post(f"{server.url}/jobs", json={"corpus": CORPUS, "hyperparameters": hp})
    final = list(stream(server.url, again.json()["id"]))[-1]
    assert final[1]["status"] == "succeeded"
    repeat = httpx.get(f"{server.url}/jobs/{again.json()['id']}/metrics").json()["points"]
    assert [p["sample"] for p in repeat] == [p["sample"] for p in points]
    assert [p["train_loss"] for p in repeat] == [p["train_loss"] for p in points]


def test_sample_length_zero_means_no_sample(serve: Callable[..., Server]) -> None:
    server = serve()
    hp = {**QUICK, "max_steps": 40, "eval_every": 10, "log_every": 10, "sample_length": 0}
    job_id, events = followed_from_the_start(server, hp)
    assert [e["step"] for e in events] == [10, 20, 30, 40]
    assert all(e["sample"] is None and e["grad_norm"] > 0 for e in events)
    points = httpx.get(f"{server.url}/jobs/{job_id}/metrics").json()["points"]
    assert len(points) == 4 and all(p["sample"] is None for p in points)
    assert all(p["val_loss"] is not None for p in points)  # evaluated, just not sampled
    job = httpx.get(f"{server.url}/jobs/{job_id}").json()
    assert job["hyperparameters"]["sample_length"] == 0
    assert job["hyperparameters"]["sample_temperature"] == 0.8


def test_sample_settings_out_of_bounds_are_422_saying_so(serve: Callable[..., Server]) -> None:
    server = serve()
    for hp in ({"sample_length": 1001}, {"sample_length": -1}, {"sample_temperature": 11}):
        r = httpx.post(f"{server.url}/jobs", json={"corpus": CORPUS, "hyperparameters": hp})
        assert r.status_code == 422
        assert next(iter(hp)) in r.text
