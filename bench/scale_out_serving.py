"""Typed /predict req/s: embedded vs scale-out (PostgreSQL + Redis), in the same run.

    python bench/scale_out_serving.py [--seconds 2] [--rounds 5] [--hidden-size 256]

Needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379, database
13: nothing is queued there), as the scale-out mode does; no worker (the model is
uploaded with POST /models). Starts one `charnn serve` on a temporary data directory
(embedded) and one on a fresh database (scale-out), uploads the same model (random
weights at --hidden-size over the bench text's characters: serving costs what a
trained model's would) to each, then drives each in turn with the typed row of
bench/serve_latency.py: 32 people typing, each request extends that person's prefix
by one character (a closed loop; each request pays one RNN step).

A third server is the scale-out one with its models listener disabled (monkeypatched
in that server's process): every prediction then reads ``models_version`` with a
query, as before LISTEN/NOTIFY. Rounds alternate the servers so drift on a shared
machine hits all of them. Each line is one phase: req/s, latency, and the server
process's CPU time per request (user + system, from /proc: what the server spends,
whatever else the machine runs; the PostgreSQL backends' share is not in it). The
last lines: the median over rounds of each round's ratio to embedded, and of CPU
per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402

from model.checkpoint import ModelCheckpoint, model_to_bytes  # noqa: E402
from model.params import init_params  # noqa: E402
from model.vocab import Vocab  # noqa: E402

CHARNN = Path(sys.executable).with_name("charnn")
HOST = "127.0.0.1"
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/13"
CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"
PREFIX, TOP_K, PEOPLE = 200, 10, 32
# `charnn serve` with the models listener never started: the query-per-prediction baseline.
NO_LISTENER = (
    "import sys; import app.store.listen as l; l.VersionListener.start = lambda self: None; "
    "from app.cli import main; sys.exit(main(sys.argv[1:]))"
)


def admin(query: str) -> None:
    import psycopg

    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(query.encode())


@contextmanager
def database() -> Iterator[str]:
    name = f"charnn_bench_{uuid.uuid4().hex[:12]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG}/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Server:
    port: int
    pid: int

    def cpu_s(self) -> float:
        """User + system CPU seconds this process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[Server]:
    """A `charnn serve` on a free port, up when /healthz answers."""
    port = loadgen.free_port(HOST)
    full = [*cmd, "serve", "--port", str(port), "--log-level", "warning"]
    with log.open("wb") as err:
        proc = subprocess.Popen(full, cwd=ROOT, env={**os.environ, **env}, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"charnn serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Server(port, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upload(port: int, data: bytes) -> str:
    r = httpx.post(
        f"http://{HOST}:{port}/models",
        content=data,
        params={"name": "bench"},
        headers={"content-type": "application/octet-stream"},
        timeout=60,
    )
    r.raise_for_status()
    model_id: str = r.json()["id"]
    return model_id


def typists(text: str, port: int, seed: int) -> Callable[[int, int], bytes]:
    """Person p's next keystroke: one character more than p's last request (whatever k is,
    so a warm-up and the measured phase continue the same typing)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - PREFIX - 200_000, PEOPLE).tolist()
    typed = [0] * PEOPLE

    def person(p: int, k: int) -> bytes:
        typed[p] += 1
        s = starts[p]
        body = {"text": text[s : s + PREFIX + typed[p]], "top_k": TOP_K, "model": "bench"}
        return loadgen.post(HOST, port, "/predict", json.dumps(body).encode())

    return person


def measure(port: int, person: Callable[[int, int], bytes], seconds: float) -> loadgen.Outcome:
    coro = loadgen.closed_loop_sessions(HOST, port, person, PEOPLE, seconds)
    try:
        import uvloop

        out: loadgen.Outcome = uvloop.run(coro)
    except ImportError:
        out = asyncio.run(coro)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per phase (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="phases per server (default 5)")
    ap.add_argument("--hidden-size", type=int, default=256)
    args = ap.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    rng = np.random.default_rng(0)
    data = model_to_bytes(ModelCheckpoint(init_params(args.hidden_size, len(vocab), rng), vocab))
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {loadgen.cpu_name()}  {os.cpu_count()} cpus  "
        f"Python {platform.python_version()}  H={args.hidden_size}  typed /predict, "
        f"{PEOPLE} people, closed loop, {args.seconds:g} s per phase, {args.rounds} rounds",
        flush=True,
    )
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        embedded_env = {"CHARNN_DATA_DIR": str(tmp / "data")}
        servers = {
            "embedded": stack.enter_context(server([str(CHARNN)], embedded_env, tmp / "e.log"))
        }
        for name, cmd in (
            ("scale-out", [str(CHARNN)]),
            ("scale-out, no listener", [sys.executable, "-c", NO_LISTENER]),
        ):
            url = stack.enter_context(database())
            env = {"CHARNN_DATABASE_URL": url, "CHARNN_BROKER_URL": REDIS}
            log = tmp / f"{len(servers)}.log"
            servers[name] = stack.enter_context(server(cmd, env, log))
        people = {}
        for seed, (name, srv) in enumerate(servers.items()):
            upload(srv.port, data)
            people[name] = typists(text, srv.port, seed)
            measure(srv.port, people[name], 1.0)  # warm-up: prefixes, caches, the listener
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu_us: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, srv in servers.items():
                cpu = srv.cpu_s()
                out = measure(srv.port, people[name], args.seconds)
                cpu_us[name].append((srv.cpu_s() - cpu) / max(out.requests, 1) * 1e6)
                rates[name].append(out.rps)
                print(
                    f"{name:<23s} typed closed32 {out.rps:7,.0f} req/s  "
                    f"p50 {out.ms(0.5):5.1f} ms  p99 {out.ms(0.99):5.1f} ms  err {out.errors}  "
                    f"server CPU {cpu_us[name][-1]:4.0f} us/req",
                    flush=True,
                )
    base = rates["embedded"]
    for name in ("scale-out", "scale-out, no listener"):
        ratio = statistics.median(r / b for r, b in zip(rates[name], base, strict=True))
        print(
            f"{name} / embedded: req/s x{ratio:.2f} (median of {args.rounds} rounds' ratios); "
            f"server CPU {statistics.median(cpu_us[name]):.0f} vs "
            f"{statistics.median(cpu_us['embedded']):.0f} us/req"
        )


if __name__ == "__main__":
    main()
