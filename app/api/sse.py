"""Server-Sent Events, formatted once for every stream the API sends."""

from __future__ import annotations

import json
from typing import Any


def sse_event(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    """One Server-Sent Event; an ``id`` lets a browser resume with Last-Event-ID."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"
