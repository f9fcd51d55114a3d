"""Typing sessions: one client's text and hidden state, kept by the server between keystrokes.

Over HTTP, a keystroke is a request that names its whole prefix, and the server
finds its state again in the prefix cache (which other clients' prefixes evict).
A session (a WebSocket, ``app/api/sessions.py``) keeps its own state: a
keystroke is one RNN step, riding the model's batch with every other session's,
and a backspace is a lookup in a bounded history of the states after each of the
last characters (Triton's sequence batcher keeps per-client state the same way).
Beyond that history, ``back`` recomputes the state of the shorter text from the
prefix cache or from the start: the history bounds memory, never what a client
may do.

This module knows nothing of WebSockets: :class:`Session` is the state and its
operations; the route bounds how many are open and for how long.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from model.inference import initial_state, next_distribution

from ..errors import Invalid
from . import slices
from .cache import LoadedModel
from .numbers import ranked


class Session:
    """A text being typed against one model: its state, and the states just before."""

    def __init__(
        self, loaded: LoadedModel, *, history: int, max_chars: int, temperature: float = 1.0
    ) -> None:
        self.loaded = loaded
        self.history = history
        self.max_chars = max_chars
        self.temperature = temperature
        self.text = ""
        # states after text[: len(text) - j] for j = 0, 1, ...: [-1] is the current one
        self._after: deque[np.ndarray] = deque([initial_state(loaded.weights)], history + 1)

    @property
    def state(self) -> np.ndarray:
        return self._after[-1]

    async def feed(self, text: str) -> None:
        """Append ``text``; unknown characters (UnknownCharactersError) change nothing."""
        if len(self.text) + len(text) > self.max_chars:
            raise Invalid(
                f"feed: the session's text would be {len(self.text) + len(text)} characters; "
                f"at most {self.max_chars} (reset, or open a new session)",
                {"max_chars": self.max_chars},
            )
        ids = np.asarray(self.loaded.ckpt.vocab.encode(text), dtype=np.intp)
        states = await self.loaded.batcher.trail(self.state, ids, self.history + 1)
        self._after.extend(states)  # the deque's bound drops the oldest
        self.text += text

    async def back(self, n: int) -> None:
        """Remove the last ``n`` characters."""
        if n > len(self.text):
            raise Invalid(
                f"back: n is {n} but the text has {len(self.text)} characters",
                {"length": len(self.text)},
            )
        text = self.text[: len(self.text) - n]
        if n < len(self._after):
            for _ in range(n):
                self._after.pop()
        else:  # beyond the history: from the prefix cache, or from the start
            h = await slices.state_after(self.loaded, text)
            self._after.clear()
            self._after.append(h)
        self.text = text

    async def set(self, text: str) -> None:
        """Make the text ``text``, stepping only what differs from the current one: an
        edit anywhere costs a ``back`` to the edit and a ``feed`` of the rest."""
        if len(text) > self.max_chars:
            raise Invalid(
                f"set: the text has {len(text)} characters; at most {self.max_chars}",
                {"max_chars": self.max_chars},
            )
        self.loaded.ckpt.vocab.encode(text)  # unknown characters: refused before any change
        same = _common_prefix(self.text, text)
        await self.back(len(self.text) - same)
        if same < len(text):
            await self.feed(text[same:])

    def reset(self) -> None:
        self.text = ""
        self._after.clear()
        self._after.append(initial_state(self.loaded.weights))

    def next(self, top_k: int | None) -> tuple[list[dict[str, str | float]], float]:
        """The next-character distribution as answered (``numbers.ranked``) and its entropy."""
        probs = next_distribution(self.loaded.weights, self.state, self.temperature)
        return ranked(probs, self.loaded.ckpt.vocab.chars, top_k)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
