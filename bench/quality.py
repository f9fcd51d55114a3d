"""Validation loss after a fixed wall-clock budget, numpy against PyTorch.

    python bench/quality.py [--seconds 300] [--hidden 256] [--no-torch]

Trains model/ with the default hyperparameters (only hidden_size and the time
budget set) on ../shared/corpora/shakespeare.txt, prints the best validation
loss in nats and bits per character and a 300-character sample; then, when
PyTorch is installed, trains the same model in torch (nn.RNN(tanh) on one-hot
input + nn.Linear with torch's own initialisation, Adam, clip 5, two threads,
the same batches and the same cosine schedule over the time budget) for the
same wall time and prints its validation loss, measured the same way (128
streams over the validation tail, from a zero state). Torch's peak learning
rate is --torch-lr (default 2e-3): at our default 8e-3 torch's initialisation
does badly (1.94 nats after 300 s), so it gets the rate that suits it.

Last, a table of the best validation loss each reached by 60 s, 120 s and the
whole budget (wall time, evaluations included, within the one run: the schedule
spans the whole budget).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.data import Streams, split  # noqa: E402
from model.inference import sample  # noqa: E402
from model.train import TrainConfig, Trainer  # noqa: E402
from model.vocab import Vocab  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpora" / "shakespeare.txt"


MARKS = (60.0, 120.0)  # seconds, and the whole budget

Curve = list[tuple[float, float]]  # (seconds since the start, validation loss)


def best_by(curve: Curve, seconds: float) -> float:
    return min((v for t, v in curve if t <= seconds), default=math.nan)


def run_numpy(text: str, hidden: int, seconds: float, overrides: dict[str, float]) -> Curve:
    cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **overrides, "hidden_size": hidden})
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "max_steps": None, "time_limit_s": seconds})
    trainer = Trainer(text, cfg)
    start, curve = time.perf_counter(), []
    for e in trainer.run():
        if e.val_loss is not None:
            curve.append((time.perf_counter() - start, e.val_loss))
        if e.val_loss is not None and e.step % (cfg.eval_every * 10) == 0:
            print(
                f"  numpy step {e.step:6d}  {e.elapsed_s:6.0f}s  val {e.val_loss:.4f}", flush=True
            )
    r = trainer.result()
    val = r.metrics["val_loss"]
    print(
        f"numpy  H={hidden} {seconds:.0f}s: {r.metrics['steps']} steps, "
        f"{r.metrics['chars_per_sec'] / 1e3:.0f}k chars/s, best val loss {val:.4f} nats/char "
        f"= {val / math.log(2):.3f} bits/char at step {r.metrics['best_step']}"
    )
    text_out, _ = sample(r.params, r.vocab, "\n", max_chars=300, temperature=0.8, seed=1)
    print("sample (temperature 0.8, seed 1):\n" + text_out + "\n")
    curve.append((time.perf_counter() - start, val))  # the final evaluation
    return curve


def run_torch(text: str, hidden: int, seconds: float, lr: float) -> Curve:
    from torch_reference import TorchRNN

    cfg = TrainConfig()
    vocab = Vocab.from_text(text)
    T, B = cfg.seq_length, cfg.batch_size
    train_ids, val_ids = split(vocab.encode(text), cfg.val_fraction)
    streams = Streams.fit(train_ids, T, B, seed=0)
    model = TorchRNN(len(vocab), hidden, lr, cfg.grad_clip, streams.B)

    def evaluate() -> float:
        n_streams = 128
        L = (len(val_ids) - 1) // n_streams
        starts = np.arange(n_streams) * L
        total, h = 0.0, model.zero_state(n_streams)
        for t0 in range(0, L, 128):
            pos = starts[None, :] + np.arange(t0, min(t0 + 128, L))[:, None]
            loss, h = model.summed_loss(val_ids[pos], val_ids[pos + 1], h)
            total += loss
        return total / (n_streams * L)

    start = time.perf_counter()
    step, epoch, chunk, best, curve = 0, 0, 0, math.inf, []
    while (done := (time.perf_counter() - start) / seconds) < 1:
        cos = 0.5 * (1.0 + math.cos(math.pi * done))
        model.set_lr(lr * (cfg.lr_final + (1.0 - cfg.lr_final) * cos))
        model.step(*streams.chunk(epoch, chunk))
        step, chunk = step + 1, chunk + 1
        if chunk >= streams.chunks_per_epoch:
            epoch, chunk, model.h = epoch + 1, 0, model.zero_state(streams.B)
        if step % cfg.eval_every == 0:
            curve.append((time.perf_counter() - start, evaluate()))
    curve.append((time.perf_counter() - start, evaluate()))
    best = min(v for _, v in curve)
    print(
        f"torch  H={hidden} {seconds:.0f}s lr {lr:g}: {step} steps, "
        f"{step * B * T / seconds / 1e3:.0f}k chars/s, best val loss {best:.4f} nats/char "
        f"= {best / math.log(2):.3f} bits/char"
    )
    return curve


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-numpy", action="store_true")
    ap.add_argument("--torch-lr", type=float, default=2e-3)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a default hyperparameter of the numpy run (to try new defaults)",
    )
    args = ap.parse_args()
    overrides = {k: _number(v) for k, v in (item.split("=", 1) for item in args.set)}
    text = CORPUS.read_text(encoding="utf-8")
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cpus, "
        f"numpy {np.__version__}, defaults: {TrainConfig()}, overrides: {overrides or 'none'}"
    )
    curves: dict[str, Curve] = {}
    if not args.no_numpy:
        curves["numpy"] = run_numpy(text, args.hidden, args.seconds, overrides)
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            curves["torch"] = run_torch(text, args.hidden, args.seconds, args.torch_lr)
        except ImportError:
            print("torch not installed: pip install -e '.[bench]' to compare")
    marks = [m for m in MARKS if m < args.seconds] + [args.seconds]
    print("\nbest validation loss (nats/char) by")
    print(f"{'seconds':>8s} " + " ".join(f"{name:>8s}" for name in curves))
    for m in marks:
        print(f"{m:8.0f} " + " ".join(f"{best_by(c, m + 1.0):8.4f}" for c in curves.values()))


if __name__ == "__main__":
    main()
