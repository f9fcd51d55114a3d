"""Serving latency and throughput of /predict against /healthz, idle and while a job trains.

    python bench/serve_latency.py [--requests 2000] [--clients 1 8 32]

Starts a real uvicorn server (app.main:app) on a free loopback port with a
fresh data directory, trains an H=256 model on ../shared/corpora/shakespeare.txt
through the API, then drives the server from this (separate) process with
bounded concurrency and prints requests/s and p50/p99 latency for:
/healthz (the no-op reference), /predict with uncached 200-character prefixes,
and /predict typed one character at a time (each request extends the previous
prefix) — first idle, then again while a training job runs. It also prints the
in-process cost of a next-character distribution (no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"
PREFIX = 200


def start_server(data_dir: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CHARNN_DATA_DIR": data_dir, "CHARNN_MAX_CONCURRENT_JOBS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def train(url: str, text: str, hp: dict[str, Any], wait: bool) -> str:
    r = httpx.post(f"{url}/jobs", json={"corpus": text, "name": "bench", "hyperparameters": hp})
    r.raise_for_status()
    job_id: str = r.json()["id"]
    while wait:
        job = httpx.get(f"{url}/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            break
        if job["status"] in ("failed", "cancelled"):
            raise SystemExit(f"training failed: {job['error']}")
        time.sleep(0.5)
    return job_id


async def drive(
    url: str, clients: int, requests: list[tuple[str, dict[str, Any] | None]]
) -> tuple[float, list[float]]:
    """Send the requests with at most `clients` in flight; (requests/s, latencies)."""
    latencies: list[float] = []
    queue = list(reversed(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            path, body = queue.pop()
            t = time.perf_counter()
            r = await (c.post(path, json=body) if body is not None else c.get(path))
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return len(requests) / elapsed, latencies


def workloads(
    text: str, n: int, rng: np.random.Generator
) -> dict[str, Callable[[int], list[tuple[str, dict[str, Any] | None]]]]:
    def healthz(clients: int) -> list[tuple[str, dict[str, Any] | None]]:
        return [("/healthz", None)] * n

    def uncached(clients: int) -> list[tuple[str, dict[str, Any] | None]]:
        starts = rng.integers(0, len(text) - PREFIX, n)
        return [("/predict", {"text": text[s : s + PREFIX], "top_k": 10}) for s in starts]

    def typed(clients: int) -> list[tuple[str, dict[str, Any] | None]]:
        # `clients` people typing: each request is the previous prefix plus one character.
        out: list[tuple[str, dict[str, Any] | None]] = []
        per = max(1, n // clients)
        starts = rng.integers(0, len(text) - PREFIX - per, clients)
        for k in range(per):
            for s in starts:
                out.append(("/predict", {"text": text[s : s + PREFIX + k], "top_k": 10}))
        return out

    return {"healthz": healthz, "predict uncached": uncached, "predict typed": typed}


def in_process(text: str, model_path: Path) -> None:
    from threadpoolctl import threadpool_limits

    from model.checkpoint import load_model
    from model.inference import advance, initial_state, next_distribution

    ckpt = load_model(model_path)
    p, v = ckpt.params, ckpt.vocab
    ids = v.encode(text[:PREFIX])
    with threadpool_limits(1):
        h0 = initial_state(p)
        n = 300
        t = time.perf_counter()
        for _ in range(n):
            next_distribution(p, advance(p, h0, ids))
        full = (time.perf_counter() - t) / n
        h = advance(p, h0, ids)
        t = time.perf_counter()
        for i in range(n):
            next_distribution(p, advance(p, h, ids[i % PREFIX : i % PREFIX + 1]))
        step = (time.perf_counter() - t) / n
    print(
        f"in-process, H={p.n_a}: next-char distribution after a {PREFIX}-char prefix "
        f"{full * 1e3:.3f} ms; one cached character more {step * 1e6:.1f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--port", type=int, default=8731)
    args = ap.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as data_dir:
        server = start_server(data_dir, args.port)
        try:
            print(
                f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cpus; training the H=256 model..."
            )
            job = train(url, text, {"hidden_size": 256, "max_steps": 300}, wait=True)
            model_id = httpx.get(f"{url}/jobs/{job}").json()["model_id"]
            in_process(text, Path(data_dir) / "models" / f"{model_id}.npz")
            rng = np.random.default_rng(0)
            loads = workloads(text, args.requests, rng)
            head = ("while", "endpoint", "clients", "req/s", "p50 ms", "p99 ms")
            print("{:<8s} {:<17s} {:>7s} {:>8s} {:>7s} {:>7s}".format(*head))
            for phase in ("idle", "training"):
                bg = None
                if phase == "training":
                    bg = train(url, text, {"hidden_size": 256, "max_steps": 10**6}, wait=False)
                    time.sleep(3)  # let it get going
                for clients in args.clients:
                    for name, make in loads.items():
                        rps, lat = asyncio.run(drive(url, clients, make(clients)))
                        q = statistics.quantiles(lat, n=100)
                        print(
                            f"{phase:<8s} {name:<17s} {clients:7d} {rps:8.0f} "
                            f"{q[49] * 1e3:7.2f} {q[98] * 1e3:7.2f}",
                            flush=True,
                        )
                if bg is not None:
                    httpx.post(f"{url}/jobs/{bg}/cancel", timeout=30)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
