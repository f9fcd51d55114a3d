"""Resumable event streams in scale-out: a stream cut at random bytes resumes on the other
API replica (Last-Event-ID) with exactly the events it missed, while a Celery worker trains.
Needs PostgreSQL and Redis, as tests/test_scale_out.py (whose cluster fixture this reuses)."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from .event_cuts import Uninterrupted, check_same_sequence, follow_with_cuts, read, with_ids
from .test_scale_out import LONG, Cluster, cluster, job, submit, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

ENDLESS = {**LONG, "log_every": 5, "eval_every": 50}


def test_a_cut_stream_resumes_on_the_other_replica_exactly(cluster: Cluster) -> None:  # noqa: F811
    a, b = cluster.a.url, cluster.b.url
    job_id = submit(a, ENDLESS, name="cuts")
    wait_for(
        lambda: job(a, job_id)["status"] == "running" and job(a, job_id)["progress"]["step"] >= 20,
        120,
        "the job training",
    )
    whole = Uninterrupted(b, job_id)
    whole.start()
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    def live() -> None:  # every cut and reconnect happens while the job trains
        assert job(a, job_id)["status"] == "running"
        time.sleep(rng.uniform(0, 0.2))

    cut, after = follow_with_cuts(lambda i: (a, b)[i % 2], job_id, rng, 20, live)
    r = httpx.post(f"{b}/jobs/{job_id}/cancel", timeout=30)
    assert r.status_code in (200, 202), r.text
    wait_for(lambda: job(a, job_id)["status"] == "cancelled", 60, "cancelled")
    cut += read(a, job_id, after)
    replay = read(b, job_id, 0)
    check_same_sequence(cut, whole.result(), replay)
    assert len(with_ids(replay)) > 20, seed
