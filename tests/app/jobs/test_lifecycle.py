"""The job lifecycle both runners share, driven with plain messages and a real store.

A small model reports progress faster than a disk commits: a run of ``progress``
messages must cost the store two writes, not two per message, and the embedded
runner must hand them over in bounded batches so its lock is never held for long
(a cancel waits for it). Found by CI: with a slow fsync, a job at H=64 reporting
every 10 steps kept the supervisor draining forever and a cancel hung the server.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from app.jobs.lifecycle import Lifecycle, Outcome, Run
from app.jobs.local import DRAIN_BATCH, LocalRunner, _Child
from app.settings import Settings
from app.store.base import MetricPoint, ModelRecord, NewModel
from app.store.sqlite import SqliteStore

from ..conftest import CORPUS, QUICK


class CountingStore(SqliteStore):
    """The real store, counting the writes progress costs."""

    progress_writes = 0
    metric_writes = 0

    def update_progress(self, job_id: str, **fields: Any) -> bool:
        self.progress_writes += 1
        return super().update_progress(job_id, **fields)

    def add_metrics(self, job_id: str, points: Sequence[MetricPoint]) -> int:
        self.metric_writes += 1
        return super().add_metrics(job_id, points)


class NoTransport:
    def checkpoint(self, run: Run) -> None: ...
    def requeue(self, run: Run) -> None: ...
    def keep_paused(self, run: Run) -> None: ...
    def unrecorded(self, run: Run, outcome: Outcome) -> None: ...
    def base_model(self, run: Run, model: ModelRecord) -> Path | None: ...


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CountingStore]:
    s = CountingStore(tmp_path / "data")
    yield s
    s.close()


def progress(step: int) -> dict[str, Any]:
    return {
        "type": "progress",
        "step": step,
        "elapsed_s": step / 100,
        "train_loss": 3.0 - step / 1000,
        "val_loss": None,
        "best_val_loss": None,
        "chars_per_sec": 1000.0,
        "total_steps": 1000,
    }


def lifecycle(store: CountingStore, announced: list[dict[str, Any]]) -> Lifecycle:
    return Lifecycle(
        store,
        Settings().model_limits,
        lambda job_id, m: announced.append(m),
        NoTransport(),
        unstorable_model_fails=True,
    )


def test_a_run_of_progress_is_two_writes_and_every_point_is_kept(
    store: CountingStore, tmp_path: Path
) -> None:
    job = store.create_job("fox", CORPUS, QUICK, seed=1, init_from=None, vocab_size=29)
    announced: list[dict[str, Any]] = []
    run = Run(job, tmp_path)
    lifecycle(store, announced).handle_all(run, [progress(s) for s in range(10, 510, 10)])
    assert (store.progress_writes, store.metric_writes) == (1, 1)
    assert [p.step for p in store.get_metrics(job.id)] == list(range(10, 510, 10))
    stored = store.get_job(job.id)
    assert stored is not None and stored.step == 500 and stored.total_steps == 1000
    assert [m["step"] for m in announced] == list(range(10, 510, 10))


def test_a_last_word_after_progress_records_the_progress_first(
    store: CountingStore, tmp_path: Path
) -> None:
    job = store.create_job("fox", CORPUS, QUICK, seed=1, init_from=None, vocab_size=29)
    announced: list[dict[str, Any]] = []
    run = Run(job, tmp_path)
    messages = [progress(10), progress(20), {"type": "failed", "error": "boom"}, progress(30)]
    lifecycle(store, announced).handle_all(run, messages)
    stored = store.get_job(job.id)
    assert stored is not None and (stored.status, stored.step) == ("failed", 20)
    assert [p.step for p in store.get_metrics(job.id)] == [10, 20]  # nothing after the end
    assert [m.get("step", m.get("status")) for m in announced] == [10, 20, "failed"]


def test_a_resumed_run_does_not_replay_steps_already_reported(
    store: CountingStore, tmp_path: Path
) -> None:
    job = store.create_job("fox", CORPUS, QUICK, seed=1, init_from=None, vocab_size=29)
    announced: list[dict[str, Any]] = []
    first = Run(job, tmp_path)
    lifecycle(store, announced).handle_all(first, [progress(s) for s in (10, 20, 30)])
    resumed_job = store.get_job(job.id)
    assert resumed_job is not None
    announced.clear()
    # Resumed from the checkpoint at step 10: it replays 20 and 30, then goes on.
    resumed = Run(resumed_job, tmp_path)
    lifecycle(store, announced).handle_all(resumed, [progress(s) for s in (20, 30, 40)])
    assert [p.step for p in store.get_metrics(job.id)] == [10, 20, 30, 40]
    assert [m["step"] for m in announced] == [40]


def test_the_embedded_runner_drains_a_flood_in_bounded_batches(
    store: CountingStore, tmp_path: Path
) -> None:
    """However much a child has sent, one pass of the supervisor handles at most
    ``DRAIN_BATCH`` messages, in two progress writes; its last words are all read."""
    job = store.create_job("fox", CORPUS, QUICK, seed=1, init_from=None, vocab_size=29)
    runner = LocalRunner(
        store,
        max_concurrent_jobs=1,
        limits=Settings().model_limits,
        job_threads=1,
        checkpoint_every_s=1.0,
    )
    n = DRAIN_BATCH * 2 + 5
    conn = SentSoFar([json.dumps(progress(s)).encode() for s in range(1, n + 1)])
    child = _Child(Run(job, tmp_path), cast(Any, None), cast(Any, conn), mp.Event())
    assert runner._drain(child) is True  # a full batch: more may be waiting
    assert (store.progress_writes, store.metric_writes) == (1, 1)
    assert len(store.get_metrics(job.id)) == DRAIN_BATCH
    while runner._drain(child):
        pass
    assert [p.step for p in store.get_metrics(job.id)] == list(range(1, n + 1))
    assert store.progress_writes == 3


class SentSoFar:
    """The parent's end of a child's pipe, holding what the child has sent so far."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages

    def poll(self) -> bool:
        return bool(self.messages)

    def recv_bytes(self) -> bytes:
        return self.messages.pop(0)


class Recording(NoTransport):
    def __init__(self) -> None:
        self.asked: list[str] = []

    def base_model(self, run: Run, model: ModelRecord) -> Path | None:
        self.asked.append(model.id)
        return run.folder / "init.npz"


def test_the_spec_resolves_init_from_through_the_transport(
    store: CountingStore, tmp_path: Path
) -> None:
    """Both runners build the body's spec here; only where the base model's file comes
    from differs. A base model deleted before the job starts fails it, saying so."""
    base = store.add_model(NewModel("base", b"not read here", {}, {}, list("abc"), 10, "float32"))
    transport = Recording()
    announced: list[dict[str, Any]] = []
    life = Lifecycle(
        store,
        Settings().model_limits,
        lambda job_id, m: announced.append(m),
        transport,
        unstorable_model_fails=True,
    )
    job = store.create_job("fox", CORPUS, QUICK, seed=7, init_from="base", vocab_size=29)
    spec = life.spec(Run(job, tmp_path), threads=1, nice=0, checkpoint_every_s=1.0)
    assert spec is not None and transport.asked == [base.id]
    assert spec.init_model_path == str(tmp_path / "init.npz") and spec.seed == 7
    assert spec.corpus_path == str(tmp_path / "corpus.txt")

    gone = store.create_job("fox", CORPUS, QUICK, seed=7, init_from="nothing", vocab_size=29)
    assert life.spec(Run(gone, tmp_path), threads=1, nice=0, checkpoint_every_s=1.0) is None
    failed = store.get_job(gone.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error == "model 'nothing' no longer exists"
    assert announced[-1]["status"] == "failed"
