"""Load: N /predict requests at concurrency C on loopback, while a job trains; p50/p99.

    python bench/load_predict.py                      # own server, own model, own training job
    python bench/load_predict.py --url http://...     # an existing server with a model
    python bench/load_predict.py --json               # one JSON object (tests read it)

Without ``--url`` it starts ``uvicorn app.main:app`` on a free loopback port over a
temporary data directory (one job at a time, one thread per job, as on a 2-core box),
trains a small model, starts a long training job and measures while that job trains.
Every request is counted by status; the exit code is 1 if any was not 200.
tests/test_faults.py runs it against its own server; docs/reliability.md has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CORPUS = "the quick brown fox jumps over the lazy dog. " * 60
SMALL = {"hidden_size": 16, "seq_length": 16, "batch_size": 4, "max_steps": 40}
PREFIXES = ("the quick brown f", "over the la", "t", "jumps ", "lazy dog. the q")


async def load(url: str, requests: int, concurrency: int) -> tuple[Counter[str], list[float]]:
    """Send ``requests`` /predict calls, ``concurrency`` in flight; statuses and latencies (s)."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    # Reuse a kept-alive connection only within 1 s: well inside uvicorn's 5 s keep-alive
    # timeout, so the server never closes a connection the client is about to send on.
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=1.0
    )
    todo = iter(range(requests))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            for i in todo:
                body = {"text": PREFIXES[i % len(PREFIXES)]}
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", json=body)
                    statuses[str(r.status_code)] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1
                    print(f"request {i}: {e!r}", file=sys.stderr)
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def wait_job(url: str, job_id: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}").json()
        if job["status"] in statuses or (
            "running" in statuses and job["status"] == "running" and job["progress"]["step"] > 0
        ):
            return job
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job_id} stuck at {job['status']}")
        time.sleep(0.1)


@contextlib.contextmanager
def own_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "CHARNN_DATA_DIR": str(Path(tmp) / "data"),
            "CHARNN_JOB_THREADS": "1",
            "CHARNN_MAX_CONCURRENT_JOBS": "1",
        }
        cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(port)]
        cmd += ["--host", "127.0.0.1", "--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/healthz").status_code == 200:
                        break
                time.sleep(0.1)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="an existing server with at least one model")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(own_server())
        training = None
        if not args.url:
            body = {"corpus": CORPUS, "hyperparameters": SMALL}
            first = httpx.post(f"{url}/jobs", json=body).json()["id"]
            wait_job(url, first, ("succeeded",))
            long_body = {"corpus": CORPUS, "hyperparameters": {**SMALL, "max_steps": 10**6}}
            training = httpx.post(f"{url}/jobs", json=long_body).json()["id"]
            wait_job(url, training, ("running",))
        statuses, latencies = asyncio.run(load(url, args.requests, args.concurrency))
        if training is not None:
            still = httpx.get(f"{url}/jobs/{training}").json()["status"]
            httpx.post(f"{url}/jobs/{training}/cancel")
            if still != "running":
                print(f"the training job was {still} by the end", file=sys.stderr)

    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "statuses": dict(statuses),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.requests} /predict at concurrency {args.concurrency}: "
            f"statuses {dict(statuses)}; p50 {report['p50_ms']} ms, "
            f"p99 {report['p99_ms']} ms, max {report['max_ms']} ms"
        )
    return 0 if set(statuses) == {"200"} else 1


if __name__ == "__main__":
    sys.exit(main())
