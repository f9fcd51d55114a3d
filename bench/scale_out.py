"""Scale-out throughput: K identical small jobs on 1 Celery worker process, then on 2.

    python bench/scale_out.py [--jobs 8] [--steps 300] [--hidden-size 128]

Needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379), as the
scale-out mode does. Each run gets a fresh database and a flushed Redis DB, one API
process (`charnn serve`) and W worker processes (`charnn worker --concurrency 1`, one
BLAS thread each); it submits K jobs at once through the API, waits until all have
succeeded, and prints jobs/minute for W = 1 and W = 2 and their ratio, measured in the
same run. On 2 cores the ideal ratio is 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
CHARNN = Path(sys.executable).with_name("charnn")
PG = "postgresql://postgres@127.0.0.1:5432"
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such "
    "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered the rightful property of some "
    "one or other of their daughters.\n"
) * 60


def admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql.encode())


def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("charnn serve did not start")
        time.sleep(0.2)


def run(workers: int, jobs: int, hp: dict[str, Any], port: int) -> float:
    """Seconds from submitting `jobs` jobs to the last one succeeding, with `workers` workers."""
    db = f"charnn_bench_{uuid.uuid4().hex[:12]}"
    admin(f"CREATE DATABASE {db}")
    env = {
        **os.environ,
        "CHARNN_DATABASE_URL": f"{PG}/{db}",
        "CHARNN_BROKER_URL": "redis://127.0.0.1:6379/14",
        "CHARNN_MAX_QUEUED_JOBS": str(jobs + 1),
        "OPENBLAS_NUM_THREADS": "1",
    }
    subprocess.run(["redis-cli", "-n", "14", "FLUSHDB"], check=True, capture_output=True)
    procs: list[subprocess.Popen[bytes]] = []
    url = f"http://127.0.0.1:{port}"
    try:
        api = subprocess.Popen(
            [str(CHARNN), "serve", "--port", str(port), "--log-level", "warning"],
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        procs.append(api)
        for _ in range(workers):
            cmd = [str(CHARNN), "worker", "--concurrency", "1", "--loglevel", "warning"]
            procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True))
        wait_http(url, api)
        start = time.perf_counter()
        ids = []
        for k in range(jobs):
            body = {"corpus": TEXT, "name": f"bench-{k}", "hyperparameters": hp}
            r = httpx.post(url + "/jobs", json=body, timeout=30)
            r.raise_for_status()
            ids.append(r.json()["id"])
        pending = set(ids)
        while pending:
            for job_id in list(pending):
                job = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
                if job["status"] == "succeeded":
                    pending.discard(job_id)
                elif job["status"] in ("failed", "cancelled"):
                    raise SystemExit(f"job {job_id} ended {job['status']}: {job['error']}")
            time.sleep(0.2)
        return time.perf_counter() - start
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        admin(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--port", type=int, default=8741)
    args = ap.parse_args()
    hp = {"hidden_size": args.hidden_size, "max_steps": args.steps, "eval_every": args.steps}
    print(f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cpus; {args.jobs} jobs of {hp}")
    rates = {}
    for workers in (1, 2):
        seconds = run(workers, args.jobs, hp, args.port)
        rates[workers] = args.jobs / seconds * 60
        print(
            f"{workers} worker(s): {seconds:6.1f} s, {rates[workers]:6.2f} jobs/minute", flush=True
        )
    print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
