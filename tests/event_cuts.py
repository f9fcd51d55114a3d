"""Following a job's event stream with the connection cut at random bytes, resuming with
Last-Event-ID: what tests/app/api/test_event_replay.py and tests/test_event_replay_scale_out.py
share. Parsed as an SSE client parses: only complete events (a blank line ends one) count."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
# A cut lands anywhere in the next few events: inside one, between two, in a comment.
CUT_BYTES = (1, 3000)


@dataclass(frozen=True)
class Ev:
    event: str
    data: dict[str, Any]
    id: int | None


def parse(raw: bytes) -> list[Ev]:
    """The complete events of a (possibly cut) stream; comments and bare retry hints skipped."""
    text = raw.decode("utf-8", errors="replace")
    blocks = text.split("\n\n")[:-1]  # the last piece is unfinished (or empty)
    out = []
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "data" in fields:
            event_id = int(fields["id"]) if "id" in fields else None
            out.append(Ev(fields.get("event", "message"), json.loads(fields["data"]), event_id))
    return out


def read(url: str, job_id: str, after: int | None, cut: int | None = None) -> list[Ev]:
    """One connection: every complete event until the server ends the stream, or until
    ``cut`` bytes arrived (then the connection is dropped mid-stream)."""
    headers = {} if after is None else {"Last-Event-ID": str(after)}
    raw = b""
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            raw += chunk
            if cut is not None and len(raw) >= cut:
                raw = raw[:cut]
                break
    return parse(raw)


def with_ids(events: list[Ev]) -> list[Ev]:
    """The replayable part of a stream: the events that carry an id."""
    return [e for e in events if e.id is not None]


def check_increasing(events: list[Ev]) -> None:
    ids = [e.id for e in with_ids(events) if e.id is not None]
    assert ids == sorted(set(ids)), ids


def follow_with_cuts(
    urls: Callable[[int], str],
    job_id: str,
    rng: random.Random,
    cuts: int,
    before_each: Callable[[], None] = lambda: None,
) -> tuple[list[Ev], int]:
    """``cuts`` connections (to ``urls(i)``) each dropped after a random number of bytes,
    every one resuming after the last id received (0 first: from the start); returns the
    events received and the last id."""
    got: list[Ev] = []
    after = 0
    for i in range(cuts):
        before_each()
        for e in read(urls(i), job_id, after, rng.randint(*CUT_BYTES)):
            if e.id is not None:
                assert e.id > after, (e, after)  # nothing the client has already seen
                after = e.id
            got.append(e)
    return got, after


class Uninterrupted(threading.Thread):
    """One connection from the start (Last-Event-ID 0) to the end, in the background."""

    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id = url, job_id
        self.events: list[Ev] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.events = read(self.url, self.job_id, 0)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self.error = e

    def result(self) -> list[Ev]:
        self.join(timeout=120)
        assert not self.is_alive(), "the uninterrupted stream did not end"
        if self.error is not None:
            raise self.error
        return self.events


def check_same_sequence(cut: list[Ev], whole: list[Ev], replay: list[Ev]) -> None:
    """The cut-and-resumed stream's events are exactly the uninterrupted stream's (and a
    replay's after the end): same events, same ids, same data, none twice, none missing."""
    for events in (cut, whole, replay):
        check_increasing(events)
    assert with_ids(replay), "no events"
    final = replay[-1]
    assert final.event == "status" and final.data["status"] in TERMINAL, final
    assert final.id == final.data["progress"]["step"] + 1
    assert all(e.event == "progress" for e in with_ids(replay)[:-1])
    assert with_ids(cut) == with_ids(replay)
    assert with_ids(whole) == with_ids(replay)
