"""Shutdown that always finishes: every stop signal, to the server alone or to its whole
process group, with a client following a running job's event stream.

``charnn serve`` (what the README and the Docker image run) in its own session, a job
training with checkpoints, an SSE client reading its events; then SIGTERM (what
``docker stop`` sends to PID 1) or SIGINT (Ctrl-C: the terminal sends it to the whole
foreground process group, job processes included). The server must end the stream,
checkpoint and requeue the job, and exit 0; after a restart the job resumes from its
checkpoint instead of failing. No test asserts on time: timeouts only bound a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.checkpoint import load_state

from .app.conftest import CORPUS, LONG
from .conftest import CHARNN, free_port

pytestmark = pytest.mark.slow
TIMEOUT = 60.0


class Serve:
    """`charnn serve` in a session of its own (so its process group can be signalled)."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **{k: v for k, v in os.environ.items() if k != "CHARNN_API_KEY"},
            "CHARNN_JOB_THREADS": "1",
            "CHARNN_MAX_CONCURRENT_JOBS": "1",
            "CHARNN_CHECKPOINT_EVERY_S": "0.3",
            **env,
        }
        cmd = [str(CHARNN), "serve", "--port", str(self.port), "--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(
            [*cmd, "--log-level", "warning"],
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, self.proc.communicate()[1]
            assert time.monotonic() < deadline, "charnn serve did not start"
            time.sleep(0.1)

    def wait(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=TIMEOUT)
        return self.proc.returncode, err

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


def session_processes(sid: int) -> list[int]:
    """Live processes of a session (the server and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ..., session id
            found.append(int(entry.name))
    return found


class Follower(threading.Thread):
    """Reads a job's event stream to its end, recording every line."""

    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id = url, job_id
        self.lines: list[str] = []
        self.first = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", f"{self.url}/jobs/{self.job_id}/events", timeout=TIMEOUT) as r:
                for line in r.iter_lines():
                    self.lines.append(line)
                    self.first.set()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.first.set()


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("target", ["server", "group"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_streams_requeues_the_job_and_exits_0(
    tmp_path: Path, sig: signal.Signals, target: str
) -> None:
    data = tmp_path / "data"
    server = Serve(data)
    try:
        r = httpx.post(f"{server.url}/jobs", json={"corpus": CORPUS, "hyperparameters": LONG})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        state = data / "jobs" / job_id / "state.npz"
        wait_for(lambda: state.exists() and load_state(state).step > 0, "a checkpoint")
        follower = Follower(server.url, job_id)
        follower.start()
        assert follower.first.wait(TIMEOUT) and follower.error is None

        if target == "server":
            os.kill(server.proc.pid, sig)
        else:
            os.killpg(server.proc.pid, sig)
        code, err = server.wait()
        assert code == 0, err
        follower.join(TIMEOUT)
        assert not follower.is_alive(), "the event stream outlived the server"
        assert any("shutting down" in line for line in follower.lines), follower.lines[-5:]
        # no job process left behind (the resource tracker may take a moment to notice)
        wait_for(lambda: session_processes(server.proc.pid) == [], "the server's processes")
        checkpointed = load_state(state).step  # the checkpoint written on the way out
        assert checkpointed > 0
    finally:
        server.close()

    again = Serve(data)
    try:
        listed = httpx.get(f"{again.url}/jobs/{job_id}").json()
        assert listed["status"] in ("queued", "running"), listed  # never "failed"
        assert listed["error"] is None
        steps: list[int] = []

        def resumed() -> bool:
            points = httpx.get(f"{again.url}/jobs/{job_id}/metrics").json()["points"]
            steps[:] = [p["step"] for p in points if p["step"] > checkpointed]
            return bool(steps)

        wait_for(resumed, "the job to train past its checkpoint")
        metrics = httpx.get(f"{again.url}/jobs/{job_id}/metrics").json()["points"]
        all_steps = [p["step"] for p in metrics]
        assert all_steps == sorted(set(all_steps))  # one curve, never a restart from 0
        assert httpx.post(f"{again.url}/jobs/{job_id}/cancel").status_code == 200
        os.kill(again.proc.pid, signal.SIGTERM)
        code, err = again.wait()
        assert code == 0, err
    finally:
        again.close()


def test_a_job_process_told_to_stop_alone_resumes_at_once(tmp_path: Path) -> None:
    """SIGTERM or SIGINT to a job process only (not its server): it checkpoints, and the
    server runs it again from there; the job never fails."""
    data = tmp_path / "data"
    server = Serve(data)
    try:
        body = {"corpus": CORPUS, "hyperparameters": {**LONG, "max_steps": 3000}}
        job_id = httpx.post(f"{server.url}/jobs", json=body).json()["id"]
        state = data / "jobs" / job_id / "state.npz"
        stopped_at = [0]
        for sig in (signal.SIGTERM, signal.SIGINT):
            # a checkpoint past the last stop's: this process is up and training
            wait_for(
                lambda: state.exists() and load_state(state).step > stopped_at[0], "a checkpoint"
            )
            (pid,) = [
                p
                for p in session_processes(server.proc.pid)
                if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            os.kill(pid, sig)
            wait_for(lambda p=pid: not Path(f"/proc/{p}").exists() or _zombie(p), "it to stop")
            stopped_at[0] = load_state(state).step
        final: dict[str, Any] = {}

        def done() -> bool:
            final.update(httpx.get(f"{server.url}/jobs/{job_id}").json())
            return final["status"] not in ("queued", "running")

        wait_for(done, "the job to finish")
        assert final["status"] == "succeeded", final["error"]
        steps = [
            p["step"] for p in httpx.get(f"{server.url}/jobs/{job_id}/metrics").json()["points"]
        ]
        assert steps == sorted(set(steps)) and steps[-1] == 3000
    finally:
        os.kill(server.proc.pid, signal.SIGTERM)
        code, err = server.wait()
        server.close()
    assert code == 0, err


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
