"""What the job service and the app's lifespan ask of a job runner.

Two implement it: ``LocalRunner`` (``local.py``: processes of this server, the
embedded default) and ``CeleryRunner`` (``celery.py``: Celery workers anywhere,
for scale-out). Both drive jobs through the same ``Lifecycle``. Under ``charnn
serve --workers N`` each worker's ``LocalRunner`` is wrapped in a ``RunnerRole``
(``role.py``): only the worker holding the role runs it.
"""

from __future__ import annotations

from typing import Protocol


class Runner(Protocol):
    def start(self) -> None: ...
    def begin_stop(self) -> None:
        """Ask every running job to stop between steps, checkpointed; return at once."""
        ...

    def stop(self) -> None: ...
    def submit(self, job_id: str) -> None: ...
    def cancel(self, job_id: str) -> bool:
        """True if the job was queued or running (it ends ``cancelled``)."""
        ...

    def pause(self, job_id: str) -> bool:
        """True if the job was queued (now ``paused``) or running (it stops at its next
        step, checkpointed there, and becomes ``paused``)."""
        ...

    def resume(self, job_id: str) -> None:
        """Run again a job the store moved from ``paused`` back to ``queued``."""
        ...

    def alive(self) -> bool: ...
