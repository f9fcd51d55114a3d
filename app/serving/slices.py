"""Model math for requests: on the event loop, batched, in short slices.

Why not threads: an RNN step is a short BLAS call between two Python lines, so a
thread doing model math must win the GIL back from the event loop hundreds of
times per request. Measured: a 200-character prefix that takes 0.9 ms alone took
600 ms on a compute thread while the loop was busy serving cached predictions,
and 16 threads each stepping a prefix took 3.4x longer per prefix than one.
So requests hand their steps to their model's batcher (``batcher.py``), which runs
them on the loop itself, all waiting requests in one GEMM per step, a slice of
steps at a time: a long prefix shares the loop fairly with the one-step
predictions of people typing, and no thread waits for the GIL.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import numpy as np

from model.inference import Chooser

from ..metrics import PREFIX_CACHE
from .cache import LoadedModel


async def state_after(loaded: LoadedModel, text: str) -> np.ndarray:
    """Hidden state after ``text``, from the longest cached prefix; remembered for next time.

    Raises UnknownCharactersError (a 422) for characters outside the vocabulary.
    Only the text after the cached prefix is encoded: a cached prefix was valid.
    """
    start, h = loaded.cached_prefix(text)
    PREFIX_CACHE.labels("hit" if start else "miss").inc()
    if start == len(text):
        return h
    ids = np.asarray(loaded.ckpt.vocab.encode(text[start:]), dtype=np.intp)
    h = await loaded.batcher.advance(h, ids)
    loaded.remember(text, h)
    return h


async def score_text(loaded: LoadedModel, text: str) -> np.ndarray:
    """Log-probability of each character of ``text`` (the first from the empty prefix)."""
    ids = np.asarray(loaded.ckpt.vocab.encode(text), dtype=np.intp)
    h = np.zeros(loaded.weights.n_a, dtype=loaded.weights.dtype)
    return await loaded.batcher.score(h, ids)


def sample(loaded: LoadedModel, h: np.ndarray, chooser: Chooser) -> AsyncGenerator[str, None]:
    """A sample's released text from state ``h`` (after its prompt), a piece per slice."""
    return loaded.batcher.sample(h, chooser)


async def sample_all(loaded: LoadedModel, h: np.ndarray, chooser: Chooser) -> str:
    return "".join([piece async for piece in sample(loaded, h, chooser)])
