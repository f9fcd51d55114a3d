"""Character vocabulary: the sorted distinct characters of a corpus."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import UnknownCharactersError


def _codepoints(text: str) -> np.ndarray:
    # UTF-32 gives one fixed-width code unit per character: vectorised encoding.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


@dataclass(frozen=True)
class Vocab:
    """Index i <-> character chars[i]."""

    chars: tuple[str, ...]
    _codes: np.ndarray = field(init=False, repr=False, compare=False)
    _order: np.ndarray = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _unknown_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("a vocabulary needs at least one character")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("every vocabulary entry must be exactly one character")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary entries must be distinct")
        codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        object.__setattr__(self, "_codes", codes[order])
        object.__setattr__(self, "_order", order.astype(np.int32))
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.chars)})
        known = "".join(re.escape(c) for c in self.chars)
        object.__setattr__(self, "_unknown_re", re.compile(f"[^{known}]+"))

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls(tuple(chr(c) for c in np.unique(_codepoints(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return isinstance(ch, str) and ch in self.index

    @property
    def index(self) -> dict[str, int]:
        return self._index

    def unknown(self, text: str) -> list[str]:
        """Distinct characters of text not in the vocabulary, in order of appearance."""
        return list(dict.fromkeys(c for c in text if c not in self._index))

    def drop_unknown(self, text: str) -> str:
        """``text`` without the characters outside the vocabulary."""
        return self._unknown_re.sub("", text)

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Indices (int32) of the characters of text.

        unknown="error" raises UnknownCharactersError naming the characters;
        unknown="skip" drops them.
        """
        if len(text) <= 8:  # a few dict lookups beat the vectorised path's fixed cost
            index = self._index
            if all(c in index for c in text):
                return np.array([index[c] for c in text], dtype=np.int32)
        codes = _codepoints(text)
        pos = np.searchsorted(self._codes, codes)
        pos_c = np.minimum(pos, len(self._codes) - 1)
        ok = self._codes[pos_c] == codes
        if not ok.all():
            if unknown != "skip":
                raise UnknownCharactersError(self.unknown(text))
            pos_c = pos_c[ok]
        return self._order[pos_c]

    def decode(self, indices: np.ndarray | list[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in indices)
