"""The events of ``GET /jobs/{id}/events``, built in one place from what the store holds.

A stream resumes exactly (``Last-Event-ID``) because every event with an id is a
function of stored rows: a ``progress`` event is one metric point (id: its step,
strictly increasing per job), the final ``status`` event is the finished job (id:
its last step + 1, above every point's). Live and replayed events are the same
events: the hub's messages only say "something new"; the stream then reads the
points after the last one it sent, so a dropped datagram or pub/sub message
delays an event, never loses it, and a reconnect cannot see one twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import Invalid
from ..store.base import JobRecord, MetricPoint
from .schemas import JobOut

Event = tuple[str, dict[str, Any], int | None]  # (event name, data, id): an SSE event

# Beyond any step a job can reach (max_steps is bounded far below): a larger id is a typo.
MAX_EVENT_ID = 10**15


@dataclass
class Best:
    """The best validation loss up to a point, counted as the service's note counts it
    (strictly lower is better), so a replayed point says what the live one said."""

    step: int | None = None
    val_loss: float | None = None

    def see(self, step: int, val_loss: float | None) -> None:
        if val_loss is None or not math.isfinite(val_loss):
            return
        if self.val_loss is None or val_loss < self.val_loss:
            self.step, self.val_loss = step, val_loss

    @classmethod
    def before(cls, evals: Iterable[tuple[int, float]], after: int) -> Best:
        """The best over the validation points at steps ``<= after``."""
        best = cls()
        for step, val in evals:
            if step <= after:
                best.see(step, val)
        return best


def total_steps(job: JobRecord) -> int | None:
    total = job.total_steps or job.hyperparameters.get("max_steps")
    return int(total) if total else None


def progress_event(point: MetricPoint, total: int | None, best: Best) -> Event:
    """One metric point as a ``progress`` event (``best`` is updated with it): the
    point's fields as ``GET /jobs/{id}/metrics`` has them, plus ``total_steps`` and
    the best validation so far. Non-finite numbers are null (JSON has none)."""
    best.see(point.step, point.val_loss)
    data: dict[str, Any] = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in asdict(point).items()
    }
    data.update(total_steps=total, best_step=best.step, best_val_loss=best.val_loss)
    return "progress", data, point.step


def status_event(job: JobOut, event_id: int | None) -> Event:
    """The job as ``GET /jobs/{id}`` answers it; ``event_id`` is ``final_id`` for a
    finished job, the job's step for the snapshot a new stream starts with, and None
    for a change on the way (running, queued, paused: live only, never replayed)."""
    return "status", job.model_dump(), event_id


def final_id(job: JobRecord) -> int:
    """The final ``status`` event's id: above every point's (none is past the job's step)."""
    return job.step + 1


def last_event_id(header: str | None, query: int | None) -> int | None:
    """Where a stream resumes: the ``Last-Event-ID`` header (what a browser sends when it
    reconnects by itself), else the ``last_event_id`` query parameter; None: from now."""
    if header is None or not header.strip():
        return query
    raw = header.strip()
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_EVENT_ID:
        raise Invalid(
            f"Last-Event-ID {raw[:32]!r} is not an event id of this stream: ids are whole "
            f"numbers from 0 to {MAX_EVENT_ID} (0: every event from the start)"
        )
    return int(raw)
