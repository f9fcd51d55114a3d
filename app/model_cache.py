"""Loaded models and their prefix states, bounded, in the API process.

A client typing one character at a time asks for "ROMEO", "ROMEO:", "ROMEO:\\n"
...; caching the hidden state of each prefix means each request pays one RNN
step, not the whole prefix. Both caches are LRU and bounded; entries are keyed
by model id, and ids are never reused, so a deleted model can only be served
from here until it falls out (the route checks the store first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from model.checkpoint import ModelCheckpoint, model_from_bytes
from model.inference import advance, initial_state

from .store import Store

PREFIX_LOOKBACK = 8  # how many characters back to look for a cached prefix


@dataclass
class LoadedModel:
    id: str
    ckpt: ModelCheckpoint
    max_states: int
    _states: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def state_after(self, text: str, ids: np.ndarray) -> np.ndarray:
        """Hidden state after ``text`` (whose indices are ``ids``); never mutated by callers."""
        params = self.ckpt.params
        with self._lock:
            start, h = 0, None
            for back in range(min(PREFIX_LOOKBACK, len(text)) + 1):
                cached = self._states.get(text[: len(text) - back])
                if cached is not None:
                    self._states.move_to_end(text[: len(text) - back])
                    start, h = len(text) - back, cached
                    break
        if h is None:
            h = initial_state(params)
        out = advance(params, h, ids[start:]) if start < len(ids) else h
        with self._lock:
            self._states[text] = out
            self._states.move_to_end(text)
            while len(self._states) > self.max_states:
                self._states.popitem(last=False)
        return out


class ModelCache:
    def __init__(self, store: Store, max_models: int, max_states: int = 4096) -> None:
        self.store = store
        self.max_models = max_models
        self.max_states = max_states
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model_id: str) -> LoadedModel | None:
        with self._lock:
            loaded = self._models.get(model_id)
            if loaded is not None:
                self._models.move_to_end(model_id)
                return loaded
        data = self.store.read_model_bytes(model_id)
        if data is None:
            return None
        loaded = LoadedModel(model_id, model_from_bytes(data), self.max_states)
        with self._lock:
            self._models[model_id] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return loaded

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)
