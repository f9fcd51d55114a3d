"""Faults of the machine in plain words: what a user or operator is told, never a path.

An ``OSError``'s ``str()`` names the file it failed on (the data directory's
absolute path) and reads like a traceback; job errors and HTTP error bodies are
shown to anyone, so they say what happened and what to do instead.
"""

from __future__ import annotations

import errno
import sqlite3

_PLAIN = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the data directory is on a read-only file system",
    errno.EACCES: "the data directory is not writable (permission denied)",
    errno.EPERM: "the data directory is not writable (operation not permitted)",
    errno.EIO: "the disk reported an I/O error",
    errno.ENOMEM: "the machine is out of memory",
}


def describe_os_error(exc: BaseException) -> str:
    """One plain phrase for a failed write or read, without any path."""
    if isinstance(exc, OSError) and exc.errno in _PLAIN:
        return _PLAIN[exc.errno]
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        if "full" in text:
            return "the disk is full"
        if "readonly" in text or "read-only" in text:
            return "the data directory is not writable"
        if "malformed" in text or "not a database" in text:
            return "the database file is damaged"
        if "disk i/o" in text:
            return "the disk reported an I/O error"
        return "the database could not be written"
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0)
        return f"the data directory could not be written ({name or type(exc).__name__})"
    return f"an unexpected {type(exc).__name__}"
