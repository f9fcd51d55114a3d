"""Typed /predict req/s of `charnn serve --workers 2` against `--workers 1`, in the same run.

    python bench/serve_workers.py [--seconds 3] [--rounds 4] [--hidden-size 256] [--wrk]

Two embedded servers on their own temporary data directories, no job running, the
same uploaded model (random weights: serving costs what a trained model's would), each
driven in turn by the typed row of bench/serve_latency.py (32 people typing, every
request one character more than that person's last, a closed loop). Rounds alternate
the servers. The load comes from this process (bench/loadgen.py), or from wrk (a C
process, `apt-get install wrk`) with ``--wrk``: on two cores the generator takes its
share of them, which caps what a second worker can add, and wrk's share is smaller.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loadgen import cpu_name  # noqa: E402
from scale_out_serving import (  # noqa: E402
    CHARNN,
    CORPUS,
    PEOPLE,
    PREFIX,
    TOP_K,
    measure,
    server,
    typists,
    upload,
)

from model.checkpoint import ModelCheckpoint, model_to_bytes  # noqa: E402
from model.params import init_params  # noqa: E402
from model.vocab import Vocab  # noqa: E402

LUA = """
local bodies = {}
local n = 0
for line in io.lines("%s") do n = n + 1; bodies[n] = line end
local i = 0
request = function()
  i = i %% n + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def wrk_rate(port: int, text: str, seconds: float, tmp: Path, seed: int) -> float:
    """req/s of wrk posting typed prefixes (each body one character longer than one before)."""
    import json

    rng = np.random.default_rng(seed)
    lines = []
    for s in rng.integers(0, len(text) - 100_000, PEOPLE).tolist():
        for k in range(200):
            body = {"text": text[s : s + PREFIX + k], "top_k": TOP_K, "model": "bench"}
            lines.append(json.dumps(body))
    order = [lines[p * 200 + k] for k in range(200) for p in range(PEOPLE)]  # typing in turn
    (tmp / "bodies.txt").write_text("\n".join(order) + "\n", encoding="utf-8")
    (tmp / "typed.lua").write_text(LUA % (tmp / "bodies.txt"), encoding="utf-8")
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{PEOPLE}",
            f"-d{seconds:g}s",
            "-s",
            str(tmp / "typed.lua"),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert found, out
    return float(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per phase (default 3)")
    ap.add_argument("--rounds", type=int, default=4, help="phases per server (default 4)")
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--wrk", action="store_true", help="drive the servers with wrk")
    args = ap.parse_args()
    if args.wrk and shutil.which("wrk") is None:
        raise SystemExit("--wrk needs wrk (apt-get install wrk)")
    text = CORPUS.read_text(encoding="utf-8")
    vocab = Vocab.from_text(text)
    rng = np.random.default_rng(0)
    data = model_to_bytes(ModelCheckpoint(init_params(args.hidden_size, len(vocab), rng), vocab))
    load = "wrk -t1" if args.wrk else "bench/loadgen.py"
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {cpu_name()}  {os.cpu_count()} cpus  "
        f"Python {platform.python_version()}  H={args.hidden_size}  typed /predict, {PEOPLE} "
        f"people, closed loop ({load}), {args.seconds:g} s per phase, {args.rounds} rounds",
        flush=True,
    )
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        servers = {}
        for n in (1, 2):
            env = {"CHARNN_DATA_DIR": str(tmp / f"data{n}"), "CHARNN_WORKERS": str(n)}
            servers[n] = stack.enter_context(server([str(CHARNN)], env, tmp / f"{n}.log"))
        people = {}
        for n, srv in servers.items():
            upload(srv.port, data)
            people[n] = typists(text, srv.port, n)
            measure(srv.port, people[n], 1.0)  # warm-up: every worker loads the model
        rates: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for n, srv in servers.items():
                if args.wrk:
                    rate = wrk_rate(srv.port, text, args.seconds, tmp, r)
                    line = f"{rate:7,.0f} req/s"
                else:
                    out = measure(srv.port, people[n], args.seconds)
                    rate = out.rps
                    line = (
                        f"{rate:7,.0f} req/s  p50 {out.ms(0.5):5.1f} ms  p99 {out.ms(0.99):5.1f} "
                        f"ms  err {out.errors}"
                    )
                rates[n].append(rate)
                print(f"--workers {n}  typed closed32 {line}", flush=True)
    ratio = statistics.median(b / a for a, b in zip(rates[1], rates[2], strict=True))
    print(f"--workers 2 / --workers 1: req/s x{ratio:.2f} (median of {args.rounds} rounds' ratios)")


if __name__ == "__main__":
    main()
