"""The PyTorch model the benchmarks compare against (bench-only; never imported by the product).

nn.RNN(tanh) on one-hot input + nn.Linear, Adam, clipping by global norm,
two intra-op threads: the straightforward torch version of model/'s network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

THREADS = 2


class TorchRNN:
    def __init__(self, vocab_size: int, hidden: int, lr: float, clip: float, batch: int) -> None:
        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        self.V, self.hidden, self.clip = vocab_size, hidden, clip
        self.rnn = torch.nn.RNN(vocab_size, hidden, nonlinearity="tanh")
        self.head = torch.nn.Linear(hidden, vocab_size)
        self.params = list(self.rnn.parameters()) + list(self.head.parameters())
        self.opt = torch.optim.Adam(self.params, lr=lr)
        self.h = self.zero_state(batch)

    def zero_state(self, batch: int) -> Any:
        return torch.zeros(1, batch, self.hidden)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def _logits(self, X: np.ndarray, h: Any) -> tuple[Any, Any]:
        x = torch.nn.functional.one_hot(torch.from_numpy(X.astype(np.int64)), self.V).float()
        out, h_last = self.rnn(x, h)
        return self.head(out).reshape(-1, self.V), h_last

    def step(self, X: np.ndarray, Y: np.ndarray) -> float:
        """One truncated-BPTT step on a (T, B) chunk; the state carries over."""
        logits, h = self._logits(X, self.h)
        loss = torch.nn.functional.cross_entropy(
            logits, torch.from_numpy(Y.astype(np.int64)).reshape(-1)
        )
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.h = h.detach()
        return float(loss.detach())

    def summed_loss(self, X: np.ndarray, Y: np.ndarray, h: Any) -> tuple[float, Any]:
        """Summed nats over a chunk without gradients, and the state after it."""
        with torch.no_grad():
            logits, h_last = self._logits(X, h)
            y = torch.from_numpy(Y.astype(np.int64)).reshape(-1)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        return float(loss), h_last
