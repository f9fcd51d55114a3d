"""From a corpus to (T, B) batches: train/validation split and parallel streams."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CorpusError


def split_lengths(n: int, val_fraction: float) -> tuple[int, int]:
    """(train, validation) sizes of :func:`split` for a corpus of ``n`` characters,
    without encoding it (a server sizes a request's corpus this way)."""
    n_val = int(n * val_fraction)
    if n_val < 2:
        return n, 0
    return n - n_val, n_val


def split(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train on the head, validate on the tail ``val_fraction`` of the corpus."""
    n_train, _ = split_lengths(len(ids), val_fraction)
    return ids[:n_train], ids[n_train:]


def check_trainable(n_chars: int, n_distinct: int, seq_length: int, val_chars: int = 0) -> None:
    """Refuse a corpus no chunk can be cut from, saying what to change."""
    if n_chars == 0:
        raise CorpusError("the corpus is empty: give some text")
    if n_distinct < 2:
        raise CorpusError(
            "the corpus has only one distinct character; give a text with at least 2 "
            "different characters"
        )
    if n_chars < seq_length + 1:
        held = (
            f", or lower val_fraction ({val_chars} characters are held out for validation)"
            if val_chars
            else ""
        )
        fix = (
            f"lower seq_length to at most {n_chars - 1}{held}, or give more text"
            if n_chars >= 2
            else f"give more text{held}"
        )
        raise CorpusError(
            f"the training part of the corpus has {n_chars} characters, too few for one "
            f"chunk of seq_length + 1 = {seq_length + 1}: {fix}"
        )


@dataclass(frozen=True)
class Streams:
    """B parallel streams over ``ids``, read in chunks of T with the state carried over.

    Stream b reads ids[offset + b*L : offset + (b+1)*L + 1]; an epoch is
    ``chunks_per_epoch`` chunks. The offset moves each epoch (from the seed) so
    the characters a stream length leaves over are trained on too.
    """

    ids: np.ndarray
    T: int
    B: int
    seed: int

    @classmethod
    def fit(cls, ids: np.ndarray, T: int, B: int, seed: int) -> Streams:
        """Shrink B so every stream holds at least one chunk (small corpora)."""
        B_fit = max(1, min(B, (len(ids) - 1) // T))
        return cls(ids, T, B_fit, seed)

    @property
    def stream_length(self) -> int:
        return (len(self.ids) - 1) // self.B

    @property
    def chunks_per_epoch(self) -> int:
        return self.stream_length // self.T

    def offset(self, epoch: int) -> int:
        slack = len(self.ids) - 1 - self.B * self.chunks_per_epoch * self.T
        if slack <= 0:
            return 0
        return int(np.random.default_rng([self.seed, epoch]).integers(0, slack + 1))

    def chunk(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y), both (T, B): X[t, b] is a character, Y[t, b] the one after it."""
        L = self.chunks_per_epoch * self.T
        starts = self.offset(epoch) + np.arange(self.B) * L + index * self.T  # (B,)
        pos = starts[None, :] + np.arange(self.T)[:, None]  # (T, B)
        return self.ids[pos], self.ids[pos + 1]
