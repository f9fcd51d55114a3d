"""Text a client may name things with: one rule for job names, model names and meta.

A name is shown in listings, stored in SQLite or PostgreSQL and sent back as
JSON, so it must be valid Unicode (no lone UTF-16 surrogates, which cannot be
encoded as UTF-8) without NUL (PostgreSQL text cannot hold it), at most 200
characters. The same ``Name`` type serves the JSON body, the multipart form, the
query string and an uploaded checkpoint's metadata, so no door is looser than
another.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, StringConstraints

MAX_NAME_CHARS = 200
SURROGATES = "lone UTF-16 surrogate (\\ud800-\\udfff)"


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
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


Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_NAME_CHARS),
    AfterValidator(_storable),
]
