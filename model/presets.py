"""Hyperparameters scaled to a corpus: what the demo page (and ``charnn train --fit``)
starts from, so a short text is not trained for ten times longer than it can use.

A 20k-character text trained for 1,000 steps at H=128 overfits after ~100 steps
(validation 2.21 -> 3.31 while training loss falls to 0.53); 1M characters take
the measured defaults' 2,000 steps without overfitting. In between, the run is
sized in epochs of the text, evaluated often enough that early stopping (the
``patience`` default) ends it soon after the best validation loss. Chosen by
``bench/presets.py``; its table is in docs/benchmarks.md.

Pure and light (no numpy): the HTTP API serves it at ``GET /hyperparameters``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig

# (smallest corpus in characters, hidden_size, seq_length, batch_size, most epochs)
_TIERS: tuple[tuple[int, int, int, int, float], ...] = (
    (0, 64, 32, 16, 15.0),
    (10_000, 128, 64, 32, 20.0),
    (50_000, 192, 64, 32, 25.0),
    (300_000, 256, 64, 64, 12.0),
)
MIN_STEPS = 100
EVALS_PER_RUN = 25  # evaluations over the longest run: often enough to stop near the best


@dataclass(frozen=True)
class Suggestion:
    """Hyperparameters for a corpus, and why, in words a person can check."""

    hyperparameters: dict[str, int]
    reason: str


def for_corpus(chars: int, *, val_fraction: float | None = None) -> Suggestion:
    """Hyperparameters for a corpus of ``chars`` characters (the rest are defaults)."""
    defaults = TrainConfig()
    val = defaults.val_fraction if val_fraction is None else val_fraction
    train_chars = max(1, int(chars * (1 - val)))
    _, hidden, T, B, epochs = next(t for t in reversed(_TIERS) if chars >= t[0])
    # a short text is read in fewer, shorter streams (every stream needs one chunk)
    T = max(8, min(T, train_chars // 4))
    B = max(1, min(B, (train_chars - 1) // T))
    per_epoch = max(1.0, train_chars / (B * T))
    default_steps = defaults.max_steps or 2000
    steps = int(min(default_steps, max(MIN_STEPS, round(epochs * per_epoch, -1))))
    eval_every = max(10, min(defaults.eval_every, steps // EVALS_PER_RUN))
    hp: dict[str, int] = {
        "hidden_size": hidden,
        "seq_length": T,
        "batch_size": B,
        "max_steps": steps,
        "eval_every": eval_every,
    }
    reason = (
        f"{chars:,} characters: H={hidden}, {B} streams of {T}, at most {steps} steps "
        f"(~{steps / per_epoch:.0f} passes over the text), evaluated every {eval_every}; "
        f"early stopping ends it once validation stops improving"
    )
    return Suggestion(hp, reason)
