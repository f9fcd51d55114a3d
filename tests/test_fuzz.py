"""Contract fuzzing: schemathesis, from the service's own OpenAPI schema, against a real server.

The server (``charnn serve``) has a seeded store: a trained model, a finished job, a
job that keeps running, plus spares that DELETE and cancel may consume (an uploaded
copy of the model, a job queued behind the running one), so the seeded resources
stay whatever order the operations run in. Each operation gets a bounded number of
generated requests, valid and invalid, with path parameters sometimes the seeded
ids; every response must be documented: no 5xx, a documented status code, content
type and body (error bodies included), and invalid data rejected with a 4xx.
bench/fuzz_api.py is the long run (same seeding and checks, >= 1,000 requests).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, GenerationMode, openapi
from schemathesis import Case as AnyCase
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import charnn_serve

Operation = APIOperation[Any, Any, Any, Any]
Case = AnyCase[Any]

EXAMPLES = 20  # per operation: about 300 requests in all, ~10 s
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
OPERATIONS = [
    "GET /healthz",
    "GET /readyz",
    "POST /jobs",
    "GET /jobs",
    "GET /jobs/{job_id}",
    "GET /jobs/{job_id}/metrics",
    "POST /jobs/{job_id}/cancel",
    "GET /jobs/{job_id}/events",
    "POST /predict",
    "POST /generate",
    "POST /score",
    "GET /models",
    "POST /models",
    "GET /models/{model_id}",
    "DELETE /models/{model_id}",
    "GET /models/{model_id}/checkpoint",
]

# The seeded store (bench/fuzz_api.py has the same lines: tests never import bench/).
SEED_TEXT = "The quick brown fox jumps over the lazy dog; 0123456789, said Max! " * 40
TINY = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "max_steps": 100, "eval_every": 50}
LONG = {**TINY, "hidden_size": 64, "max_steps": 10**6}  # outlives any run here


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
    npz = httpx.get(f"{url}/models/{model_id}/checkpoint", timeout=30).content
    headers = {"Content-Type": "application/octet-stream"}
    r = httpx.post(f"{url}/models?name=fuzz-copy", content=npz, headers=headers, timeout=30)
    assert r.status_code == 201, r.text
    return {
        "job_id": [finished, running],
        "events_job_id": [finished],  # the running job's stream never ends
        "cancel_job_id": [finished, spare_job],
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


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, list[str]]]]:
    workdir = tmp_path_factory.mktemp("fuzz")
    with charnn_serve(workdir, CHARNN_MAX_QUEUED_JOBS="4") as served:
        yield served.url, seed_store(served.url)


@pytest.fixture(scope="module")
def operations(seeded: tuple[str, dict[str, list[str]]]) -> dict[str, Operation]:
    schema = openapi.from_url(f"{seeded[0]}/openapi.json")
    results = list(schema.get_all_operations())
    ops = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(ops) == len(results), "the schema has operations schemathesis cannot read"
    return {f"{op.method.upper()} {op.path}": op for op in ops}


@pytest.mark.slow
def test_every_operation_is_fuzzed(operations: dict[str, Operation]) -> None:
    """A new endpoint must join OPERATIONS (and so the fuzzing)."""
    assert sorted(operations) == sorted(OPERATIONS)


@pytest.mark.slow
@pytest.mark.parametrize("label", OPERATIONS)
def test_responses_match_the_schema(
    label: str,
    seeded: tuple[str, dict[str, list[str]]],
    operations: dict[str, Operation],
) -> None:
    url, ids = seeded
    op = operations[label]

    @hypothesis.seed(20261125)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the report shows the case
        suppress_health_check=list(HealthCheck),
    )
    @given(case=case_strategy(op, ids))
    def check(case: Case) -> None:
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=30)

    check()
