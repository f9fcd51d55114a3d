"""Numbers as answered: float32 results with float32's precision, not float64's digits.

A float32 probability converted to a Python float prints as 0.12345679104328156: sixteen
digits of which the last nine are noise. Rounded to 7 significant digits (float32 holds
7.2) it prints as 0.1234568, and a client loses nothing the model computed.

Short inputs (a /predict top-k, one entropy) are rounded in plain Python: numpy's
dozen calls cost ~20 us whatever the size, a /predict's largest single cost once
the model math is cached. Both paths do the same float operations in the same
order (the same IEEE products, quotients and half-even rounding), so they give
the same doubles (tests/app/serving/test_numbers.py compares them on 300,000 values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from model.inference import entropy_bits

DIGITS = 7
SHORT = 32  # below about 45 values the Python loop is faster than numpy's (measured)


def _one(v: float, digits: int) -> float:
    """``significant`` for one float: the same steps as the array version, in Python."""
    if v == 0.0 or not math.isfinite(v):
        return v  # zero, infinities and NaN: the array version returns them as they are
    k = digits - 1 - math.floor(math.log10(abs(v)))
    if k > 22:
        return v
    if k >= 0:
        scale = 10.0**k
        return round(v * scale) / scale
    scale = 10.0 ** min(-k, 22)
    return round(v / scale) * scale


def significant(values: npt.ArrayLike, digits: int = DIGITS) -> list[float]:
    """``values`` rounded to ``digits`` significant digits, as Python floats."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1 and x.size <= SHORT:
        return [_one(v, digits) for v in x.tolist()]
    return _array(x, digits)


def _array(x: np.ndarray, digits: int) -> list[float]:
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
    return _one(float(value), digits)


def ranked(
    probs: np.ndarray, chars: Sequence[str], top_k: int | None
) -> tuple[list[dict[str, str | float]], float]:
    """A distribution as answered (/predict, typing sessions): ``NextChar`` fields as plain
    dicts, most likely first (ties by index), ``top_k`` of them; and its entropy in bits.
    Dicts, not NextChar objects: validated with their message in one pydantic-core call,
    a third of the cost (the JSON is the same)."""
    order = np.argsort(-probs, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    top = significant(probs[order])
    out: list[dict[str, str | float]] = [
        {"char": chars[i], "prob": p} for i, p in zip(order.tolist(), top, strict=True)
    ]
    return out, significant1(entropy_bits(probs))
