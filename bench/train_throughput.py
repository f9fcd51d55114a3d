"""Training throughput of model/ against PyTorch on the same batches.

    python bench/train_throughput.py [--hidden 128 256 512] [--repeats 3]

Prints characters per second for B=64, T=64, float32 on the shakespeare corpus
(../shared/corpora/shakespeare.txt), interleaving numpy and torch runs
(numpy, torch, numpy, torch, ...) because this machine is shared and noisy,
then a table of medians with the ratio numpy/torch. Every run is a fresh
process, so neither side inherits the other's threads (torch's OpenMP workers
keep spinning after a step and would slow a numpy run in the same process). The numpy side runs the
real training loop (model.train.Trainer: batching, BPTT, clipping, Adam); the
torch side is nn.RNN(tanh) on one-hot input + nn.Linear, Adam, clip 5, two
threads. Without torch installed (pip install -e '.[bench]') only numpy runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.data import Streams  # noqa: E402
from model.train import TrainConfig, Trainer  # noqa: E402
from model.vocab import Vocab  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"
B, T, THREADS, LR, CLIP = 64, 64, 2, 2e-3, 5.0  # THREADS: numpy shards; torch uses 2
WARMUP = 5


def steps_for(hidden: int) -> int:
    return max(20, int(60 * (256 / hidden) ** 1.5))


def numpy_run(text: str, hidden: int, steps: int) -> float:
    """Characters per second of the real training loop, warm-up steps excluded."""
    cfg = TrainConfig(
        hidden_size=hidden,
        seq_length=T,
        batch_size=B,
        learning_rate=LR,
        grad_clip=CLIP,
        max_steps=WARMUP + steps,
        val_fraction=0.0,
        log_every=WARMUP,
        eval_every=10**9,
    )
    trainer = Trainer(text, cfg, threads=THREADS)
    marks = [(e.step, time.perf_counter()) for e in trainer.run()]
    (s0, t0), (s1, t1) = marks[0], marks[-1]
    return (s1 - s0) * B * T / (t1 - t0)


def torch_run(text: str, hidden: int, steps: int) -> float:
    from torch_reference import TorchRNN

    vocab = Vocab.from_text(text)
    streams = Streams.fit(vocab.encode(text), T, B, seed=0)
    model = TorchRNN(len(vocab), hidden, LR, CLIP, B)
    start = 0.0
    for i in range(WARMUP + steps):
        if i == WARMUP:
            start = time.perf_counter()
        model.step(*streams.chunk(0, i % streams.chunks_per_epoch))
    return steps * B * T / (time.perf_counter() - start)


def measure(name: str, hidden: int, steps: int) -> float:
    """One run in a fresh interpreter; returns characters per second."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--hidden",
            str(hidden),
            "--steps",
            str(steps),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    if args.worker:
        fn = numpy_run if args.worker == "numpy" else torch_run
        print(fn(text, args.hidden[0], args.steps))
        return
    try:
        import torch

        has_torch = True
        torch_version = str(torch.__version__)
    except ImportError:
        has_torch, torch_version = False, "not installed"
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cpus, "
        f"numpy {np.__version__}, torch {torch_version}, B={B} T={T} float32"
    )
    results: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.repeats):
        for hidden in args.hidden:
            n = steps_for(hidden)
            for name in ["numpy", "torch"] if has_torch else ["numpy"]:
                cps = measure(name, hidden, n)
                results.setdefault((name, hidden), []).append(cps)
                print(
                    f"run {rep + 1} H={hidden:<4d} {name:<6s} {cps / 1e3:8.1f}k chars/s", flush=True
                )
    print()
    # Ratio of medians, and the median of the per-repeat ratios: a numpy run and
    # the torch run right after it share the machine's mood, so the paired
    # ratio is the steadier figure when other tenants come and go.
    print(
        f"{'H':>5s} {'numpy chars/s':>14s} {'torch chars/s':>14s} {'numpy/torch':>12s} "
        f"{'paired':>7s}"
    )
    for hidden in args.hidden:
        np_runs = results[("numpy", hidden)]
        np_med = statistics.median(np_runs)
        if has_torch:
            t_runs = results[("torch", hidden)]
            t_med = statistics.median(t_runs)
            paired = statistics.median(a / b for a, b in zip(np_runs, t_runs, strict=True))
            print(
                f"{hidden:5d} {np_med / 1e3:13.1f}k {t_med / 1e3:13.1f}k {np_med / t_med:11.2f}x "
                f"{paired:6.2f}x"
            )
        else:
            print(f"{hidden:5d} {np_med / 1e3:13.1f}k {'-':>14s} {'-':>12s}")


if __name__ == "__main__":
    main()
