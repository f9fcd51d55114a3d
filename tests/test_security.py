"""Security controls: the API key on every mutating route, CORS only for configured
origins, no pickle anywhere, no internal paths or tracebacks in responses, and the
documented size limits. docs/reliability.md ("Security and threat model") maps each
control to its test here.
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.api import health, hyperparameters, jobs, metrics, models
from app.api.deps import require_api_key
from app.main import create_app
from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.params import init_params
from model.vocab import Vocab

from .app.conftest import CORPUS, LONG, QUICK, asgi_client, settings_for, wait_status

ROOT = Path(__file__).resolve().parent.parent
KEY = "s3cret-key"
TEXT = "the quick brown fox jumps over the lazy dog\n"

# Every state-changing operation: each must answer 401 without the key when one is set.
MUTATING = {
    ("POST", "/jobs"),
    ("POST", "/jobs/{job_id}/cancel"),
    ("POST", "/jobs/{job_id}/pause"),
    ("POST", "/jobs/{job_id}/resume"),
    ("DELETE", "/jobs/{job_id}"),
    ("POST", "/models"),
    ("DELETE", "/models/{model_id}"),
}
# POSTs that only compute an answer from a stored model and change nothing: open on purpose.
OPEN_COMPUTE = {("POST", "/predict"), ("POST", "/generate"), ("POST", "/score")}


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def operations(app: FastAPI) -> set[tuple[str, str]]:
    schema = app.openapi()
    return {(m.upper(), path) for path, item in schema["paths"].items() for m in item}


def npz() -> bytes:
    vocab = Vocab.from_text(TEXT)
    params = init_params(8, len(vocab), np.random.default_rng(0))
    return model_to_bytes(ModelCheckpoint(params, vocab))


# ------------------------------------------------------------------ API key


def test_every_operation_is_classified_and_every_mutation_is_guarded(tmp_path: Path) -> None:
    """A new route that changes state must join MUTATING and carry the guard, or this fails."""
    app = create_app(settings_for(tmp_path, api_key=KEY))
    ops = operations(app)
    writes = {op for op in ops if op[0] != "GET"}
    unclassified = writes - MUTATING - OPEN_COMPUTE
    assert not unclassified, f"classify these in MUTATING or OPEN_COMPUTE: {sorted(unclassified)}"
    assert MUTATING | OPEN_COMPUTE <= ops, "a classified operation no longer exists"
    # The routers' own routes (FastAPI wraps included routers; these are the originals).
    routes = [
        r
        for m in (jobs, models, health, hyperparameters, metrics)
        for r in m.router.routes
        if isinstance(r, APIRoute)
    ]
    assert {(meth, r.path) for r in routes for meth in r.methods or ()} == ops
    guarded = {
        (method, r.path)
        for r in routes
        for method in r.methods or ()
        if any(d.call is require_api_key for d in r.dependant.dependencies)
    }
    assert guarded == MUTATING, f"guarded {sorted(guarded)}; expected {sorted(MUTATING)}"


@asynccontextmanager
async def keyed(tmp_path: Path, key: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(settings_for(tmp_path, api_key=key, max_queued_jobs=8)) as c:
        yield c


def concrete(method: str, path: str, ids: dict[str, str]) -> str:
    """Reads use the finished job (its event stream ends); pause, resume (in that order)
    and cancel use the running one."""
    job = ids["live"] if path.endswith(("/cancel", "/pause", "/resume")) else ids["done"]
    return path.replace("{job_id}", job).replace("{model_id}", ids["model"])


async def fixtures(c: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, str]:
    """An uploaded model, a finished job and a running one."""
    model = (await c.post("/models", content=npz(), headers=auth)).json()["id"]
    body = {"corpus": CORPUS, "hyperparameters": QUICK}
    done = (await c.post("/jobs", json=body, headers=auth)).json()["id"]
    assert (await wait_status(c, done, ("succeeded", "failed")))["status"] == "succeeded"
    live = (await call(c, "POST", "/jobs", auth)).json()["id"]
    await wait_status(c, live, ("running",))
    return {"model": model, "done": done, "live": live}


async def call(
    c: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]
) -> httpx.Response:
    """One request with a body that would be accepted, so only auth can refuse it."""
    if (method, path) == ("POST", "/jobs"):
        job: dict[str, Any] = {"corpus": CORPUS, "hyperparameters": LONG}
        return await c.post(path, json=job, headers=headers)
    if (method, path) == ("POST", "/models"):
        return await c.post(path, content=npz(), headers=headers)
    if method == "POST" and path in ("/predict", "/generate", "/score"):
        body: dict[str, Any] = {"text": "the"} if path != "/generate" else {"max_chars": 5}
        return await c.post(path, json=body, headers=headers)
    return await c.request(method, path, headers=headers)


def last(op: tuple[str, str]) -> tuple[bool, bool, tuple[str, str]]:
    """DELETE last (the model is used), cancel after pause and resume (the live job)."""
    return op[0] == "DELETE", op[1].endswith("/cancel"), op


AUTH_HEADERS = [
    pytest.param({"Authorization": f"Bearer {KEY}"}, id="bearer"),
    pytest.param({"authorization": f"bearer {KEY}"}, id="bearer-lowercase"),
    pytest.param({"X-API-Key": KEY}, id="x-api-key"),
]


@pytest.mark.parametrize("auth", AUTH_HEADERS)
def test_the_key_is_needed_for_mutations_only(tmp_path: Path, auth: dict[str, str]) -> None:
    async def go() -> None:
        async with keyed(tmp_path, KEY) as c:
            ops = operations(create_app(settings_for(tmp_path / "x", api_key=KEY)))
            ids = await fixtures(c, auth)
            wrong = [{}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"},
                     {"Authorization": KEY}, {"X-API-Key": KEY.upper()}]  # fmt: skip
            for method, template in sorted(ops):
                path = concrete(method, template, ids)
                if (method, template) in MUTATING:
                    for headers in wrong:
                        r = await call(c, method, path, headers)
                        assert r.status_code == 401, (method, path, headers, r.text)
                        assert r.json()["error"]["code"] == "unauthorized"
                        assert "Bearer" in r.json()["error"]["message"]
                        assert r.headers["www-authenticate"] == "Bearer"
                else:  # reads and the compute POSTs: no key needed
                    r = await call(c, method, path, {})
                    assert r.status_code < 400, (method, path, r.status_code)
            # with the key, every mutation gets past the guard (DELETE last: the model is used)
            for method, template in sorted(MUTATING, key=last):
                r = await call(c, method, concrete(method, template, ids), auth)
                assert r.status_code in (200, 201, 202, 204), (method, template, r.text)
            assert (await c.get(f"/jobs/{ids['live']}")).json()["status"] == "cancelled"

    run(go())


def test_without_a_configured_key_everything_works_without_auth(tmp_path: Path) -> None:
    async def go() -> None:
        async with keyed(tmp_path, None) as c:
            ops = operations(create_app(settings_for(tmp_path / "x")))
            ids = await fixtures(c, {})
            for method, template in sorted(ops, key=last):
                r = await call(c, method, concrete(method, template, ids), {})
                assert r.status_code < 400, (method, template, r.status_code, r.text)

    run(go())


# ------------------------------------------------------------------ CORS

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "x-api-key, content-type",
}


def test_cors_preflight_only_for_configured_origins(tmp_path: Path) -> None:
    async def go() -> None:
        settings = settings_for(tmp_path, cors_origins=["https://demo.example"], api_key=KEY)
        async with asgi_client(settings) as c:
            ok = await c.options("/jobs", headers={"Origin": "https://demo.example", **PREFLIGHT})
            assert ok.status_code == 200
            assert ok.headers["access-control-allow-origin"] == "https://demo.example"
            assert "POST" in ok.headers["access-control-allow-methods"]
            assert "x-api-key" in ok.headers["access-control-allow-headers"].lower()
            assert "access-control-allow-credentials" not in ok.headers
            for origin in ("https://evil.example", "https://demo.example.evil.example", "null"):
                bad = await c.options("/jobs", headers={"Origin": origin, **PREFLIGHT})
                assert bad.status_code == 400
                assert "access-control-allow-origin" not in bad.headers
                r = await c.get("/models", headers={"Origin": origin})
                assert "access-control-allow-origin" not in r.headers
        async with asgi_client(settings_for(tmp_path / "none")) as c:
            for method in ("OPTIONS", "GET"):
                headers = {"Origin": "https://demo.example", **PREFLIGHT}
                r = await c.request(method, "/jobs", headers=headers)
                assert not any(h.startswith("access-control-") for h in r.headers), r.headers

    run(go())


# ------------------------------------------------------------------ no pickle

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
LOADERS = {"load", "loads", "Unpickler"}
SAVERS = {"save", "savez", "savez_compressed"}  # writing a pickle loads nothing


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def pickle_offences(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, "import " + a.name) for a in node.names if a.name in PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "") in PICKLE_MODULES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            head, _, attr = name.rpartition(".")
            kw = {k.arg: k.value for k in node.keywords}
            allow = kw.get("allow_pickle")
            if head in PICKLE_MODULES and attr in LOADERS:
                found.append((node.lineno, f"{name}(...)"))
            elif name in ("np.load", "numpy.load"):
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append((node.lineno, f"{name}(...) without allow_pickle=False"))
            elif allow is not None and attr not in SAVERS:
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append((node.lineno, f"{name}(..., allow_pickle=<not False>)"))
    return found


def python_files() -> Iterator[Path]:
    for folder in ("app", "model", "bench", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_code_can_unpickle() -> None:
    files = list(python_files())
    assert ROOT / "model" / "checkpoint.py" in files and len(files) > 20
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        offenders += [f"{path.relative_to(ROOT)}:{n}: {what}" for n, what in pickle_offences(tree)]
    assert not offenders, "code that could unpickle:\n" + "\n".join(offenders)


def test_the_pickle_scan_catches_what_it_looks_for() -> None:
    bad = "\n".join(
        [
            "import pickle",
            "from cloudpickle import loads",
            "pickle.loads(b'')",
            "np.load(f)",
            "np.load(f, allow_pickle=True)",
            "numpy.load(f, allow_pickle=flag)",
            "np.lib.format.read_array(f, allow_pickle=True)",
        ]
    )
    assert [n for n, _ in pickle_offences(ast.parse(bad))] == [1, 2, 3, 4, 5, 6, 7]
    ok = "np.load(f, allow_pickle=False)\nnp.savez(b, allow_pickle=True)\nnp.save(b, a)"
    assert pickle_offences(ast.parse(ok)) == []


def test_checkpoint_loading_passes_allow_pickle_false_explicitly() -> None:
    source = (ROOT / "model" / "checkpoint.py").read_text(encoding="utf-8")
    assert re.search(r"np\.load\([^)]*allow_pickle=False\)", source)


# ------------------------------------------------------------------ no internals in responses

LEAKS = ("Traceback", 'File "', "site-packages", "app/", "model/", ".py", "charnn.db")


def assert_no_leak(r: httpx.Response, data_dir: Path) -> None:
    text = r.text
    for needle in (str(data_dir), str(data_dir.resolve()), *LEAKS):
        assert needle not in text, (needle, text)


class BrokenStore:
    """Every call fails the way a broken disk would, naming the database path."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise OSError(f"disk I/O error at {self.data_dir}/charnn.db (app/store.py line 1)")

        return fail


def test_errors_never_echo_paths_or_tracebacks(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    async def go() -> None:
        async with asgi_client(settings_for(data_dir, max_concurrent_jobs=1)) as c:
            seen: list[httpx.Response] = []
            seen.append(await c.post("/models", content=b"PK\x03\x04" + b"\0" * 100))
            seen.append(await c.post("/models", content=npz()[:400]))
            seen.append(await c.get("/models/" + "0" * 32))
            seen.append(await c.get("/jobs/../../etc/passwd"))
            seen.append(await c.get("/models/" + str(data_dir).replace("/", "%2F")))
            seen.append(await c.post("/predict", json={"model": str(data_dir / "models")}))
            # a job whose corpus file vanished before it ran
            blocker = (
                await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
            ).json()
            await wait_status(c, blocker["id"], ("running",))
            victim = (
                await c.post("/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
            ).json()
            (data_dir / "jobs" / victim["id"] / "corpus.txt").unlink()
            await c.post(f"/jobs/{blocker['id']}/cancel")
            failed = await wait_status(c, victim["id"], ("failed", "succeeded"))
            assert failed["status"] == "failed" and failed["error"]
            seen.append(await c.get(f"/jobs/{victim['id']}"))
            seen.append(await c.get("/jobs"))
            for r in seen:
                assert 400 <= r.status_code < 500 or r.status_code == 200, r.text
                assert_no_leak(r, data_dir)

    run(go())


def test_an_internal_error_is_a_500_without_details(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"

    async def go() -> None:
        app = create_app(settings_for(data_dir))
        async with app.router.lifespan_context(app):
            state = app.state.charnn
            real = state.store
            broken = BrokenStore(data_dir)
            state.store = state.jobs.store = state.models.store = state.models.cache.store = broken
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                    for method, path, body in [
                        ("GET", "/jobs", None),
                        ("GET", "/models/" + "0" * 32, None),
                        ("POST", "/jobs", {"corpus": CORPUS, "hyperparameters": QUICK}),
                        ("POST", "/predict", {"text": "the"}),
                    ]:
                        r = await c.request(method, path, json=body)
                        assert r.status_code == 500, (path, r.text)
                        assert r.json()["error"]["code"] == "internal"
                        assert "server log" in r.json()["error"]["message"]
                        assert_no_leak(r, data_dir)
                        assert "disk I/O" not in r.text
            finally:
                state.store = state.jobs.store = state.models.store = state.models.cache.store = (
                    real
                )

    run(go())


# ------------------------------------------------------------------ size limits


def test_size_limits_are_documented_and_state_the_limit(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for var in ("CHARNN_MAX_BODY_BYTES", "CHARNN_MAX_CORPUS_CHARS"):
        assert re.search(rf"^\| `{var}` \| `\d+` \| .+ \|$", readme, re.M), var

    async def go() -> None:
        settings = settings_for(tmp_path, max_body_bytes=10_000, max_corpus_chars=3_000)
        async with asgi_client(settings) as c:
            big = "ab" * 6_000
            for r in (
                await c.post("/jobs", json={"corpus": big}),
                await c.post("/jobs", files={"corpus": ("c.txt", big.encode())}),
                await c.post("/models", content=b"PK" * 6_000),
                await c.post("/predict", json={"text": big}),
            ):
                assert r.status_code == 413, r.text
                assert r.json()["error"]["code"] == "payload_too_large"
                assert "limit of 10000 bytes" in r.json()["error"]["message"]
                assert "max_body_bytes" in r.json()["error"]["message"]

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
                yield b'{"corpus": "'
                for _ in range(20):
                    yield b"ab" * 500
                yield b'"}'

            r = await c.post(
                "/jobs", content=chunked(), headers={"content-type": "application/json"}
            )
            assert r.status_code == 413 and "limit of 10000 bytes" in r.text

            r = await c.post("/jobs", json={"corpus": "ab" * 2_000})  # 4000 chars, under 10 kB
            assert r.status_code == 422, r.text
            message = r.json()["error"]["message"]
            assert "4000 characters" in message and "allows 3000" in message
            assert "max_corpus_chars" in message
            assert (await c.get("/jobs")).json()["total"] == 0

    run(go())
