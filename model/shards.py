"""Data-parallel loss_and_grads: the batch split into column shards computed at once.

The shard count depends only on B (two when B >= 2), never on how the shards
are run, so the weights are bit-identical whichever back-end runs them:

- ``ThreadShards``: a thread per shard, one BLAS thread each. numpy releases
  the GIL inside BLAS and ufunc loops, but the per-time-step Python between
  those calls still contends for it: measured here, two B=32 shards took
  23-25 ms in two threads against 20 ms each alone (H=256, T=64).
- ``ProcessShards``: shard 0 in the calling process, shard 1 in a spawned child
  that reads the weights and batch from shared memory and writes its gradients
  back there. No GIL between them: 20 ms, as alone. One pipe round trip per
  step (tens of microseconds) is the whole overhead, so it is the default for
  models big enough to amortise the child's start (about 0.3 s).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

from .params import Params
from .rnn import Workspace, loss_and_grads

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)

# n_a * B * T at or above which a training run uses a child process by default.
PROCESS_MIN_WORK = 64 * 64 * 64
# How long each side polls for the other's word before blocking. Waking a blocked
# process took 0.15-0.3 ms on a 2 vCPU VM (2026-12-03), per hand-off, twice a step;
# the wait is normally shorter than this, and each side has a core of its own.
SPIN_S = 0.005


def _recv(conn: Connection, spin_s: float = SPIN_S) -> bytes:
    deadline = time.perf_counter() + spin_s
    while not conn.poll(0) and time.perf_counter() < deadline:
        pass
    return conn.recv_bytes()


def shard_slices(B: int) -> list[slice]:
    n = 2 if B >= 2 else 1
    bounds = np.linspace(0, B, n + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Shards(Protocol):
    grads: Params  # combined gradient of the whole batch
    hidden: np.ndarray  # (B, n_a) last hidden state of the whole batch

    def __call__(self, params: Params, X: np.ndarray, Y: np.ndarray, h0: np.ndarray) -> float: ...

    def close(self) -> None: ...


def _shard_loss(
    params: Params, X: np.ndarray, Y: np.ndarray, h0: np.ndarray, s: slice, ws: Workspace
) -> tuple[float, Params, np.ndarray]:
    return loss_and_grads(
        params,
        np.ascontiguousarray(X[:, s]),
        np.ascontiguousarray(Y[:, s]),
        np.ascontiguousarray(h0[s]),
        ws,
    )


class _Combine:
    """Weighted sum of shard gradients, in shard order (the order fixes the bits)."""

    def __init__(self, params: Params, B: int) -> None:
        self.slices = shard_slices(B)
        self.weights: list[float] = [(s.stop - s.start) / B for s in self.slices]
        self.grads = Params.zeros(params.n_a, params.n_x, params.dtype)
        self.hidden = np.empty((B, params.n_a), params.dtype)
        self._scaled = np.empty_like(self.grads.flat)

    def combine(self, i: int, loss: float, g: np.ndarray, h_last: np.ndarray) -> float:
        w = self.weights[i]
        if i == 0:
            np.multiply(g, w, out=self.grads.flat)
        else:
            np.multiply(g, w, out=self._scaled)  # w * g, as before, without a temporary
            self.grads.flat[...] += self._scaled
        self.hidden[self.slices[i]] = h_last
        return w * float(loss)


class ThreadShards(_Combine):
    def __init__(self, params: Params, T: int, B: int, threads: int) -> None:
        super().__init__(params, B)
        self.workspaces = [Workspace.for_batch(params, T, s.stop - s.start) for s in self.slices]
        n = len(self.slices)
        self.pool = ThreadPoolExecutor(threads) if threads > 1 and n > 1 else None

    def __call__(self, params: Params, X: np.ndarray, Y: np.ndarray, h0: np.ndarray) -> float:
        def run(i: int) -> tuple[float, Params, np.ndarray]:
            return _shard_loss(params, X, Y, h0, self.slices[i], self.workspaces[i])

        idx = range(len(self.slices))
        outs = list(self.pool.map(run, idx)) if self.pool else [run(i) for i in idx]
        return sum(self.combine(i, l, g.flat, h) for i, (l, g, h) in enumerate(outs))

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


class _Shared:
    """Named arrays laid out in one shared-memory block."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: dict[str, tuple[Any, ...]]):
        self.shm = shm
        self.arrays: dict[str, np.ndarray] = {}
        offset = 0
        for name, (shape, dtype) in layout.items():
            arr: np.ndarray = np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=offset)
            self.arrays[name] = arr
            offset += (arr.nbytes + 63) // 64 * 64

    @staticmethod
    def size(layout: dict[str, tuple[Any, ...]]) -> int:
        return sum(
            (int(np.prod(shape)) * np.dtype(dtype).itemsize + 63) // 64 * 64
            for shape, dtype in layout.values()
        )


def _layout(n_a: int, n_x: int, T: int, B: int, dtype: str) -> dict[str, tuple[Any, ...]]:
    P = n_a * n_x * 2 + n_a * n_a + n_a + n_x
    b1 = shard_slices(B)[-1]
    b = b1.stop - b1.start
    return {
        "params": ((P,), dtype),
        "grads": ((P,), dtype),
        "X": ((T, b), np.int32),
        "Y": ((T, b), np.int32),
        "h0": ((b, n_a), dtype),
        "h_last": ((b, n_a), dtype),
        "loss": ((1,), np.float64),
    }


def _child(name: str, n_a: int, n_x: int, T: int, B: int, dtype: str, conn: Connection) -> None:
    """The second shard's process: wait for b"go", compute, answer b"ok"."""
    from multiprocessing import resource_tracker

    shm = shared_memory.SharedMemory(name=name)
    # This process has its own resource tracker, which would unlink the parent's
    # block when this process exits; the parent owns it.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    a: dict[str, np.ndarray] = {}
    try:
        a = _Shared(shm, _layout(n_a, n_x, T, B, dtype)).arrays
        params = Params.from_flat(a["params"], n_a, n_x)
        ws = Workspace.for_batch(params, T, a["X"].shape[1])
        with threadpool_limits(1):
            while _recv(conn) == b"go":
                try:
                    loss, g, h_last = loss_and_grads(params, a["X"], a["Y"], a["h0"], ws)
                    a["grads"][...] = g.flat
                    a["h_last"][...] = h_last
                    a["loss"][0] = loss
                    conn.send_bytes(b"ok")
                except Exception as exc:  # reported to the parent, which raises
                    conn.send_bytes(b"error: " + repr(exc).encode())
    except (EOFError, OSError):
        pass  # the parent went away
    finally:
        a.clear()
        params = ws = None  # type: ignore[assignment]
        shm.close()


class ProcessShards(_Combine):
    def __init__(self, params: Params, T: int, B: int) -> None:
        super().__init__(params, B)
        if len(self.slices) != 2:
            raise ValueError("process shards need B >= 2")
        dtype = str(params.dtype)
        layout = _layout(params.n_a, params.n_x, T, B, dtype)
        self._shm = shared_memory.SharedMemory(create=True, size=_Shared.size(layout))
        self._shared = _Shared(self._shm, layout).arrays
        self._ws = Workspace.for_batch(params, T, self.slices[0].stop)
        # A plain subprocess, not multiprocessing: spawn would re-import the
        # caller's __main__, which breaks scripts without a main guard.
        ours, theirs = socket.socketpair()
        args = [self._shm.name, params.n_a, params.n_x, T, B, dtype, theirs.fileno()]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "model.shards", *map(str, args)],
            pass_fds=[theirs.fileno()],
            env=_child_env(),
            # Its own process group: a terminal's Ctrl-C (or a signal to the job's group)
            # never reaches it, even before it ignores them; it ends with its pipe.
            process_group=0,
        )
        theirs.close()
        self._conn = Connection(ours.detach())

    def __call__(self, params: Params, X: np.ndarray, Y: np.ndarray, h0: np.ndarray) -> float:
        a, s1 = self._shared, self.slices[1]
        a["params"][...] = params.flat
        a["X"][...] = X[:, s1]
        a["Y"][...] = Y[:, s1]
        a["h0"][...] = h0[s1]
        try:
            self._conn.send_bytes(b"go")
        except OSError:
            raise RuntimeError("the training shard process died") from None
        loss0, g0, h0_last = _shard_loss(params, X, Y, h0, self.slices[0], self._ws)
        total = self.combine(0, loss0, g0.flat, h0_last)
        try:
            answer = _recv(self._conn)
        except (EOFError, OSError):
            raise RuntimeError("the training shard process died") from None
        if answer != b"ok":
            raise RuntimeError(f"the training shard process failed: {answer.decode()}")
        return total + self.combine(1, float(a["loss"][0]), a["grads"], a["h_last"])

    def close(self) -> None:
        try:
            self._conn.send_bytes(b"quit")
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()
        del self._shared
        self._shm.close()
        self._shm.unlink()


def _child_env() -> dict[str, str]:
    """One BLAS thread, and model/ importable even when run from a source tree."""
    path = os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def make_shards(params: Params, T: int, B: int, threads: int, mode: str = "auto") -> Shards:
    """mode: "auto" (a process for big enough work), "process", or "thread"."""
    if threads > 1 and B >= 2:
        if mode == "process" or (mode == "auto" and params.n_a * B * T >= PROCESS_MIN_WORK):
            return ProcessShards(params, T, B)
    return ThreadShards(params, T, B, threads)


if __name__ == "__main__":
    # A terminal Ctrl-C or a SIGTERM to the process group reaches this child too; it must
    # not die of them (the step would fail with "the training shard process died"). The
    # parent stops between steps and then sends b"quit" or closes the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _name, *_ints, _dtype, _fd = sys.argv[1:]
    _n_a, _n_x, _T, _B = map(int, _ints)
    _child(_name, _n_a, _n_x, _T, _B, _dtype, Connection(int(_fd)))
