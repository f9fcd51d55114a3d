"""PostgresStore: the SQLite store's behaviour, plus what distributed workers coordinate with.

Needs a PostgreSQL server (``CHARNN_TEST_PG_URL``, default the local one with
trust auth): skipped when none answers, except in CI, which has one. Each test
session works in a fresh database, dropped at the end; each test in a fresh
schema of it (``PostgresStore(schema=...)``). Also ``CeleryRunner.submit`` when
the broker refuses (it needs the store, not Redis).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from app.store.base import (
    JobActiveError,
    MetricPoint,
    ModelRecord,
    NewModel,
    QueueFullError,
    SharedStore,
    Store,
    StoreError,
    StoreUnavailable,
    valid_id,
)
from app.store.postgres import PG_SCHEMA_VERSION, PostgresStore

from .test_sqlite import (
    BAD_IDS,
    HYPER,
    _job,
    _model,
    add_three_models,
    test_ids_are_uuid_hex,
    test_list_filter_paginate_newest_first,
    test_metrics_idempotent_and_ordered,
    test_metrics_non_finite_loss,
    test_satisfies_protocol,
    test_update_job,
    test_update_job_rejects_unknown_fields,
)

# The backend-agnostic SQLite tests, collected here with this module's `store` fixture.
REUSED = (
    test_ids_are_uuid_hex,
    test_list_filter_paginate_newest_first,
    test_metrics_idempotent_and_ordered,
    test_metrics_non_finite_loss,
    test_satisfies_protocol,
    test_update_job,
    test_update_job_rejects_unknown_fields,
)

SERVER_URL = os.environ.get("CHARNN_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _server_unreachable() -> str | None:
    try:
        psycopg.connect(SERVER_URL, connect_timeout=2).close()
    except psycopg.Error as exc:
        return f"PostgreSQL unreachable at {SERVER_URL}: {str(exc).strip()}"
    return None


_why = _server_unreachable()
if _why is not None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{_why} (CI must run the PostgreSQL store tests)", pytrace=False)
    pytest.skip(_why, allow_module_level=True)


def _with_dbname(url: str, dbname: str) -> str:
    return make_conninfo(url, dbname=dbname)


def _create_database() -> tuple[str, str]:
    name = f"charnn_test_{uuid.uuid4().hex}"
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, _with_dbname(SERVER_URL, name)


def _drop_database(name: str) -> None:
    with psycopg.connect(SERVER_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name, url = _create_database()
    try:
        yield url
    finally:
        _drop_database(name)


@pytest.fixture
def schema() -> str:
    return f"t_{uuid.uuid4().hex}"


@pytest.fixture
def store(pg_url: str, schema: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_url, schema=schema)
    yield s
    s.close()


def _sql(pg_url: str, schema: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run SQL behind the store's back (e.g. to age a heartbeat)."""
    with psycopg.connect(pg_url, autocommit=True, options=f"-c search_path={schema}") as conn:
        cur = conn.execute(query.encode(), params)
        return cur.fetchall() if cur.description is not None else []


def _age_heartbeat(pg_url: str, schema: str, job_id: str, seconds: float) -> None:
    _sql(
        pg_url,
        schema,
        "UPDATE charnn_jobs SET heartbeat_at = heartbeat_at - %s WHERE id = %s",
        seconds,
        job_id,
    )


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on: bound (so nobody else gets it), never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def _new_model(name: str = "m", data: bytes = b"npz-bytes") -> NewModel:
    return NewModel(name, data, HYPER, {"val_loss": 1.5}, ["a", "b"], 10, "float32")


def _in_threads(n: int, fn: Any) -> list[Any]:
    """Run fn(i) in n threads released at once; their results, re-raising any error."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# -- the Store protocol ----------------------------------------------------------


def test_pg_satisfies_protocol(store: PostgresStore) -> None:
    s: Store = store  # mypy checks the structural match
    assert s.count_jobs() == 0


def test_create_and_get_job(store: PostgresStore) -> None:
    job = store.create_job("tiny", "héllo\nwörld", HYPER, seed=7, init_from="m1", vocab_size=9)
    assert valid_id(job.id) and job.status == "queued"
    assert (job.name, job.seed, job.init_from, job.vocab_size) == ("tiny", 7, "m1", 9)
    assert job.corpus_chars == len("héllo\nwörld") and job.hyperparameters == HYPER
    assert job.step == 0 and job.started_at is None and job.model_id is None
    assert store.get_job(job.id) == job
    assert store.read_corpus(job.id) == "héllo\nwörld"
    assert store.read_state(job.id) is None
    store.write_state(job.id, b"\x00state")
    assert store.read_state(job.id) == b"\x00state"
    store.write_state(job.id, b"newer")
    assert store.read_state(job.id) == b"newer"
    assert store.get_job("0" * 32) is None and store.read_corpus("0" * 32) is None
    store.write_state("0" * 32, b"x")  # unknown job: nothing stored, no error
    assert store.read_state("0" * 32) is None


def test_bad_corpus_or_name_writes_nothing(store: PostgresStore) -> None:
    with pytest.raises(UnicodeEncodeError):
        _job(store, corpus="lone \ud800 surrogate")
    with pytest.raises(ValueError, match="NUL"):
        _job(store, corpus="a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        _job(store, name="a\x00b")
    with pytest.raises(ValueError, match="NUL"):
        _model(store, name="a\x00b")
    assert store.count_jobs() == 0 and store.count_models() == 0


def test_the_shared_store_speaks_records_and_bytes_only(store: PostgresStore) -> None:
    shared: SharedStore = store  # mypy checks the structural match
    job = _job(shared)
    assert shared.read_corpus(job.id) == "hello world"
    for path_method in ("corpus_path", "state_path", "model_path", "job_folder", "model_file"):
        assert not hasattr(store, path_method)  # no promise of files it does not have


def test_models_add_resolve_delete(store: PostgresStore) -> None:
    first, second = add_three_models(store)
    assert store.resolve_model("a\x00") is None
    with pytest.raises(ValueError):
        store.list_models(offset=-1)

    assert store.delete_model(second.id) is True
    assert store.get_model(second.id) is None and store.read_model_bytes(second.id) is None
    assert store.resolve_model("shakespeare") == first
    assert store.delete_model(second.id) is False
    assert store.count_models() == 2


def test_model_bytes_round_trip_large(store: PostgresStore) -> None:
    data = os.urandom(8 << 20)
    model = _model(store, data=data)
    assert model.size_bytes == len(data)
    assert store.read_model_bytes(model.id) == data


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_not_found(store: PostgresStore, bad: str) -> None:
    _job(store)
    _model(store)
    assert store.get_job(bad) is None
    assert store.update_job(bad, step=3) is None
    assert store.read_corpus(bad) is None and store.read_state(bad) is None
    store.write_state(bad, b"x")
    assert store.add_metrics(bad, [MetricPoint(1, 0.1, 1.0)]) == 0
    assert store.get_metrics(bad) == []
    assert store.get_model(bad) is None
    assert store.read_model_bytes(bad) is None
    assert store.delete_model(bad) is False
    assert store.resolve_model(bad) is None
    assert store.claim_job(bad, "w", 10) is None
    assert store.heartbeat(bad, "w") == (False, False)
    assert store.request_cancel(bad) is None
    assert store.update_progress(bad, step=3) is False
    assert store.delete_job(bad) is False and store.discard_job(bad) is False
    assert store.finish_job(bad, worker="w", status="failed") is None
    assert store.requeue_job(bad, worker="w", state=b"x") is False
    assert store.write_state(bad, b"x", worker="w") is False
    assert store.count_models() == 1 and store.count_jobs() == 1


def test_durable_across_instances(pg_url: str, schema: str) -> None:
    with PostgresStore(pg_url, schema=schema) as first:
        job = _job(first)
        first.update_job(job.id, status="succeeded", step=5)
        first.add_metrics(job.id, [MetricPoint(5, 1.0, 2.0, 2.5)])
        model = _model(first, "kept", b"bytes", job_id=job.id)
    with PostgresStore(pg_url, schema=schema) as second:  # schema creation is idempotent
        got = second.get_job(job.id)
        assert got is not None and got.status == "succeeded" and got.step == 5
        assert second.get_metrics(job.id) == [MetricPoint(5, 1.0, 2.0, 2.5)]
        assert second.resolve_model("kept") == model
        assert second.read_model_bytes(model.id) == b"bytes"
        assert second.models_version == 1
    assert _sql(pg_url, schema, "SELECT schema_version FROM charnn_meta") == [(PG_SCHEMA_VERSION,)]


def test_newer_schema_refused(pg_url: str, schema: str) -> None:
    PostgresStore(pg_url, schema=schema).close()
    _sql(pg_url, schema, "UPDATE charnn_meta SET schema_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        PostgresStore(pg_url, schema=schema)


def test_bad_arguments(pg_url: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresStore(pg_url, schema="x; DROP TABLE y")
    with pytest.raises(ValueError, match="pool_size"):
        PostgresStore(pg_url, pool_size=0)


def test_unreachable_server_fails_fast(closed_port: int) -> None:
    url = f"postgresql://charnn:s3cret-pw@127.0.0.1:{closed_port}/postgres?connect_timeout=2"
    with pytest.raises(StoreUnavailable) as caught:
        PostgresStore(url)
    assert str(caught.value) == "the database is unreachable"  # a plain reason, no URL
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_writable(store: PostgresStore, pg_url: str, schema: str) -> None:
    assert store.writable() is True
    assert store.writable() is True  # the probe leaves no transaction or lock behind
    read_only = make_conninfo(pg_url, options="-c default_transaction_read_only=on")
    ro = PostgresStore(read_only, schema=schema)  # the URL's options and the schema's combine
    try:
        assert ro.count_jobs() == 0  # reads work
        assert ro.writable() is False
    finally:
        ro.close()


def test_not_writable_when_closed(store: PostgresStore) -> None:
    store.close()
    store.close()  # idempotent
    assert store.writable() is False
    with pytest.raises(StoreError, match="closed"):
        store.count_jobs()


def test_reconnects_after_connections_are_killed(store: PostgresStore, pg_url: str) -> None:
    job = _job(store)
    _in_threads(4, lambda i: store.count_jobs())  # several pooled connections
    dbname = conninfo_to_dict(pg_url)["dbname"]
    killed = _sql(
        pg_url,
        "public",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND application_name = 'charnn' AND pid <> pg_backend_pid()",
        dbname,
    )
    assert killed
    assert store.get_job(job.id) == job  # a broken connection is replaced once
    assert store.update_job(job.id, step=2) is not None
    assert store.count_jobs() == 1


def test_concurrent_threads(store: PostgresStore) -> None:
    def work(n: int) -> None:
        for i in range(10):
            job = _job(store, f"t{n}-{i}", corpus=f"corpus {n} {i}")
            store.update_job(job.id, status="running", step=i)
            store.add_metrics(job.id, [MetricPoint(i, 0.1, 1.0)])
            store.list_jobs(limit=5)
            store.count_active()
            model = _model(store, f"m{n}", f"{n}-{i}".encode())
            assert store.read_model_bytes(model.id) == f"{n}-{i}".encode()
            if i % 2:
                assert store.delete_model(model.id)
            assert store.writable()

    _in_threads(8, work)
    assert store.count_jobs() == 80 and store.count_active() == 80
    assert store.count_models() == 40
    assert store.models_version == 120  # 80 inserts + 40 deletes, none lost


# -- models_version --------------------------------------------------------------


def _eventually(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``cond``; the timeout only bounds a failure, it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


def _listening(store: PostgresStore) -> PostgresStore:
    """The store with its models listener started and fresh. Trusted for 10 minutes, not
    3 s, after each ping: a stalled machine must not turn its reads into queries."""
    store._versions._alive_s = 600.0
    assert store.models_version >= 0  # the first read starts it
    _eventually(store._versions.fresh, "the models listener")
    return store


class _Queries:
    """Counts the store's pooled connection checkouts (every query takes one)."""

    def __init__(self, store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        checkout = store._pool.connection

        @contextmanager
        def counted() -> Iterator[Any]:
            self.n += 1
            with checkout() as conn:
                yield conn

        monkeypatch.setattr(store._pool, "connection", counted)


def test_models_version_shared_between_replicas(pg_url: str, schema: str) -> None:
    with (
        PostgresStore(pg_url, schema=schema) as a,
        PostgresStore(pg_url, schema=schema) as b,
    ):
        assert a.models_version == b.models_version == 0
        _listening(a)
        _listening(b)
        model = _model(a)
        assert a.models_version == 1  # the writer sees its own change at once ...
        _eventually(lambda: b.models_version == 1, "b to hear of a's model")  # ... b soon
        assert b.delete_model(model.id) is True
        assert b.models_version == 2
        _eventually(lambda: a.models_version == 2, "a to hear of b's delete")
        assert a.delete_model(model.id) is False  # nothing deleted, no bump
        assert a.models_version == 2 and b.models_version == 2
        _job(a)
        a.update_job(a.list_jobs()[0].id, step=3)  # job writes do not bump it
        assert b.models_version == 2
        assert b._versions.fresh() and a._versions.fresh()  # those reads came from memory


def test_models_version_from_memory_while_listening(
    pg_url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        PostgresStore(pg_url, schema=schema) as a,
        PostgresStore(pg_url, schema=schema) as b,
    ):
        _listening(b)
        queries = _Queries(b, monkeypatch)
        first = _model(a, "first")
        _eventually(lambda: b.models_version == 1, "the insert's notification")
        assert a.delete_model(first.id)
        _eventually(lambda: b.models_version == 2, "the delete's notification")
        for _ in range(1000):
            assert b.models_version == 2
        assert queries.n == 0  # none of those reads (over a thousand) queried
        mine = _model(b, "mine")  # its own write: one transaction, and seen at once
        assert queries.n == 1 and b.models_version == 3 and queries.n == 1
        stored = a.finish_job(_claimed(a), worker="w", status="succeeded", model=_new_model())
        assert isinstance(stored, ModelRecord)  # a worker's outcome notifies too
        _eventually(lambda: b.models_version == 4, "the finished job's notification")
        assert b.delete_model(mine.id) and b.models_version == 5
        _eventually(lambda: a.models_version == 5, "a to hear of b's delete")
        assert queries.n == 2  # b's two writes, no reads
    other = f"{schema}_other"  # another schema's changes are another channel's
    with (
        _listening(PostgresStore(pg_url, schema=schema)) as c,
        PostgresStore(pg_url, schema=other) as d,
        PostgresStore(pg_url, schema=schema) as e,
    ):
        for _ in range(8):
            _model(d)
        assert d.models_version == 8
        _model(e)  # committed after d's: its notification comes after any of theirs
        _eventually(lambda: c.models_version == 6, "e's notification")
        assert c.models_version == 6  # d's versions (up to 8) never reached c's counter


def _claimed(store: PostgresStore) -> str:
    job = _job(store)
    assert store.claim_job(job.id, "w", 30) is not None
    return job.id


def _backend_alive(pg_url: str, pid: int) -> bool:
    return bool(_sql(pg_url, "public", "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid))


def test_a_killed_listener_falls_back_to_queries_then_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its own database: new connections to it are refused while the listener is down.
    name, url = _create_database()
    allow = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}")

    def connections(allowed: bool) -> None:
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(allow.format(sql.Identifier(name), sql.SQL(str(allowed).lower())))

    try:
        with PostgresStore(url) as a, PostgresStore(url) as b:
            _listening(b)
            old_pid = b._versions.backend_pid
            assert old_pid is not None
            connections(False)  # the pools' open connections keep working
            _sql(SERVER_URL, "public", "SELECT pg_terminate_backend(%s)", old_pid)
            _eventually(lambda: not b._versions.fresh(), "the listener to notice")
            queries = _Queries(b, monkeypatch)
            _model(a, "while down")
            assert b.models_version == 1  # read from the table: never stale
            assert queries.n == 1
            assert b.models_version == 1 and queries.n == 2  # every read, while down
            assert not b._versions.fresh()  # it cannot reconnect yet
            _model(a, "also while down")  # b hears nothing of this one ...
            connections(True)
            _eventually(b._versions.fresh, "the listener to reconnect")
            assert b._versions.backend_pid not in (None, old_pid)
            n = queries.n
            assert b.models_version == 2 and queries.n == n  # ... but read it on reconnecting
            _model(a, "after")
            _eventually(lambda: b.models_version == 3, "notifications again")
            assert queries.n == n
    finally:
        connections(True)
        _drop_database(name)


def _listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("charnn-listen-")]


def test_close_stops_the_listener(pg_url: str, schema: str) -> None:
    before = _listener_threads()
    store = _listening(PostgresStore(pg_url, schema=schema))
    thread, pid = store._versions._thread, store._versions.backend_pid
    assert thread is not None and thread.is_alive() and pid is not None
    assert _backend_alive(pg_url, pid)
    store.close()
    assert not thread.is_alive()
    _eventually(lambda: not _backend_alive(pg_url, pid), "its session to end")
    assert _listener_threads() == before
    assert not store._versions.fresh()
    with pytest.raises(StoreError, match="closed"):
        store.models_version  # noqa: B018
    store.close()  # idempotent
    PostgresStore(pg_url, schema=schema).close()  # never read: no thread was started
    assert _listener_threads() == before


def test_a_forked_child_leaves_the_parent_s_listener_alone(pg_url: str, schema: str) -> None:
    with (
        PostgresStore(pg_url, schema=schema) as a,
        _listening(PostgresStore(pg_url, schema=schema)) as b,
    ):
        pid = b._versions.backend_pid
        assert pid is not None
        child = os.fork()
        if child == 0:  # a Celery pool process, say: reads and closes what it inherited
            ok = False
            try:
                ok = not b._versions.fresh() and b.models_version == 0
                b.close()
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert b._versions.backend_pid == pid and _backend_alive(pg_url, pid)
        _model(a)
        _eventually(lambda: b.models_version == 1, "the parent's listener, still working")
        assert b._versions.fresh() and b._versions.backend_pid == pid


# -- distributed execution -------------------------------------------------------


def test_claim_job(store: PostgresStore) -> None:
    job = _job(store)
    claimed = store.claim_job(job.id, "w1", stale_after_s=30)
    assert claimed is not None and claimed.status == "running" and claimed.id == job.id
    assert claimed.started_at is not None and claimed.started_at >= job.created_at
    assert store.get_job(job.id) == claimed
    assert store.claim_job(job.id, "w2", stale_after_s=30) is None  # live heartbeat
    assert store.claim_job(job.id, "w1", stale_after_s=30) is None  # even by its owner
    assert store.count_queued() == 0
    store.update_job(job.id, status="succeeded")
    assert store.claim_job(job.id, "w2", stale_after_s=0) is None  # finished
    assert store.claim_job("0" * 32, "w2", stale_after_s=0) is None


@pytest.mark.parametrize("replicas", [1, 4])
def test_claim_is_exclusive(pg_url: str, schema: str, replicas: int) -> None:
    stores = [PostgresStore(pg_url, schema=schema) for _ in range(replicas)]
    try:
        jobs = [_job(stores[0], f"j{i}") for i in range(5)]
        for job in jobs:
            won = _in_threads(
                8, lambda i, job=job: stores[i % replicas].claim_job(job.id, f"w{i}", 30)
            )
            winners = [w for w in won if w is not None]
            assert len(winners) == 1
            owner = f"w{won.index(winners[0])}"
            assert stores[0].heartbeat(job.id, owner) == (True, False)
    finally:
        for s in stores:
            s.close()


def test_stale_takeover_and_heartbeat_ownership(
    store: PostgresStore, pg_url: str, schema: str
) -> None:
    job = _job(store)
    first = store.claim_job(job.id, "w1", stale_after_s=30)
    assert first is not None
    assert store.heartbeat(job.id, "w1") == (True, False)
    assert store.heartbeat(job.id, "w2") == (False, False)
    _age_heartbeat(pg_url, schema, job.id, 60)  # w1 died a minute ago
    assert store.claim_job(job.id, "w2", stale_after_s=120) is None  # not stale for 120 s
    second = store.claim_job(job.id, "w2", stale_after_s=30)
    assert second is not None and second.status == "running"
    assert second.started_at == first.started_at  # the first start is kept
    assert store.heartbeat(job.id, "w1") == (False, False)  # w1 must stop writing
    assert store.heartbeat(job.id, "w2") == (True, False)
    store.update_job(job.id, status="succeeded")
    assert store.heartbeat(job.id, "w2") == (False, False)  # finished: nobody owns it


def test_heartbeat_refreshes(store: PostgresStore, pg_url: str, schema: str) -> None:
    job = _job(store)
    assert store.claim_job(job.id, "w1", stale_after_s=30) is not None
    _age_heartbeat(pg_url, schema, job.id, 60)
    assert store.heartbeat(job.id, "w1") == (True, False)  # refreshed: alive again
    assert store.claim_job(job.id, "w2", stale_after_s=30) is None
    assert store.requeue_stale(30) == []


def test_request_cancel(store: PostgresStore) -> None:
    queued, running, done = _job(store, "q"), _job(store, "r"), _job(store, "d")
    assert store.claim_job(running.id, "w1", 30) is not None
    store.update_job(done.id, status="succeeded", finished_at=5.0)

    cancelled = store.request_cancel(queued.id)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    assert store.claim_job(queued.id, "w2", 0) is None  # a cancelled job is never claimed

    flagged = store.request_cancel(running.id)
    assert flagged is not None and flagged.status == "running" and flagged.finished_at is None
    assert store.heartbeat(running.id, "w1") == (True, True)  # the worker learns of it
    assert store.request_cancel(running.id) == flagged  # idempotent

    unchanged = store.request_cancel(done.id)
    assert unchanged is not None and unchanged == store.get_job(done.id)
    assert (unchanged.status, unchanged.finished_at) == ("succeeded", 5.0)
    assert store.request_cancel("0" * 32) is None


def test_requeue_stale(store: PostgresStore, pg_url: str, schema: str) -> None:
    a, b, c, d = (_job(store, n) for n in "abcd")
    for job in (a, b, c):
        assert store.claim_job(job.id, f"w-{job.name}", 30) is not None
    _age_heartbeat(pg_url, schema, a.id, 100)
    _age_heartbeat(pg_url, schema, c.id, 100)
    assert store.requeue_stale(30) == [a.id, c.id]  # oldest first
    assert store.requeue_stale(30) == []
    assert [j.status for j in map(store.get_job, (a.id, b.id, c.id, d.id)) if j] == [
        "queued",
        "running",
        "queued",
        "queued",
    ]
    assert store.count_queued() == 3
    assert store.heartbeat(a.id, "w-a") == (False, False)  # its old worker lost it
    again = store.claim_job(a.id, "w-new", 30)
    assert again is not None and again.status == "running"


def test_requeue_stale_concurrent_callers(pg_url: str, schema: str) -> None:
    stores = [PostgresStore(pg_url, schema=schema) for _ in range(4)]
    try:
        jobs = [_job(stores[0], f"j{i}") for i in range(40)]
        for job in jobs:
            assert stores[0].claim_job(job.id, "dead", 30) is not None
        _sql(pg_url, schema, "UPDATE charnn_jobs SET heartbeat_at = heartbeat_at - 100")
        got = _in_threads(8, lambda i: stores[i % 4].requeue_stale(30))
        ids = [job_id for batch in got for job_id in batch]
        assert sorted(ids) == sorted(j.id for j in jobs)  # each exactly once
        assert stores[0].count_queued() == 40
    finally:
        for s in stores:
            s.close()


def test_jobs_to_resume_and_counts(store: PostgresStore) -> None:
    a, b, c = _job(store, "a"), _job(store, "b"), _job(store, "c")
    store.claim_job(b.id, "w", 30)
    store.update_job(c.id, status="failed")
    assert [j.name for j in store.jobs_to_resume()] == ["a", "b"]
    assert store.count_queued() == 1 and store.count_active() == 2
    assert a.created_at <= b.created_at <= c.created_at


# -- schema creation from several processes ---------------------------------------


def _construct(url: str, barrier: Any, results: Any) -> None:
    try:
        barrier.wait(timeout=60)
        with PostgresStore(url) as s:
            results.put(("ok", s.models_version))
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc)))


@pytest.mark.slow  # over a second: the full suite runs it
def test_concurrent_schema_creation_from_processes() -> None:
    name, url = _create_database()
    try:
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_construct, args=(url, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert outcomes == [("ok", 0)] * 4
        assert all(p.exitcode == 0 for p in procs)
        with PostgresStore(url) as s:
            assert s.count_jobs() == 0 and s.writable()
    finally:
        _drop_database(name)


# -- admission, progress, deletion, purging (SqliteStore's semantics) ---------------


def test_max_queued_holds_across_replicas(pg_url: str, schema: str) -> None:
    stores = [PostgresStore(pg_url, schema=schema) for _ in range(4)]
    try:

        def submit(i: int) -> str:
            try:
                stores[i % 4].create_job(
                    f"j{i}", "corpus", HYPER, seed=i, init_from=None, vocab_size=6, max_queued=16
                )
            except QueueFullError:
                return "full"
            return "stored"

        outcomes = _in_threads(100, submit)
        assert outcomes.count("stored") == 16 and outcomes.count("full") == 84
        assert stores[0].count_jobs() == stores[0].count_queued() == 16
        assert _sql(pg_url, schema, "SELECT count(*) FROM charnn_jobs") == [(16,)]
    finally:
        for s in stores:
            s.close()


def test_max_queued_counts_only_waiting_jobs(store: PostgresStore) -> None:
    with pytest.raises(QueueFullError, match="0 jobs are already waiting"):
        store.create_job("j", "c", HYPER, seed=1, init_from=None, vocab_size=1, max_queued=0)
    first = store.create_job("a", "c", HYPER, seed=1, init_from=None, vocab_size=1, max_queued=1)
    with pytest.raises(QueueFullError, match="1 jobs are already waiting"):
        store.create_job("b", "c", HYPER, seed=1, init_from=None, vocab_size=1, max_queued=1)
    assert store.claim_job(first.id, "w", 30) is not None  # running: no longer waiting
    store.create_job("c", "c", HYPER, seed=1, init_from=None, vocab_size=1, max_queued=1)
    assert [j.name for j in store.list_jobs()] == ["c", "a"]


def test_update_progress_only_forwards(store: PostgresStore) -> None:
    job = _job(store)
    assert store.update_progress(job.id, step=5, train_loss=2.0, total_steps=100) is True
    assert store.update_progress(job.id, step=5, train_loss=9.0) is False  # a replay
    assert store.update_progress(job.id, step=3, train_loss=9.0) is False  # backwards
    assert store.update_progress(job.id, step=7, val_loss=float("nan"), eta_s=1.5) is True
    got = store.get_job(job.id)
    assert got is not None and (got.step, got.train_loss, got.total_steps) == (7, 2.0, 100)
    assert got.val_loss is None and got.eta_s == 1.5
    with pytest.raises(ValueError, match="status"):
        store.update_progress(job.id, step=8, status="failed")
    with pytest.raises(ValueError, match="integer step"):
        store.update_progress(job.id, train_loss=1.0)
    assert store.update_progress("0" * 32, step=1) is False


def test_update_progress_racing_writers_never_go_back(store: PostgresStore) -> None:
    job = _job(store)
    _in_threads(8, lambda i: [store.update_progress(job.id, step=s) for s in range(i, 200, 8)])
    got = store.get_job(job.id)
    assert got is not None and got.step == 199


def test_delete_job(store: PostgresStore, pg_url: str, schema: str) -> None:
    queued, running, done = _job(store, "q"), _job(store, "r"), _job(store, "d")
    assert store.claim_job(running.id, "w", 30) is not None
    store.update_job(done.id, status="failed", finished_at=1.0)
    store.add_metrics(done.id, [MetricPoint(1, 0.1, 2.0)])
    store.write_state(done.id, b"state")
    model = _model(store, job_id=done.id)
    for active, status in ((queued, "queued"), (running, "running")):
        with pytest.raises(JobActiveError) as caught:
            store.delete_job(active.id)
        assert caught.value.status == status
    assert store.delete_job(done.id) is True
    assert store.get_job(done.id) is None and store.read_corpus(done.id) is None
    assert store.get_metrics(done.id) == []
    assert _sql(pg_url, schema, "SELECT count(*) FROM charnn_metrics") == [(0,)]
    assert store.get_model(model.id) == model  # its model is kept
    assert store.delete_job(done.id) is False
    assert store.count_jobs() == 2


def test_discard_job_whatever_its_status(store: PostgresStore) -> None:
    queued, running = _job(store, "q"), _job(store, "r")
    assert store.claim_job(running.id, "w", 30) is not None
    assert store.discard_job(queued.id) is True and store.discard_job(running.id) is True
    assert store.discard_job(queued.id) is False and store.count_jobs() == 0


def test_purge_job_files(store: PostgresStore, pg_url: str, schema: str) -> None:
    old, recent, active, cancelled = (_job(store, n, corpus=f"text {n}") for n in "abcd")
    store.update_job(old.id, status="succeeded", finished_at=100.0)
    store.update_job(recent.id, status="failed", finished_at=5000.0)
    store.update_job(cancelled.id, status="cancelled", finished_at=200.0)
    store.claim_job(active.id, "w", 30)
    store.update_job(active.id, finished_at=50.0)  # running: never purged
    for job in (old, recent, active):
        store.write_state(job.id, b"state")
    store.add_metrics(old.id, [MetricPoint(1, 0.1, 2.0)])

    assert store.purge_job_files(1000.0) == [old.id, cancelled.id]
    assert store.read_corpus(old.id) == "" and store.read_state(old.id) is None
    assert store.read_corpus(cancelled.id) == ""
    assert store.get_job(old.id) is not None and store.get_metrics(old.id)  # rows stay
    assert store.read_corpus(recent.id) == "text b" and store.read_state(recent.id) == b"state"
    assert store.read_corpus(active.id) == "text c" and store.read_state(active.id) == b"state"
    versions = _sql(pg_url, schema, "SELECT id, xmin::text FROM charnn_jobs ORDER BY id")
    assert store.purge_job_files(1000.0) == []  # nothing left to purge ...
    assert _sql(pg_url, schema, "SELECT id, xmin::text FROM charnn_jobs ORDER BY id") == versions
    assert store.purge_job_files(10_000.0) == [recent.id]  # ... and no row rewritten


# -- unreadable rows -------------------------------------------------------------


def test_unreadable_rows_are_skipped_not_fatal(
    store: PostgresStore, pg_url: str, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    good_job, bad_job = _job(store, "good"), _job(store, "bad")
    older, bad_vocab, bad_metrics = (_model(store, "m") for _ in range(3))
    _sql(pg_url, schema, "UPDATE charnn_jobs SET hyperparameters = %s WHERE id = %s",
         '"a string"', bad_job.id)  # fmt: skip
    _sql(pg_url, schema, "UPDATE charnn_models SET vocab = '[1,2]' WHERE id = %s", bad_vocab.id)
    _sql(pg_url, schema, "UPDATE charnn_models SET metrics = '[]' WHERE id = %s", bad_metrics.id)
    with pytest.raises(psycopg.errors.CheckViolation):  # the schema refuses a bad status
        _sql(pg_url, schema, "UPDATE charnn_jobs SET status = 'lost' WHERE id = %s", good_job.id)

    with caplog.at_level(logging.ERROR, logger="charnn.store"):
        assert [j.id for j in store.list_jobs()] == [good_job.id]
        assert [j.id for j in store.jobs_to_resume()] == [good_job.id]
        assert store.get_job(bad_job.id) is None
        assert store.update_job(bad_job.id, name="renamed") is None
        assert store.request_cancel(bad_job.id) is None
        assert [m.id for m in store.list_models()] == [older.id]
        assert store.newest_model() == older  # a damaged newest row hides no other
        assert store.resolve_model("m") == older
        assert store.get_model(bad_vocab.id) is None and store.get_model(bad_metrics.id) is None
        store.list_jobs()
    assert store.count_jobs() == 2 and store.count_models() == 3  # counted, not hidden
    logged = [r.getMessage() for r in caplog.records]
    assert sum(bad_job.id in m for m in logged) == 1  # logged once, not at every listing
    assert any(bad_vocab.id in m for m in logged) and any(bad_metrics.id in m for m in logged)


def test_an_unreadable_job_fails_when_claimed(
    store: PostgresStore, pg_url: str, schema: str
) -> None:
    job = _job(store)
    _sql(pg_url, schema, "UPDATE charnn_jobs SET hyperparameters = '[]' WHERE id = %s", job.id)
    assert store.claim_job(job.id, "w", 30) is None  # no worker can run it ...
    rows = _sql(pg_url, schema, "SELECT status, error FROM charnn_jobs WHERE id = %s", job.id)
    assert rows[0][0] == "failed" and "damaged" in rows[0][1]  # ... so it is not re-sent
    assert store.requeue_stale(0) == [] and store.count_queued() == 0


# -- failures of the database: StoreUnavailable, plain reasons ----------------------


def test_a_server_gone_away_is_unavailable(
    store: PostgresStore, pg_url: str, closed_port: int
) -> None:
    job = _job(store)
    store._pool._conninfo = make_conninfo(  # the server "moves away"
        f"postgresql://charnn:s3cret-pw@127.0.0.1:{closed_port}/postgres", connect_timeout=2
    )
    dbname = conninfo_to_dict(pg_url)["dbname"]
    _sql(pg_url, "public",
         "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
         "WHERE datname = %s AND application_name = 'charnn'", dbname)  # fmt: skip
    for call in (
        lambda: store.get_job(job.id),
        lambda: store.list_jobs(),
        lambda: _job(store),
        lambda: store.update_progress(job.id, step=3),
        lambda: store.finish_job(job.id, worker="w", status="failed"),
    ):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        reason = str(caught.value)
        assert reason == "the database is unreachable"
        assert "s3cret" not in reason and str(closed_port) not in reason
    assert store.writable() is False


def test_read_only_session_refuses_writes(store: PostgresStore, pg_url: str, schema: str) -> None:
    job = _job(store)
    one = PostgresStore(pg_url, schema=schema, pool_size=1)  # one connection: always the same
    try:
        with one._pool.connection() as conn:
            conn.execute("SET default_transaction_read_only = on")
        writes = (
            lambda: _job(one),
            lambda: one.update_job(job.id, step=2),
            lambda: one.update_progress(job.id, step=2),
            lambda: one.delete_job(job.id),
            lambda: one.claim_job(job.id, "w", 30),
            lambda: one.add_model(NewModel("m", b"x", HYPER, {}, ["a"], 1, "float32")),
            lambda: one.write_state(job.id, b"x"),
            lambda: one.purge_job_files(1e12),
        )
        for write in writes:
            with pytest.raises(
                StoreUnavailable, match=r"^the database refused the write \(read-only\)$"
            ):
                write()
        assert one.get_job(job.id) == job  # reads still work
        assert one.writable() is False
    finally:
        one.close()
    assert store.count_jobs() == 1 and store.count_models() == 0 and store.writable()


def test_read_only_database_refuses_writes() -> None:
    name, url = _create_database()
    try:
        with PostgresStore(url) as store:
            job = _job(store)
        with psycopg.connect(SERVER_URL, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(name)
                )
            )
        try:
            with PostgresStore(url) as ro:  # opening an up-to-date schema only reads
                assert ro.get_job(job.id) == job and ro.writable() is False
                with pytest.raises(StoreUnavailable, match="read-only"):
                    ro.create_job("x", "c", HYPER, seed=1, init_from=None, vocab_size=1)
                with pytest.raises(StoreUnavailable, match="read-only"):
                    ro.request_cancel(job.id)
                assert ro.count_jobs() == 1
        finally:
            with psycopg.connect(SERVER_URL, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
                        sql.Identifier(name)
                    )
                )
        with PostgresStore(url) as again:
            assert again.writable() and again.request_cancel(job.id) is not None
    finally:
        _drop_database(name)


# -- conditional finish --------------------------------------------------------------


def test_finish_job_only_by_the_owner(store: PostgresStore, pg_url: str, schema: str) -> None:
    job = _job(store)
    assert store.claim_job(job.id, "A", 30) is not None
    _age_heartbeat(pg_url, schema, job.id, 60)  # A stalls ...
    assert store.requeue_stale(30) == [job.id]
    assert store.claim_job(job.id, "B", 30) is not None  # ... and B takes over
    version = store.models_version

    assert (
        store.finish_job(job.id, worker="A", status="succeeded", model=_new_model("from A"))
        is False
    )
    assert store.requeue_job(job.id, worker="A", state=b"A's state") is False
    assert store.write_state(job.id, b"A's state", worker="A") is False
    assert store.count_models() == 0 and store.models_version == version  # nothing written
    after = store.get_job(job.id)
    assert after is not None and after.status == "running" and after.model_id is None
    assert store.heartbeat(job.id, "B") == (True, False)  # still B's
    assert store.read_state(job.id) is None

    assert store.write_state(job.id, b"B's state", worker="B") is True
    model = store.finish_job(
        job.id, worker="B", status="succeeded", model=_new_model("from B", b"bytes")
    )
    assert isinstance(model, ModelRecord) and model.job_id == job.id and model.name == "from B"
    assert (model.vocab, model.param_count, model.size_bytes) == (["a", "b"], 10, 5)
    assert store.read_model_bytes(model.id) == b"bytes"
    assert store.models_version == version + 1
    done = store.get_job(job.id)
    assert done is not None and done.status == "succeeded" and done.model_id == model.id
    assert done.finished_at is not None and done.error is None
    # A retry (say, after a commit whose answer was lost) writes nothing more.
    assert store.finish_job(job.id, worker="B", status="succeeded", model=_new_model()) is False
    assert store.count_models() == 1 and store.heartbeat(job.id, "B") == (False, False)


def test_finish_job_outcomes(store: PostgresStore) -> None:
    failed, cancelled, queued = _job(store, "f"), _job(store, "c"), _job(store, "q")
    for job in (failed, cancelled):
        assert store.claim_job(job.id, "w", 30) is not None
    assert store.finish_job(failed.id, worker="w", status="failed", error="boom\x00") is True
    assert store.finish_job(cancelled.id, worker="w", status="cancelled") is True
    got = store.get_job(failed.id)
    assert got is not None and (got.status, got.error, got.model_id) == (
        "failed",
        "boom\ufffd",
        None,
    )
    got = store.get_job(cancelled.id)
    assert got is not None and got.status == "cancelled" and got.finished_at is not None
    assert (
        store.finish_job(queued.id, worker="w", status="failed") is False
    )  # not running: nobody owns it
    assert store.finish_job("0" * 32, worker="w", status="failed") is None  # no such job
    with pytest.raises(ValueError, match="finished status"):
        store.finish_job(queued.id, worker="w", status="running")
    with pytest.raises(ValueError, match="only a succeeded job"):
        store.finish_job(queued.id, worker="w", status="failed", model=_new_model())
    assert store.count_models() == 0


def test_requeue_job_only_by_the_owner(store: PostgresStore) -> None:
    job = _job(store)
    assert store.claim_job(job.id, "w", 30) is not None
    assert store.requeue_job(job.id, worker="w", state=b"latest") is True
    back = store.get_job(job.id)
    assert back is not None and back.status == "queued" and store.read_state(job.id) == b"latest"
    assert store.heartbeat(job.id, "w") == (False, False)
    assert (
        store.requeue_job(job.id, worker="w", state=b"again") is False
    )  # queued: not running here
    assert store.claim_job(job.id, "w2", 30) is not None  # the next worker takes it


# -- CeleryRunner.submit when the broker refuses ------------------------------------


def test_submit_refused_by_the_broker_stores_nothing(
    store: PostgresStore, pg_url: str, closed_port: int
) -> None:
    from app.jobs.celery_runner import CeleryRunner
    from app.settings import Settings

    settings = Settings(database_url=pg_url, broker_url=f"redis://127.0.0.1:{closed_port}/0")
    runner = CeleryRunner(store, settings)
    try:
        job = _job(store)
        with pytest.raises(StoreUnavailable) as caught:
            runner.submit(job.id)
        assert str(caught.value) == "the job queue (broker) is unreachable; nothing was stored"
        assert store.get_job(job.id) is None and store.count_jobs() == 0
        assert runner.alive() is False
    finally:
        runner.stop()
