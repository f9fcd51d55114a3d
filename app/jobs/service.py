"""Training jobs, the rules: submit (every check before anything is stored), read, follow,
cancel, delete.

The HTTP routes (``app/api/jobs.py``) parse a request, call one method here and
send what it returns. Refusals are the service errors of ``app/errors.py`` and
model/'s own (``CorpusError``, ``ConfigError``, ``UnknownCharactersError``: 422);
a full queue is the store's ``QueueFullError`` (429), raised in the same
transaction as the insert so racing submissions never overfill it. Methods that
touch the store are plain functions the routes run in the thread pool.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict

from fastapi.concurrency import run_in_threadpool

from model.config import HYPERPARAMETERS, TrainConfig
from model.data import check_trainable, split_lengths
from model.errors import CheckpointError, UnknownCharactersError
from model.memory import training_bytes
from model.params import hidden_size_for
from model.vocab import Vocab

from ..domain import TERMINAL_STATUSES, JobStatus, text_problem
from ..errors import Conflict, Invalid, NotFound, Unavailable
from ..settings import Settings
from ..store.base import JobActiveError, JobRecord, Store, readable
from ..store.idempotency import (
    IdempotencyKey,
    IdempotencyMismatch,
    IdempotentReplay,
    fingerprint,
    key_problem,
)
from ..store.validation import check_limits
from .events import CLOSING, EventHub
from .pause import Steering
from .replay import Best, Event, final_id, progress_event, status_event, total_steps
from .runner import Runner
from .schemas import (
    CorpusInfo,
    HyperparametersOut,
    JobCreate,
    JobList,
    JobMetrics,
    JobOut,
    JobProgress,
    JobStopping,
    MetricPointOut,
    MetricsOut,
)

# The corpus in the job process: its text (up to 4 bytes a character) and about 25 bytes
# a character while it is encoded (model/memory.py says what training_bytes leaves out).
CORPUS_BYTES_PER_CHAR = 29
KEEP_ALIVE_S = 15.0  # an event stream's silence before it re-reads the job

_UNREADABLE: set[str] = set()


def job_out(job: JobRecord, evals: Sequence[tuple[int, float]] = ()) -> JobOut:
    """A stored job as answered; ``evals`` (its (step, validation loss) points) give the
    best step and the plain-words note."""
    total = job.total_steps or job.hyperparameters.get("max_steps")
    best_step, since = _best(evals)
    return JobOut(
        id=job.id,
        name=job.name,
        status=job.status,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        hyperparameters=HyperparametersOut.model_validate(job.hyperparameters),
        seed=job.seed,
        init_from=job.init_from,
        corpus=CorpusInfo(chars=job.corpus_chars, vocab_size=job.vocab_size),
        progress=JobProgress(
            step=job.step,
            total_steps=total,
            fraction=min(job.step / total, 1.0) if total else None,
            eta_s=job.eta_s if job.status == "running" else None,
        ),
        metrics=JobMetrics(
            train_loss=job.train_loss,
            val_loss=job.val_loss,
            chars_per_sec=job.chars_per_sec,
            best_step=best_step,
            evals_since_best=since,
        ),
        model_id=job.model_id,
        error=job.error,
        note=_note(job, total, best_step, since),
    )


def _best(evals: Sequence[tuple[int, float]]) -> tuple[int | None, int | None]:
    """(step of the best validation loss, evaluations since it), as the trainer counts."""
    best_step, best, since = None, math.inf, 0
    for step, val in evals:
        if val < best:
            best_step, best, since = step, val, 0
        else:
            since += 1
    return best_step, (since if best_step is not None else None)


def _note(job: JobRecord, total: int | None, best: int | None, since: int | None) -> str | None:
    """How the run is going, or how it ended, in words (None before any evaluation)."""
    if best is None or since is None or job.status in ("queued", "failed"):
        return None
    patience = job.hyperparameters.get("patience", HYPERPARAMETERS["patience"].default)
    if job.status == "running":
        if since == 0:
            return f"validation loss improving: best so far at step {best}"
        left = f" ({since} of {patience} evaluations before early stopping)" if patience else ""
        return f"validation loss has not improved since step {best}{left}"
    if job.status != "succeeded":  # cancelled: no model was kept
        return f"{job.status} at step {job.step}; validation loss was best at step {best}"
    if patience and since >= patience and (total is None or job.step < total):
        return (
            f"stopped early at step {job.step}: validation loss had not improved since step "
            f"{best}; the model from step {best} was kept"
        )
    if best < job.step:
        return (
            f"stopped at step {job.step}; validation loss was best at step {best}, and that "
            "model was kept"
        )
    return f"stopped at step {job.step}, at the best validation loss so far"


def jobs_out(
    jobs: list[JobRecord], evals: Mapping[str, Sequence[tuple[int, float]]] | None = None
) -> list[JobOut]:
    """The jobs that can be shown; one that cannot (an old bug's row) is logged, skipped."""
    found = evals or {}
    return readable(jobs, lambda j: job_out(j, found.get(j.id, ())), "job", _UNREADABLE)


def _mismatch(key: str) -> Conflict:
    """The 409 of a key reused for another request: it names the key, never the other
    request's job (keys are server-wide)."""
    return Conflict(
        f"Idempotency-Key {key!r} was already used with a different request (corpus, name, "
        "hyperparameters, seed or init_from); send that same request again to get its job, "
        "or use a new key for a new job"
    )


class JobService:
    def __init__(self, store: Store, runner: Runner, events: EventHub, settings: Settings) -> None:
        self.store = store
        self.runner = runner
        self.events = events
        self.settings = settings

    # ------------------------------------------------------------------ submit

    def submit(self, body: JobCreate, idempotency_key: str | None = None) -> tuple[JobOut, bool]:
        """Check everything, then store the job and queue it: (the job, False).

        With ``idempotency_key``: a live key of the same request answers its job as it is
        now, (job, True), before any check (a replay is not refused because the queue
        filled up or the base model went since); of another request, a 409 naming the
        key. Racing requests with one key leave one job: the store records the key in
        the job's insert transaction (``app/store/idempotency.py``)."""
        key = self._idempotency(body, idempotency_key)
        if key is not None and (live := self.store.idempotency_key(key.key)) is not None:
            return self._replay(key, *live), True
        self._check_ceilings(body)
        corpus = body.corpus
        if problem := text_problem(corpus):
            raise Invalid(f"corpus {problem}")
        if not corpus.strip():
            raise Invalid("the corpus is empty or only whitespace")
        hp = body.hyperparameters.model_dump()
        init_id = None
        if body.init_from is not None:
            base = self.store.resolve_model(body.init_from)
            if base is None:
                raise NotFound(f"no model with id or name {body.init_from[:64]!r} to start from")
            vocab = Vocab(tuple(base.vocab))
            init_id, hp["hidden_size"] = base.id, hidden_size_for(base.param_count, len(vocab))
            if hp["hidden_size"] > self.settings.max_hidden_size:
                raise Invalid(
                    f"init_from model {base.id} has hidden size {hp['hidden_size']}, over this "
                    f"server's limit of {self.settings.max_hidden_size} (max_hidden_size)"
                )
            unknown = vocab.unknown(corpus)
            if unknown:
                raise UnknownCharactersError(unknown)
            n_distinct = len(Vocab.from_text(corpus))  # a fine-tuning vocabulary may hold more
        else:
            vocab = Vocab.from_text(corpus)
            n_distinct = len(vocab)
            if n_distinct > self.settings.max_vocab_size:
                raise Invalid(
                    f"the corpus has {n_distinct} distinct characters; this server allows "
                    f"{self.settings.max_vocab_size} (max_vocab_size)"
                )
        config = TrainConfig.from_dict({**hp, "seed": body.seed})  # ConfigError -> 422
        # Sized, not encoded: the job process encodes the corpus; a 10M-character request
        # need not pay for it twice.
        split = split_lengths(len(corpus), config.val_fraction)
        check_trainable(split[0], n_distinct, config.seq_length, split[1])  # CorpusError -> 422
        self._check_size(config, len(vocab), len(corpus), split)

        if not self.store.writable():
            raise Unavailable("the data directory is not writable; no new jobs can be stored")
        # The queue's room is checked in the store's insert transaction (QueueFullError:
        # 429, nothing stored); a write that fails is StoreUnavailable (503, nothing stored).
        try:
            job = self.store.create_job(
                body.name or "untitled",
                corpus,
                hp,
                body.seed,
                init_id,
                len(vocab),
                max_queued=self.settings.max_queued_jobs,
                idempotency=key,
            )
        except IdempotentReplay as e:  # a racing request with the key stored first
            return self._out(self._record(e.job_id)), True
        except IdempotencyMismatch as e:
            raise _mismatch(e.key) from None
        self.runner.submit(job.id)
        return job_out(job), False

    def _idempotency(self, body: JobCreate, given: str | None) -> IdempotencyKey | None:
        if given is None:
            return None
        if problem := key_problem(given):
            raise Invalid(problem)
        hp = body.hyperparameters.model_dump()
        fp = fingerprint(body.corpus, body.name, hp, body.seed, body.init_from)
        return IdempotencyKey(given, fp, self.settings.idempotency_ttl_s)

    def _replay(self, key: IdempotencyKey, fp: str, job_id: str) -> JobOut:
        """The job a live key created, or a 409 when it came from another request."""
        if fp != key.fingerprint:
            raise _mismatch(key.key)
        return self._out(self._record(job_id))

    def _check_ceilings(self, body: JobCreate) -> None:
        s, hp = self.settings, body.hyperparameters.model_dump()
        problems = [
            f"{name} {hp[name]} is over this server's limit of {limit}"
            for name, limit in s.hyperparameter_ceilings.items()
            # unset (null) has no size; with init_from the base model decides the hidden
            # size (checked in submit)
            if (hp[name] or 0) > limit
            and not (name == "hidden_size" and body.init_from is not None)
        ]
        if len(body.corpus) > s.max_corpus_chars:
            problems.append(
                f"corpus has {len(body.corpus)} characters; this server allows "
                f"{s.max_corpus_chars} (max_corpus_chars)"
            )
        if problems:
            raise Invalid("; ".join(problems))

    def _check_size(
        self, config: TrainConfig, n_x: int, corpus_chars: int, split: tuple[int, int]
    ) -> None:
        """The job's model and its training memory, bounded before anything is stored."""
        s = self.settings
        try:
            check_limits(config.hidden_size, n_x, config.dtype, s.model_limits, "this job's model")
        except CheckpointError as e:
            raise Invalid(str(e)) from None
        need = (
            training_bytes(
                config.hidden_size,
                n_x,
                config.seq_length,
                config.batch_size,
                config.dtype,
                config.optimizer,
                train_chars=split[0],
                val_chars=split[1],
            )
            + CORPUS_BYTES_PER_CHAR * corpus_chars
        )
        if need > s.max_job_memory_bytes:
            raise Invalid(
                f"this job would need about {need / 2**20:,.0f} MiB of memory (hidden_size "
                f"{config.hidden_size}, {n_x} distinct characters, batch_size "
                f"{config.batch_size}, seq_length {config.seq_length}); this server allows "
                f"{s.max_job_memory_bytes / 2**20:,.0f} MiB (max_job_memory_bytes)"
            )

    # ------------------------------------------------------------------ read

    def _record(self, job_id: str) -> JobRecord:
        job = self.store.get_job(job_id)
        if job is None or not jobs_out([job]):
            raise NotFound(f"no job with id {job_id[:64]!r}")
        return job

    def get(self, job_id: str) -> JobOut:
        return self._out(self._record(job_id))

    def _out(self, job: JobRecord) -> JobOut:
        return job_out(job, self.store.evaluations([job.id]).get(job.id, ()))

    def list(self, status: JobStatus | None, limit: int, offset: int) -> JobList:
        jobs = self.store.list_jobs(status, limit, offset)
        total = self.store.count_jobs(status)
        evals = self.store.evaluations([j.id for j in jobs])
        return JobList(items=jobs_out(jobs, evals), total=total, limit=limit, offset=offset)

    def metrics(self, job_id: str, after_step: int) -> MetricsOut:
        self._record(job_id)
        points = self.store.get_metrics(job_id, after_step)
        return MetricsOut(
            job_id=job_id,
            points=[
                # the same fields, as the replayed events take them (app/jobs/replay.py)
                MetricPointOut(**asdict(p))
                for p in points
            ],
        )

    # ------------------------------------------------------------------ change

    def _steering(self) -> Steering:
        return Steering(self.store, self.runner, self.settings, self._record, self._out)

    async def cancel(self, job_id: str) -> JobOut | JobStopping:
        """Stop a queued, running or paused job: the job once it is cancelled, or after
        ``STOP_WAIT_S`` a ``JobStopping`` (202) while it is still stopping."""
        return await self._steering().cancel(job_id)

    async def pause(self, job_id: str) -> JobOut | JobStopping:
        """Checkpoint a queued or running job and free its slot (``app/jobs/pause.py``)."""
        return await self._steering().pause(job_id)

    async def resume(self, job_id: str) -> JobOut:
        """Queue a paused job again; it continues exactly where it stopped."""
        return await self._steering().resume(job_id)

    def delete(self, job_id: str) -> None:
        try:
            deleted = self.store.delete_job(job_id)
        except JobActiveError as e:
            raise Conflict(
                f"job {job_id} is {e.status}; cancel it first (POST /jobs/{job_id}/cancel), "
                "then delete it"
            ) from None
        if not deleted:
            raise NotFound(f"no job with id {job_id[:64]!r}")

    # ------------------------------------------------------------------ follow

    async def follow(self, job_id: str, after: int | None = None) -> AsyncIterator[Event]:
        """The job's events (``app/jobs/replay.py`` builds them): without ``after``, a
        ``status`` snapshot (id: the job's step) first; with it (``Last-Event-ID``), the
        events with a larger id, replayed from the store, first. Then ``progress`` as
        points are recorded, ``status`` (no id) when it changes, and the final ``status``.
        Not found: raised before the first event. At shutdown a ``closing`` event ends it."""
        await run_in_threadpool(self._record, job_id)  # 404 before the stream starts

        async def events() -> AsyncIterator[Event]:
            # Subscribe inside the stream, so one that never starts (client gone) leaves
            # no subscription behind; before reading the store, so nothing is missed.
            queue = self.events.subscribe(job_id)
            try:
                job = await run_in_threadpool(self._record, job_id)
                total = total_steps(job)
                if after is None:
                    out = await run_in_threadpool(self._out, job)
                    if job.status in TERMINAL_STATUSES:
                        yield status_event(out, final_id(job))
                        return
                    yield status_event(out, job.step)
                last = job.step if after is None else after
                evals = await run_in_threadpool(self.store.evaluations, [job_id])
                best = Best.before(evals.get(job_id, ()), last)

                async def caught_up() -> AsyncIterator[Event]:
                    # Every point after the last one sent: live and replayed alike.
                    nonlocal last
                    for p in await run_in_threadpool(self.store.get_metrics, job_id, last):
                        yield progress_event(p, total, best)
                        last = p.step

                async def final(now: JobRecord) -> AsyncIterator[Event]:
                    async for e in caught_up():  # all recorded before the outcome was
                        yield e
                    if final_id(now) > last:
                        yield status_event(await run_in_threadpool(self._out, now), final_id(now))

                if after is not None and job.status in TERMINAL_STATUSES:
                    async for e in final(job):
                        yield e
                    return
                async for e in caught_up():
                    yield e
                while True:
                    try:
                        messages = [await asyncio.wait_for(queue.get(), timeout=KEEP_ALIVE_S)]
                    except TimeoutError:
                        # An event missed (a scale-out replica's Redis subscription
                        # reconnecting) must not leave the stream open: ask the store.
                        now = await run_in_threadpool(self._record, job_id)
                        if now.status in TERMINAL_STATUSES:
                            async for e in final(now):
                                yield e
                            return
                        async for e in caught_up():
                            yield e
                        yield "keep-alive", {}, None
                        continue
                    while not queue.empty():  # one store read answers all that waits
                        messages.append(queue.get_nowait())
                    if any(m is CLOSING for m in messages):
                        yield "closing", {}, None
                        return
                    fresh = False  # points recorded, not read yet
                    for m in messages:
                        if m.get("type") == "progress":
                            fresh = True
                        elif m.get("type") == "status":
                            if fresh:
                                async for e in caught_up():
                                    yield e
                                fresh = False
                            now = await run_in_threadpool(self._record, job_id)
                            if now.status in TERMINAL_STATUSES:
                                async for e in final(now):
                                    yield e
                                return
                            yield status_event(await run_in_threadpool(self._out, now), None)
                    if fresh:
                        async for e in caught_up():
                            yield e
            finally:
                self.events.unsubscribe(job_id, queue)

        return events()
