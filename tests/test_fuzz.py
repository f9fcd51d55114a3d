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

from collections.abc import Iterator

import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import openapi
from schemathesis.core.result import Ok

from .conftest import charnn_serve
from .fuzzing import CHECKS, Case, Operation, case_strategy, seed_store

EXAMPLES = 20  # per operation: about 300 requests in all, ~10 s
OPERATIONS = [
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "POST /jobs",
    "GET /hyperparameters",
    "GET /jobs",
    "GET /jobs/{job_id}",
    "DELETE /jobs/{job_id}",
    "GET /jobs/{job_id}/metrics",
    "POST /jobs/{job_id}/cancel",
    "POST /jobs/{job_id}/pause",
    "POST /jobs/{job_id}/resume",
    "GET /jobs/{job_id}/events",
    "POST /predict",
    "POST /generate",
    "POST /score",
    "GET /models",
    "POST /models",
    "GET /models/{model_id}",
    "DELETE /models/{model_id}",
    "GET /models/{model_id}/checkpoint",
    "GET /models/{model_id}/web",
]


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
