"""What a user of the serving API feels, against the floor of the stack; idle, and training.

    python bench/serve_latency.py [--seconds 3] [--rows typed fresh ws] [--quick]

Starts a real ``charnn serve`` on a fresh data directory, trains an H=256 model on
../shared/corpora/shakespeare.txt through the API, and starts beside it the floor
(``bench/floor_app.py``: FastAPI + uvicorn served the same way, whose routes only
validate the same pydantic bodies and answer the product's own JSON bytes for
this model). Then, per phase (idle; while a second job trains), for each row and
load, it drives the floor and then the product with the same kind of requests
(``bench/loadgen.py``; raw asyncio HTTP/1.1 and ``websockets``) and prints one line:

- closed32: 32 clients, each sending its next request when the last was answered:
  req/s, and the product's as a fraction of the floor's;
- open100/300/1000: requests at fixed arrival times whatever the server does,
  latency counted from each request's due time (no coordinated omission):
  p50 / p99 / max and errors, the floor's beside.

Rows: typed (32 people typing: each request extends that person's last prefix by
one character), fresh (an uncached random 200-character prefix), score (1,000
characters), generate (200 characters, non-streaming, after a 40-character prompt),
ws (32 WebSocket sessions on /sessions, one keystroke per message; skipped if the
server has no /sessions), and mixed (typed and fresh in turn, open loop 300 req/s,
while a job trains).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"
CHARNN = Path(sys.executable).with_name("charnn")
HOST = "127.0.0.1"
PREFIX, SCORED, PROMPT, GENERATED, TOP_K, PEOPLE = 200, 1000, 40, 200, 10, 32
TYPED = 200  # keystrokes before a typing person starts another text
ROWS = ("typed", "fresh", "score", "generate", "ws", "mixed")
LOADS = ("closed32", "open100", "open300", "open1000")
Make = Callable[[int], bytes]


@contextmanager
def process(cmd: list[str], port: int, log: Path, env: dict[str, str]) -> Iterator[str]:
    """A server process, up when /healthz answers; SIGTERM (then SIGKILL) at the end."""
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stderr=err)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[0]} did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def submit(url: str, text: str, hp: dict[str, Any]) -> str:
    r = httpx.post(
        f"{url}/jobs", json={"corpus": text, "name": "bench", "hyperparameters": hp}, timeout=60
    )
    r.raise_for_status()
    job_id: str = r.json()["id"]
    return job_id


def wait_for(
    url: str, job_id: str, done: Callable[[dict[str, Any]], bool], ended: bool = False
) -> dict[str, Any]:
    """Poll the job until ``done``; a job that ended otherwise is fatal (unless ``ended``)."""
    while True:
        job: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if not ended and job["status"] in ("failed", "cancelled"):
            raise SystemExit(f"training job {job_id} {job['status']}: {job.get('error')}")
        if done(job):
            return job
        time.sleep(0.5)


# ---------------------------------------------------------------- requests


@dataclass
class Workload:
    """The requests of one row, fresh for each cell: no body is sent twice in a phase."""

    text: str
    host: str
    port: int
    rng: np.random.Generator

    def _starts(self, room: int, n: int = 100_000) -> np.ndarray:
        return self.rng.integers(0, len(self.text) - room, n)

    def _post(self, path: str, body: dict[str, Any]) -> bytes:
        return loadgen.post(self.host, self.port, path, json.dumps(body).encode())

    def typed(self, people: int = PEOPLE) -> tuple[Make, Callable[[int, int], bytes]]:
        """Request i is person i mod n's (i // n)-th keystroke; also as (person, k). Each
        keystroke extends the person's last prefix by one character; after TYPED of them
        the person starts afresh elsewhere (one uncached prefix in TYPED), so prefixes stay
        200-400 characters whether a server answers 1,000 or 10,000 a second."""
        starts = self._starts(PREFIX + TYPED).tolist()

        def person(p: int, k: int) -> bytes:
            s = starts[(p * 7919 + k // TYPED) % len(starts)]
            text = self.text[s : s + PREFIX + k % TYPED]
            return self._post("/predict", {"text": text, "top_k": TOP_K})

        return (lambda i: person(i % people, i // people)), person

    def fresh(self) -> Make:
        starts = self._starts(PREFIX).tolist()

        def make(i: int) -> bytes:
            s = starts[i % len(starts)]
            return self._post("/predict", {"text": self.text[s : s + PREFIX], "top_k": TOP_K})

        return make

    def score(self) -> Make:
        starts = self._starts(SCORED).tolist()
        return lambda i: self._post(
            "/score", {"text": self.text[starts[i % len(starts)] :][:SCORED]}
        )

    def generate(self) -> Make:
        starts = self._starts(PROMPT).tolist()
        return lambda i: self._post(
            "/generate",
            {
                "prompt": self.text[starts[i % len(starts)] :][:PROMPT],
                "max_chars": GENERATED,
                "temperature": 0.8,
                "seed": i,
            },
        )

    def keystrokes(
        self, people: int = PEOPLE, room: int = 20_000
    ) -> tuple[Callable[[int], list[str]], Callable[[int, int], str]]:
        """Each session's opening (its 200-character prefix), then one character a message."""
        starts = self._starts(PREFIX + room, people).tolist()

        def opening(p: int) -> list[str]:
            s = starts[p]
            return [json.dumps({"op": "feed", "text": self.text[s : s + PREFIX]})]

        def key(p: int, k: int) -> str:
            c = self.text[starts[p] + PREFIX + k]
            return json.dumps({"op": "feed", "text": c})

        return opening, key


# ---------------------------------------------------------------- one cell


@dataclass
class Target:
    name: str  # "floor" or "charnn"
    url: str
    ws_url: str

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def _rate(load: str) -> int:
    return int(load.removeprefix("open"))


async def http_cell(
    target: Target, row: str, load: str, text: str, seed: int, s: float
) -> loadgen.Outcome:
    work = Workload(text, HOST, target.port, np.random.default_rng(seed))
    if row == "typed":
        by_index, by_person = work.typed()
        if load == "closed32":
            return await loadgen.closed_loop_sessions(HOST, target.port, by_person, PEOPLE, s)
        return await loadgen.open_loop(HOST, target.port, by_index, _rate(load), s)
    if row == "mixed":
        make = loadgen.mixed(work.typed()[0], work.fresh())
    else:
        make = {"fresh": work.fresh, "score": work.score, "generate": work.generate}[row]()
    if load == "closed32":
        return await loadgen.closed_loop(HOST, target.port, make, PEOPLE, s)
    return await loadgen.open_loop(HOST, target.port, make, _rate(load), s)


async def ws_cell(target: Target, load: str, text: str, seed: int, s: float) -> loadgen.Outcome:
    opening, key = Workload(text, HOST, target.port, np.random.default_rng(seed)).keystrokes()
    conns = await loadgen.ws_open(target.ws_url, PEOPLE, opening)
    try:
        if load == "closed32":
            return await loadgen.ws_closed_loop(conns, key, s)
        return await loadgen.ws_open_loop(conns, key, _rate(load), s)
    finally:
        await loadgen.ws_close(conns)


def run(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def measure(target: Target, row: str, load: str, text: str, seed: int, s: float) -> loadgen.Outcome:
    if row == "ws":
        out: loadgen.Outcome = run(ws_cell(target, load, text, seed, s))
    else:
        out = run(http_cell(target, row, load, text, seed, s))
    return out


def line(phase: str, row: str, load: str, out: loadgen.Outcome, tail: str) -> str:
    unit = "keys/s" if row == "ws" else "req/s"
    return (
        f"{phase:<8s}  {row:<8s}  {load:<8s}  {out.rps:7,.0f} {unit:<6s}  p50 {out.ms(0.5):6.1f} ms"
        f"  p99 {out.ms(0.99):6.1f} ms  max {out.max_ms:6.1f} ms  err {out.errors:<4d}  {tail}"
    )


# ---------------------------------------------------------------- setup


def answers(url: str, ws_url: str, text: str, folder: Path) -> bool:
    """The product's own answers for the floor to send; True if /sessions is served."""
    folder.mkdir(parents=True, exist_ok=True)
    bodies = {
        "predict": {"text": text[:PREFIX], "top_k": TOP_K},
        "score": {"text": text[:SCORED]},
        "generate": {"prompt": text[:PROMPT], "max_chars": GENERATED, "seed": 0},
    }
    for name, body in bodies.items():
        r = httpx.post(f"{url}/{name}", json=body, timeout=60)
        r.raise_for_status()
        (folder / f"{name}.json").write_bytes(r.content)

    async def session() -> tuple[str, str] | None:
        try:
            ws = await connect(ws_url, proxy=None)
        except InvalidStatus as e:
            print(f"# ws: /sessions refused the handshake (HTTP {e.response.status_code})")
            return None
        async with ws:
            ready = str(await ws.recv())
            await ws.send(json.dumps({"op": "feed", "text": text[:PREFIX]}))
            return ready, str(await ws.recv())

    got = run(session())
    served = got is not None
    if got is None:  # the floor's WebSocket still answers, from the /predict answer
        p = json.loads((folder / "predict.json").read_bytes())
        got = (
            json.dumps({"type": "ready", "model": p["model"]}),
            json.dumps({"type": "next", "next": p["next"], "entropy_bits": p["entropy_bits"]}),
        )
    (folder / "ready.json").write_text(got[0])
    (folder / "next.json").write_text(got[1])
    return served


def in_process(text: str, model_path: Path) -> str:
    import timeit

    from threadpoolctl import threadpool_limits

    from model.checkpoint import load_model
    from model.inference import InferenceWeights, advance, initial_state, next_distribution

    ckpt = load_model(model_path)
    w = InferenceWeights.of(ckpt.params)
    ids = ckpt.vocab.encode(text[:PREFIX])
    with threadpool_limits(1):
        h0 = initial_state(w)
        h = advance(w, h0, ids)
        full = (
            min(
                timeit.repeat(
                    lambda: next_distribution(w, advance(w, h0, ids)), number=100, repeat=5
                )
            )
            / 100
        )
        step = (
            min(
                timeit.repeat(
                    lambda: next_distribution(w, advance(w, h, ids[:1])), number=2000, repeat=5
                )
            )
            / 2000
        )
    return (
        f"# in-process, H={w.n_a}: next-char distribution after a {PREFIX}-char prefix "
        f"{full * 1e3:.3f} ms; one cached character more {step * 1e6:.1f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per load and server (default 3)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))
    ap.add_argument(
        "--phases", nargs="+", choices=("idle", "training"), default=["idle", "training"]
    )
    ap.add_argument("--train-steps", type=int, default=300, help="of the served H=256 model")
    ap.add_argument("--log-level", default="info", help="both servers' (charnn serve's default)")
    ap.add_argument("--quick", action="store_true", help="1 s per cell, 100 training steps")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.train_steps = 1.0, 100
    text = CORPUS.read_text(encoding="utf-8")
    import fastapi
    import uvicorn

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {loadgen.cpu_name()}  {os.cpu_count()} cpus  "
        f"Python {platform.python_version()}  numpy {np.__version__}  "
        f"FastAPI {fastapi.__version__}  uvicorn {uvicorn.__version__}  "
        f"{args.seconds:g} s per cell, log level {args.log_level}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = loadgen.free_port(HOST)
        serve = [str(CHARNN), "serve", "--port", str(port), "--data-dir", str(work / "data")]
        serve += ["--log-level", args.log_level]
        with process(serve, port, work / "charnn.log", {}) as url:
            job = submit(url, text, {"hidden_size": 256, "max_steps": args.train_steps})
            model_id = wait_for(url, job, lambda j: j["status"] == "succeeded")["model_id"]
            print(in_process(text, work / "data" / "models" / f"{model_id}.npz"), flush=True)
            product = Target(
                "charnn", url, f"ws://{HOST}:{port}/sessions?model={model_id}&top_k={TOP_K}"
            )
            sessions = answers(url, product.ws_url, text, work / "answers")
            fport = loadgen.free_port(HOST)
            floor_cmd = [sys.executable, str(BENCH / "floor_app.py"), "--port", str(fport)]
            floor_cmd += ["--answers", str(work / "answers"), "--log-level", args.log_level]
            with process(floor_cmd, fport, work / "floor.log", {}) as furl:
                floor = Target("floor", furl, f"ws://{HOST}:{fport}/sessions")
                bench(args, text, url, floor, product, sessions)


def bench(
    args: argparse.Namespace, text: str, url: str, floor: Target, product: Target, sessions: bool
) -> None:
    seed = 0
    for phase in args.phases:
        bg = None
        if phase == "training":
            hp = {"hidden_size": 256, "max_steps": 10**6, "patience": None}
            bg = submit(url, text, hp)
            wait_for(
                url,
                bg,
                lambda j: j["status"] == "running" and (j.get("progress") or {}).get("step", 0) > 0,
            )
        try:
            typed_closed: float | None = None
            for row in args.rows:
                if row == "mixed":
                    loads = ["open300"] if phase == "training" else []
                else:
                    loads = args.loads
                if row == "ws" and not sessions:
                    print(
                        f"{phase:<8s}  ws        skipped: the server has no /sessions WebSocket yet"
                    )
                    continue
                for load in loads:
                    seed += 1
                    base = measure(floor, row, load, text, seed, args.seconds)
                    seed += 1
                    out = measure(product, row, load, text, seed, args.seconds)
                    if load == "closed32":
                        tail = f"{out.rps / base.rps:.2f} of floor ({base.rps:,.0f}/s)"
                        if row == "typed":
                            typed_closed = out.rps
                        if row == "ws" and typed_closed:
                            tail += f"  {out.rps / typed_closed:.1f}x typed HTTP"
                    else:
                        tail = (
                            f"floor p50 {base.ms(0.5):.1f} p99 {base.ms(0.99):.1f} "
                            f"max {base.max_ms:.1f} ms err {base.errors}"
                        )
                    print(line(phase, row, load, out, tail), flush=True)
        finally:
            if bg is not None:
                httpx.post(f"{url}/jobs/{bg}/cancel", timeout=30)
                wait_for(url, bg, lambda j: j["status"] not in ("queued", "running"), ended=True)


if __name__ == "__main__":
    main()
