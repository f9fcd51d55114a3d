"""Crashes, faults and overload against a real uvicorn server: real processes, real signals.

Each test kills, starves or floods a real ``uvicorn app.main:app`` process (started by
``tests/app/conftest.py: Server``) and then checks what the service promises in
docs/reliability.md, "Crashes, faults and overload". No test asserts on time: timeouts
only bound how long a broken service may take to fail a test.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.checkpoint import load_model, load_state
from model.errors import ModelError

from .app.conftest import CORPUS, LONG, QUICK, Server, free_port
from .conftest import CHARNN, charnn_serve

ROOT = Path(__file__).resolve().parent.parent
PREFIXES = ("", "t", "the quick brown f", "lazy dog. the qu", "over the ")
BODY_LIMIT = 100_000  # the shared server's CHARNN_MAX_BODY_BYTES
TIMEOUT = 60.0  # no healthy step takes anywhere near this; it only bounds a broken one

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------- helpers

Start = Callable[..., Server]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Start servers on ``tmp_path/data`` (or ``data_dir``); all are stopped at the end."""
    servers: list[Server] = []

    def go(data_dir: Path | None = None, **env: str) -> Server:
        base = {
            "CHARNN_DATA_DIR": str(data_dir or tmp_path / "data"),
            "CHARNN_JOB_THREADS": "1",
            "CHARNN_CHECKPOINT_EVERY_S": "0.3",
            "CHARNN_MAX_CONCURRENT_JOBS": "1",
        }
        server = Server({**base, **env})
        servers.append(server)
        return server

    yield go
    for s in servers:
        s.stop()


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def job(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/jobs/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def submit(url: str, hp: dict[str, Any], **extra: Any) -> str:
    r = httpx.post(f"{url}/jobs", json={"corpus": CORPUS, "hyperparameters": hp, **extra})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def wait_job(url: str, job_id: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    final: dict[str, Any] = {}

    def done() -> bool:
        final.update(job(url, job_id))
        return final["status"] in statuses

    wait_for(done, f"job {job_id} to be {'/'.join(statuses)}")
    return final


def train_model(url: str, seed: int = 0) -> str:
    """A finished model's id (a QUICK job)."""
    finished = wait_job(url, submit(url, QUICK, seed=seed), ("succeeded", "failed"))
    assert finished["status"] == "succeeded", finished
    model_id: str = finished["model_id"]
    return model_id


def predictions(url: str, model_id: str) -> list[Any]:
    """Every prefix's full next-character distribution: equal lists mean equal models."""
    out = []
    for text in PREFIXES:
        r = httpx.post(f"{url}/predict", json={"text": text, "model": model_id}, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        out.append((body["model"], body["next"], body["entropy_bits"]))
    return out


def every_npz_loads(data_dir: Path) -> int:
    """Load every .npz under its final name with the strict loaders; the count loaded."""
    n = 0
    for path in sorted(data_dir.rglob("*.npz")):
        assert not path.name.startswith("."), path  # temp files never carry the final name
        try:
            if path.name == "state.npz":
                load_state(path)
            else:
                load_model(path)
        except ModelError as e:  # a torn or corrupt file under its final name
            pytest.fail(f"{path.relative_to(data_dir)} does not load: {e}")
        n += 1
    return n


def temp_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob(".*.tmp") if p.is_file())


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass  # the thread ended meanwhile
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def job_processes(server: Server) -> list[int]:
    """The server's spawned job processes (multiprocessing's spawn_main, not its tracker)."""
    return [c for c in children(server.proc.pid) if "spawn_main" in cmdline(c)]


# ---------------------------------------------------------------------------- 1. kill -9


def test_kill_9_mid_training_resumes_and_every_old_model_predicts_identically(
    start: Start, tmp_path: Path
) -> None:
    server = start()
    old = [train_model(server.url, seed) for seed in (1, 2)]
    before = {m: predictions(server.url, m) for m in old}
    job_id = submit(server.url, {**QUICK, "max_steps": 4000, "eval_every": 1000})
    state = tmp_path / "data" / "jobs" / job_id / "state.npz"
    wait_for(lambda: state.exists() and load_state(state).step >= 300, "a checkpoint")
    checkpointed = load_state(state).step
    server.kill9()

    again = start()  # the same data directory
    assert job(again.url, job_id)["status"] in ("queued", "running")
    steps: list[int] = []
    with httpx.stream("GET", f"{again.url}/jobs/{job_id}/events", timeout=TIMEOUT) as r:
        kind = ""
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "progress":
                event = json.loads(line[6:])
                if "job" not in event:  # (not the snapshot sent first: the job's last row)
                    steps.append(event["step"])
    finished = job(again.url, job_id)
    assert finished["status"] == "succeeded", finished
    assert finished["progress"]["step"] == 4000
    # resumed from the checkpoint (or a later one), not from step 0
    assert steps and steps[0] > checkpointed
    assert steps == sorted(steps)
    for model_id, answers in before.items():
        assert predictions(again.url, model_id) == answers
    every_npz_loads(tmp_path / "data")


# ---------------------------------------------------------------------------- 2. torn writes


@pytest.mark.parametrize("target", ["state", "model"])
def test_kill_9_inside_a_checkpoint_or_model_write_leaves_no_torn_file(
    start: Start, tmp_path: Path, target: str
) -> None:
    data = tmp_path / "data"
    server = start()
    old = train_model(server.url)
    answers = predictions(server.url, old)
    # a job stopped by a clean shutdown: queued, with a checkpoint to resume from
    job_id = submit(server.url, {**QUICK, "max_steps": 10**6 if target == "state" else 5000})
    wait_for(lambda: job(server.url, job_id)["progress"]["step"] > 0, "training to start")
    server.stop()
    assert (data / "jobs" / job_id / "state.npz").exists()

    # CHARNN_TEST_SLOW_WRITE_S (test-only, model/atomic.py) pauses every atomic write half-way
    # through its temporary file, so the kill below lands while a half-written file exists.
    # For "model", no checkpoint is due before the job ends and writes its model.
    every = "0.3" if target == "state" else "1000"
    slow = start(CHARNN_TEST_SLOW_WRITE_S="30", CHARNN_CHECKPOINT_EVERY_S=every)
    prefix = f".{target}.npz."
    wait_for(
        lambda: any(p.name.startswith(prefix) for p in temp_files(data / "jobs" / job_id)),
        f"a half-written {target} file",
    )
    slow.kill9()
    assert temp_files(data), "the kill should have left a temporary file behind"
    every_npz_loads(data)  # whatever carries a final name is whole

    again = start()
    ready = httpx.get(f"{again.url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    listed = httpx.get(f"{again.url}/jobs").json()
    assert job_id in [j["id"] for j in listed["items"]]
    assert predictions(again.url, old) == answers
    if target == "model":  # it resumes and writes its model whole this time
        done = wait_job(again.url, job_id, ("succeeded", "failed"))
        assert done["status"] == "succeeded", done
        predictions(again.url, done["model_id"])
    else:
        assert httpx.post(f"{again.url}/jobs/{job_id}/cancel").status_code == 200
        wait_job(again.url, job_id, ("cancelled",))
    assert temp_files(data) == []  # left-overs of the crash are cleaned at start-up
    every_npz_loads(data)


# ---------------------------------------------------------------------------- 3. OOM kill


def test_a_killed_job_process_fails_the_job_and_the_api_keeps_serving(start: Start) -> None:
    server = start()
    old = train_model(server.url)
    answers = predictions(server.url, old)
    job_id = submit(server.url, LONG)
    wait_for(lambda: job(server.url, job_id)["progress"]["step"] > 0, "training to start")
    (pid,) = job_processes(server)
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does to the biggest process

    failed = wait_job(server.url, job_id, ("failed", "succeeded", "cancelled"))
    assert failed["status"] == "failed"
    assert failed["error"] == "the training process died (exit code -9)"
    assert server.proc.poll() is None
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert predictions(server.url, old) == answers
    train_model(server.url, seed=5)  # the runner goes on with the next job


# ---------------------------------------------------------------------------- 4. read-only, full


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full or read-only disk: {mounted.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextmanager
def immutable(*dirs: Path) -> Iterator[None]:
    """No new file in these directories, even for root (who ignores permission bits).

    (A read-only remount is refused while the database is open for writing.)"""
    done = subprocess.run(["chattr", "+i", *map(str, dirs)], capture_output=True, text=True)
    try:
        if done.returncode != 0:
            pytest.skip(f"cannot make a directory read-only for root: {done.stderr}")
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, dirs)], check=False)


RESERVE = 2 << 20  # what a filler holds from the start: freeing it always frees this much


def reserve(path: Path) -> Path:
    """The filler file, made (holding RESERVE bytes) while the disk still has room: a
    server writing fast (a job's metric points) may fill a small disk before ``fill``
    runs, and then neither creating a file nor freeing one would be possible."""
    filler = path / "filler"
    filler.write_bytes(b"\0" * RESERVE)
    return filler


def fill(path: Path) -> Path:
    """Write until the filesystem says ENOSPC; the filler file (``reserve``'s, if made)."""
    filler = path / "filler"
    # Unbuffered: a buffered file keeps the bytes a short write left behind and raises
    # ENOSPC again when it is closed (whether it does depended on how full the disk was).
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass
    return filler


def assert_not_ready(url: str) -> None:
    r = httpx.get(f"{url}/readyz")
    assert r.status_code == 503
    assert "the data directory is not writable" in r.json()["error"]["details"]["problems"]
    refused = httpx.post(f"{url}/jobs", json={"corpus": CORPUS, "hyperparameters": QUICK})
    assert refused.status_code == 503, refused.text
    assert "not writable" in refused.json()["error"]["message"]


def test_read_only_or_full_data_dir_is_not_ready_and_damages_nothing(
    start: Start, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        server = start(data_dir=disk)
        old = train_model(server.url)
        answers = predictions(server.url, old)
        models = httpx.get(f"{server.url}/models").json()

        with immutable(disk, disk / "jobs", disk / "models"):  # read-only
            assert_not_ready(server.url)
            assert predictions(server.url, old) == answers
            assert httpx.get(f"{server.url}/models").json() == models
            assert httpx.get(f"{server.url}/healthz").status_code == 200
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, "ready again")

        slack = disk / "slack"
        slack.write_bytes(bytes(256 * 1024))
        filler = fill(disk)  # disk full
        try:
            assert_not_ready(server.url)
            assert predictions(server.url, old) == answers
            assert httpx.get(f"{server.url}/models").json() == models
            # 256 kB free: the readiness probe passes, a 1 MB corpus does not fit: still a 503
            slack.unlink()
            big = {"corpus": CORPUS * 400, "hyperparameters": QUICK}
            refused = httpx.post(f"{server.url}/jobs", json=big, timeout=TIMEOUT)
            assert refused.status_code == 503, refused.text
            assert "the disk is full" in refused.json()["error"]["message"]
            assert httpx.get(f"{server.url}/jobs").json()["total"] == 1  # nothing half-stored
        finally:
            filler.unlink()
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, "ready again")
        train_model(server.url, seed=3)  # everything works again
        assert predictions(server.url, old) == answers
        server.stop()
        every_npz_loads(disk)


# ---------------------------------------------------------------------------- 5-7: one server


@dataclass(frozen=True)
class Shared:
    server: Server
    model: str
    data_dir: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One server for the tests that leave it as they found it, with one trained model."""
    data = tmp_path_factory.mktemp("shared") / "data"
    server = Server(
        {
            "CHARNN_DATA_DIR": str(data),
            "CHARNN_JOB_THREADS": "1",
            "CHARNN_CHECKPOINT_EVERY_S": "0.3",
            "CHARNN_MAX_CONCURRENT_JOBS": "1",
            "CHARNN_MAX_QUEUED_JOBS": "1",
            "CHARNN_MAX_BODY_BYTES": str(BODY_LIMIT),
        }
    )
    try:
        yield Shared(server, train_model(server.url), data)
    finally:
        server.stop()


# ---------------------------------------------------------------------------- 5. divergence


def test_divergence_fails_the_job_and_stores_no_model(shared: Shared) -> None:
    models_before = httpx.get(f"{shared.url}/models").json()
    files_before = sorted((shared.data_dir / "models").iterdir())
    hp = {**QUICK, "learning_rate": 10, "optimizer": "sgd", "grad_clip": 0}
    job_id = submit(shared.url, hp, seed=4)
    failed = wait_job(shared.url, job_id, ("failed", "succeeded", "cancelled"))
    assert failed["status"] == "failed"
    assert re.search(r"diverged at step \d+", failed["error"]), failed["error"]
    assert failed["model_id"] is None
    assert httpx.get(f"{shared.url}/models").json() == models_before
    assert sorted((shared.data_dir / "models").iterdir()) == files_before
    assert not (shared.data_dir / "jobs" / job_id / "model.npz").exists()
    points = httpx.get(f"{shared.url}/jobs/{job_id}/metrics").json()["points"]
    assert all(math.isfinite(p["train_loss"]) for p in points if p["train_loss"] is not None)


# ---------------------------------------------------------------------------- 6. overload


def raw_socket(shared: Shared) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", shared.server.port), timeout=TIMEOUT)
    return sock


def read_response_head(sock: socket.socket) -> str:
    """Read until the end of the response headers (and whatever came with them)."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {got!r}"
        got += chunk
    return got.decode("latin-1")


def read_response(sock: socket.socket) -> str:
    """Read one whole response (head and ``Content-Length`` body), so the next read on
    a kept-alive connection starts at the next response: TCP may split them anywhere."""
    got = read_response_head(sock).encode("latin-1")
    head, _, body = got.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    assert length is not None, head
    while len(body) < int(length[1]):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection mid-body: {got!r}"
        body += chunk
    assert len(body) == int(length[1]), "more than one response arrived"
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_queue_full_is_429_with_retry_after_from_a_real_server(shared: Shared) -> None:
    jobs: list[str] = []
    try:
        jobs.append(submit(shared.url, LONG))
        wait_job(shared.url, jobs[0], ("running",))  # out of the queue, in the one slot
        jobs.append(submit(shared.url, LONG))  # CHARNN_MAX_QUEUED_JOBS=1: this one waits
        r = httpx.post(f"{shared.url}/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"].isdigit()
        assert r.json()["error"]["code"] == "queue_full"
        assert job(shared.url, jobs[1])["status"] == "queued"
    finally:
        for job_id in reversed(jobs):
            httpx.post(f"{shared.url}/jobs/{job_id}/cancel")
        for job_id in jobs:
            wait_job(shared.url, job_id, ("cancelled", "succeeded", "failed"))


def test_a_huge_declared_body_is_refused_413_before_it_is_sent(shared: Shared) -> None:
    with raw_socket(shared) as sock:
        head = (
            "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**12}\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"corpus": "' + b"a" * 1000)  # 1 kB of a 1 TB body
        answer = read_response_head(sock)  # answered without the other 999.9... GB
    assert answer.startswith("HTTP/1.1 413"), answer
    assert "payload_too_large" in answer or "content-length" in answer.lower()


def test_a_chunked_body_is_refused_413_once_it_crosses_the_limit(shared: Shared) -> None:
    with raw_socket(shared) as sock:
        head = (
            "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        piece = b"a" * 10_000
        sent = 0
        sock.settimeout(0.05)
        answer = b""
        while sent <= 3 * BODY_LIMIT:  # never finished: the answer must come before the end
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            break
        sock.settimeout(TIMEOUT)
        assert answer, f"no answer after {sent} bytes of a body limited to {BODY_LIMIT}"
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            assert more, answer
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert sent > BODY_LIMIT


def test_slow_clients_do_not_block_others(shared: Shared) -> None:
    stalled = []
    try:
        # a client stalled mid-body, one stalled mid-headers, one dribbling a byte at a time
        mid_body = raw_socket(shared)
        mid_body.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"text": "the'
        )
        mid_head = raw_socket(shared)
        mid_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        dribble = raw_socket(shared)
        stalled = [mid_body, mid_head, dribble]
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        statuses = []
        for i in range(len(request) - 1):
            dribble.sendall(request[i : i + 1])
            statuses.append(httpx.get(f"{shared.url}/healthz", timeout=10).status_code)
            r = httpx.post(f"{shared.url}/predict", json={"text": "the "}, timeout=10)
            statuses.append(r.status_code)
        assert statuses == [200] * len(statuses)
        dribble.sendall(request[-1:])
        assert read_response_head(dribble).startswith("HTTP/1.1 200")
    finally:
        for sock in stalled:
            sock.close()


# ---------------------------------------------------------------------------- 7. load


def test_2000_predictions_at_concurrency_64_while_training_all_succeed(shared: Shared) -> None:
    training = submit(shared.url, LONG)
    try:
        wait_for(lambda: job(shared.url, training)["progress"]["step"] > 0, "training to start")
        script = ROOT / "bench" / "load_predict.py"
        cmd = [sys.executable, str(script), "--url", shared.url, "--json"]
        cmd += ["--requests", "2000", "--concurrency", "64"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["requests"] == 2000
        assert report["statuses"] == {"200": 2000}, report
        assert job(shared.url, training)["status"] == "running"  # it trained all along
    finally:
        httpx.post(f"{shared.url}/jobs/{training}/cancel")
        wait_job(shared.url, training, ("cancelled", "succeeded", "failed"))


# ---------------------------------------------------------------------------- 8. disk faults


def test_a_disk_that_fills_during_training_fails_the_job_in_plain_words(
    start: Start, tmp_path: Path
) -> None:
    """The checkpoint write fails; the job ends ``failed`` saying the disk is full (once its
    outcome can be written: at the latest when space is freed, with no restart), never
    stays ``running``, and the next job trains."""
    with tmpfs(tmp_path / "disk", "24m") as disk:
        reserve(disk)
        server = start(data_dir=disk)
        job_id = submit(server.url, {**LONG, "hidden_size": 64})
        state = disk / "jobs" / job_id / "state.npz"
        wait_for(lambda: state.exists(), "a first checkpoint")
        filler = fill(disk)
        try:
            wait_for(lambda: job_processes(server) == [], "the job process to end")
            assert job(server.url, job_id)["status"] in ("running", "failed")
        finally:
            filler.unlink()
        failed = wait_job(server.url, job_id, ("failed", "succeeded", "cancelled", "queued"))
        assert failed["status"] == "failed", failed
        assert failed["error"] == "the disk is full: the job's files could not be written"
        assert str(disk) not in json.dumps(failed)
        wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, "ready again")
        train_model(server.url, seed=2)
        every_npz_loads(disk)


def model_files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "models").iterdir())


def test_uploads_and_deletes_under_a_read_only_or_full_disk_are_503_and_half_nothing(
    start: Start, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", "16m") as disk:
        server = start(data_dir=disk)
        model = train_model(server.url)
        answers = predictions(server.url, model)
        npz = httpx.get(f"{server.url}/models/{model}/checkpoint").content
        octet = {"content-type": "application/octet-stream"}
        listed, files = httpx.get(f"{server.url}/models").json(), model_files(disk)

        def unchanged() -> None:
            assert httpx.get(f"{server.url}/models").json() == listed
            assert model_files(disk) == files
            assert predictions(server.url, model) == answers

        with immutable(disk / "models"):  # only models/: the rest is writable
            ready = httpx.get(f"{server.url}/readyz")
            assert ready.status_code == 503, ready.text
            r = httpx.post(f"{server.url}/models", content=npz, headers=octet)
            assert r.status_code == 503, r.text
            assert "not writable" in r.json()["error"]["message"]
            r = httpx.delete(f"{server.url}/models/{model}")
            assert r.status_code == 503, r.text
            assert str(disk) not in r.text
            unchanged()
        filler = fill(disk)
        try:
            r = httpx.post(f"{server.url}/models", content=npz, headers=octet)
            assert r.status_code == 503 and "the disk is full" in r.text, r.text
            unchanged()
            r = httpx.delete(f"{server.url}/models/{model}")  # whole, one way or the other
            assert r.status_code in (204, 503), r.text
            if r.status_code == 503:
                unchanged()
            else:
                assert httpx.get(f"{server.url}/models/{model}").status_code == 404
                assert model_files(disk) == []
        finally:
            filler.unlink()
        if httpx.get(f"{server.url}/models/{model}").status_code == 200:
            assert httpx.delete(f"{server.url}/models/{model}").status_code == 204
        assert model_files(disk) == []
        assert httpx.post(f"{server.url}/models", content=npz, headers=octet).status_code == 201


# ---------------------------------------------------------------------------- 9. one owner


def test_a_second_server_on_the_same_data_directory_refuses_to_start(
    start: Start, tmp_path: Path
) -> None:
    first = start()
    running = submit(first.url, LONG)
    wait_for(lambda: job(first.url, running)["status"] == "running", "the job to run")
    env = {**os.environ, "CHARNN_JOB_THREADS": "1"}
    data = str(tmp_path / "data")
    second = subprocess.run(
        [str(CHARNN), "serve", "--port", str(free_port()), "--data-dir", data],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=ROOT,
    )
    assert second.returncode == 1, second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert line == (
        f"charnn: error: the data directory {data} is in use by another charnn server "
        f"(pid {first.proc.pid}); stop it, or give this one its own --data-dir"
    ), second.stderr
    plain = subprocess.run(  # plain uvicorn: its start-up fails, it never serves
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**env, "CHARNN_DATA_DIR": data},
        cwd=ROOT,
    )
    assert plain.returncode != 0 and "in use by another charnn server" in plain.stderr
    # `uvicorn --workers 2` on a directory of its own: the second worker finds the first
    # one's lock, says so in one line, and uvicorn stops the whole server
    workers = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--workers", "2"]
        + ["--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**env, "CHARNN_DATA_DIR": str(tmp_path / "two-workers")},
        cwd=ROOT,
    )
    said = [ln for ln in workers.stderr.splitlines() if ln.startswith("charnn cannot start")]
    assert len(said) == 1, workers.stderr[-3000:]  # (uvicorn's parent itself exits 0)
    assert "stopping the parent process" in workers.stderr
    assert f"the data directory {tmp_path / 'two-workers'} is in use by another" in said[0]
    assert re.search(r"\(pid \d+\)", said[0])
    assert job(first.url, running)["status"] == "running"
    httpx.post(f"{first.url}/jobs/{running}/cancel")
    assert wait_job(first.url, running, ("cancelled",))["status"] == "cancelled"


# ---------------------------------------------------------------------------- 10. connections


def test_slow_header_clients_are_disconnected_and_others_are_served(tmp_path: Path) -> None:
    with charnn_serve(tmp_path, CHARNN_HEADER_TIMEOUT_S="1") as served:
        slow = []
        for i in range(50):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never ends
            slow.append(sock)  # the others never send a byte
        try:
            assert httpx.get(f"{served.url}/healthz").status_code == 200
            for sock in slow:
                try:
                    assert sock.recv(1024) == b""  # closed by the server
                except ConnectionResetError:
                    pass
        finally:
            for sock in slow:
                sock.close()
        assert httpx.get(f"{served.url}/healthz").status_code == 200


def test_a_connection_idle_longer_than_clients_keep_theirs_is_still_open(tmp_path: Path) -> None:
    """httpx keeps idle connections 5 s: the server keeps them longer (keep_alive_s), so a
    client never sends on a connection the server is closing at that very moment."""
    with charnn_serve(tmp_path) as served:
        with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as sock:
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            sock.sendall(request)
            assert read_response(sock).startswith("HTTP/1.1 200")
            time.sleep(6)  # past httpx's (and uvicorn's default) 5 s
            sock.sendall(request)
            assert read_response(sock).startswith("HTTP/1.1 200")
