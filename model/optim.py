"""Optimizers and gradient clipping over flat parameter vectors.

State is a dict of named arrays so it can be checkpointed as-is and restored
bit-exactly; every update works in place with preallocated scratch buffers.
"""

from __future__ import annotations

import math

import numpy as np

from .config import OPTIMIZER_NAMES

OPTIMIZERS = OPTIMIZER_NAMES  # model/config.py names them

ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
EPS = 1e-8


def clip_by_global_norm(grads: np.ndarray, max_norm: float) -> float:
    """Scale grads in place so their L2 norm is at most max_norm; return the norm before."""
    g64 = np.dot(grads, grads)  # BLAS dot, accumulates in the array's dtype
    norm = math.sqrt(float(g64))
    if max_norm > 0 and norm > max_norm:
        grads *= max_norm / norm
    return norm


def init_state(name: str, size: int, dtype: np.dtype[np.floating]) -> dict[str, np.ndarray]:
    if name == "sgd":
        return {}
    if name == "adagrad":
        return {"sum_sq": np.zeros(size, dtype)}
    if name == "adam":
        return {"m": np.zeros(size, dtype), "v": np.zeros(size, dtype)}
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class Optimizer:
    """Applies one named update rule; ``state`` holds everything needed to resume."""

    def __init__(
        self,
        name: str,
        size: int,
        dtype: np.dtype[np.floating],
        state: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.name = name
        self.state = init_state(name, size, dtype)
        if state is not None:
            for key, arr in self.state.items():
                if key not in state or state[key].shape != arr.shape:
                    raise ValueError(f"optimizer state for {name!r} lacks a valid {key!r}")
                arr[...] = state[key]
        self._tmp = np.empty(size, dtype)
        self._tmp2 = np.empty(size, dtype)

    def step(
        self, params: np.ndarray, grads: np.ndarray, lr: float, t: int, weight_decay: float = 0.0
    ) -> None:
        """Update params in place; t is the 1-based step number (for Adam's bias correction).

        weight_decay is decoupled from the gradient (AdamW's form, for every rule):
        params shrink by lr * weight_decay * params before the update.
        """
        tmp = self._tmp
        if weight_decay:
            params *= 1.0 - lr * weight_decay
        if self.name == "sgd":
            np.multiply(grads, lr, out=tmp)
            params -= tmp
        elif self.name == "adagrad":
            acc = self.state["sum_sq"]
            np.multiply(grads, grads, out=tmp)
            acc += tmp
            np.sqrt(acc, out=tmp)
            tmp += EPS
            np.divide(grads, tmp, out=tmp)
            tmp *= lr
            params -= tmp
        else:
            m, v, tmp2 = self.state["m"], self.state["v"], self._tmp2
            m *= ADAM_BETA1
            np.multiply(grads, 1.0 - ADAM_BETA1, out=tmp)
            m += tmp
            v *= ADAM_BETA2
            np.multiply(grads, grads, out=tmp)
            tmp *= 1.0 - ADAM_BETA2
            v += tmp
            # p -= lr_t * m / (sqrt(v) + eps_t), the bias corrections folded into lr_t, eps_t
            bc1 = 1.0 - ADAM_BETA1**t
            bc2 = 1.0 - ADAM_BETA2**t
            np.sqrt(v, out=tmp2)
            tmp2 += EPS * math.sqrt(bc2)
            np.divide(m, tmp2, out=tmp)
            tmp *= lr * math.sqrt(bc2) / bc1
            params -= tmp
