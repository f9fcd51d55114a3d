"""Serving latency and throughput of /predict against /healthz, idle and while a job trains.

    python bench/serve_latency.py [--seconds 5] [--clients 1 8 32]

Starts a real uvicorn server (app.main:app) on a free loopback port with a fresh
data directory, trains an H=256 model on ../shared/corpora/shakespeare.txt through
the API, and prints the in-process cost of a next-character distribution (no
HTTP). Then it drives the server with wrk (a separate C process: `apt-get install
wrk`) at each concurrency for a fixed time and prints requests/s and p50/p99
latency of /healthz (the no-op reference), /predict with uncached 200-character
prefixes, and /predict typed one character at a time (each request extends an
earlier prefix by one character), first idle, then while a training job runs,
with each /predict throughput as a fraction of /healthz's in the same phase.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"
LUA = Path(__file__).resolve().parent / "wrk_bodies.lua"
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


@dataclass
class Result:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if m is None:
        raise ValueError(f"unexpected wrk latency {value!r}")
    return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[m[2]]


def run_wrk(url: str, clients: int, seconds: int, bodies: Path | None) -> Result:
    threads = min(2, clients)
    cmd = ["wrk", f"-t{threads}", f"-c{clients}", f"-d{seconds}s", "--latency", "--timeout", "30s"]
    env = dict(os.environ)
    if bodies is not None:
        cmd += ["-s", str(LUA), f"{url}/predict", "--", str(threads)]
        env["BODIES"] = str(bodies)
    else:
        cmd.append(f"{url}/healthz")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    return Result(
        requests=int(re.search(r"(\d+) requests in", out)[1]),  # type: ignore[index]
        rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        p50_ms=_ms(re.search(r"^\s*50%\s+(\S+)", out, re.M)[1]),  # type: ignore[index]
        p99_ms=_ms(re.search(r"^\s*99%\s+(\S+)", out, re.M)[1]),  # type: ignore[index]
    )


def write_bodies(
    text: str, folder: Path, clients: int, n: int, rng: np.random.Generator
) -> dict[str, Path]:
    """One file of request bodies per /predict workload."""
    folder.mkdir(exist_ok=True)
    uncached, typed = folder / f"uncached-{clients}.txt", folder / f"typed-{clients}.txt"
    starts = rng.integers(0, len(text) - PREFIX, n)
    uncached.write_text(
        "".join(json.dumps({"text": text[s : s + PREFIX], "top_k": 10}) + "\n" for s in starts)
    )
    # `clients` people typing: the k-th body of each is the previous one plus a character.
    per = max(1, n // clients)
    starts = rng.integers(0, len(text) - PREFIX - per, clients)
    lines = [
        json.dumps({"text": text[s : s + PREFIX + k], "top_k": 10}) + "\n"
        for k in range(per)
        for s in starts
    ]
    typed.write_text("".join(lines))
    return {"predict uncached": uncached, "predict typed": typed}


def in_process(text: str, model_path: Path) -> None:
    import timeit

    from threadpoolctl import threadpool_limits

    from model.checkpoint import load_model
    from model.inference import InferenceWeights, advance, initial_state, next_distribution

    ckpt = load_model(model_path)
    w = InferenceWeights.of(ckpt.params)  # what the server holds per loaded model
    ids = ckpt.vocab.encode(text[:PREFIX])
    one = ids[:1]
    with threadpool_limits(1):
        h0 = initial_state(w)
        h = advance(w, h0, ids)
        full = (
            min(
                timeit.repeat(
                    lambda: next_distribution(w, advance(w, h0, ids)), number=200, repeat=5
                )
            )
            / 200
        )
        step = (
            min(
                timeit.repeat(
                    lambda: next_distribution(w, advance(w, h, one)), number=5000, repeat=5
                )
            )
            / 5000
        )
    print(
        f"in-process, H={w.n_a}: next-char distribution after a {PREFIX}-char prefix "
        f"{full * 1e3:.3f} ms; one cached character more {step * 1e6:.1f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="wrk run per cell")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--train-steps", type=int, default=300)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("this benchmark drives the server with wrk: apt-get install wrk")
    text = CORPUS.read_text(encoding="utf-8")
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as tmp:
        server = start_server(data_dir, args.port)
        try:
            print(
                f"# {time.strftime('%Y-%m-%d')} {os.cpu_count()} cpus; training the H=256 model..."
            )
            job = train(url, text, {"hidden_size": 256, "max_steps": args.train_steps}, wait=True)
            model_id = httpx.get(f"{url}/jobs/{job}").json()["model_id"]
            in_process(text, Path(data_dir) / "models" / f"{model_id}.npz")
            rng = np.random.default_rng(0)
            # More bodies than a run can send, fresh for each phase: no body is repeated,
            # so "uncached" is never served from the prefix cache.
            bodies = {
                (phase, c): write_bodies(text, Path(tmp) / phase, c, 40_000, rng)
                for phase in ("idle", "training")
                for c in args.clients
            }
            head = (
                "while",
                "endpoint",
                "clients",
                "requests",
                "req/s",
                "p50 ms",
                "p99 ms",
                "of healthz",
            )
            print("{:<8s} {:<17s} {:>7s} {:>8s} {:>8s} {:>7s} {:>7s} {:>10s}".format(*head))
            for phase in ("idle", "training"):
                bg = None
                if phase == "training":
                    bg = train(url, text, {"hidden_size": 256, "max_steps": 10**6}, wait=False)
                    time.sleep(3)  # let it get going
                for clients in args.clients:
                    base = run_wrk(url, clients, args.seconds, None)
                    rows = [("healthz", base)] + [
                        (name, run_wrk(url, clients, args.seconds, path))
                        for name, path in bodies[phase, clients].items()
                    ]
                    for name, r in rows:
                        print(
                            f"{phase:<8s} {name:<17s} {clients:7d} {r.requests:8d} {r.rps:8.0f} "
                            f"{r.p50_ms:7.2f} {r.p99_ms:7.2f} {r.rps / base.rps:10.0%}",
                            flush=True,
                        )
                if bg is not None:
                    httpx.post(f"{url}/jobs/{bg}/cancel", timeout=30)
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
