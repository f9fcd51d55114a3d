"""Numbers as answered: float32 results with float32's precision, not float64's digits.

A float32 probability converted to a Python float prints as 0.12345679104328156: sixteen
digits of which the last nine are noise. Rounded to 7 significant digits (float32 holds
7.2) it prints as 0.1234568, and a client loses nothing the model computed.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

DIGITS = 7


def significant(values: npt.ArrayLike, digits: int = DIGITS) -> list[float]:
    """``values`` rounded to ``digits`` significant digits, as Python floats."""
    x = np.asarray(values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(x)))
    exponent = np.where(np.isfinite(exponent), exponent, 0.0)
    # x * 10**k rounded is an integer of `digits` digits; dividing by the exact power of
    # ten gives the double nearest the decimal, which Python prints in its short form.
    # Powers of ten are exact up to 1e22; values below ~1e-16 are left as they are.
    k = digits - 1 - exponent
    scale = 10.0 ** np.clip(np.abs(k), 0, 22)
    rounded = np.where(k >= 0, np.round(x * scale) / scale, np.round(x / scale) * scale)
    out: list[float] = np.where(np.isfinite(x) & (k <= 22), rounded, x).tolist()
    return out


def significant1(value: float, digits: int = DIGITS) -> float:
    return significant([value], digits)[0]
