"""Every failure answers with the one error shape; client mistakes are never a 500."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI

from app.errors import Conflict, QueueFull, install_error_handlers
from app.jobs.schemas import Hyperparameters, JobCreate
from model.errors import CorpusError, UnknownCharactersError


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/jobs")
    def create(body: JobCreate) -> dict[str, Any]:
        return {"hidden_size": body.hyperparameters.hidden_size}

    @app.get("/conflict")
    def conflict() -> None:
        raise Conflict("job abc is already finished", details={"status": "succeeded"})

    @app.get("/full")
    def full() -> None:
        raise QueueFull("16 jobs are waiting", headers={"Retry-After": "30"})

    @app.get("/unknown")
    def unknown() -> None:
        raise UnknownCharactersError(["é", "😀"])

    @app.get("/corpus")
    def corpus() -> None:
        raise CorpusError("the corpus is empty")

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("/secret/path/to/charnn.db is locked")

    return app


def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_api_errors_have_the_shape_status_and_headers() -> None:
    r = call("GET", "/conflict")
    assert r.status_code == 409
    assert r.json() == {
        "error": {
            "code": "conflict",
            "message": "job abc is already finished",
            "details": {"status": "succeeded"},
            "request_id": None,  # set by app/api/observe.py, which this bare app lacks
        }
    }
    r = call("GET", "/full")
    assert (r.status_code, r.headers["retry-after"]) == (429, "30")
    assert r.json()["error"]["code"] == "queue_full"


def test_model_errors_map_to_422_naming_the_problem() -> None:
    r = call("GET", "/unknown")
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "unknown_characters"
    assert r.json()["error"]["details"] == {"chars": ["é", "😀"]}
    r = call("GET", "/corpus")
    assert (r.status_code, r.json()["error"]["message"]) == (422, "the corpus is empty")


def test_validation_errors_say_where_and_do_not_echo_the_input() -> None:
    corpus = "x" * 5000
    r = call("POST", "/jobs", json={"corpus": corpus, "hyperparameters": {"hidden_size": 0}})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid"
    assert err["message"].startswith("hyperparameters.hidden_size:")
    assert corpus not in r.text
    r = call("POST", "/jobs", json={"corpus": "abc", "colour": "red"})
    assert r.status_code == 422 and "colour" in r.text
    r = call("POST", "/jobs", json={"corpus": "abc", "hyperparameters": {"learning_rate": "NaN"}})
    assert r.status_code == 422


def test_unknown_routes_and_bugs_keep_the_shape_and_hide_internals() -> None:
    r = call("GET", "/nowhere")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")
    r = call("GET", "/bug")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal"
    assert "secret" not in r.text


def test_hyperparameter_defaults_are_the_model_defaults() -> None:
    from model.train import TrainConfig

    given = JobCreate(corpus="abc").hyperparameters.model_dump()
    assert given == {k: v for k, v in TrainConfig().to_dict().items() if k in given}
    assert set(given) == set(Hyperparameters.model_fields)
