"""The batcher: requests stepped together give the numbers each gives alone, join and
leave between slices, and never wait on a longer or a vanished neighbour."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from app.serving import batcher as batching
from app.serving.batcher import Batcher
from model.inference import (
    InferenceWeights,
    advance,
    initial_state,
    make_chooser,
    sample,
    score_from,
)
from model.params import init_params
from model.vocab import Vocab

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,"
VOCAB = Vocab.from_text(ALPHABET)


def weights(hidden: int = 48, seed: int = 0) -> InferenceWeights:
    params = init_params(hidden, len(VOCAB), np.random.default_rng(seed))
    # Peaked distributions that differ between prefixes; Waa as initialised (a chaotic
    # recurrence would grow float32 rounding differences past any tolerance).
    params.Wya[...] *= 8
    return InferenceWeights.of(params)


def ids(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, len(VOCAB), n).astype(np.intp)


@pytest.fixture
def rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of requests in each slice, as the kernel was called."""
    seen: list[int] = []
    real = batching.advance_rows  # type: ignore[attr-defined]

    def spy(w: Any, h0: np.ndarray, *args: Any) -> None:
        seen.append(h0.shape[0])
        real(w, h0, *args)

    monkeypatch.setattr(batching, "advance_rows", spy)
    yield seen


@pytest.mark.parametrize("n", [1, 7, 64])
def test_feeds_scores_and_samples_together_equal_each_alone(n: int, rows: list[int]) -> None:
    w = weights()
    rng = np.random.default_rng(n)
    feeds = [
        (rng.standard_normal(w.n_a).astype(w.dtype) * 0.5, ids(int(k), rng))
        for k in rng.integers(1, 300, n)
    ]
    scores = [ids(int(k), rng) for k in rng.integers(1, 300, n)]
    samples: list[dict[str, Any]] = [
        {
            "max_chars": int(k),
            "seed": i,
            "temperature": float(t),
            "top_k": tk,
            "top_p": tp,
            "stop": st,
        }
        for i, (k, t, tk, tp, st) in enumerate(
            zip(
                rng.integers(0, 120, n),
                rng.choice([0.0, 0.7, 1.0, 1.5], n),
                [None if i % 2 else 3 for i in range(n)],
                [None if i % 4 < 2 else 0.9 for i in range(n)],
                [(" th",) if i % 3 == 0 else () for i in range(n)],
                strict=True,
            )
        )
    ]

    async def go() -> Any:
        b = Batcher(w, max_batch=4096, max_delay_s=0.0)

        async def one_sample(kw: dict[str, Any]) -> tuple[str, str | None]:
            chooser = make_chooser(w, VOCAB, **kw)
            h = advance(w, initial_state(w), VOCAB.encode("the "))
            text = "".join([p async for p in b.sample(h, chooser)])
            return text, chooser.finish_reason

        return await asyncio.gather(
            asyncio.gather(*(b.advance(h, x) for h, x in feeds)),
            asyncio.gather(*(b.score(initial_state(w), x) for x in scores)),
            asyncio.gather(*(one_sample(kw) for kw in samples)),
        )

    got_feeds, got_scores, got_samples = asyncio.run(go())
    for (h, x), got in zip(feeds, got_feeds, strict=True):
        np.testing.assert_allclose(got, advance(w, h, x), atol=1e-6, rtol=0)
    for x, got in zip(scores, got_scores, strict=True):
        np.testing.assert_allclose(got, score_from(w, initial_state(w), x)[0], atol=1e-5, rtol=1e-6)
    for kw, got in zip(samples, got_samples, strict=True):
        assert got == sample(w, VOCAB, "the ", **kw)
    # everything was waiting: one batch from the first slice (a 0-character sample steps
    # nothing)
    assert max(rows) == 2 * n + sum(kw["max_chars"] > 0 for kw in samples)


def test_a_long_request_does_not_hold_short_ones_back(rows: list[int]) -> None:
    w = weights(hidden=128)
    rng = np.random.default_rng(3)
    finished: list[str] = []

    async def go() -> None:
        b = Batcher(w, max_batch=64, max_delay_s=0.0)

        async def ask(label: str, x: np.ndarray) -> None:
            await b.advance(initial_state(w), x)
            finished.append(label)

        long = asyncio.create_task(ask("long", ids(40_000, rng)))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the long one is stepping alone now
        await asyncio.gather(long, *(ask(f"short{i}", ids(50, rng)) for i in range(8)))

    asyncio.run(go())
    assert finished[-1] == "long" and len(finished) == 9
    assert rows[0] == 1 and max(rows) == 9  # the short ones joined the running batch


def test_a_request_that_goes_away_leaves_the_batch(rows: list[int]) -> None:
    w = weights()
    rng = np.random.default_rng(4)

    async def go() -> np.ndarray:
        b = Batcher(w, max_batch=64, max_delay_s=0.0)
        gone = asyncio.create_task(b.advance(initial_state(w), ids(30_000, rng)))
        stays = asyncio.create_task(b.advance(initial_state(w), ids(20_000, rng)))
        await asyncio.sleep(0.01)
        gone.cancel()
        chooser = make_chooser(w, VOCAB, max_chars=10_000, seed=1)
        pieces = b.sample(initial_state(w), chooser)
        await pieces.__anext__()
        await pieces.aclose()  # a stream whose client went away
        out = await stays
        with pytest.raises(asyncio.CancelledError):
            await gone
        for _ in range(100):  # the loop ends once it has nothing to step
            if b._task is None:
                break
            await asyncio.sleep(0)
        assert b._task is None and not b._active and not b._waiting
        return out

    asyncio.run(go())
    assert rows[-1] == 1  # the survivor finished alone


def test_max_batch_bounds_every_slice_and_everyone_finishes(rows: list[int]) -> None:
    w = weights()
    rng = np.random.default_rng(5)
    asks = [ids(int(k), rng) for k in rng.integers(1, 200, 9)]

    async def go() -> list[np.ndarray]:
        b = Batcher(w, max_batch=2, max_delay_s=0.0)
        return await asyncio.gather(*(b.advance(initial_state(w), x) for x in asks))

    for x, got in zip(asks, asyncio.run(go()), strict=True):
        np.testing.assert_allclose(got, advance(w, initial_state(w), x), atol=1e-6, rtol=0)
    assert max(rows) == 2


def test_a_queue_delay_waits_for_more_requests(rows: list[int]) -> None:
    w = weights()
    rng = np.random.default_rng(6)

    async def go() -> None:
        b = Batcher(w, max_batch=2, max_delay_s=30.0)  # a full batch starts at once
        first = asyncio.create_task(b.advance(initial_state(w), ids(5, rng)))
        await asyncio.sleep(0.05)
        assert not first.done()  # waiting for a second request
        await asyncio.gather(first, b.advance(initial_state(w), ids(5, rng)))

    asyncio.run(go())
    assert rows == [2]


def test_slices_keep_about_the_same_work_as_the_batch_grows() -> None:
    # a lone request at H=256 keeps the unbatched 61 steps; 32 together take 5
    assert batching.slice_steps(256, 1) == 61
    assert batching.slice_steps(256, 32) == 5
    assert batching.slice_steps(1024, 4096) == 1


@pytest.mark.parametrize("keep", [1, 3, 61, 62, 500])
def test_trail_keeps_the_states_after_each_of_the_last_inputs(keep: int) -> None:
    """Stepped across several slices beside other work, the kept tail is each step's state."""
    w = weights(hidden=256)  # 61 steps a slice alone: 300 inputs span several slices
    rng = np.random.default_rng(keep)
    seq = ids(300, rng)
    others = [ids(int(k), rng) for k in rng.integers(1, 400, 5)]
    h0 = initial_state(w)

    async def go() -> np.ndarray:
        b = Batcher(w, max_batch=64, max_delay_s=0)
        tail, *_ = await asyncio.gather(b.trail(h0, seq, keep), *(b.advance(h0, o) for o in others))
        return tail

    tail = asyncio.run(go())
    m = min(keep, seq.size)
    assert tail.shape == (m, w.n_a)
    for j in range(m):
        want = advance(w, h0, seq[: seq.size - m + j + 1])
        np.testing.assert_allclose(tail[j], want, atol=1e-5)  # float32 sums, 300 steps
