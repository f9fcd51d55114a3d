"""Processes that die with the process that started them (Linux's parent-death signal).

A job process whose runner was killed (``kill -9``, the OOM killer) would train on
until its next report found the pipe closed, while the process that took over
the runner role resumed the same job from its checkpoint: one job trained twice
for a while, both writing its ``state.npz``. A worker of ``charnn serve
--workers N`` whose parent was killed would go on serving, and running jobs,
beside the next server started on the directory the dead parent no longer
locks. With ``PR_SET_PDEATHSIG`` the kernel sends SIGKILL the moment the parent
(the thread that started the child: the runner's supervisor thread, uvicorn's
main thread) is gone, and the job resumes from its last checkpoint, as after a
crash of the whole server. Elsewhere than Linux this does nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from typing import Any

from . import process

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Be sent ``sig`` when ``parent`` (this process's parent now) dies; at once if it
    already has (it may die before the signal is armed)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def job_main(parent: int, spec: dict[str, Any], conn: Connection, stop: Event) -> None:
    """The job process's entry point: :func:`app.jobs.process.main`, tied to ``parent``."""
    die_with_parent(parent)
    process.main(spec, conn, stop)
