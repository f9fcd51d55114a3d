"""Continuous batching: the RNN steps of all waiting requests for one model, together.

32 people each sending a fresh 200-character prefix cost 32 x 200 vector products
one request at a time; stepped together they cost 200 (32, n_a) x (n_a, n_a)
products, about three times less work per character here (docs/benchmarks.md).
Each loaded model has one :class:`Batcher`: a task on the event loop that, while
anything is waiting, runs a *slice* of steps for every admitted request at once
(``model.inference.advance_rows``), then yields the loop. Requests join at the
next slice and leave when their last step is done (continuous batching, as in TGI
and vLLM), so a 40,000-character prefix takes its share of every slice while short
ones come and go around it.

Three kinds of work ride in the same slice: *feeds* (a prefix for /predict, the
prompt of /generate), *scores* (a feed that keeps each step's log-probability) and
*samples* (each step's input is the character drawn from the last one's
distribution, by the request's own ``model.inference.Chooser``, so a seed gives
the same text as alone). Slices are sized so that one costs about as long as an
unbatched slice did (``slice_steps``): the loop stays as responsive for the
one-step predictions of people typing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.inference import Chooser, InferenceWeights, advance_rows, logprobs_of

from ..metrics import BATCH_ROWS, CHARS_STEPPED

# Work per slice in units of n_a^2 multiply-adds, counting a step as B + 2 rows (a
# lone vector product costs about three rows of a batched one here): ~0.4 ms.
SLICE_UNITS = 12_000_000


def slice_steps(n_a: int, rows: int) -> int:
    """Steps per slice for ``rows`` requests at hidden size n_a."""
    return max(1, SLICE_UNITS // (n_a * n_a * (rows + 2)))


@dataclass(eq=False)
class _Work:
    h: np.ndarray  # the state before the next step
    ids: np.ndarray | None = None  # feeds and scores: all their inputs; samples: None
    pos: int = 0  # inputs stepped so far
    scored: list[np.ndarray] | None = None  # scores: log-probabilities so far
    keep: int = 0  # feeds: how many of the last states after each input to keep
    kept: list[np.ndarray] = field(default_factory=list)  # (k, n_a) blocks, oldest first
    chooser: Chooser | None = None
    chunks: asyncio.Queue[str | None] | None = None  # samples: released text; None: done
    done: asyncio.Future[np.ndarray] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def left(self) -> int:
        if self.chooser is not None:
            return self.chooser.max_chars - self.chooser.chosen
        assert self.ids is not None
        return self.ids.size - self.pos

    @property
    def abandoned(self) -> bool:
        return self.done.done()  # cancelled by its request (client gone), or finished


class Batcher:
    """One model's batch: requests in, the same numbers out as stepped alone (to float32
    rounding: a GEMM sums in another order than a vector product)."""

    def __init__(self, weights: InferenceWeights, max_batch: int, max_delay_s: float) -> None:
        self.w = weights
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._waiting: deque[_Work] = deque()
        self._active: list[_Work] = []
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ requests

    async def advance(self, h: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """The state after stepping ``ids`` (checked indices) from ``h``."""
        if ids.size == 0:
            return h
        return await self._submit(_Work(h, ids))

    async def trail(self, h: np.ndarray, ids: np.ndarray, keep: int) -> np.ndarray:
        """The states after each of the last ``keep`` of ``ids`` stepped from ``h``, oldest
        first, as a (min(keep, len(ids)), n_a) array: its last row is the final state."""
        if ids.size == 0 or keep <= 0:
            return np.empty((0, self.w.n_a), dtype=self.w.dtype)
        work = _Work(h, ids, keep=keep)
        await self._submit(work)
        return np.concatenate(work.kept)[-keep:]

    async def score(self, h: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """log p of each of ``ids`` given the ones before, starting from state ``h``."""
        work = _Work(h, ids, scored=[])
        if ids.size:
            await self._submit(work)
        assert work.scored is not None
        return np.concatenate(work.scored) if work.scored else np.empty(0, np.float64)

    async def sample(self, h: np.ndarray, chooser: Chooser) -> AsyncGenerator[str, None]:
        """The released text of a sample from state ``h``, a piece per slice; the
        stream's ``finish_reason`` is on ``chooser`` once this is exhausted."""
        if chooser.finish_reason is not None:
            return
        work = _Work(h, chooser=chooser, chunks=asyncio.Queue())
        self._enqueue(work)
        try:
            assert work.chunks is not None
            while (piece := await work.chunks.get()) is not None:
                yield piece
            if not work.done.cancelled() and work.done.exception() is not None:
                raise work.done.exception()  # type: ignore[misc]
        finally:
            work.done.cancel()  # a consumer that stops early: leave the batch

    async def _submit(self, work: _Work) -> np.ndarray:
        self._enqueue(work)
        return await work.done  # cancelled with its request: the loop drops it

    def _enqueue(self, work: _Work) -> None:
        self._waiting.append(work)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        try:
            while self._waiting or self._active:
                if self.max_delay_s and len(self._waiting) + len(self._active) < self.max_batch:
                    await self._gather_more()
                while self._waiting and len(self._active) < self.max_batch:
                    self._active.append(self._waiting.popleft())
                self._active = [w for w in self._active if not w.abandoned]
                if self._active:
                    self._slice()
                await asyncio.sleep(0)  # requests run, and new ones queue for the next slice
        except BaseException as e:  # cancelled (shutdown) or a bug: nobody waits forever
            for work in [*self._waiting, *self._active]:
                _finish(work, e)
            self._waiting.clear()
            self._active = []
            raise
        finally:
            self._task = None

    async def _gather_more(self) -> None:
        """Wait up to max_delay_s for the batch to fill (Triton's max_queue_delay)."""
        deadline = time.monotonic() + self.max_delay_s
        while len(self._waiting) + len(self._active) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.0005))

    def _slice(self) -> None:
        w = self.w
        # Samples first (they run every step of the slice), then the rest longest first.
        samples = [x for x in self._active if x.chooser is not None]
        feeds = sorted(
            (x for x in self._active if x.chooser is None), key=lambda x: x.left, reverse=True
        )
        rows = samples + feeds
        T = min(slice_steps(w.n_a, len(rows)), max(x.left for x in rows))
        steps = [min(T, x.left) for x in rows]
        S = len(samples)
        T = max(steps)
        if S:
            for r in range(S):
                steps[r] = T  # a sample that ends early idles to the slice's end
        ids = np.zeros((len(rows), T), dtype=np.intp)
        for r, x in enumerate(feeds, start=S):
            assert x.ids is not None
            ids[r, : steps[r]] = x.ids[x.pos : x.pos + steps[r]]
        h0 = np.stack([x.h for x in rows])
        out = np.empty((T, len(rows), w.n_a), dtype=w.dtype)
        counts = np.array(steps[S:], dtype=np.intp)
        running = S + np.searchsorted(-counts, -np.arange(1, T + 1), side="right")
        released: list[list[str]] = [[] for _ in samples]

        def choose(t: int, logits: np.ndarray) -> Sequence[int]:
            picks = []
            for r, x in enumerate(samples):
                chooser = x.chooser
                assert chooser is not None
                if chooser.finish_reason is not None:
                    picks.append(0)  # done earlier in this slice: its row idles
                    continue
                i, text = chooser.choose(logits[r])
                if text:
                    released[r].append(text)
                picks.append(i)
            return picks

        chosen = sum(x.chooser.chosen for x in samples if x.chooser is not None)
        advance_rows(w, h0, ids, running, out, choose, S)
        chosen = sum(x.chooser.chosen for x in samples if x.chooser is not None) - chosen
        BATCH_ROWS.observe(len(rows))
        CHARS_STEPPED.inc(sum(steps[S:]) + chosen)
        for r, x in enumerate(rows):
            k = steps[r]
            if x.scored is not None:
                assert x.ids is not None
                before = np.concatenate([x.h[None], out[: k - 1, r]])
                x.scored.append(logprobs_of(w, before, x.ids[x.pos : x.pos + k]))
            if x.keep and x.ids is not None and x.ids.size - (x.pos + k) < x.keep:
                # only the tail that can end up among the last ``keep`` states
                first = max(0, x.ids.size - x.keep - x.pos)
                x.kept.append(out[first:k, r].copy())
            x.h = out[k - 1, r].copy()
            if x.chooser is not None:
                assert x.chunks is not None
                if released[r]:
                    x.chunks.put_nowait("".join(released[r]))
                if x.chooser.finish_reason is not None:
                    _finish(x, x.h)
            else:
                x.pos += k
                if x.left == 0:
                    _finish(x, x.h)
        self._active = [x for x in self._active if not x.done.done()]


def _finish(work: _Work, result: np.ndarray | BaseException) -> None:
    if not work.done.done():
        if isinstance(result, asyncio.CancelledError):
            work.done.cancel()
        elif isinstance(result, BaseException):
            work.done.set_exception(result)
        else:
            work.done.set_result(result)
    if work.chunks is not None:
        work.chunks.put_nowait(None)
