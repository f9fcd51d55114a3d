"""The runner role under ``charnn serve --workers N``: every process serves, one runs jobs.

The parent holds the data directory's lock (``charnn.lock``: a second server is
refused); each worker opens the store trusting it (``SqliteStore(owner=...)``)
and wraps its ``LocalRunner`` in a :class:`RunnerRole`. The worker that holds
an exclusive ``flock`` on ``data_dir/runner.lock`` runs the jobs; the others try
to take it every ``TAKE_EVERY_S``. The kernel releases the lock however its
holder dies, so a killed runner's role passes to another worker within about
half a second, and only the taker's ``LocalRunner.start`` runs, once: the
crash-resume path (jobs left ``queued`` or ``running`` go back to the queue and
resume from their checkpoints). The dead runner's job processes died with it
(``app/jobs/lifeline.py``), so no job ever trains twice.

Everything goes through the store, which is the truth; datagrams
(``app/jobs/peers.py``) only make it fast:

- submit: the job row is ``queued`` (the queue's room checked in its insert
  transaction, as before); the process says "wake" to ``<base>/runner``, whose
  holder reads the queued jobs (oldest first) and ``adopt``s those it does not
  know. It also reads them every ``POLL_EVERY_S``, so a lost wake-up, or one
  sent while the role was passing, costs at most that.
- cancel (and pause): recorded in ``cancel_requests`` (``pause_requests``), then
  "wake"; the runner cancels (pauses) as a
  single server does (a queued job at once, a running one between steps), and
  the outcome removes the request. POST /jobs/{id}/cancel still waits for the
  outcome (``JobService.cancel``), so its answer is what it was with one process.
- events: a process with subscribers to a job asks the runner for its events
  ("follow", renewed every ``RENEW_EVERY_S``, valid ``LEASE_S``); the runner
  sends each event it announces to the followers as a datagram, and they feed
  their ``EventHub``. A follower also reads its followed jobs' rows at each
  renewal: a job finished whose final event was lost (a full buffer, the role
  passing) still ends every stream within a second.
- models: ``models_version`` is a row (``app/store/sqlite.py``), so a model
  stored or deleted by any process is seen by every cache on its next request.

The role is not taken while the server is stopping (the parent says so in the
lock file before it signals the workers), so a stopping server never resumes the
jobs it is stopping; a worker stopped alone (uvicorn's SIGHUP restart, SIGTTOU)
hands the role, and its checkpointed jobs, to another.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any

from ..domain import ACTIVE_STATUSES, TERMINAL_STATUSES
from ..store.base import StoreError, WorkerStore, valid_id
from ..store.faults import describe_os_error
from ..store.sqlite import owner_stopping
from . import lifeline, peers
from .events import EventHub
from .local import LocalRunner

log = logging.getLogger("charnn.jobs")

ROLE_NAME = "runner.lock"
TAKE_EVERY_S = 0.5  # how often a worker without the role tries to take it
POLL_EVERY_S = 0.5  # how often the runner reads the store's queue and cancels unasked
RENEW_EVERY_S = 1.0  # how often a follower renews its request (and reads its jobs' rows)
LEASE_S = 3.0  # how long a follow request holds without renewal
MAX_FOLLOWED = 1000  # job ids in one follow request (only active jobs are ever followed)


class RunnerRole:
    """The ``Runner`` of one worker: its ``LocalRunner`` once it holds the role, else
    the store and a word to the process that does."""

    def __init__(
        self, store: WorkerStore, local: LocalRunner, events: EventHub, owner: int
    ) -> None:
        self.store = store
        self.local = local
        self.events = events
        self.owner = owner
        local.on_event = self._announce
        base = peers.base_name(store.data_dir, owner)
        self._runner_name = base + b"/runner"
        self._follower_base = base + b"/"
        self._me = peers.Endpoint(self._follower_base + str(os.getpid()).encode())
        self._runner_end: peers.Endpoint | None = None
        path = store.data_dir / ROLE_NAME
        try:
            self._role_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._me.close()
            raise StoreError(f"cannot use {path}: {describe_os_error(e)}") from None
        self._role_lock = threading.Lock()  # taking the role vs. begin_stop
        self._is_runner = False
        self._stopping = False
        self._closed = False
        self._leases: dict[int, tuple[frozenset[str], float]] = {}  # follower pid -> lease
        self._leases_lock = threading.Lock()
        self._cancelling: set[str] = set()  # requests passed to the LocalRunner
        self._pausing: set[str] = set()  # likewise
        self._poked = threading.Event()  # read the store now
        self._kick_r, self._kick_w = socket.socketpair()
        self._kick_r.setblocking(False)
        self._kick_w.setblocking(False)
        self._thread: threading.Thread | None = None

    @property
    def is_runner(self) -> bool:
        return self._is_runner

    # ------------------------------------------------------------------ Runner

    def start(self) -> None:
        """Die with the server's parent process; take the role if it is free (one of
        the workers starting together gets it now), then watch for it."""
        lifeline.die_with_parent(self.owner)
        self._take()
        self.events.on_subscribe = self._followed_now
        self._thread = threading.Thread(target=self._run, name="charnn-role", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        """The job is stored ``queued``: the runner adopts it from there."""
        self._wake_runner()

    def cancel(self, job_id: str) -> bool:
        job = self.store.request_cancel(job_id)
        self._wake_runner()
        return job is not None and job.status in ACTIVE_STATUSES

    def pause(self, job_id: str) -> bool:
        """Recorded in ``pause_requests`` for the runner, as a cancel is."""
        asked = self.store.request_pause(job_id)
        self._wake_runner()
        return asked

    def resume(self, job_id: str) -> None:
        """The job is stored ``queued`` again: the runner adopts it from there."""
        self._wake_runner()

    def begin_stop(self) -> None:
        with self._role_lock:
            self._stopping = True
            if self._is_runner:
                self.local.begin_stop()

    def stop(self) -> None:
        """Stop the jobs (the runner), then the thread; the role is released last."""
        if self._role_fd < 0:
            return  # stopped already
        self.begin_stop()
        if self._is_runner:
            self.local.stop()
        self._closed = True
        self._kick()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.events.on_subscribe = None
        for end in (self._me, self._runner_end):
            if end is not None:
                end.close()
        self._kick_r.close()
        self._kick_w.close()
        fd, self._role_fd = self._role_fd, -1
        os.close(fd)  # releases the role, if held

    def alive(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return False
        return not self._is_runner or self.local.alive()

    # ------------------------------------------------------------------ the role

    def _take(self) -> None:
        """Take the role if it is free and the server is not stopping."""
        try:
            fcntl.flock(self._role_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another worker runs the jobs
        with self._role_lock:
            # Checked with the lock held: the runner that released it stopped after the
            # parent wrote "stopping", so no worker can miss it and restart its jobs.
            if self._stopping or owner_stopping(self.store.data_dir):
                fcntl.flock(self._role_fd, fcntl.LOCK_UN)
                return
            try:
                os.ftruncate(self._role_fd, 0)
                os.pwrite(self._role_fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # only for whoever looks
            try:
                self._runner_end = peers.Endpoint(self._runner_name)
            except OSError as e:  # another user's process squats the name: poll only
                log.warning("no wake-up socket for the job runner (%s): polling the store", e)
            self.local.start()  # requeues what a dead runner left running: once per takeover
            self._is_runner = True
        log.info("process %d runs the training jobs", os.getpid())
        self._poked.set()

    def _run(self) -> None:
        next_take = next_poll = next_renew = 0.0
        while not self._closed:
            try:
                now = time.monotonic()
                if not self._is_runner and now >= next_take:
                    next_take = now + TAKE_EVERY_S
                    self._take_or_leave()
                if self._is_runner and (self._poked.is_set() or now >= next_poll):
                    self._poked.clear()
                    next_poll = now + POLL_EVERY_S
                    self._poll_store()
                if not self._is_runner and now >= next_renew:
                    next_renew = now + RENEW_EVERY_S
                    self._renew()
                due = next_poll if self._is_runner else min(next_take, next_renew)
                self._wait(max(0.0, due - time.monotonic()))
            except Exception:  # never let the role die with one bad moment
                log.exception("the job runner role's thread failed; going on")
                time.sleep(0.5)

    def _take_or_leave(self) -> None:
        try:
            self._take()
        except Exception:
            # The store refused the takeover (a full disk, a damaged database): this
            # worker stops, which releases the role for another one (uvicorn restarts it).
            log.exception("could not take over the training jobs; stopping this worker")
            os.kill(os.getpid(), signal.SIGTERM)
            self._closed = True

    def _wait(self, timeout: float) -> None:
        runner_end = self._runner_end
        ends: list[Any] = [self._me, self._kick_r]
        if runner_end is not None:
            ends.append(runner_end)
        ready, _, _ = select.select(ends, [], [], timeout)
        if self._kick_r in ready:
            try:
                while self._kick_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        if runner_end is not None and runner_end in ready:
            for message in runner_end.receive():
                self._as_runner(message)
        if self._me in ready:
            for message in self._me.receive():
                self._as_follower(message)

    def _kick(self) -> None:
        try:
            self._kick_w.send(b"!")
        except OSError:
            pass  # full (already kicked) or closed

    # ------------------------------------------------------------------ runner side

    def _poll_store(self) -> None:
        """Adopt the jobs others stored, then act on the cancels others recorded."""
        try:
            self.local.adopt(self.store.queued_job_ids())
            requests = self.store.cancel_requests()
            pauses = self.store.pause_requests()
        except StoreError as e:
            log.warning("could not read the job queue: %s", e)
            return
        for job_id in requests:
            if job_id not in self._cancelling and self.local.cancel(job_id):
                self._cancelling.add(job_id)  # once: a repeat would restart its grace period
        self._cancelling.intersection_update(requests)
        for job_id in pauses:
            if job_id not in self._pausing and self.local.pause(job_id):
                self._pausing.add(job_id)
        self._pausing.intersection_update(pauses)

    def _as_runner(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "wake":
            self._poked.set()
        elif op == "follow":
            pid, jobs = message.get("pid"), message.get("jobs")
            if not isinstance(pid, int) or not isinstance(jobs, list):
                return
            wanted = frozenset(j for j in jobs[:MAX_FOLLOWED] if valid_id(j))
            with self._leases_lock:
                if wanted:
                    self._leases[pid] = (wanted, time.monotonic() + LEASE_S)
                else:
                    self._leases.pop(pid, None)

    def _announce(self, job_id: str, message: dict[str, Any]) -> None:
        """A job's event (the LocalRunner's threads): here, and to every follower."""
        self.events.publish(job_id, message)
        now = time.monotonic()
        with self._leases_lock:
            for pid in [p for p, (_, until) in self._leases.items() if until < now]:
                del self._leases[pid]
            followers = [p for p, (jobs, _) in self._leases.items() if job_id in jobs]
        if not followers:
            return
        datagram = {"op": "event", "job": job_id, "message": message}
        for pid in followers:
            if not self._me.send(self._follower_base + str(pid).encode(), datagram):
                with self._leases_lock:
                    self._leases.pop(pid, None)  # gone (killed, restarted)

    # ------------------------------------------------------------------ follower side

    def _as_follower(self, message: dict[str, Any]) -> None:
        job_id, event = message.get("job"), message.get("message")
        if message.get("op") == "event" and isinstance(job_id, str) and isinstance(event, dict):
            self.events.publish(job_id, event)

    def _wake_runner(self) -> None:
        if self._is_runner:
            self._poked.set()
            self._kick()
        else:
            self._me.send(self._runner_name, {"op": "wake"})

    def _followed_now(self, job_id: str) -> None:
        """A job's first subscriber here (on the event loop): ask for its events now."""
        if not self._is_runner:
            self._send_follow(self.events.followed())

    def _send_follow(self, jobs: list[str]) -> None:
        message = {"op": "follow", "pid": os.getpid(), "jobs": jobs[:MAX_FOLLOWED]}
        self._me.send(self._runner_name, message)

    def _renew(self) -> None:
        """Renew the follow request; end the streams of jobs that finished meanwhile."""
        jobs = self.events.followed()
        if not jobs:
            return
        self._send_follow(jobs)
        for job_id in jobs:
            try:
                job = self.store.get_job(job_id)
            except StoreError:
                return  # the next renewal asks again
            if job is not None and job.status in TERMINAL_STATUSES:
                # JobService.follow reads the job's final state from the store on this.
                self.events.publish(job_id, {"type": "status", "status": job.status})
