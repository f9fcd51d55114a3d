"""Crash-safe file writes."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

_DEFAULT_UMASK = 0o022
# Test-only: seconds to pause half-way through writing the temporary file, so a test
# can land a kill -9 inside a checkpoint or model write (tests/test_faults.py).
# Ignored unless set to a number in (0, 60]; never set it in production.
_SLOW_WRITE_ENV = "CHARNN_TEST_SLOW_WRITE_S"


def _test_pause() -> None:
    raw = os.environ.get(_SLOW_WRITE_ENV)
    if not raw:
        return
    try:
        delay = float(raw)
    except ValueError:
        return
    if 0 < delay <= 60:
        time.sleep(delay)


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads
    # creating files; Linux exposes it read-only in /proc.
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _DEFAULT_UMASK


def _fsync_dir(directory: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows cannot open directories; nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace the file at ``path`` with ``data`` so readers never see a partial file.

    The bytes go to a temporary file in the same directory (same filesystem, so
    the rename is atomic), are fsynced, and the temporary file is renamed over
    the target; the directory is then fsynced so the rename itself survives a
    power loss. A crash at any point leaves either the old file or the new one,
    never a half-written one. The temporary file is removed if anything fails.
    The new file gets the existing file's permissions, else the usual
    ``0o666 & ~umask`` (mkstemp alone would make it owner-only).
    """
    target = Path(path)
    directory = target.parent
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            view, half = memoryview(data), len(data) // 2
            f.write(view[:half])
            f.flush()
            _test_pause()  # no-op unless the test-only variable is set
            f.write(view[half:])
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
