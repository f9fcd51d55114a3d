"""The entry point of a job process: its signals first, the heavy imports after.

A terminal's Ctrl-C reaches the whole process group, and some process managers
send SIGTERM to every process of a service: either one only asks the job to
stop between steps, checkpointed (its server decides what happens next), so a
signal meant for the server never fails a job. The handlers are installed
before numpy and the training code are imported, which leaves only the
interpreter's own start (tens of milliseconds) unprotected. The shard child
runs in a process group of its own and ignores both.
"""

from __future__ import annotations

import json
import logging
import signal
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from types import FrameType
from typing import Any

log = logging.getLogger("charnn.jobs")


def main(spec: dict[str, Any], conn: Connection, stop: Event) -> None:
    """Run one job (spawned: a fresh interpreter), reporting JSON messages over ``conn``."""
    asked = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal asked
        asked = True  # only a flag: an mp.Event's lock is not safe in a signal handler

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def send(message: dict[str, Any]) -> None:
        conn.send_bytes(json.dumps(message, allow_nan=False).encode())

    try:
        import os

        from .body import JobSpec, run_job

        job = JobSpec(**spec)
        if job.nice:
            os.nice(job.nice)  # inherited by the job's shard process
        run_job(job, send, lambda: asked or stop.is_set())
    except (BrokenPipeError, EOFError):
        pass  # the server is gone; the job resumes from its checkpoint at its next start
    except Exception as exc:  # a bug: report it without a traceback
        log.exception("job %s crashed", spec.get("job_id"))
        name = type(exc).__name__
        try:
            send({"type": "failed", "error": f"internal error in the training process ({name})"})
        except OSError:
            pass
    finally:
        conn.close()
