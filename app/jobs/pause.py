"""Pause, resume, and cancels and pauses that answer only once they took effect.

A pause stops a running job at its next step, checkpointed at that step (the
body's ``stopped`` path: ``state.npz`` is the state *after* the last step, the
mean loss since the last event included), and marks it ``paused``: no runner
holds it, a restart leaves it paused (``jobs_to_resume`` reads only active
jobs), and its slot goes to the next queued job. A resume moves it back to
``queued`` (the queue's room checked as for a submit) and the runner runs it
from that checkpoint, so its metric points and final model are bit-identical
to an uninterrupted run of the same seed (for runs bounded by ``max_steps``: a
``time_limit_s`` budget counts training time only, so paused time is not
spent, but where a time-bounded run stops depends on the machine's speed).

Both a cancel and a pause wait up to ``STOP_WAIT_S`` for the job to stop; one
still stopping then is answered 202 with a :class:`JobStopping` body, never a
200 with a job still ``running``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi.concurrency import run_in_threadpool

from ..domain import TERMINAL_STATUSES
from ..errors import Conflict, ServiceError
from ..settings import Settings
from ..store.base import JobRecord, Store
from .runner import Runner
from .schemas import JobOut, JobStopping

STOP_WAIT_S = 5.0  # how long a cancel or a pause waits for the job to stop
_POLL_S = 0.05


class TooManyPaused(ServiceError):
    status, code = 429, "too_many_paused"


async def _wait_for(
    record: Callable[[str], JobRecord], job_id: str, done: Callable[[JobRecord], bool]
) -> JobRecord:
    job = await run_in_threadpool(record, job_id)
    for _ in range(int(STOP_WAIT_S / _POLL_S)):
        if done(job):
            break
        await asyncio.sleep(_POLL_S)
        job = await run_in_threadpool(record, job_id)
    return job


class Steering:
    """The pause, resume and cancel rules of ``JobService`` (which passes its store,
    runner, settings, and how it reads and shows a job)."""

    def __init__(
        self,
        store: Store,
        runner: Runner,
        settings: Settings,
        record: Callable[[str], JobRecord],
        out: Callable[[JobRecord], JobOut],
    ) -> None:
        self.store = store
        self.runner = runner
        self.settings = settings
        self.record = record
        self.out = out

    async def cancel(self, job_id: str) -> JobOut | JobStopping:
        job = await run_in_threadpool(self.record, job_id)
        if job.status in TERMINAL_STATUSES:
            raise Conflict(
                f"job {job_id} is already {job.status}; only queued, running or paused jobs "
                "can be cancelled"
            )
        if job.status == "paused":  # no runner holds it: cancelled here, at once
            await run_in_threadpool(self.store.finish_job, job_id, "cancelled")
        else:
            # Off the event loop: the runner may be busy recording (its lock).
            await run_in_threadpool(self.runner.cancel, job_id)
        job = await _wait_for(self.record, job_id, lambda j: j.status in TERMINAL_STATUSES)
        out = await run_in_threadpool(self.out, job)
        if job.status in TERMINAL_STATUSES:
            return out
        if job.status == "paused":  # resumed and paused again meanwhile: cancel that
            return await self.cancel(job_id)
        return JobStopping(
            state="cancelling",
            message=f"job {job_id} is stopping at its next step; it will be cancelled",
            job=out,
        )

    async def pause(self, job_id: str) -> JobOut | JobStopping:
        job = await run_in_threadpool(self.record, job_id)
        if job.status == "paused":
            raise Conflict(f"job {job_id} is already paused; resume it with POST .../resume")
        if job.status in TERMINAL_STATUSES:
            raise Conflict(
                f"job {job_id} is already {job.status}; only queued or running jobs can be paused"
            )
        limit = self.settings.max_paused_jobs
        paused = await run_in_threadpool(self.store.count_jobs, "paused")
        if paused >= limit:
            raise TooManyPaused(
                f"{paused} jobs are paused already and this server keeps at most {limit} "
                "(max_paused_jobs); resume or cancel one first",
                headers={"Retry-After": "10"},
            )
        asked = await run_in_threadpool(self.runner.pause, job_id)
        job = await _wait_for(
            self.record, job_id, lambda j: j.status == "paused" or j.status in TERMINAL_STATUSES
        )
        if job.status in TERMINAL_STATUSES:
            raise Conflict(f"job {job_id} ended ({job.status}) before it could be paused")
        out = await run_in_threadpool(self.out, job)
        if job.status == "paused":
            return out
        if not asked:
            raise Conflict(f"job {job_id} could not be paused now ({job.status}); try again")
        return JobStopping(
            state="pausing",
            message=f"job {job_id} is checkpointing at its next step; it will be paused",
            job=out,
        )

    async def resume(self, job_id: str) -> JobOut:
        job = await run_in_threadpool(self.record, job_id)
        if job.status != "paused":
            raise Conflict(
                f"job {job_id} is {job.status}; only paused jobs can be resumed "
                "(pause one with POST /jobs/{id}/pause)"
            )
        resumed = await run_in_threadpool(
            lambda: self.store.resume_job(job_id, max_queued=self.settings.max_queued_jobs)
        )
        if not resumed:
            now = await run_in_threadpool(self.record, job_id)
            raise Conflict(f"job {job_id} is {now.status}; only paused jobs can be resumed")
        await run_in_threadpool(self.runner.resume, job_id)
        return await run_in_threadpool(self.out, await run_in_threadpool(self.record, job_id))
