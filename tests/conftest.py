"""Fixtures for the user-facing tests: the ``charnn`` console script and a server it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHARNN = Path(sys.executable).with_name("charnn")  # the console script pip installed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    port: int
    data_dir: Path
    stderr: str = ""  # everything the server wrote there, once it has stopped


@contextmanager
def charnn_serve(workdir: Path, log_level: str = "warning", **env: str) -> Iterator[Served]:
    """`charnn serve` in the background, as the README starts it, on a free loopback port,
    with extra CHARNN_* settings. On exit it must stop cleanly on SIGTERM (exit 0) having
    printed where to point a browser."""
    port = free_port()
    data_dir = workdir / "server-data"
    base = {k: v for k, v in os.environ.items() if k != "CHARNN_API_KEY"}
    full_env = {**base, "CHARNN_JOB_THREADS": "1", "CHARNN_MAX_CONCURRENT_JOBS": "1", **env}
    cmd = [str(CHARNN), "serve", "--port", str(port), "--data-dir", str(data_dir)]
    cmd += ["--log-level", log_level]
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, cwd=workdir, env=full_env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "charnn serve exited"
            assert time.monotonic() < deadline, "charnn serve did not start"
            time.sleep(0.1)
        served = Served(url, port, data_dir)
        yield served
    finally:
        proc.send_signal(signal.SIGTERM)
        _, banner = proc.communicate(timeout=30)
        if "served" in locals():
            served.stderr = banner
    assert proc.returncode == 0, banner  # a clean shutdown
    assert f"open http://127.0.0.1:{port}/ in a browser" in banner


@pytest.fixture
def charnn_server(tmp_path: Path) -> Iterator[Served]:
    with charnn_serve(tmp_path) as served:
        yield served
