"""Model math for requests: on the event loop, in short slices.

Why not threads: an RNN step is a short BLAS call between two Python lines, so a
thread doing model math must win the GIL back from the event loop hundreds of
times per request. Measured: a 200-character prefix that takes 0.9 ms alone took
600 ms on a compute thread while the loop was busy serving cached predictions,
and 16 threads each stepping a prefix took 3.4x longer per prefix than one.
So requests run their steps on the loop itself, about SLICE_MACS of work at a
time, and yield between slices: a long prefix shares the loop fairly with the
one-step predictions of people typing, and no thread waits for the GIL.
"""

from __future__ import annotations

import asyncio
import itertools

import numpy as np

from model.inference import SampleStream, advance, score_from

from ..metrics import CHARS_STEPPED, PREFIX_CACHE
from .cache import LoadedModel

SLICE_MACS = 4_000_000  # multiply-adds per slice: ~0.25 ms here (61 steps at H=256)


def slice_steps(n_a: int) -> int:
    """RNN steps per slice for hidden size n_a (each step is an n_a x n_a gemv)."""
    return max(4, SLICE_MACS // (n_a * n_a))


async def state_after(loaded: LoadedModel, text: str) -> np.ndarray:
    """Hidden state after ``text``, from the longest cached prefix; remembered for next time.

    Raises UnknownCharactersError (a 422) for characters outside the vocabulary.
    Only the text after the cached prefix is encoded: a cached prefix was valid.
    """
    start, h = loaded.cached_prefix(text)
    PREFIX_CACHE.labels("hit" if start else "miss").inc()
    if start == len(text):
        return h
    ids = loaded.ckpt.vocab.encode(text[start:])
    CHARS_STEPPED.inc(len(ids))
    n = slice_steps(loaded.weights.n_a)
    for i in range(0, len(ids), n):
        if i:
            await asyncio.sleep(0)
        h = advance(loaded.weights, h, ids[i : i + n])
    loaded.remember(text, h)
    return h


async def sample_slice(stream: SampleStream, n_a: int) -> list[str]:
    """The next slice of a sample stream's characters ([] when it is done)."""
    await asyncio.sleep(0)
    chunk = list(itertools.islice(stream, slice_steps(n_a)))
    CHARS_STEPPED.inc(len(chunk))
    return chunk


async def sample_all(stream: SampleStream, n_a: int) -> str:
    parts: list[str] = []
    while chunk := await sample_slice(stream, n_a):
        parts.extend(chunk)
    return "".join(parts)


async def score_text(loaded: LoadedModel, text: str) -> np.ndarray:
    """Log-probability of each character of ``text`` (the first from the empty prefix)."""
    ids = loaded.ckpt.vocab.encode(text)
    CHARS_STEPPED.inc(len(ids))
    w = loaded.weights
    h = np.zeros(w.n_a, dtype=w.dtype)
    n = slice_steps(w.n_a)
    pieces = []
    for i in range(0, max(len(ids), 1), n):
        if i:
            await asyncio.sleep(0)
        lp, h = score_from(w, h, ids[i : i + n])
        pieces.append(lp)
    return np.concatenate(pieces)
