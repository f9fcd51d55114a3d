"""What an operator scrapes and reads: /metrics from a real server, counted exactly; JSON logs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Served, charnn_serve

pytestmark = pytest.mark.slow

PERIODIC = "abcd" * 300
TINY = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "max_steps": 60, "eval_every": 20}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):  # the library's own parser
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def run_job(url: str, hp: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + "/jobs", json={"corpus": PERIODIC, "name": "m", "hyperparameters": hp})
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        job = httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json()
    return job


def test_metrics_count_exactly_what_was_done(tmp_path: Path) -> None:
    with charnn_serve(tmp_path) as served:
        url = served.url
        before = scrape(url)
        assert value(before, "charnn_jobs", status="succeeded") == 0
        assert ("process_cpu_seconds_total", frozenset()) in before  # the default collectors

        job = run_job(url, TINY)
        assert job["status"] == "succeeded"
        model = job["model_id"]

        def post(path: str, body: dict[str, Any]) -> httpx.Response:
            return httpx.post(url + path, json={"model": model, **body}, timeout=30)

        assert post("/predict", {"text": "abcdab"}).status_code == 200  # 6 characters stepped
        assert post("/predict", {"text": "abcdab"}).status_code == 200  # cached: none
        assert post("/predict", {"text": "abcdabc"}).status_code == 200  # one more
        assert post("/generate", {"prompt": "ab", "max_chars": 10, "seed": 1}).status_code == 200
        assert post("/score", {"text": "abca"}).status_code == 200
        assert post("/predict", {"text": "abx"}).status_code == 422
        assert httpx.get(url + "/no/such/page").status_code == 404
        after = scrape(url)

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("charnn_jobs_started_total") == 1
        assert moved("charnn_jobs_finished_total", outcome="succeeded") == 1
        assert value(after, "charnn_jobs", status="succeeded") == 1
        assert value(after, "charnn_jobs", status="running") == 0
        assert value(after, "charnn_job_queue_length") == 0
        assert moved("charnn_predictions_total", model=model) == 3  # the 422 is not one
        assert moved("charnn_generations_total", model=model) == 1
        assert moved("charnn_scores_total", model=model) == 1
        # 6 + 0 + 1 (predictions) + 2 + 10 (prompt, sample) + 4 (score)
        assert moved("charnn_chars_stepped_total") == 23
        # misses: "abcdab" and the prompt "ab"; hits: "abcdab" again, "abcdabc", "abx" (from
        # the prompt's "ab", before the 422)
        assert moved("charnn_prefix_cache_requests_total", result="miss") == 2
        assert moved("charnn_prefix_cache_requests_total", result="hit") == 3
        assert moved("charnn_model_cache_requests_total", result="miss") == 1
        assert moved("charnn_model_cache_requests_total", result="hit") == 5
        assert value(after, "charnn_models_loaded") == 1
        http = "charnn_http_requests_total"
        assert moved(http, route="/predict", method="POST", status="200") == 3
        assert moved(http, route="/predict", method="POST", status="422") == 1
        assert moved(http, route="/jobs", method="POST", status="202") == 1
        assert moved(http, route="unmatched", method="GET", status="404") == 1  # not the path
        assert (
            moved("charnn_http_request_duration_seconds_count", route="/score", method="POST") == 1
        )
        labels = {dict(k[1]).get("route") for k in after if k[0] == http}
        assert "/no/such/page" not in labels and "/jobs/{job_id}" in labels


def test_running_jobs_have_gauges_and_the_key_leaves_metrics_open(tmp_path: Path) -> None:
    with charnn_serve(tmp_path, CHARNN_API_KEY="k") as served:
        url, auth = served.url, {"Authorization": "Bearer k"}
        body = {
            "corpus": PERIODIC,
            "hyperparameters": {**TINY, "max_steps": 10**6, "patience": None},
        }
        job = httpx.post(url + "/jobs", json=body, headers=auth, timeout=30).json()
        try:
            deadline = time.monotonic() + 60
            while True:
                samples = scrape(url)  # no key needed: the documented rule
                if value(samples, "charnn_job_step", job=job["id"]) > 0:
                    break
                assert time.monotonic() < deadline, "no running job in /metrics"
                time.sleep(0.2)
            assert value(samples, "charnn_jobs", status="running") == 1
            assert value(samples, "charnn_job_chars_per_second", job=job["id"]) > 0
            assert value(samples, "charnn_job_train_loss", job=job["id"]) > 0
        finally:
            httpx.post(f"{url}/jobs/{job['id']}/cancel", headers=auth, timeout=30)
        samples = scrape(url)
        assert value(samples, "charnn_jobs_finished_total", outcome="cancelled") == 1
        assert not [k for k in samples if k[0] == "charnn_job_step"]  # it stopped running


def test_json_logs_are_one_object_per_line_with_the_request_id(tmp_path: Path) -> None:
    served: Served
    with charnn_serve(tmp_path, CHARNN_LOG_FORMAT="json", log_level="info") as served:
        r = httpx.get(served.url + "/models/nope", headers={"X-Request-ID": "trace-me-1"})
        assert r.status_code == 404 and r.json()["error"]["request_id"] == "trace-me-1"
    lines = served.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    access = [r for r in records if r.get("request_id") == "trace-me-1"]
    assert len(access) == 1, records
    assert access[0] | {"duration_ms": 0} == access[0] | {
        "logger": "charnn.access",
        "method": "GET",
        "route": "/models/{model_id}",
        "path": "/models/nope",
        "status": 404,
        "duration_ms": 0,
    }
    assert any("open http://127.0.0.1" in r["message"] for r in records)  # the banner too
