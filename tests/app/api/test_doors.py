"""Validation at every door, by the same code: what one request could once poison for
everyone (an uploaded checkpoint's metadata, a model past the ceilings, ``init_from``, a
vocabulary of a million characters) is refused before anything is stored, and every
listing stays readable. Plus the HTTP edges: JSON whatever the content type, OpenAPI
references that resolve, CORS refusals and security headers, DELETE /jobs.

docs/reliability.md ("Every door, one validation") maps each family to its test here.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.store.validation import ModelHyperparameters, ModelMetrics
from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.params import init_params
from model.vocab import Vocab

from ..conftest import CORPUS, LONG, QUICK, asgi_client, settings_for, wait_status
from .test_bad_inputs import npy, npz_parts, refused, zipped

OCTET = {"content-type": "application/octet-stream"}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def with_meta(meta_json: str, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """A checkpoint whose meta string is exactly ``meta_json`` (escapes kept as written)."""
    base, _ = npz_parts()
    members = {f"{k}.npy": npy(v) for k, v in (arrays or base).items()}
    return zipped({**members, "meta.npy": npy(np.array(meta_json))})


def meta_with(**changes: Any) -> dict[str, Any]:
    _, meta = npz_parts()
    for key, value in changes.items():
        if "." in key:
            section, field = key.split(".")
            meta[section][field] = value
        else:
            meta[key] = value
    return meta


async def listings_still_work(c: httpx.AsyncClient, models: int) -> None:
    r = await c.get("/models")
    assert r.status_code == 200, r.text
    assert r.json()["total"] == models
    for path in ("/jobs", "/readyz"):
        assert (await c.get(path)).status_code == 200


# ------------------------------------------------------------------ uploaded metadata

WRONG = "abc"  # a string where every numeric or enum field wants something else
METRIC_FIELDS = list(ModelMetrics.model_fields)
HP_FIELDS = list(ModelHyperparameters.model_fields)


def test_every_metadata_field_of_the_wrong_type_is_refused_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    """Every field of meta.metrics and meta.hyperparameters, given a string (and the
    numeric ones NaN-like huge or negative): a 422 naming the field; the store holds
    nothing; GET /models, /jobs and the default /predict keep working."""
    cases: list[tuple[str, dict[str, Any]]] = []
    for f in METRIC_FIELDS:
        cases.append((f"meta.metrics.{f}", meta_with(**{f"metrics.{f}": WRONG})))
    for f in HP_FIELDS:
        value: Any = WRONG if f not in ("optimizer", "dtype") else "nope"
        cases.append((f"meta.hyperparameters.{f}", meta_with(**{f"hyperparameters.{f}": value})))
    cases += [
        ("meta.metrics.train_loss", meta_with(**{"metrics.train_loss": -1.0})),
        ("meta.metrics.steps", meta_with(**{"metrics.steps": -3})),
        ("meta.metrics.steps", meta_with(**{"metrics.steps": True})),
        ("meta.hyperparameters.hidden_size", meta_with(**{"hyperparameters.hidden_size": 9})),
        ("meta.metrics.surprise", meta_with(**{"metrics.surprise": 1})),
        ("meta.hyperparameters.surprise", meta_with(**{"hyperparameters.surprise": 1})),
        ("meta.surprise", meta_with(surprise={"x": 1})),
        ("meta.name", meta_with(name="n" * 10_000)),
        ("meta.name", meta_with(name="a\x00b")),
        ("meta.name", meta_with(name="")),
        ("meta.name", meta_with(name=12)),
        ("meta.job_id", meta_with(job_id="../../etc")),
    ]

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            for where, meta in cases:
                data = with_meta(json.dumps(meta))
                for r in (
                    await c.post("/models", content=data, headers=OCTET),
                    await c.post("/models", files={"file": ("m.npz", data)}),
                ):
                    refused(r, 422, "invalid_checkpoint", where)
                await listings_still_work(c, 0)
            assert list((tmp_path / "data" / "models").iterdir()) == []
            control = await c.post("/models", content=with_meta(json.dumps(meta_with())))
            assert control.status_code == 201, control.text
            assert (await c.post("/predict", json={"text": "he"})).status_code == 200

    run(go())


# Lone surrogates written as JSON escapes, so the meta text itself is plain ASCII.
SURROGATE_PLACES = [
    ("a vocabulary entry", lambda m: m.replace('"h"', '"\\ud800"', 1)),
    ("the name", lambda m: m.replace('"name": "ok"', '"name": "x\\udfff"', 1)),
    (
        "a hyperparameter key",
        lambda m: m.replace('"hyperparameters": {}', '"hyperparameters": {"\\ud800": 1}', 1),
    ),
    ("a metrics key", lambda m: m.replace('"metrics": {', '"metrics": {"\\udc00": 1, ', 1)),
    ("an extra value", lambda m: m.replace('"format"', '"note": ["\\ud83d"], "format"', 1)),
]


@pytest.mark.parametrize(("place", "edit"), SURROGATE_PLACES, ids=[p for p, _ in SURROGATE_PLACES])
def test_lone_surrogates_anywhere_in_the_metadata_are_refused(
    tmp_path: Path, place: str, edit: Any
) -> None:
    meta = json.dumps(meta_with(name="ok", metrics={"steps": 1}), ensure_ascii=True)
    assert '"hyperparameters": {}' in meta and '"name": "ok"' in meta
    data = with_meta(edit(meta))
    assert edit(meta) != meta

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            for r in (
                await c.post("/models", content=data, headers=OCTET),
                await c.post("/models", files={"file": ("m.npz", data)}),
            ):
                refused(r, 422, "invalid_checkpoint", "surrogate")
            await listings_still_work(c, 0)

    run(go())


def test_nul_in_the_vocabulary_is_refused(tmp_path: Path) -> None:
    vocab = Vocab(("\x00", "a", "b"))
    data = model_to_bytes(ModelCheckpoint(init_params(4, 3, np.random.default_rng(0)), vocab))

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            r = await c.post("/models", content=data, headers=OCTET)
            refused(r, 422, "invalid_checkpoint", "meta.vocab[0]", "nul")

    run(go())


# ------------------------------------------------------------------ ceilings at every door


def zeros_model(n_a: int, n_x: int, dtype: str = "float32") -> bytes:
    """A model of zeros: tiny compressed, big in memory (what a hostile upload sends)."""
    chars = tuple(chr(0x4E00 + i) for i in range(n_x))
    params = init_params(n_a, n_x, np.random.default_rng(0), dtype)
    params.flat[...] = 0
    return model_to_bytes(ModelCheckpoint(params, Vocab(chars)))


@pytest.mark.parametrize(
    ("label", "n_a", "n_x", "setting"),
    [
        ("hidden", 40, 5, "max_hidden_size"),
        ("vocabulary", 4, 60, "max_vocab_size"),
        ("bytes", 30, 30, "max_model_bytes"),
    ],
)
def test_an_upload_past_a_ceiling_is_refused_naming_it(
    tmp_path: Path, label: str, n_a: int, n_x: int, setting: str
) -> None:
    limits = {"max_hidden_size": 32, "max_vocab_size": 50, "max_model_bytes": 8_000}

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data", **limits)) as c:
            r = await c.post("/models", content=zeros_model(n_a, n_x), headers=OCTET)
            refused(r, 422, "invalid_checkpoint", setting, "too big for this server")
            await listings_still_work(c, 0)

    run(go())


def test_init_from_holds_the_hidden_ceiling_even_for_models_stored_before_it_was_lowered(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    text = "".join(chr(0x4E00 + i) for i in range(5)) * 400

    async def go() -> None:
        async with asgi_client(settings_for(data, max_hidden_size=64)) as c:
            r = await c.post("/models", content=zeros_model(48, 5), headers=OCTET)
            assert r.status_code == 201, r.text
            base = r.json()["id"]
        async with asgi_client(settings_for(data, max_hidden_size=32)) as c:
            r = await c.post("/jobs", json={"corpus": text, "init_from": base})
            refused(r, 422, "invalid", "hidden size 48", "max_hidden_size")
            assert (await c.get("/jobs")).json()["total"] == 0
            assert list((data / "jobs").iterdir()) == []
            await listings_still_work(c, 1)

    run(go())


def test_a_job_past_the_vocabulary_model_or_memory_ceiling_is_refused_before_storing(
    tmp_path: Path,
) -> None:
    wide = "".join(chr(0x4E00 + i) for i in range(300)) * 4  # 300 distinct characters
    hp = {**QUICK, "hidden_size": 64}

    async def go() -> None:
        settings = settings_for(tmp_path / "data", max_vocab_size=200)
        async with asgi_client(settings) as c:
            r = await c.post("/jobs", json={"corpus": wide, "hyperparameters": hp})
            refused(r, 422, "invalid", "300 distinct characters", "max_vocab_size")
        settings = settings_for(tmp_path / "data", max_model_bytes=50_000)
        async with asgi_client(settings) as c:
            r = await c.post("/jobs", json={"corpus": wide, "hyperparameters": hp})
            refused(r, 422, "invalid", "this job's model", "max_model_bytes")
        settings = settings_for(tmp_path / "data", max_job_memory_bytes=2_000_000)
        async with asgi_client(settings) as c:
            r = await c.post("/jobs", json={"corpus": wide, "hyperparameters": hp})
            refused(r, 422, "invalid", "MiB of memory", "max_job_memory_bytes")
            assert (await c.get("/jobs")).json()["total"] == 0
            assert list((tmp_path / "data" / "jobs").iterdir()) == []
            ok = await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
            assert ok.status_code == 202, ok.text  # the control: a small job fits

    run(go())


# ------------------------------------------------------------------ refused means nothing stored


def test_concurrent_submissions_past_the_queue_store_nothing_for_the_refused(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data", max_queued_jobs=6)) as c:
            blocker = await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
            await wait_status(c, blocker.json()["id"], ("running",))
            body = {"corpus": CORPUS, "hyperparameters": QUICK}
            answers = await asyncio.gather(*(c.post("/jobs", json=body) for _ in range(40)))
            statuses = sorted(r.status_code for r in answers)
            assert statuses.count(202) == 6 and statuses.count(429) == 34, statuses
            for r in answers:
                if r.status_code == 429:
                    refused(r, 429, "queue_full", "max_queued_jobs")
                    assert r.headers["retry-after"] == "10"
            jobs = (await c.get("/jobs", params={"limit": 100})).json()
            assert jobs["total"] == 7 and {j["status"] for j in jobs["items"]} <= {
                "queued",
                "running",
            }
            assert len(list((tmp_path / "data" / "jobs").iterdir())) == 7
            await c.post(f"/jobs/{blocker.json()['id']}/cancel")

    run(go())


# ------------------------------------------------------------------ DELETE /jobs


def test_delete_a_finished_job_and_only_a_finished_one(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            done = await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
            job = await wait_status(c, done.json()["id"], ("succeeded",))
            live = await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
            live_id = live.json()["id"]
            await wait_status(c, live_id, ("running",))
            r = await c.delete(f"/jobs/{live_id}")
            refused(r, 409, "conflict", "running", "cancel it first")
            assert (await c.delete(f"/jobs/{job['id']}")).status_code == 204
            assert (await c.get(f"/jobs/{job['id']}")).status_code == 404
            assert (await c.get(f"/jobs/{job['id']}/metrics")).status_code == 404
            assert not (tmp_path / "data" / "jobs" / job["id"]).exists()
            assert (await c.get(f"/models/{job['model_id']}")).status_code == 200  # kept
            refused(await c.delete(f"/jobs/{job['id']}"), 404, "not_found")
            await c.post(f"/jobs/{live_id}/cancel")
            assert (await c.delete(f"/jobs/{live_id}")).status_code == 204

    run(go())


# ------------------------------------------------------------------ HTTP edges

COMPUTE = [
    ("/predict", {"text": "the qu"}),
    ("/generate", {"prompt": "the", "max_chars": 5, "seed": 1}),
    ("/score", {"text": "the quick"}),
]
CONTENT_TYPES = [None, "application/x-www-form-urlencoded", "text/plain", "application/json"]


def test_json_bodies_are_json_whatever_the_content_type(tmp_path: Path) -> None:
    """``curl -d`` sends application/x-www-form-urlencoded: the same answer as JSON."""

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            done = await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
            await wait_status(c, done.json()["id"], ("succeeded",))
            for path, body in COMPUTE:
                answers = []
                for ctype in CONTENT_TYPES:
                    headers: dict[str, str] = {"content-type": ctype} if ctype else {}
                    r = await c.post(path, content=json.dumps(body).encode(), headers=headers)
                    assert r.status_code == 200, (path, ctype, r.text)
                    answers.append(r.json())
                assert all(a == answers[0] for a in answers), path
                form = {"content-type": "application/x-www-form-urlencoded"}
                r = await c.post(path, content=b"text=abc", headers=form)
                refused(r, 422, "invalid", "json")

    run(go())


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            r for v in node.values() for r in _refs(v)
        ]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_every_openapi_reference_resolves_to_a_component(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            schema = (await c.get("/openapi.json")).json()
        components = schema["components"]["schemas"]
        refs = _refs(schema)
        assert refs and all(r.startswith("#/components/schemas/") for r in refs), refs
        assert {r.rsplit("/", 1)[1] for r in refs} <= set(components)
        assert "$defs" not in json.dumps(schema)
        body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/JobCreate"}
        assert "hidden_size" in components["Hyperparameters"]["properties"]
        for path, _ in COMPUTE:
            content = schema["paths"][path]["post"]["requestBody"]["content"]
            assert "$ref" in content["application/json"]["schema"]

    run(go())


def test_a_refused_cors_preflight_is_the_error_shape(tmp_path: Path) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Origin": "https://evil.example"}

    async def go() -> None:
        settings = settings_for(tmp_path / "data", cors_origins=["https://demo.example"])
        async with asgi_client(settings) as c:
            r = await c.options("/predict", headers=preflight)
            refused(r, 400, "cors_refused", "origin", "charnn_cors_origins")
            ok = await c.options(
                "/predict", headers={**preflight, "Origin": "https://demo.example"}
            )
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "https://demo.example"

    run(go())


def test_security_headers_on_every_answer_and_a_csp_outside_the_docs(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path / "data")) as c:
            for path in ("/", "/static/app.js", "/healthz", "/jobs", "/nope", "/docs"):
                r = await c.get(path)
                assert r.headers["x-content-type-options"] == "nosniff", path
                assert r.headers["x-frame-options"] == "DENY", path
                assert r.headers["referrer-policy"] == "no-referrer", path
                csp = r.headers.get("content-security-policy")
                if path == "/docs":  # Swagger UI's inline script: only images are held
                    assert csp == "img-src 'self' data:"
                else:
                    assert csp is not None and "default-src 'self'" in csp, path
                    assert "frame-ancestors 'none'" in csp
            r = await c.post("/jobs", content=b"{")  # errors carry them too
            assert r.status_code == 422 and r.headers["x-content-type-options"] == "nosniff"

    run(go())


def test_a_stored_model_whose_file_was_damaged_since_is_503_not_422(tmp_path: Path) -> None:
    """The client sent nothing wrong: a model file that rotted on disk is the server's fault."""

    async def go() -> None:
        data = tmp_path / "data"
        async with asgi_client(settings_for(data)) as c:
            r = await c.post("/models", content=with_meta(json.dumps(meta_with())))
            model_id = r.json()["id"]
            (data / "models" / f"{model_id}.npz").write_bytes(b"PK\x03\x04" + bytes(100))
            r = await c.post("/predict", json={"model": model_id, "text": "he"})
            refused(r, 503, "unavailable", "damaged", "charnn check")
            assert str(data) not in r.text
            await listings_still_work(c, 1)

    run(go())
