"""Training: truncated BPTT over B parallel streams, with validation and resuming.

    trainer = Trainer(text, TrainConfig(max_steps=2000))
    for event in trainer.run():        # one Progress per log_every steps and per eval
        print(event)                   # stop early: break, or should_stop=...
    result = trainer.result()          # the best-validation weights, not just the last

The batch is split into two shards (when B >= 2) computed at once, each with
one BLAS thread: two single-threaded (B/2)-row GEMMs beat one two-threaded
B-row GEMM at these sizes. model/shards.py runs them in a child process or in
threads; the shard count depends only on B, so the weights are bit-identical
whatever ``threads`` and the back-end are.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from . import data, inference
from .config import StopReason, TrainConfig
from .errors import ConfigError, CorpusError, DivergedError
from .optim import Optimizer, clip_by_global_norm
from .params import Params, init_params
from .rnn import Workspace, loss_only
from .shards import make_shards
from .state import TrainResult, TrainState
from .vocab import Vocab

__all__ = [  # TrainConfig and the state records live in their own modules; also named here
    "Progress",
    "StopReason",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "corpus_digest",
    "evaluate",
    "train",
]

# Both shards at once where there are two cores; results do not depend on it.
DEFAULT_THREADS = min(2, os.cpu_count() or 1)
# Third word of a sample's seed: keeps it apart from any other (seed, step) stream.
_SAMPLE_STREAM = 0x73616D70


@dataclass(frozen=True)
class Progress:
    """One event of the training stream."""

    step: int
    epoch: int
    train_loss: float  # mean over the steps since the previous event
    val_loss: float | None  # set on events that measured it
    chars_per_sec: float  # training characters per second since the previous event
    elapsed_s: float
    total_steps: int | None
    best_val_loss: float | None
    best_step: int | None
    # Diagnostics of the step logged: None where a caller builds an event without them.
    grad_norm: float | None = None  # global L2 norm of the gradient, before clipping
    clipped: bool | None = None  # whether grad_clip scaled it down
    learning_rate: float | None = None  # the step size that step used (the cosine schedule)
    sample: str | None = None  # at evaluations: eval_sample of the current weights


def eval_sample(params: Params, vocab: Vocab, config: TrainConfig, step: int) -> str:
    """``config.sample_length`` characters of ``params`` from the empty prefix.

    Its generator is seeded by (seed, step) and its own: the training stream is left
    untouched, so a run with samples is bit-identical to one without, and a resumed
    or paused run shows the same samples as an uninterrupted one."""
    if config.sample_length == 0:
        return ""
    rng = np.random.default_rng([config.seed, step, _SAMPLE_STREAM])
    text, _ = inference.sample(
        params,
        vocab,
        max_chars=config.sample_length,
        temperature=config.sample_temperature,
        rng=rng,
    )
    return text


def corpus_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _eval_streams(
    params: Params,
    ids: np.ndarray,
    starts: np.ndarray,
    L: int,
    T: int,
    workspaces: dict[int, Workspace],
) -> float:
    """Summed nats over streams ids[start : start+L+1], chunks of T, state carried;
    ``workspaces`` holds one per chunk length."""
    total = 0.0
    h = np.zeros((len(starts), params.n_a), params.dtype)
    for t0 in range(0, L, T):
        pos = starts[None, :] + np.arange(t0, min(t0 + T, L))[:, None]  # (T', B)
        loss, h_last = loss_only(params, ids[pos], ids[pos + 1], h, workspaces[pos.shape[0]])
        h[...] = h_last
        total += loss * pos.size
    return total


def _eval_workspaces(params: Params, B: int, L: int, T: int) -> dict[int, Workspace]:
    """One workspace per chunk length, made before any thread starts: a pass's memory is
    the same whatever the threads' timing (model/memory.py counts all of them)."""
    lengths = {T, L % T} - {0} if L >= T else {T, L}
    return {n: Workspace.for_batch(params, n, B) for n in sorted(lengths)}


def evaluate(
    params: Params,
    ids: np.ndarray,
    T: int = 128,
    B: int = 128,
    pool: ThreadPoolExecutor | None = None,
) -> float:
    """Mean nats per character over ids, read as B streams from a zero state.

    With a pool the streams are split between its threads.
    """
    B = max(1, min(B, (len(ids) - 1) // T))
    L = (len(ids) - 1) // B
    starts = np.arange(B) * L
    parts = np.array_split(starts, 2) if pool is not None and B >= 2 else [starts]
    spaces = [_eval_workspaces(params, len(p), L, T) for p in parts]
    if pool is not None and len(parts) > 1:
        sums = list(
            pool.map(lambda i: _eval_streams(params, ids, parts[i], L, T, spaces[i]), range(2))
        )
    else:
        sums = [_eval_streams(params, ids, p, L, T, w) for p, w in zip(parts, spaces, strict=True)]
    return sum(sums) / (B * L)


class Trainer:
    """Runs (or resumes) one training run over a corpus."""

    def __init__(
        self,
        text: str,
        config: TrainConfig | None = None,
        *,
        init: tuple[Params, Vocab] | None = None,
        resume: TrainState | None = None,
        threads: int = DEFAULT_THREADS,
        shard_mode: str = "auto",
    ) -> None:
        if not text:
            raise CorpusError("the corpus is empty")
        if resume is not None:
            config = resume.config
            if resume.corpus_sha256 != corpus_digest(text):
                raise CorpusError("this checkpoint was trained on a different corpus")
        self.config = config = config or TrainConfig()
        self.threads = max(1, threads)
        self.shard_mode = shard_mode  # see model/shards.py; results do not depend on it
        if resume is not None:
            vocab = resume.vocab
        elif init is not None:
            vocab = init[1]
        else:
            vocab = Vocab.from_text(text)
        ids = vocab.encode(text)
        data.check_trainable(len(ids), len(vocab), 1)
        self.train_ids, self.val_ids = data.split(ids, config.val_fraction)
        data.check_trainable(len(self.train_ids), len(vocab), config.seq_length, len(self.val_ids))
        self.streams = data.Streams.fit(
            self.train_ids, config.seq_length, config.batch_size, config.seed
        )

        if resume is None:
            if init is not None:
                params = init[0].copy(config.dtype)
                if params.n_a != config.hidden_size:
                    raise ConfigError(
                        f"hidden_size {config.hidden_size} does not match the initial model's "
                        f"{params.n_a}"
                    )
            else:
                rng = np.random.default_rng(config.seed)
                params = init_params(config.hidden_size, len(vocab), rng, config.dtype)
            opt = Optimizer(config.optimizer, params.flat.size, params.dtype)
            resume = TrainState(
                config=config,
                vocab=vocab,
                corpus_sha256=corpus_digest(text),
                params=params,
                optimizer=opt.state,
                hidden=np.zeros((self.streams.B, config.hidden_size), params.dtype),
            )
        self.state = resume
        self.optimizer = Optimizer(
            config.optimizer, resume.params.flat.size, resume.params.dtype, resume.optimizer
        )
        self.state.optimizer = self.optimizer.state
        self._pool: ThreadPoolExecutor | None = None

    @property
    def chars_per_step(self) -> int:
        return self.streams.B * self.streams.T

    def _evaluate(self) -> float | None:
        if len(self.val_ids) < 2:
            return None
        return evaluate(self.state.params, self.val_ids, pool=self._pool)

    def _learning_rate(self) -> float:
        """Cosine from learning_rate down to lr_final * learning_rate over the run.

        The run's length is max_steps when set (so the schedule, and the weights,
        are reproducible), otherwise the time budget.
        """
        cfg, s = self.config, self.state
        if cfg.max_steps is not None:
            done = s.step / cfg.max_steps
        else:
            assert cfg.time_limit_s is not None
            done = s.elapsed_s / cfg.time_limit_s
        cos = 0.5 * (1.0 + math.cos(math.pi * min(max(done, 0.0), 1.0)))
        return cfg.learning_rate * (cfg.lr_final + (1.0 - cfg.lr_final) * cos)

    def _diverged(self, loss: float) -> bool:
        """NaN/inf, or far worse than a uniform guess (ln V nats): no way back from there."""
        uniform = math.log(len(self.state.vocab))
        return not math.isfinite(loss) or loss > max(3 * uniform, uniform + 4)

    def _record_eval(self, val: float) -> None:
        s = self.state
        s.last_val_loss, s.last_eval_step = val, s.step
        if s.best_val_loss is None or val < s.best_val_loss:
            s.best_val_loss, s.best_step, s.evals_since_best = val, s.step, 0
            s.best_params = s.params.copy()
        else:
            s.evals_since_best += 1

    def run(self, should_stop: Callable[[], bool] | None = None) -> Iterator[Progress]:
        """Train until a stop condition; yields Progress events between steps."""
        with threadpool_limits(1 if self.threads > 1 else None):
            yield from self._run(should_stop)

    def _run(self, should_stop: Callable[[], bool] | None) -> Iterator[Progress]:
        cfg, s = self.config, self.state
        sharded = make_shards(
            s.params, self.streams.T, self.streams.B, self.threads, self.shard_mode
        )
        self._pool = ThreadPoolExecutor(2) if self.threads > 1 else None
        start = time.perf_counter() - s.elapsed_s
        # The mean train loss since the last event resumes with the state: a run stopped
        # between events (a pause) reports the same mean at its next event as one that was not.
        mark_t, mark_step, loss_sum, loss_n = time.perf_counter(), s.step, s.loss_sum, s.loss_n
        try:
            s.stop_reason = None
            while True:
                if cfg.max_steps is not None and s.step >= cfg.max_steps:
                    s.stop_reason = "max_steps"
                elif cfg.time_limit_s is not None and s.elapsed_s >= cfg.time_limit_s:
                    s.stop_reason = "time_limit"
                elif cfg.patience is not None and s.evals_since_best >= cfg.patience:
                    s.stop_reason = "early_stopping"
                elif should_stop is not None and should_stop():
                    s.stop_reason = "stopped"
                if s.stop_reason is not None:
                    break

                X, Y = self.streams.chunk(s.epoch, s.chunk)
                loss = sharded(s.params, X, Y, s.hidden)
                grads = sharded.grads.flat
                norm = clip_by_global_norm(grads, cfg.grad_clip)
                clipped = 0 < cfg.grad_clip < norm
                if not math.isfinite(norm) or self._diverged(loss):
                    raise DivergedError(s.step + 1, loss)
                lr = self._learning_rate()
                self.optimizer.step(s.params.flat, grads, lr, s.step + 1, cfg.weight_decay)
                s.hidden[...] = sharded.hidden
                s.step += 1
                s.chunk += 1
                if s.chunk >= self.streams.chunks_per_epoch:
                    s.epoch, s.chunk = s.epoch + 1, 0
                    s.hidden[...] = 0.0
                s.last_train_loss = loss
                loss_sum += loss
                loss_n += 1
                s.loss_sum, s.loss_n = loss_sum, loss_n

                val, sample = None, None
                last = cfg.max_steps is not None and s.step >= cfg.max_steps
                if s.step % cfg.eval_every == 0 or last:
                    if cfg.sample_length:
                        sample = eval_sample(s.params, s.vocab, cfg, s.step)
                    val = self._evaluate()
                    if val is not None:
                        if self._diverged(val):
                            raise DivergedError(s.step, val)
                        self._record_eval(val)
                s.elapsed_s = time.perf_counter() - start
                if val is not None or sample is not None or s.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    cps = (s.step - mark_step) * self.chars_per_step / max(now - mark_t, 1e-9)
                    yield Progress(
                        step=s.step,
                        epoch=s.epoch,
                        train_loss=loss_sum / loss_n,
                        val_loss=val,
                        chars_per_sec=cps,
                        elapsed_s=s.elapsed_s,
                        total_steps=cfg.max_steps,
                        best_val_loss=s.best_val_loss,
                        best_step=s.best_step,
                        grad_norm=norm,
                        clipped=clipped,
                        learning_rate=lr,
                        sample=sample,
                    )
                    mark_t, mark_step, loss_sum, loss_n = time.perf_counter(), s.step, 0.0, 0
                    s.loss_sum, s.loss_n = 0.0, 0
            # The best model must have seen the final weights too (unless stopped from
            # outside: then the run may be resumed and must continue exactly).
            if s.stop_reason != "stopped" and s.step > 0 and s.last_eval_step != s.step:
                val = self._evaluate()
                if val is not None:
                    if self._diverged(val):
                        raise DivergedError(s.step, val)
                    self._record_eval(val)
        finally:
            sharded.close()
            if self._pool is not None:
                self._pool.shutdown()

    def result(self) -> TrainResult:
        s = self.state
        params = s.best_params if s.best_params is not None else s.params
        metrics = {
            "steps": s.step,
            "epochs": s.epoch,
            "train_loss": s.last_train_loss,
            "val_loss": s.best_val_loss,
            "best_step": s.best_step if s.best_params is not None else s.step,
            "last_val_loss": s.last_val_loss,
            "elapsed_s": s.elapsed_s,
            "chars_per_sec": s.step * self.chars_per_step / s.elapsed_s if s.elapsed_s else None,
            "stop_reason": s.stop_reason,
            "train_chars": int(len(self.train_ids)),
            "val_chars": int(len(self.val_ids)),
            "batch_size_used": self.streams.B,
        }
        return TrainResult(params=params.copy(), vocab=s.vocab, config=self.config, metrics=metrics)


def train(
    text: str,
    config: TrainConfig | None = None,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    threads: int = DEFAULT_THREADS,
    **overrides: Any,
) -> TrainResult:
    """Train a model on text; the convenience wrapper around Trainer."""
    config = replace(config or TrainConfig(), **overrides)
    trainer = Trainer(text, config, threads=threads)
    for event in trainer.run(should_stop):
        if on_progress is not None:
            on_progress(event)
    return trainer.result()
