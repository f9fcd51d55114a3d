"""The five parameters of the basic RNN, in the seed's notation.

All five live in one flat array (``Params.flat``) and the named fields are
views into it, so the optimizer, gradient clipping and checkpoint code each
work on a single vector while the math keeps the classic names and shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PARAM_NAMES: tuple[str, ...] = ("Wax", "Waa", "Wya", "ba", "by")
DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float64": np.float64}


def param_shapes(n_a: int, n_x: int) -> dict[str, tuple[int, int]]:
    """Shapes of the parameters for hidden size n_a and vocabulary size n_x (= n_y)."""
    return {
        "Wax": (n_a, n_x),
        "Waa": (n_a, n_a),
        "Wya": (n_x, n_a),
        "ba": (n_a, 1),
        "by": (n_x, 1),
    }


def flat_size(n_a: int, n_x: int) -> int:
    return sum(r * c for r, c in param_shapes(n_a, n_x).values())


def hidden_size_for(param_count: int, n_x: int) -> int:
    """n_a from a parameter count: the inverse of flat_size (n_a^2 + (2 n_x + 1) n_a + n_x)."""
    b = 2 * n_x + 1
    return round((-b + math.sqrt(b * b + 4 * (param_count - n_x))) / 2)


@dataclass(frozen=True)
class Params:
    """Views into ``flat``; writing to a field writes to ``flat`` and vice versa."""

    flat: np.ndarray  # (P,)
    Wax: np.ndarray  # (n_a, n_x)  input -> hidden
    Waa: np.ndarray  # (n_a, n_a)  hidden -> hidden
    Wya: np.ndarray  # (n_y, n_a)  hidden -> output
    ba: np.ndarray  # (n_a, 1)
    by: np.ndarray  # (n_y, 1)

    @property
    def n_a(self) -> int:
        return int(self.Waa.shape[0])

    @property
    def n_x(self) -> int:
        return int(self.Wax.shape[1])

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self.flat.dtype

    @classmethod
    def from_flat(cls, flat: np.ndarray, n_a: int, n_x: int) -> Params:
        if flat.ndim != 1 or flat.size != flat_size(n_a, n_x) or not flat.flags.c_contiguous:
            raise ValueError(f"flat must be a contiguous vector of {flat_size(n_a, n_x)} values")
        views: dict[str, np.ndarray] = {}
        offset = 0
        for name, (rows, cols) in param_shapes(n_a, n_x).items():
            views[name] = flat[offset : offset + rows * cols].reshape(rows, cols)
            offset += rows * cols
        return cls(flat=flat, **views)

    @classmethod
    def zeros(cls, n_a: int, n_x: int, dtype: str | np.dtype[np.floating] = "float32") -> Params:
        return cls.from_flat(np.zeros(flat_size(n_a, n_x), dtype=dtype), n_a, n_x)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], dtype: str | None = None) -> Params:
        """Copy named arrays (validated shapes) into a fresh flat buffer."""
        n_a, n_x = arrays["Wax"].shape
        out = cls.zeros(n_a, n_x, dtype or arrays["Wax"].dtype)
        for name, shape in param_shapes(n_a, n_x).items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {shape}")
            getattr(out, name)[...] = arrays[name]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def __deepcopy__(self, memo: dict[int, object]) -> Params:
        # A field-by-field deepcopy would cut the views loose from ``flat``.
        return self.copy()

    def copy(self, dtype: str | np.dtype[np.floating] | None = None) -> Params:
        flat = self.flat.astype(dtype or self.flat.dtype, copy=True)
        return Params.from_flat(flat, self.n_a, self.n_x)


def init_params(n_a: int, n_x: int, rng: np.random.Generator, dtype: str = "float32") -> Params:
    """Initialisation chosen by measurement (docs/benchmarks.md, "Initialisation").

    Wax columns are character embeddings: N(0, 1) scaled so a fresh pre-activation
    has unit-ish variance. Waa is a random orthogonal matrix scaled to 0.9 so the
    recurrence neither explodes nor forgets at once. Wya starts small so the first
    predictions are near uniform; biases start at zero.
    """
    p = Params.zeros(n_a, n_x, "float64")
    p.Wax[...] = rng.standard_normal((n_a, n_x)) * 0.5
    q, r = np.linalg.qr(rng.standard_normal((n_a, n_a)))
    p.Waa[...] = 0.9 * q * np.sign(np.diag(r))
    p.Wya[...] = rng.standard_normal((n_x, n_a)) * (1.0 / np.sqrt(n_a))
    return p.copy(dtype)
