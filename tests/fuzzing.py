"""What contract fuzzing shares: the seeded store and the case strategy.

Used by tests/test_fuzz.py (few examples, in the suite) and bench/fuzz_api.py (the
long run), so both seed the same resources and reach them the same way. The
seeded store keeps its targets whatever the order of operations: ``job_id`` and
``model_id`` are never consumed; ``cancel_job_id``, ``delete_job_id`` and
``delete_model_id`` are spares that cancel and DELETE may consume (a job queued
behind the running one, a job cancelled at once, an uploaded copy of the model).
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode
from schemathesis import Case as AnyCase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

Operation = APIOperation[Any, Any, Any, Any]
Case = AnyCase[Any]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

SEED_TEXT = "The quick brown fox jumps over the lazy dog; 0123456789, said Max! " * 40
TINY = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "max_steps": 100, "eval_every": 50}
LONG = {**TINY, "hidden_size": 64, "max_steps": 10**6, "patience": None}  # outlives any run


def _post_job(url: str, name: str, hp: dict[str, Any]) -> str:
    body = {"corpus": SEED_TEXT, "name": name, "hyperparameters": hp}
    r = httpx.post(f"{url}/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def _wait(url: str, job_id: str, status: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if job["status"] == status:
            return job
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, f"job {job_id} stuck at {job['status']}"
        time.sleep(0.1)


def seed_store(url: str) -> dict[str, list[str]]:
    """Seed through the API; return the real ids to use per path parameter and body field."""
    finished = _post_job(url, "fuzz-seed", TINY)
    model_id = str(_wait(url, finished, "succeeded")["model_id"])
    running = _post_job(url, "fuzz-long", LONG)
    _wait(url, running, "running")
    spare_job = _post_job(url, "fuzz-spare", TINY)  # queued behind the running job
    doomed = _post_job(url, "fuzz-doomed", TINY)  # cancelled at once: DELETE /jobs takes it
    assert httpx.post(f"{url}/jobs/{doomed}/cancel", timeout=30).status_code == 200
    npz = httpx.get(f"{url}/models/{model_id}/checkpoint", timeout=30).content
    headers = {"Content-Type": "application/octet-stream"}
    r = httpx.post(f"{url}/models?name=fuzz-copy", content=npz, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    return {
        "job_id": [finished, running],
        "events_job_id": [finished],  # the running job's stream never ends
        "cancel_job_id": [finished, spare_job],
        "delete_job_id": [doomed, running],  # running: 409
        "model_id": [model_id],
        "delete_model_id": [str(r.json()["id"])],
        "model": [model_id, "fuzz-seed"],
    }


def case_strategy(op: Operation, ids: dict[str, list[str]]) -> st.SearchStrategy[Case]:
    """Generated cases, plus the same with each path parameter (and a body's ``model``,
    a job's corpus) set to seeded values, so real resources are reached as well as junk."""
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    key = {
        ("/jobs/{job_id}/events", "job_id"): "events_job_id",
        ("/jobs/{job_id}/cancel", "job_id"): "cancel_job_id",
    }
    if op.method.lower() == "delete":
        key[(op.path, "model_id")] = "delete_model_id"
        key[(op.path, "job_id")] = "delete_job_id"
    strategies = [op.as_strategy(generation_mode=m) for m in modes]
    for name in [p.name for p in op.path_parameters]:
        for real in ids[key.get((op.path, name), name)]:
            strategies += [
                op.as_strategy(generation_mode=m, path_parameters={name: real}) for m in modes
            ]

    def seeded_body(pair: tuple[Case, str]) -> Case:
        case, ref = pair
        if isinstance(case.body, dict) and op.path != "/jobs":
            case.body["model"] = ref
        elif isinstance(case.body, dict):
            case.body["corpus"] = SEED_TEXT  # trainable: jobs are queued (until 429)
            if "init_from" in case.body:
                case.body["init_from"] = ref
        return case

    if op.method.lower() == "post" and op.path in ("/predict", "/generate", "/score", "/jobs"):
        positive = op.as_strategy(generation_mode=GenerationMode.POSITIVE)
        strategies.append(st.tuples(positive, st.sampled_from(ids["model"])).map(seeded_body))
    return st.one_of(strategies)
