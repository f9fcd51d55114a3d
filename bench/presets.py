"""Do the corpus-sized presets end near their best validation loss? And which patience?

    python bench/presets.py                  # 5k, 20k, 100k, 1M characters (~4 min)
    python bench/presets.py --sizes 20000

For each size, the first N characters of shakespeare.txt are trained with
``model.presets.for_corpus(N)`` and early stopping off, recording every
evaluation. From that one curve, each patience p is replayed: the step where a run
with ``patience=p`` would have stopped, the best validation loss it would have kept,
and the share of the run it saves. (Replaying is exact: early stopping changes
when a run ends, not what it computes before.) The issue's old "small" preset
(1,000 steps at H=128, whatever the text) runs on 20k characters for comparison.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import TrainConfig  # noqa: E402
from model.presets import for_corpus  # noqa: E402
from model.train import Trainer  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "shakespeare.txt"
PATIENCES = (1, 2, 3, 4, 5, 8)
OLD_SMALL = {
    "hidden_size": 128,
    "seq_length": 64,
    "batch_size": 32,
    "learning_rate": 0.008,
    "max_steps": 1000,
    "eval_every": 100,
}

Curve = list[tuple[int, float, float]]  # (step, validation loss, elapsed s)


def curve_of(text: str, hp: Mapping[str, object]) -> tuple[Curve, float]:
    trainer = Trainer(text, TrainConfig.from_dict({**hp, "patience": None}))
    curve: Curve = []
    last_train = math.nan
    for event in trainer.run():
        last_train = event.train_loss
        if event.val_loss is not None:
            curve.append((event.step, event.val_loss, event.elapsed_s))
    return curve, last_train


def replay(curve: Curve, patience: int) -> tuple[int, float, float]:
    """(stop step, kept best validation loss, elapsed s) of a run with this patience."""
    best, since = math.inf, 0
    for step, val, elapsed in curve:
        if val < best:
            best, since = val, 0
        else:
            since += 1
            if since >= patience:
                return step, best, elapsed
    return curve[-1][0], best, curve[-1][2]


def report(label: str, hp: Mapping[str, object], curve: Curve, last_train: float) -> None:
    best_step, best_val, _ = min(curve, key=lambda c: c[1])
    end_step, end_val, end_s = curve[-1]
    print(
        f"\n{label}: H={hp['hidden_size']} T={hp['seq_length']} B={hp['batch_size']} "
        f"steps {hp['max_steps']} eval_every {hp['eval_every']}\n"
        f"  no early stopping: {end_step} steps in {end_s:.1f} s, best val {best_val:.4f} at "
        f"step {best_step} ({100 * best_step / end_step:.0f} % of the run), val at the end "
        f"{end_val:.4f}, train loss at the end {last_train:.4f}"
    )
    for p in PATIENCES:
        stop, kept, at = replay(curve, p)
        print(
            f"  patience {p}: stops at step {stop:5d} ({at:5.1f} s, {100 * at / end_s:3.0f} % "
            f"of the time), keeps {kept:.4f} ({kept - best_val:+.4f} against the run's best)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000, 100_000, 1_000_000])
    ap.add_argument("--no-old", action="store_true", help="skip the old small preset")
    args = ap.parse_args()
    text = CORPUS.read_text(encoding="utf-8")
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.machine()} {os.cpu_count()} cpus, "
        f"numpy {np.__version__}, corpus: the first N characters of {CORPUS.name}"
    )
    for n in args.sizes:
        suggestion = for_corpus(n)
        hp = dict(suggestion.hyperparameters)
        curve, last = curve_of(text[:n], hp)
        report(f"{n:,} characters, the preset", hp, curve, last)
    if not args.no_old:
        curve, last = curve_of(text[:20_000], OLD_SMALL)
        report("20,000 characters, the old 'small' preset", OLD_SMALL, curve, last)


if __name__ == "__main__":
    main()
