"""Datagrams between the processes of one ``charnn serve --workers N`` (Linux).

Each worker binds ``<base>/<pid>``, and the one that runs the jobs also
``<base>/runner``, where ``<base>`` is named after the owner's pid and the data
directory's device and inode. The names are in Linux's abstract socket
namespace: no file in the data directory to clean up after a crash, no length
limit on the directory's path, and the kernel frees a name the moment its
process dies, so the next runner can bind ``runner`` at once. Every datagram
carries its sender's credentials (``SO_PASSCRED``): only this user's processes
are heard (any of them could write the data directory anyway).

Sends never block the sender: a peer gone is reported (``send`` returns False),
a peer whose buffer is full misses that datagram. Nothing here is the truth:
the store is, and ``app/jobs/role.py`` says what covers a lost datagram.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger("charnn.jobs")

MAX_DATAGRAM = 64 * 1024  # far above any message sent (a progress event is ~300 bytes)
_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def base_name(data_dir: Path, owner: int) -> bytes:
    """The abstract-namespace prefix of one server's sockets."""
    st = os.stat(data_dir)
    digest = hashlib.sha256(f"{owner}:{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:24]
    return b"\0charnn/" + digest.encode()


class Endpoint:
    """One bound, non-blocking datagram socket; ``OSError`` if the name is taken."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind(name)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[dict[str, Any]]:
        """Every datagram waiting, decoded: this user's JSON objects, the rest dropped."""
        found: list[dict[str, Any]] = []
        space = socket.CMSG_SPACE(_CREDENTIALS.size)
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(MAX_DATAGRAM, space)
            except (BlockingIOError, InterruptedError):
                return found
            except OSError:
                log.warning("a datagram socket of this server failed", exc_info=True)
                return found
            if not _from_this_user(ancillary):
                continue
            try:
                message = json.loads(data)
            except ValueError:
                continue
            if isinstance(message, dict):
                found.append(message)

    def send(self, to: bytes, message: dict[str, Any]) -> bool:
        """Send without waiting; False only if nobody has the name ``to`` (gone)."""
        try:
            self.sock.sendto(json.dumps(message).encode(), to)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, InterruptedError):
            pass  # its buffer is full: this one is lost
        except OSError:
            log.debug("a datagram to a process of this server failed", exc_info=True)
        return True

    def close(self) -> None:
        self.sock.close()


def _from_this_user(ancillary: list[tuple[int, int, bytes]]) -> bool:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            if len(data) >= _CREDENTIALS.size:
                _, uid, _ = _CREDENTIALS.unpack_from(data)
                return bool(uid == os.getuid())
    return False
