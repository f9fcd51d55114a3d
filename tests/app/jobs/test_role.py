"""The pieces of `charnn serve --workers N`'s runner role, in one process: the datagram
endpoints, the hub's followers, adopting stored jobs, and the role passing from one
holder to the next (tests/test_workers.py runs the real thing)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.jobs.events import EventHub
from app.jobs.local import LocalRunner
from app.jobs.peers import Endpoint, base_name
from app.jobs.role import RunnerRole
from app.settings import Settings
from app.store.sqlite import SqliteStore

from ..conftest import CORPUS, QUICK


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "data")
    yield s
    s.close()


class Recording(EventHub):
    """A hub that keeps what is published (no loop runs here to deliver it)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.published: list[tuple[str, dict[str, Any]]] = []

    def publish(self, job_id: str, message: dict[str, Any]) -> None:
        self.published.append((job_id, message))


@pytest.fixture
def hub() -> Iterator[Recording]:
    loop = asyncio.new_event_loop()
    yield Recording(loop)
    loop.close()


def runs(role: RunnerRole) -> bool:
    return role.is_runner


def wait_for(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def runner(store: SqliteStore) -> LocalRunner:
    return LocalRunner(
        store,
        max_concurrent_jobs=1,
        job_threads=1,
        checkpoint_every_s=0.2,
        limits=Settings().model_limits,
    )


def test_endpoints_carry_json_objects_and_say_when_a_peer_is_gone(tmp_path: Path) -> None:
    base = base_name(tmp_path, os.getpid())
    assert base.startswith(b"\0charnn/")
    assert base != base_name(tmp_path, os.getpid() + 1)  # one server's names are its own
    a, b = Endpoint(base + b"/a"), Endpoint(base + b"/b")
    try:
        with pytest.raises(OSError):
            Endpoint(base + b"/a")  # a name has one holder
        assert a.send(b.name, {"op": "wake"}) is True
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for junk in (b"not json", b"[1, 2]"):  # dropped, not raised
            raw.sendto(junk, b.name)
        raw.close()
        assert a.send(b.name, {"op": "event", "job": "j", "message": {"step": 1}})
        got: list[dict[str, Any]] = []
        while len(got) < 2:  # local datagrams are there at once; select would wait anyway
            got += b.receive()
        assert got == [{"op": "wake"}, {"op": "event", "job": "j", "message": {"step": 1}}]
        assert b.receive() == []
        assert a.send(base + b"/nobody", {"op": "wake"}) is False
    finally:
        a.close()
        b.close()
    Endpoint(base + b"/a").close()  # the name was freed with its socket


def test_the_hub_says_when_a_job_gets_its_first_subscriber() -> None:
    async def go() -> None:
        hub = EventHub(asyncio.get_running_loop())
        told: list[str] = []
        hub.on_subscribe = told.append
        q1 = hub.subscribe("a")
        q2 = hub.subscribe("a")
        hub.subscribe("b")
        assert told == ["a", "b"] and sorted(hub.followed()) == ["a", "b"]
        hub.unsubscribe("a", q1)
        hub.unsubscribe("a", q2)
        assert hub.followed() == ["b"]
        hub.subscribe("a")
        assert told == ["a", "b", "a"]

    asyncio.run(go())


def test_adopt_queues_only_jobs_the_runner_does_not_know(store: SqliteStore) -> None:
    local = runner(store)
    one, two, three = (store.create_job("j", CORPUS, QUICK, 1, None, 29) for _ in range(3))
    local.submit(one.id)
    assert local.adopt(store.queued_job_ids()) == 2  # two and three, in that order
    assert local.adopt(store.queued_job_ids()) == 0
    local.begin_stop()  # stopping: they resume at the next start instead
    four = store.create_job("j", CORPUS, QUICK, 1, None, 29)
    assert local.adopt([four.id]) == 0
    assert {two.id, three.id} < set(store.queued_job_ids())


def test_the_role_passes_to_the_next_holder_which_resumes_the_jobs_once(
    store: SqliteStore, hub: Recording
) -> None:
    first = RunnerRole(store, runner(store), hub, owner=1)  # owners: names of their own
    second = RunnerRole(store, runner(store), hub, owner=2)
    try:
        first._take()
        second._take()
        assert runs(first) and not runs(second)
        assert int((store.data_dir / "runner.lock").read_text()) == os.getpid()
        # a job the first runner was running (it cannot start: its base model is gone)
        job = store.create_job("j", CORPUS, QUICK, 1, "missing", 29)
        store.update_job(job.id, status="running")
        first.stop()  # releases the role
        second._take()
        assert runs(second)
        wait_for(lambda: store.count_active() == 0)  # requeued, then tried, by the second
        done = store.get_job(job.id)
        assert done is not None and done.status == "failed"
        assert done.error == "model 'missing' no longer exists"
        failed = {"type": "status", "status": "failed", "error": done.error}
        assert hub.published == [(job.id, failed)]
    finally:
        second.stop()
        first.stop()


def test_no_worker_takes_the_role_of_a_stopping_server(store: SqliteStore, hub: EventHub) -> None:
    role = RunnerRole(store, runner(store), hub, owner=3)
    lock = store.data_dir / "charnn.lock"
    lock.write_text(f"{os.getpid()}\nstopping\n")  # what the parent writes at SIGTERM
    try:
        role._take()
        assert not runs(role)
        lock.write_text(f"{os.getpid()}\n")
        role._take()
        assert runs(role)
    finally:
        role.stop()
