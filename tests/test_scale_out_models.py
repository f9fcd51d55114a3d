"""Scale-out model lookups: two API replicas on one PostgreSQL, no query per prediction.

Each replica's model cache trusts ``models_version`` from its store's LISTEN/NOTIFY
listener (``app/store/listen.py``). A model uploaded or deleted on one replica must
take effect there on the next request, and on the other once the notification
arrives. No worker is needed: models are uploaded (``POST /models``). Needs
PostgreSQL and Redis like tests/test_scale_out.py (skipped without them, failing in
CI); Redis is only pinged, never flushed. A fresh database per module run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest

from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.params import init_params
from model.vocab import Vocab

from .conftest import Served, charnn_serve
from .test_scale_out import PG_URL, REDIS_URL, wait_for

pytestmark = pytest.mark.slow

TEXT = "the quick brown fox jumps over the lazy dog.\n"


def _unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: CI must run the scale-out tests")
    pytest.skip(why)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Served, str]]:
    try:
        import psycopg
        import redis
    except ImportError as e:  # the scale extra is not installed
        _unavailable(f"the scale-out extra is not installed ({e.name})")
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as e:
        _unavailable(f"PostgreSQL is unreachable at {PG_URL} ({e})")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except (redis.RedisError, OSError) as e:
        _unavailable(f"Redis is unreachable at {REDIS_URL} ({e})")
    db = f"charnn_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"'.encode())
    database_url = urlunsplit(urlsplit(PG_URL)._replace(path=f"/{db}"))
    env = {"CHARNN_DATABASE_URL": database_url, "CHARNN_BROKER_URL": REDIS_URL}
    workdir = tmp_path_factory.mktemp("scale-out-models")
    try:
        with (
            charnn_serve(workdir / "api-a", **env) as a,
            charnn_serve(workdir / "api-b", **env) as b,
        ):
            yield a, b, database_url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'.encode())


def upload(server: Served, name: str, seed: int) -> str:
    vocab = Vocab.from_text(TEXT)
    data = model_to_bytes(
        ModelCheckpoint(init_params(8, len(vocab), np.random.default_rng(seed)), vocab)
    )
    r = httpx.post(
        f"{server.url}/models",
        content=data,
        params={"name": name},
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    model_id: str = r.json()["id"]
    return model_id


def predict(server: Served, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", json={"text": "the", "model": model})


def served_by(server: Served, model: str) -> str | None:
    """The id of the model ``model`` resolves to on ``server``, or None (404)."""
    r = predict(server, model)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return str(body["model"])


def listeners(database_url: str) -> int:
    import psycopg

    dbname = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'charnn-listener'",
            (dbname,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_replicas_see_new_and_deleted_models(replicas: tuple[Served, Served, str]) -> None:
    a, b, database_url = replicas
    first = upload(a, "typed", seed=0)
    assert served_by(a, "typed") == first and served_by(b, "typed") == first  # now cached
    wait_for(lambda: listeners(database_url) == 2, 30, "one models listener per replica")

    second = upload(a, "typed", seed=1)  # the name now means the newer model
    assert served_by(a, "typed") == second  # the writer: on its next request
    wait_for(lambda: served_by(b, "typed") == second, 30, "the other replica to hear of it")
    assert all(served_by(b, "typed") == second for _ in range(20))  # and never back

    assert httpx.delete(f"{b.url}/models/{second}").status_code == 204
    assert served_by(b, "typed") == first  # the name falls back to the older model
    assert served_by(b, second) is None and predict(b, second).status_code == 404
    wait_for(lambda: served_by(a, "typed") == first, 30, "the other replica to hear of it")
    assert served_by(a, second) is None

    assert httpx.delete(f"{a.url}/models/{first}").status_code == 204
    assert served_by(a, "typed") is None and served_by(a, first) is None
    wait_for(lambda: served_by(b, first) is None, 30, "the other replica to hear of it")
    assert served_by(b, "typed") is None
    assert listeners(database_url) == 2  # still listening: those reads were from memory
