"""A small public-domain text shipped with the package, for examples and first runs."""

from __future__ import annotations

from importlib.resources import files

SAMPLE_NAME = "hamlet"


def sample_text() -> str:
    """The opening of Hamlet (~100k characters; model/corpora/README.md says where from)."""
    return files("model").joinpath("corpora", "hamlet.txt").read_text(encoding="utf-8")
