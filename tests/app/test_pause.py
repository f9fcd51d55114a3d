"""Pause and resume against a real server: the same loss curve and model as an
uninterrupted run, through several pauses and a restart while paused; the refusals;
cancels that never answer 200 with a job still running."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from .conftest import CORPUS, QUICK, Server

# Odd intervals: pauses land between progress events and evaluations, not on them.
HP = {**QUICK, "hidden_size": 48, "max_steps": 3000, "log_every": 23, "eval_every": 101}
SEED = 11


def submit(url: str, **extra: Any) -> str:
    body = {"corpus": CORPUS, "hyperparameters": HP, "seed": SEED, **extra}
    r = httpx.post(f"{url}/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def job(url: str, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/jobs/{job_id}").json())


def wait(url: str, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (j := job(url, job_id))["status"] not in statuses:
        assert time.monotonic() < deadline, f"job stuck at {j['status']}"
        time.sleep(0.05)
    return j


def wait_step(url: str, job_id: str, step: int) -> None:
    deadline = time.monotonic() + 120
    while job(url, job_id)["progress"]["step"] < step:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def pause(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/jobs/{job_id}/pause", timeout=30)
    assert r.status_code in (200, 202), r.text
    if r.status_code == 202:
        assert r.json()["state"] == "pausing"
    return wait(url, job_id, ("paused",))


def resume(url: str, job_id: str) -> None:
    r = httpx.post(f"{url}/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("queued", "running")


def curve(url: str, job_id: str) -> list[tuple[int, float | None, float | None]]:
    points = httpx.get(f"{url}/jobs/{job_id}/metrics").json()["points"]
    return [(p["step"], p["train_loss"], p["val_loss"]) for p in points]


def weights(url: str, model_id: str) -> dict[str, np.ndarray]:
    data = httpx.get(f"{url}/models/{model_id}/checkpoint").content
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if npz[k].dtype.kind == "f"}


def assert_same_run(url: str, a: str, b: str) -> None:
    ja, jb = wait(url, a, ("succeeded",)), wait(url, b, ("succeeded",))
    expected, got = curve(url, a), curve(url, b)
    assert len(expected) > 3000 // 23  # every progress event and evaluation
    assert got == expected  # every point, bit for bit (floats compared exactly)
    wa, wb = weights(url, ja["model_id"]), weights(url, jb["model_id"])
    assert wa and sorted(wa) == sorted(wb)
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name


@pytest.mark.slow
def test_paused_three_times_and_through_a_restart_is_bit_identical(
    serve: Callable[..., Server],
) -> None:
    server = serve()
    reference = submit(server.url)
    wait(server.url, reference, ("succeeded",))

    paused = submit(server.url)
    steps = []
    for target in (1, 700, 1500):  # wherever the pause lands after these steps
        wait_step(server.url, paused, target)
        j = pause(server.url, paused)
        steps.append(j["progress"]["step"])
        assert j["progress"]["eta_s"] is None
        if target == 1500:
            break
        time.sleep(0.3)  # paused for a while: nothing moves
        assert job(server.url, paused)["progress"]["step"] == steps[-1]
        resume(server.url, paused)
    assert steps == sorted(steps) and steps[-1] < HP["max_steps"]

    server.stop()  # SIGTERM while paused
    server = serve()  # same data directory
    assert job(server.url, paused)["status"] == "paused"  # not resumed by the restart
    time.sleep(0.5)
    assert job(server.url, paused)["status"] == "paused"
    resume(server.url, paused)
    assert_same_run(server.url, reference, paused)


@pytest.mark.slow
def test_a_paused_job_frees_its_slot_and_the_refusals_say_why(
    serve: Callable[..., Server],
) -> None:
    server = serve(CHARNN_MAX_PAUSED_JOBS="1")
    long = {**HP, "max_steps": 10**6}
    first = submit(server.url, hyperparameters=long)
    wait(server.url, first, ("running",))
    second = submit(server.url, hyperparameters=long)  # waits for the only slot
    assert job(server.url, second)["status"] == "queued"

    assert pause(server.url, first)["status"] == "paused"
    wait(server.url, second, ("running",))  # the slot went to the next job

    r = httpx.post(f"{server.url}/jobs/{first}/pause")
    assert r.status_code == 409 and "already paused" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/jobs/{second}/resume")
    assert r.status_code == 409 and "only paused jobs" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/jobs/{second}/pause")  # the limit: one paused job
    assert r.status_code == 429 and "max_paused_jobs" in r.json()["error"]["message"]
    assert job(server.url, second)["status"] == "running"
    r = httpx.delete(f"{server.url}/jobs/{first}")
    assert r.status_code == 409 and "paused" in r.json()["error"]["message"]

    # A queued job pauses without running.
    third = submit(server.url, hyperparameters=long)
    r = httpx.post(f"{server.url}/jobs/{third}/cancel")  # frees nothing: third is queued
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = httpx.post(f"{server.url}/jobs/{first}/cancel")  # a paused job: cancelled at once
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    fourth = submit(server.url, hyperparameters=long)
    r = httpx.post(f"{server.url}/jobs/{fourth}/pause")
    assert r.status_code == 200 and r.json()["status"] == "paused"
    assert r.json()["started_at"] is None  # never ran
    r = httpx.post(f"{server.url}/jobs/{fourth}/resume")
    assert r.status_code == 200 and r.json()["status"] == "queued"

    # Cancel answers 200 only once the job stopped; else 202, never 200 and running.
    r = httpx.post(f"{server.url}/jobs/{second}/cancel", timeout=30)
    if r.status_code == 200:
        assert r.json()["status"] == "cancelled"
    else:
        assert r.status_code == 202 and r.json()["state"] == "cancelling"
    r = httpx.post(f"{server.url}/jobs/{second}/pause")
    assert r.status_code == 409 and "cancelled" in r.json()["error"]["message"]
    wait(server.url, fourth, ("running",))
    r = httpx.post(f"{server.url}/jobs/{fourth}/cancel", timeout=30)
    assert r.status_code in (200, 202)
    assert r.json().get("status") != "running"


@pytest.mark.slow
def test_resume_respects_the_queue_limit(serve: Callable[..., Server]) -> None:
    server = serve(CHARNN_MAX_QUEUED_JOBS="1")
    long = {**HP, "max_steps": 10**6}
    running = submit(server.url, hyperparameters=long)
    wait(server.url, running, ("running",))
    waiting = submit(server.url, hyperparameters=long)
    assert pause(server.url, waiting)["status"] == "paused"
    other = submit(server.url, hyperparameters=long)  # the queue's one place
    r = httpx.post(f"{server.url}/jobs/{waiting}/resume")
    assert r.status_code == 429 and r.headers.get("Retry-After")
    assert job(server.url, waiting)["status"] == "paused"
    for j in (running, other, waiting):
        assert httpx.post(f"{server.url}/jobs/{j}/cancel", timeout=30).status_code in (200, 202)


@pytest.mark.slow
def test_the_cli_and_both_clients_pause_and_resume(serve: Callable[..., Server]) -> None:
    import asyncio
    import subprocess
    import sys
    from pathlib import Path

    from app.client import AsyncClient, Client

    charnn = Path(sys.executable).with_name("charnn")
    server = serve()
    long = {**HP, "max_steps": 10**6}
    job_id = submit(server.url, hyperparameters=long)
    wait(server.url, job_id, ("running",))

    def remote(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(charnn), "remote", *args, job_id, "--url", server.url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    out = remote("pause")
    assert out.returncode == 0, out.stderr
    assert f"{job_id}  paused at step" in out.stdout or "pausing" in out.stdout
    wait(server.url, job_id, ("paused",))
    again = remote("pause")  # a refusal: one line, exit 1
    assert again.returncode == 1 and "already paused" in again.stderr
    out = remote("resume")
    assert out.returncode == 0 and f"{job_id}  queued" in out.stdout or "running" in out.stdout

    with Client(server.url) as client:
        handle = client.job(job_id)
        wait(server.url, job_id, ("running",))
        assert handle.pause().status in ("paused", "running")  # running: the 202 case
        wait(server.url, job_id, ("paused",))
        assert handle.resume().status in ("queued", "running")

    async def async_side() -> None:
        async with AsyncClient(server.url) as client:
            handle = client.job(job_id)
            wait(server.url, job_id, ("running",))
            assert (await handle.pause()).status in ("paused", "running")
            wait(server.url, job_id, ("paused",))
            assert (await handle.resume()).status in ("queued", "running")
            assert (await handle.cancel()).status in ("cancelled", "running")

    asyncio.run(async_side())
    assert wait(server.url, job_id, ("cancelled",))["status"] == "cancelled"
