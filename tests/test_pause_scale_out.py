"""Pause and resume in scale-out mode: paused through replica A, resumed through B, run on
whichever worker claims it; the loss curve and model equal an uninterrupted run's."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest

from .test_scale_out import CORPUS, TINY, Cluster, cluster, job, wait_for

__all__ = ["cluster"]  # the module-scoped fixture, used here

pytestmark = pytest.mark.slow

HP = {
    **TINY,
    "hidden_size": 48,
    "max_steps": 6000,
    "log_every": 23,
    "eval_every": 101,
    "patience": None,
}


def submit(url: str) -> str:
    body = {"corpus": CORPUS, "name": "paused", "hyperparameters": HP, "seed": 5}
    r = httpx.post(f"{url}/jobs", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def status_is(url: str, job_id: str, status: str) -> Any:
    return lambda: job(url, job_id)["status"] == status


def reached(url: str, job_id: str, step: int) -> Any:
    return lambda: job(url, job_id)["progress"]["step"] >= step


def curve(url: str, job_id: str) -> list[tuple[int, Any, Any]]:
    points = httpx.get(f"{url}/jobs/{job_id}/metrics").json()["points"]
    return [(p["step"], p["train_loss"], p["val_loss"]) for p in points]


def weights(url: str, model_id: str) -> dict[str, np.ndarray]:
    data = httpx.get(f"{url}/models/{model_id}/checkpoint").content
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if npz[k].dtype.kind == "f"}


def test_pause_on_one_replica_resume_on_the_other_is_bit_identical(cluster: Cluster) -> None:
    a, b = cluster.a.url, cluster.b.url
    reference = submit(a)
    wait_for(status_is(a, reference, "succeeded"), 300, "the reference run")

    paused = submit(a)
    for target, (pause_on, resume_on) in zip((1, 1500), ((a, b), (b, a)), strict=True):
        wait_for(reached(a, paused, target), 120, "training")
        r = httpx.post(f"{pause_on}/jobs/{paused}/pause", timeout=30)
        assert r.status_code in (200, 202), r.text
        wait_for(status_is(resume_on, paused, "paused"), 60, "paused")
        step = job(resume_on, paused)["progress"]["step"]
        time.sleep(1.5)  # three heartbeats: no worker holds or trains it
        assert job(a, paused)["progress"]["step"] == step
        assert job(a, paused)["status"] == "paused"
        r = httpx.post(f"{resume_on}/jobs/{paused}/resume")
        assert r.status_code == 200, r.text
    wait_for(status_is(b, paused, "succeeded"), 300, "the paused run")

    expected, got = curve(a, reference), curve(b, paused)
    assert len(expected) > 6000 // 23
    assert got == expected
    wa = weights(a, job(a, reference)["model_id"])
    wb = weights(b, job(b, paused)["model_id"])
    assert wa and sorted(wa) == sorted(wb)
    for name in wa:
        assert np.array_equal(wa[name], wb[name]), name
