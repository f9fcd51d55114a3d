"""Loaded models, their prefix states and model lookups, bounded, in the API process.

A client typing one character at a time asks for "ROMEO", "ROMEO:", "ROMEO:\\n"
...; caching the hidden state of each prefix means each request pays one RNN
step, not the whole prefix. Model references ("the newest", a name, an id) are
resolved through the store once per change of ``store.models_version``, so a
prediction costs no database query while the set of models stays the same, and a
delete or a new model takes effect on the next request (on other scale-out
replicas, once PostgreSQL's NOTIFY of the change has arrived: about a
millisecond). All caches are LRU and bounded; ids are never reused, so a cached
model can never be mistaken for another.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from model.checkpoint import ModelCheckpoint, model_from_bytes
from model.inference import InferenceWeights, initial_state

from ..metrics import MODEL_CACHE, MODELS_LOADED
from ..store.base import ModelRecord, Store
from .batcher import Batcher

PREFIX_LOOKBACK = 8  # how many characters back to look for a cached prefix
MAX_REFS = 1024  # distinct model references remembered between model changes


@dataclass(frozen=True)
class BatchLimits:
    max_batch: int = 64
    max_delay_s: float = 0.0


@dataclass
class LoadedModel:
    id: str
    ckpt: ModelCheckpoint
    max_states: int
    batch_limits: BatchLimits = field(default_factory=BatchLimits)
    weights: InferenceWeights = field(init=False)
    _states: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _batcher: Batcher | None = None
    web: bytes | None = None  # its web export (app/serving/export.py), once asked for

    def __post_init__(self) -> None:
        self.weights = InferenceWeights.of(self.ckpt.params)

    @property
    def batcher(self) -> Batcher:
        """This model's batch (made on first use, on the event loop that serves it)."""
        if self._batcher is None:
            limits = self.batch_limits
            self._batcher = Batcher(self.weights, limits.max_batch, limits.max_delay_s)
        return self._batcher

    def cached_prefix(self, text: str) -> tuple[int, np.ndarray]:
        """(n, state after text[:n]) for the longest cached prefix at most
        PREFIX_LOOKBACK characters short of ``text``; (0, a_0) if there is none.
        The state is shared: never mutate it."""
        with self._lock:
            for back in range(min(PREFIX_LOOKBACK, len(text)) + 1):
                key = text[: len(text) - back]
                cached = self._states.get(key)
                if cached is not None:
                    self._states.move_to_end(key)
                    return len(key), cached
        return 0, initial_state(self.weights)

    def remember(self, text: str, h: np.ndarray) -> None:
        """Cache ``h`` as the state after ``text`` (which must be all in the vocabulary)."""
        with self._lock:
            self._states[text] = h
            self._states.move_to_end(text)
            while len(self._states) > self.max_states:
                self._states.popitem(last=False)


class ModelCache:
    def __init__(
        self,
        store: Store,
        max_models: int,
        max_states: int = 4096,
        batch_limits: BatchLimits | None = None,
    ) -> None:
        self.store = store
        self.batch_limits = batch_limits or BatchLimits()
        self.max_models = max_models
        self.max_states = max_states
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._refs: dict[str | None, ModelRecord | None] = {}
        self._refs_version = -1
        self._lock = threading.Lock()

    def cached_record(self, ref: str | None) -> tuple[bool, ModelRecord | None]:
        """(True, record or None) if ``ref`` was resolved since the last model change;
        (False, None) if only :meth:`resolve` (a store query) can tell."""
        with self._lock:
            if self._refs_version == self.store.models_version and ref in self._refs:
                return True, self._refs[ref]
        return False, None

    def resolve(self, ref: str | None) -> ModelRecord | None:
        """The model ``ref`` names (None: the newest one), or None if there is none."""
        found, record = self.cached_record(ref)
        if found:
            return record
        version = self.store.models_version  # read first: a change during the query re-queries
        record = self.store.newest_model() if ref is None else self.store.resolve_model(ref)
        with self._lock:
            if self._refs_version != version or len(self._refs) >= MAX_REFS:
                self._refs.clear()
                self._refs_version = version
            self._refs[ref] = record
        return record

    def cached(self, model_id: str) -> LoadedModel | None:
        """The loaded model if it is in memory (no I/O)."""
        with self._lock:
            loaded = self._models.get(model_id)
            if loaded is not None:
                self._models.move_to_end(model_id)
            return loaded

    def get(self, model_id: str) -> LoadedModel | None:
        """The loaded model, read from the store if needed; None if it has no checkpoint."""
        loaded = self.cached(model_id)
        if loaded is not None:
            return loaded
        MODEL_CACHE.labels("miss").inc()
        data = self.store.read_model_bytes(model_id)
        if data is None:
            return None
        loaded = LoadedModel(model_id, model_from_bytes(data), self.max_states, self.batch_limits)
        with self._lock:
            first = self._models.get(model_id)
            if first is not None:  # another request loaded it meanwhile: share that one
                self._models.move_to_end(model_id)  # (and its prefix cache)
                return first
            self._models[model_id] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            MODELS_LOADED.set(len(self._models))
        return loaded

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)
            MODELS_LOADED.set(len(self._models))
