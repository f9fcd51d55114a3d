"""Rounding to float32's precision: the plain-Python path for short inputs gives the same
doubles as the numpy path, so an answer's JSON does not depend on its length."""

from __future__ import annotations

import math

import numpy as np

from app.serving.numbers import SHORT, _array, _one, significant, significant1


def same(a: float, b: float) -> bool:
    return (a == b and math.copysign(1, a) == math.copysign(1, b)) or (a != a and b != b)


def test_the_python_path_gives_the_numpy_paths_doubles() -> None:
    rng = np.random.default_rng(7)
    # float32 values of every exponent (random bit patterns: subnormals, inf, nan included)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    with np.errstate(invalid="ignore"):  # NaN payloads
        parts = [bits.view(np.float32).astype(np.float64)]
    for n in range(-45, 39):  # float32 neighbours of each power of ten, where floor(log10) turns
        p32 = np.float32(10.0**n)
        near = [p32]
        lo = hi = p32
        for _ in range(4):
            lo, hi = np.nextafter(lo, np.float32(0)), np.nextafter(hi, np.float32(np.inf))
            near += [lo, hi]
        parts.append(np.array(near, dtype=np.float32).astype(np.float64))
    for n in range(-30, 30):  # and float64 ones
        p64 = 10.0**n
        parts.append(np.array([p64, np.nextafter(p64, 0), np.nextafter(p64, np.inf), -p64]))
    parts.append(rng.random(100_000))  # probabilities
    parts.append(np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e300, -1e300, 5e-324, 1e-17]))
    values = np.concatenate(parts)
    with np.errstate(over="ignore", invalid="ignore"):
        want = _array(values, 7)
    got = [_one(v, 7) for v in values.tolist()]
    bad = [(v, w, g) for v, w, g in zip(values.tolist(), want, got, strict=True) if not same(w, g)]
    assert not bad, bad[:5]


def test_short_and_long_inputs_round_alike() -> None:
    probs = np.random.default_rng(0).random(3 * SHORT).astype(np.float32)
    whole = significant(probs)
    assert significant(probs[:SHORT]) == whole[:SHORT]  # the Python path
    assert significant(probs[: SHORT + 1]) == whole[: SHORT + 1]  # the numpy path
    assert significant([0.12345679104328156]) == [0.1234568]
    assert significant1(float(np.float32(0.12345679))) == 0.1234568
    assert significant1(123456789.0) == 123456800.0
