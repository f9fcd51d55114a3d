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

The bound: the same run times, on this CPU, the GEMMs one training step is made
of (per shard of B/2 streams, in the operand layouts model/rnn.py uses: T forward
and T-1 backward (B/2, H) x (H, H) steps, the output layer, dh, dWya, dWaa, dWax),
in two processes at once, one BLAS thread each, as the two shards run. Their
median is the step time the GEMMs alone allow; "of bound" is that time over
numpy's measured step time (1.00 would be nothing but GEMMs). What is left above
it is elementwise work, Python between calls, and the two shards' hand-off.
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


def gemm_step_s(hidden: int, vocab: int, reps: int = 15) -> float:
    """Median seconds of one shard's GEMMs for one step, one BLAS thread."""
    from threadpoolctl import threadpool_limits

    b, n, h, v = B // 2, T * (B // 2), hidden, vocab
    rng = np.random.default_rng(0)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    a, w, out = f32(b, h), f32(h, h), np.empty((b, h), np.float32)
    hs, dz, probs = f32(n, h), f32(n, h), f32(n, v)
    wya, gwaa, gwya, gwax = f32(v, h), np.empty((h, h), np.float32), f32(v, h), f32(h, v)
    logits, dh = np.empty((n, v), np.float32), np.empty((n, h), np.float32)

    def step() -> None:
        for _ in range(2 * T - 1):  # the forward and the backward recurrence
            np.dot(a, w, out=out)
        np.dot(hs, wya.T, out=logits)  # output layer
        np.dot(probs.T, hs, out=gwya)  # dWya
        np.dot(probs, wya, out=dh)  # dh from the output layer
        np.dot(dz.T, hs, out=gwaa)  # dWaa
        np.dot(dz.T, probs, out=gwax)  # dWax (one-hot inputs: an (n, V) operand)

    times = []
    with threadpool_limits(1):
        step()
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_bound(hidden: int, vocab: int) -> float:
    """Characters per second the GEMMs allow: two shards' GEMMs in two processes at once."""
    cmd = [sys.executable, __file__, "--worker", "gemm", "--hidden", str(hidden)]
    cmd += ["--steps", str(vocab)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    secs = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return B * T / max(secs)


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
    ap.add_argument("--worker", choices=["numpy", "torch", "gemm"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "gemm":  # --steps carries the vocabulary size
        print(gemm_step_s(args.hidden[0], args.steps))
        return
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
    vocab = len(set(text))
    results: dict[tuple[str, int], list[float]] = {}
    for rep in range(args.repeats):
        for hidden in args.hidden:
            n = steps_for(hidden)
            for name in ["numpy", "torch", "bound"] if has_torch else ["numpy", "bound"]:
                cps = gemm_bound(hidden, vocab) if name == "bound" else measure(name, hidden, n)
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
        f"{'paired':>7s} {'GEMM bound':>11s} {'of bound':>9s}"
    )
    for hidden in args.hidden:
        np_runs = results[("numpy", hidden)]
        np_med = statistics.median(np_runs)
        bound_runs = results[("bound", hidden)]
        bound = statistics.median(bound_runs)
        # numpy's step time over the bound's, paired with the bound measured right after
        of_bound = statistics.median(a / b for a, b in zip(np_runs, bound_runs, strict=True))
        tail = f"{bound / 1e3:10.1f}k {of_bound:9.2f}"
        if has_torch:
            t_runs = results[("torch", hidden)]
            t_med = statistics.median(t_runs)
            paired = statistics.median(a / b for a, b in zip(np_runs, t_runs, strict=True))
            print(
                f"{hidden:5d} {np_med / 1e3:13.1f}k {t_med / 1e3:13.1f}k {np_med / t_med:11.2f}x "
                f"{paired:6.2f}x {tail}"
            )
        else:
            print(f"{hidden:5d} {np_med / 1e3:13.1f}k {'-':>14s} {'-':>12s} {'-':>7s} {tail}")


if __name__ == "__main__":
    main()
