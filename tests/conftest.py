"""Fixtures for the user-facing tests: the ``charnn`` console script and a server it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


@pytest.fixture
def charnn_server(tmp_path: Path) -> Iterator[Served]:
    """`charnn serve` in the background, as the README starts it, on a free loopback port.

    On teardown it must stop cleanly on SIGTERM (exit 0) and have printed where
    to point a browser.
    """
    port = free_port()
    data_dir = tmp_path / "server-data"
    env = {**os.environ, "CHARNN_JOB_THREADS": "1", "CHARNN_MAX_CONCURRENT_JOBS": "1"}
    cmd = [str(CHARNN), "serve", "--port", str(port), "--data-dir", str(data_dir)]
    cmd += ["--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
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
        yield Served(url, port, data_dir)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, banner = proc.communicate(timeout=30)
        code = proc.returncode
    assert code == 0, banner  # a clean shutdown
    assert f"open http://127.0.0.1:{port}/ in a browser" in banner
