"""The records of a training run: its resumable state and its result.

Apart from the training loop so that reading or writing a checkpoint
(``model/checkpoint.py``), and so serving a model, never imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import StopReason, TrainConfig
from .params import Params
from .vocab import Vocab


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    config: TrainConfig
    vocab: Vocab
    corpus_sha256: str
    params: Params
    optimizer: dict[str, np.ndarray]
    hidden: np.ndarray  # (B, n_a) carried into the next chunk
    step: int = 0
    epoch: int = 0
    chunk: int = 0  # next chunk index within the epoch
    elapsed_s: float = 0.0
    best_params: Params | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_train_loss: float | None = None
    last_val_loss: float | None = None
    last_eval_step: int | None = None
    stop_reason: StopReason | None = None
    loss_sum: float = 0.0  # train losses since the last progress event (its mean's parts)
    loss_n: int = 0


@dataclass(frozen=True)
class TrainResult:
    params: Params  # best validation weights (last weights when there is no validation)
    vocab: Vocab
    config: TrainConfig
    metrics: dict[str, Any] = field(default_factory=dict)
