"""Idempotent submits (issue 19, part 4): ``POST /jobs`` with an ``Idempotency-Key``, against a
real uvicorn server; the client's retry through a loopback proxy that loses its first answer.
The store-level checks (racing inserts, expiry, both stores) are in tests/app/store/."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import Client
from app.store.idempotency import IdempotencyKey, IdempotentReplay
from app.store.sqlite import SqliteStore

from ..conftest import CORPUS, QUICK, Server

BODY = {"corpus": CORPUS, "name": "idem", "hyperparameters": QUICK}
HP: dict[str, Any] = dict(QUICK)


def post(url: str, key: str | None, body: dict[str, Any] = BODY, **kw: Any) -> httpx.Response:
    headers = {} if key is None else {"Idempotency-Key": key}
    return httpx.post(f"{url}/jobs", json=body, headers=headers, timeout=30, **kw)


def total_jobs(url: str) -> int:
    r = httpx.get(f"{url}/jobs", timeout=30)
    assert r.status_code == 200, r.text
    total: int = r.json()["total"]
    return total


@pytest.mark.slow  # a real server
def test_same_key_same_body_answers_the_same_job(serve: Callable[..., Server]) -> None:
    s = serve()
    first = post(s.url, "order-42")
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    again = post(s.url, "order-42")
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == f"/jobs/{first.json()['id']}"
    # The same request spelled otherwise: defaults named, or multipart instead of JSON.
    explicit = {**BODY, "seed": 0, "hyperparameters": {**QUICK, "optimizer": "adam"}}
    assert post(s.url, "order-42", explicit).json()["id"] == first.json()["id"]
    config = json.dumps({"name": "idem", "hyperparameters": QUICK})
    multipart = httpx.post(
        f"{s.url}/jobs",
        files={"corpus": ("c.txt", CORPUS.encode(), "text/plain")},
        data={"config": config},
        headers={"Idempotency-Key": "order-42"},
        timeout=30,
    )
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["id"] == first.json()["id"]
    assert total_jobs(s.url) == 1
    # Without a key, or with another one, a submit is a new job.
    assert post(s.url, None).status_code == 202
    assert post(s.url, "order-43").status_code == 202
    assert total_jobs(s.url) == 3


@pytest.mark.slow  # a real server
def test_same_key_other_body_is_a_409_naming_the_key(serve: Callable[..., Server]) -> None:
    s = serve()
    assert post(s.url, "k-1").status_code == 202
    for other in (
        {**BODY, "corpus": CORPUS + "!"},
        {**BODY, "name": "other"},
        {**BODY, "seed": 7},
        {**BODY, "hyperparameters": {**QUICK, "hidden_size": 24}},
    ):
        r = post(s.url, "k-1", other)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "conflict"
        assert "Idempotency-Key 'k-1'" in error["message"]
        assert "different request" in error["message"]
    assert total_jobs(s.url) == 1


@pytest.mark.slow  # a real server
def test_bad_keys_are_422_in_words(serve: Callable[..., Server]) -> None:
    s = serve()
    for bad in (b"", b"x" * 256, "caf\u00e9".encode("latin-1")):
        headers = {b"Idempotency-Key": bad}
        r = httpx.post(f"{s.url}/jobs", json=BODY, headers=headers, timeout=30)
        assert r.status_code == 422, r.text
        assert "Idempotency-Key must be 1 to 255 printable ASCII" in r.json()["error"]["message"]
    assert post(s.url, "x" * 255).status_code == 202
    assert total_jobs(s.url) == 1


@pytest.mark.slow  # a real server
def test_a_key_expires_and_then_starts_a_new_job(serve: Callable[..., Server]) -> None:
    s = serve(CHARNN_IDEMPOTENCY_TTL_S="1")
    first = post(s.url, "short-lived")
    assert first.status_code == 202, first.text
    deadline = time.monotonic() + 30  # bounds a failure only
    while True:
        r = post(s.url, "short-lived")
        if r.status_code == 202:
            break
        assert r.status_code == 200 and r.json()["id"] == first.json()["id"], r.text
        assert time.monotonic() < deadline, "the key never expired"
        time.sleep(0.2)
    assert r.json()["id"] != first.json()["id"]
    assert total_jobs(s.url) == 2


@pytest.mark.slow  # a real server
def test_deleting_the_job_frees_its_key(serve: Callable[..., Server]) -> None:
    s = serve()
    job_id = post(s.url, "reuse").json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{s.url}/jobs/{job_id}").json()["status"] != "succeeded":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.1)
    assert httpx.delete(f"{s.url}/jobs/{job_id}").status_code == 204
    again = post(s.url, "reuse")
    assert again.status_code == 202, again.text
    assert again.json()["id"] != job_id


@pytest.mark.slow  # a real server
def test_concurrent_submits_with_one_key_make_one_job(serve: Callable[..., Server]) -> None:
    s = serve(CHARNN_MAX_QUEUED_JOBS="64")
    n = 8
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    big = {**BODY, "corpus": CORPUS * 40}  # a body worth overlapping

    def one() -> None:
        barrier.wait()
        r = post(s.url, "race", big)
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * (n - 1) + [202], [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert total_jobs(s.url) == 1


class LosingProxy:
    """A TCP proxy on loopback whose first connection loses the server's answer: it reads
    it (so the first attempt did reach the server) and either holds the connection silent
    (``timeout``: the client's read timeout fires) or closes it (``cut``)."""

    def __init__(self, upstream_port: int, mode: str) -> None:
        self.upstream_port, self.mode = upstream_port, mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.lost = b""
        self.first_answered = threading.Event()
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            lose = self.connections == 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, lose), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, lose: bool = False) -> None:
        try:
            while data := src.recv(65536):
                if not lose:
                    dst.sendall(data)
                    continue
                self.lost += data
                if b"\r\n\r\n" in self.lost and not self.first_answered.is_set():
                    self.first_answered.set()
                    if self.mode == "cut":
                        dst.close()  # the client sees the connection die, no answer
        except OSError:
            pass
        finally:
            for sock in (src, dst):  # wakes the other direction's recv, which closes too
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[Callable[[int, str], LosingProxy]]:
    made: list[LosingProxy] = []

    def make(port: int, mode: str) -> LosingProxy:
        made.append(LosingProxy(port, mode))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.mark.slow  # a real server; "timeout" waits out the client's 5 s timeout
@pytest.mark.parametrize("mode", ["timeout", "cut"])
def test_a_client_retrying_a_lost_submit_starts_one_job(
    serve: Callable[..., Server], proxy: Callable[[int, str], LosingProxy], mode: str
) -> None:
    s = serve()
    p = proxy(s.port, mode)
    # 5 s: long enough for any submit here, short enough for the test; the proxy holds the
    # first answer forever, so that attempt can only end by the client's timeout.
    with Client(f"http://127.0.0.1:{p.port}", timeout=5.0) as client:
        job = client.train(CORPUS, name="retried", **HP)
    assert p.first_answered.is_set()
    deadline = time.monotonic() + 10  # the lost answer's body, read on by the proxy
    while f'"id":"{job.id}"'.encode() not in p.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.lost.startswith(b"HTTP/1.1 202"), p.lost[:80]  # the first attempt made the job
    assert p.connections == 2  # the client sent it again, on a new connection
    assert total_jobs(s.url) == 1
    listed = httpx.get(f"{s.url}/jobs").json()["items"]
    assert [j["id"] for j in listed] == [job.id]
    assert f'"id":"{job.id}"'.encode() in p.lost  # the retry answered the first attempt's job


@pytest.mark.slow  # a real server
def test_client_train_with_a_key_is_safe_to_call_again(serve: Callable[..., Server]) -> None:
    s = serve()
    with Client(s.url) as client:
        first = client.train(CORPUS, name="mine", idempotency_key="nightly-1", **HP)
        again = client.train(CORPUS, name="mine", idempotency_key="nightly-1", **HP)
        other = client.train(CORPUS, name="mine", **HP)  # a fresh key per call
    assert again.id == first.id
    assert other.id != first.id
    assert total_jobs(s.url) == 2


def test_an_old_data_directory_gains_the_key_table(tmp_path: Path) -> None:
    with SqliteStore(tmp_path) as store:
        store._conn.execute("DROP TABLE idempotency_keys")  # as an older charnn left it
    with SqliteStore(tmp_path) as store:
        key = IdempotencyKey("upgraded", "f" * 64, 60.0)
        job = store.create_job("n", CORPUS, {}, 0, None, 30, idempotency=key)
        assert store.idempotency_key("upgraded") == ("f" * 64, job.id)
        with pytest.raises(IdempotentReplay) as replay:
            store.create_job("n", CORPUS, {}, 0, None, 30, idempotency=key)
        assert replay.value.job_id == job.id
        assert store.count_jobs() == 1
        assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == [job.id]
