"""`charnn serve --workers 2` on one data directory: every process serves every route,
exactly one runs the jobs, and the role passes on when its holder dies.

Real processes only: `charnn serve --workers 2` in a session of its own, httpx against its
port. Which worker served a request is read from the kernel (the process holding the
server side of the client's TCP connection, through /proc), so nothing in the API had to
change to tell them apart. No test asserts on time: timeouts only bound a hang.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.checkpoint import ModelCheckpoint, load_state, model_to_bytes
from model.params import init_params
from model.vocab import Vocab

from .app.conftest import CORPUS, LONG, QUICK
from .conftest import CHARNN, free_port

pytestmark = pytest.mark.slow
TIMEOUT = 90.0


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat_fields(int(entry.name))
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def is_spawned(pid: int) -> bool:
    """A multiprocessing spawn child (uvicorn's workers, the runner's job processes)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def session_processes(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat_fields(int(entry.name))
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[4]) == sid:
                found.append(int(entry.name))
    return found


def socket_owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The process among ``pids`` holding the server end of 127.0.0.1:client_port's
    connection to server_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote = cols[1], cols[2]
        if int(local.split(":")[1], 16) == server_port and (
            int(remote.split(":")[1], 16) == client_port
        ):
            inode = cols[9]
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue  # closed meanwhile
    return None


def client_port(response: httpx.Response) -> int:
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


class Workers:
    """`charnn serve --workers 2` in a session of its own; stderr to a file."""

    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        self.log = log
        full_env = {
            **{k: v for k, v in os.environ.items() if k != "CHARNN_API_KEY"},
            "CHARNN_JOB_THREADS": "1",
            "CHARNN_MAX_CONCURRENT_JOBS": "1",
            "CHARNN_CHECKPOINT_EVERY_S": "0.3",
            **env,
        }
        cmd = [str(CHARNN), "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        cmd += ["--workers", "2", "--log-level", "info"]
        self._err = log.open("a")
        self.proc = subprocess.Popen(
            cmd, env=full_env, stderr=self._err, stdout=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(lambda: len(self.workers()) == 2 and self.all_serve(), "every worker to serve")

    def workers(self) -> list[int]:
        return sorted(p for p in children(self.proc.pid) if is_spawned(p))

    def runner(self) -> int:
        """The pid holding the runner role (it writes its pid in runner.lock)."""
        text = (self.data_dir / "runner.lock").read_text().strip()
        return int(text) if text.isdigit() else -1

    def served_by(self, response: httpx.Response) -> int | None:
        return socket_owner(self.port, client_port(response), self.workers())

    def all_serve(self) -> bool:
        """Fresh connections until every worker has answered one (the kernel hands each
        connection to whichever worker accepts first)."""
        seen: set[int] = set()
        for _ in range(200):
            try:
                with httpx.Client(timeout=5) as c:
                    r = c.get(self.url + "/healthz")
                    if r.status_code == 200:
                        seen.add(self.served_by(r) or -1)
            except httpx.TransportError:
                return False
            if seen >= set(self.workers()):
                return True
        return False

    def client_on(self, pid: int) -> httpx.Client:
        """A client whose kept-alive connection a given worker serves."""
        for _ in range(500):
            c = httpx.Client(base_url=self.url, timeout=TIMEOUT)
            if self.served_by(c.get("/healthz")) == pid:
                return c
            c.close()
        raise AssertionError(f"worker {pid} never accepted a connection")

    def log_text(self) -> str:
        self._err.flush()
        return self.log.read_text()

    def stop(self) -> int:
        """SIGTERM to the parent, as `docker stop` does: its exit status."""
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=TIMEOUT)
        wait_for(lambda: session_processes(self.proc.pid) == [], "every process to end")
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._err.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    started: list[Workers] = []

    def go(**env: str) -> Workers:
        w = Workers(tmp_path / "data", tmp_path / f"serve-{len(started)}.log", **env)
        started.append(w)
        return w

    yield go
    for w in started:
        w.close()


def submit(c: httpx.Client, hp: dict[str, Any]) -> str:
    r = c.post("/jobs", json={"corpus": CORPUS, "name": "fox", "hyperparameters": hp})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def status(c: httpx.Client, job_id: str) -> str:
    return str(c.get(f"/jobs/{job_id}").json()["status"])


def steps(c: httpx.Client, job_id: str) -> list[int]:
    return [p["step"] for p in c.get(f"/jobs/{job_id}/metrics").json()["points"]]


def job_processes(w: Workers) -> set[int]:
    return {p for worker in w.workers() for p in children(worker) if is_spawned(p)}


def model_npz(seed: int) -> bytes:
    vocab = Vocab.from_text("the quick brown fox jumps over the lazy dog.")
    params = init_params(16, len(vocab), np.random.default_rng(seed))
    return model_to_bytes(ModelCheckpoint(params, vocab))


class Stream(threading.Thread):
    """One SSE stream of a job, read to its end: (event, data) pairs."""

    def __init__(self, w: Workers, job_id: str) -> None:
        super().__init__(daemon=True)
        self.w, self.job_id = w, job_id
        self.pid: int | None = None
        self.events: list[tuple[str, str]] = []
        self.opened = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=TIMEOUT) as c:
                with c.stream("GET", f"{self.w.url}/jobs/{self.job_id}/events") as r:
                    self.pid = self.w.served_by(r)
                    self.opened.set()
                    event = ""
                    for line in r.iter_lines():
                        if "shutting down" in line:  # the comment a closing stream ends with
                            self.events.append(("closing", line))
                        elif line.startswith("event: "):
                            event = line.removeprefix("event: ")
                        elif line.startswith("data: "):
                            self.events.append((event, line.removeprefix("data: ")))
        except BaseException as e:
            self.error = e
        finally:
            self.opened.set()


def progress_steps(stream: Stream) -> list[int]:
    return [
        int(m.group(1))
        for kind, data in stream.events
        if kind == "progress" and (m := re.search(r'"step": ?(\d+)', data))
    ]


# ---------------------------------------------------------------------------------- tests


def test_every_worker_serves_and_a_model_change_is_seen_by_the_other_at_once(
    start: Callable[..., Workers],
) -> None:
    w = start()
    a, b = w.workers()
    assert w.runner() in (a, b)
    on_a, on_b = w.client_on(a), w.client_on(b)
    try:
        headers = {"content-type": "application/octet-stream"}
        first = on_a.post("/models", content=model_npz(1), headers=headers, params={"name": "m"})
        assert first.status_code == 201, first.text
        first_id = first.json()["id"]
        # b resolves "the newest model" and "m", and loads it into its caches
        for ref in (None, "m", first_id):
            r = on_b.post("/predict", json={"text": "the ", "model": ref})
            assert r.status_code == 200 and r.json()["model"] == first_id, r.text
        second = on_b.post("/models", content=model_npz(2), headers=headers, params={"name": "m"})
        second_id = second.json()["id"]
        # a, which resolved nothing yet, and b: the new newest "m" at once
        assert on_a.post("/predict", json={"text": "the ", "model": "m"}).json()["model"] == (
            second_id
        )
        assert on_a.delete(f"/models/{second_id}").status_code == 204
        # b had it cached under both names: gone at once, "m" is the first one again
        gone = on_b.post("/predict", json={"text": "the ", "model": second_id})
        assert gone.status_code == 404, gone.text
        assert on_b.get(f"/models/{second_id}").status_code == 404
        assert on_b.post("/predict", json={"text": "the ", "model": "m"}).json()["model"] == (
            first_id
        )
        assert on_b.delete(f"/models/{first_id}").status_code == 204
        assert on_a.post("/predict", json={"text": "the "}).status_code == 404  # none left
        for c in (on_a, on_b):
            assert w.served_by(c.get("/readyz")) in (a, b)
            assert c.get("/readyz").status_code == 200
    finally:
        on_a.close()
        on_b.close()
    assert w.stop() == 0


def test_a_job_runs_once_and_its_events_reach_streams_on_every_worker(
    start: Callable[..., Workers],
) -> None:
    w = start()
    runner = w.runner()
    (other,) = [p for p in w.workers() if p != runner]
    with closing(w.client_on(other)) as c:
        job_id = submit(c, {**QUICK, "max_steps": 1500, "log_every": 10})  # through the other
        streams: list[Stream] = []
        while {s.pid for s in streams} != {runner, other} and len(streams) < 40:
            s = Stream(w, job_id)
            s.start()
            assert s.opened.wait(TIMEOUT) and s.error is None, s.error
            streams.append(s)
        assert {s.pid for s in streams} == {runner, other}
        seen: set[int] = set()

        def finished() -> bool:
            seen.update(job_processes(w))
            return status(c, job_id) not in ("queued", "running")

        wait_for(finished, "the job to finish")
        assert status(c, job_id) == "succeeded"
        assert len(seen) == 1, seen  # one job process, by the runner, ever
        for s in streams:
            s.join(TIMEOUT)
            assert not s.is_alive() and s.error is None, s.error
            assert s.events[-1][0] == "status" and '"succeeded"' in s.events[-1][1], s.events[-3:]
            got = progress_steps(s)
            assert got == sorted(set(got)), f"repeated or out of order on {s.pid}"
            assert len(got) > 1, f"no live progress on {s.pid}"  # not only the snapshot
        points = steps(c, job_id)
        assert points == sorted(set(points)) and points[-1] == 1500
        model_id = c.get(f"/jobs/{job_id}").json()["model_id"]
    started = 0.0
    for pid in (runner, other):  # the model answers everywhere; one start was counted
        with closing(w.client_on(pid)) as c:
            r = c.post("/predict", json={"text": "the ", "model": model_id})
            assert r.status_code == 200, r.text
            m = re.search(r"^charnn_jobs_started_total (\S+)$", c.get("/metrics").text, re.M)
            started += float(m.group(1)) if m else 0.0
    assert started == 1.0
    assert w.stop() == 0


def test_a_cancel_through_either_worker_stops_the_job(start: Callable[..., Workers]) -> None:
    w = start()
    runner = w.runner()
    (other,) = [p for p in w.workers() if p != runner]
    with closing(w.client_on(runner)) as on_runner, closing(w.client_on(other)) as on_other:
        running = submit(on_other, LONG)
        queued = submit(on_runner, LONG)  # one at a time: this one waits
        wait_for(lambda: status(on_other, running) == "running", "the first job to run")
        assert status(on_runner, queued) == "queued"
        # the answer is the cancelled job, as with one process
        r = on_other.post(f"/jobs/{queued}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        r = on_other.post(f"/jobs/{running}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        third = submit(on_other, LONG)
        wait_for(lambda: status(on_runner, third) == "running", "the third job to run")
        r = on_runner.post(f"/jobs/{third}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
        again = on_other.post(f"/jobs/{third}/cancel")
        assert again.status_code == 409, again.text
        wait_for(lambda: job_processes(w) == set(), "no job process left")
    assert w.stop() == 0


def test_a_pause_through_either_worker_reaches_the_runner(start: Callable[..., Workers]) -> None:
    """Pause and resume sent to the worker that does not run jobs: the runner pauses the
    job (checkpointed, its slot freed), and resumes it; a queued job pauses unstarted."""
    w = start()
    runner = w.runner()
    (other,) = [p for p in w.workers() if p != runner]
    with closing(w.client_on(runner)) as on_runner, closing(w.client_on(other)) as on_other:
        running = submit(on_other, LONG)
        queued = submit(on_other, LONG)
        wait_for(lambda: status(on_other, running) == "running", "the first job to run")
        r = on_other.post(f"/jobs/{queued}/pause")
        assert r.status_code == 200 and r.json()["status"] == "paused", r.text
        assert r.json()["started_at"] is None
        r = on_other.post(f"/jobs/{running}/pause")
        assert r.status_code in (200, 202), r.text
        wait_for(lambda: status(on_runner, running) == "paused", "the pause")
        wait_for(lambda: job_processes(w) == set(), "its job process to end")
        step = on_runner.get(f"/jobs/{running}").json()["progress"]["step"]
        r = on_other.post(f"/jobs/{running}/resume")
        assert r.status_code == 200, r.text
        wait_for(
            lambda: on_runner.get(f"/jobs/{running}").json()["progress"]["step"] > step,
            "it to train on",
        )
        for job_id in (running, queued):
            r = on_other.post(f"/jobs/{job_id}/cancel")
            assert r.status_code in (200, 202), r.text
            wait_for(lambda j=job_id: status(on_runner, j) == "cancelled", "the cancel")  # type: ignore[misc]
    assert w.stop() == 0


def kill_the_runner(w: Workers, c: httpx.Client, job_id: str, state: Path, after: int) -> int:
    """Once the job checkpointed past ``after``: kill -9 the runner worker; its job process
    dies with it, another worker takes the role and the job resumes there. The step of
    the checkpoint it resumed from."""
    runner = w.runner()
    wait_for(lambda: state.exists() and load_state(state).step > after, "a checkpoint")
    wait_for(lambda: len(job_processes(w)) == 1, "its job process")
    (trainer,) = job_processes(w)
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not alive(trainer), "the dead runner's job process to die with it")
    checkpointed = load_state(state).step
    wait_for(lambda: w.runner() not in (runner, -1), "another worker to take the role")
    assert w.runner() in w.workers()
    wait_for(lambda: len(w.workers()) == 2, "uvicorn to replace the dead worker")
    wait_for(lambda: any(s > checkpointed for s in steps(c, job_id)), "the job to resume")
    assert len(job_processes(w)) == 1  # never two trainings of it at once
    return checkpointed


def test_kill_9_of_the_runner_worker_resumes_its_job_once_elsewhere(
    start: Callable[..., Workers],
) -> None:
    w = start()
    with httpx.Client(base_url=w.url, timeout=TIMEOUT) as c:
        job_id = submit(c, {**LONG, "max_steps": 12_000})
        state = w.data_dir / "jobs" / job_id / "state.npz"
        # the first runner, then the worker that took its place (the old one, or the new)
        checkpointed = kill_the_runner(w, c, job_id, state, 0)
        kill_the_runner(w, c, job_id, state, checkpointed)

        def done() -> bool:
            assert len(job_processes(w)) <= 1
            return status(c, job_id) not in ("queued", "running")

        wait_for(done, "the job to finish")
        final = c.get(f"/jobs/{job_id}").json()
        assert final["status"] == "succeeded", final["error"]
        points = steps(c, job_id)
        assert points == sorted(set(points)) and points[-1] == 12_000  # one curve
    assert w.stop() == 0
    # the role was taken once at start and once after each death, never twice at a time
    took = re.findall(r"process (\d+) runs the training jobs", w.log_text())
    assert len(took) == 3 and len(set(took)) == 3, took


def test_one_owner_per_directory_and_sigterm_checkpoints_and_resumes(
    start: Callable[..., Workers], tmp_path: Path
) -> None:
    w = start()
    data = tmp_path / "data"
    with httpx.Client(base_url=w.url, timeout=TIMEOUT) as c:
        job_id = submit(c, LONG)
        state = data / "jobs" / job_id / "state.npz"
        wait_for(lambda: state.exists() and load_state(state).step > 0, "a checkpoint")
        for extra in ([], ["--workers", "2"]):  # a second server is refused, in one line
            second = subprocess.run(
                [str(CHARNN), "serve", "--port", str(free_port()), "--data-dir", str(data)] + extra,
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert second.returncode == 1, second.stderr
            assert second.stderr.strip().splitlines()[-1] == (
                f"charnn: error: the data directory {data} is in use by another charnn server "
                f"(pid {w.proc.pid}); stop it, or give this one its own --data-dir"
            ), second.stderr
        assert status(c, job_id) == "running"
        follower = Stream(w, job_id)
        follower.start()
        assert follower.opened.wait(TIMEOUT)
    assert w.stop() == 0  # every worker and job process gone (Workers.stop waits for it)
    follower.join(TIMEOUT)
    assert follower.events and follower.events[-1][0] == "closing", follower.events[-3:]
    checkpointed = load_state(state).step
    assert checkpointed > 0
    assert "stopping" in (data / "charnn.lock").read_text()
    assert len(re.findall(r"runs the training jobs", w.log_text())) == 1  # no takeover

    again = start()
    with httpx.Client(base_url=again.url, timeout=TIMEOUT) as c:
        listed = c.get(f"/jobs/{job_id}").json()
        assert listed["status"] in ("queued", "running") and listed["error"] is None, listed
        wait_for(lambda: any(s > checkpointed for s in steps(c, job_id)), "it to resume")
        points = steps(c, job_id)
        assert points == sorted(set(points))
        assert c.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert again.stop() == 0


def test_kill_9_of_the_parent_takes_every_process_with_it_and_the_job_resumes(
    start: Callable[..., Workers],
) -> None:
    w = start()
    with httpx.Client(base_url=w.url, timeout=TIMEOUT) as c:
        job_id = submit(c, LONG)
        state = w.data_dir / "jobs" / job_id / "state.npz"
        wait_for(lambda: state.exists() and load_state(state).step > 0, "a checkpoint")
        wait_for(lambda: len(job_processes(w)) == 1, "its job process")
    os.kill(w.proc.pid, signal.SIGKILL)  # the parent only, not its session
    w.proc.wait()
    # workers and job process die with it: nothing serves or trains an unlocked directory
    wait_for(lambda: session_processes(w.proc.pid) == [], "the workers and the job to die")
    checkpointed = load_state(state).step
    again = start()
    with httpx.Client(base_url=again.url, timeout=TIMEOUT) as c:
        wait_for(lambda: any(s > checkpointed for s in steps(c, job_id)), "it to resume")
        assert c.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert again.stop() == 0


def test_a_worker_that_cannot_start_stops_the_server_with_exit_1(tmp_path: Path) -> None:
    """The parent checked the data directory; a worker can still fail on what only workers
    use (here runner.lock is a directory): uvicorn stops the rest, and that is an error."""
    data = tmp_path / "data"
    (data / "runner.lock").mkdir(parents=True)
    env = {**os.environ, "CHARNN_JOB_THREADS": "1", "CHARNN_MAX_CONCURRENT_JOBS": "1"}
    cmd = [str(CHARNN), "serve", "--port", str(free_port()), "--data-dir", str(data)]
    failed = subprocess.run(
        [*cmd, "--workers", "2"], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert lines[-1] == (
        "charnn: error: a worker process could not start (the reason is logged above)"
    )
    said = [ln for ln in lines if "charnn cannot start" in ln]
    assert said and f"cannot use {data / 'runner.lock'}" in said[0], failed.stderr[-2000:]
    bad = subprocess.run(
        [*cmd, "--workers", "2", "--reload"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "charnn: error: --reload runs one process: drop --workers (or CHARNN_WORKERS) with it"
    )
    usage = subprocess.run([*cmd, "--workers", "0"], capture_output=True, text=True)
    assert usage.returncode == 2 and "0 workers is out of range: use 1-64" in usage.stderr
