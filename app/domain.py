"""The words of the service's domain, defined once and importable without numpy.

A job's statuses, which of them are active or final, and the rule for names
are used by the store, the job runners, the schemas, the client and the CLI:
each imports them from here, so adding a status or changing the name rule is
one edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, StringConstraints

# Where `charnn serve` listens by default, and so where the client and `charnn remote` look.
DEFAULT_URL = "http://127.0.0.1:8000"

JobStatus = Literal["queued", "running", "paused", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
# Active: a runner holds the job (queued for a slot, or training); a crash-restart resumes
# these. A paused job is checkpointed and held by no runner: not active (it stays paused
# across restarts) and not finished (it can be resumed or cancelled, not deleted).
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("queued", "running")
UNFINISHED_STATUSES: tuple[JobStatus, ...] = ("queued", "running", "paused")
TERMINAL_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class ModelLimits:
    """This server's ceilings for any stored model, uploaded or trained (from the settings)."""

    max_hidden_size: int
    max_vocab_size: int
    max_model_bytes: int


MAX_NAME_CHARS = 200
SURROGATES = "lone UTF-16 surrogate (\\ud800-\\udfff)"


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None.

    Text is stored in SQLite or PostgreSQL and sent back as JSON, so it must be
    valid Unicode (a lone UTF-16 surrogate cannot be encoded as UTF-8) without
    NUL (PostgreSQL text cannot hold it)."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"contains a {SURROGATES}; strings must be valid Unicode text"
    return None


def first_text_problem(value: Any, where: str = "") -> str | None:
    """The first string (or object key) anywhere in a JSON-like value that cannot be
    stored, as ``"where: why"``; None when every string is fine."""
    if isinstance(value, str):
        problem = text_problem(value)
        return f"{where or 'value'} {problem}" if problem else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)):
                return f"a key of {where or 'the object'} {problem}"
            if found := first_text_problem(item, f"{where}.{key}" if where else str(key)):
                return found
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            if found := first_text_problem(item, f"{where}[{i}]"):
                return found
    return None


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# A job's or a model's name, at every door (JSON body, multipart form, query string,
# an uploaded checkpoint's metadata): 1 to 200 characters of storable text.
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NAME_CHARS),
    AfterValidator(_storable),
]
