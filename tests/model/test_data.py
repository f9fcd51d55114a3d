"""The train/validation split, and sizing it without encoding the corpus."""

from __future__ import annotations

import numpy as np
import pytest

from model.data import split, split_lengths


@pytest.mark.parametrize("n", [0, 1, 5, 19, 20, 21, 100, 1001])
@pytest.mark.parametrize("val_fraction", [0.0, 0.05, 0.1, 0.5, 0.99])
def test_split_lengths_are_the_split_s_sizes(n: int, val_fraction: float) -> None:
    ids = np.arange(n)
    train, val = split(ids, val_fraction)
    assert split_lengths(n, val_fraction) == (len(train), len(val))
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)  # head, then tail
    assert len(val) == 0 or len(val) >= 2  # a one-character validation set is no set


def test_the_tail_is_held_out() -> None:
    train, val = split(np.arange(100), 0.1)
    assert train[-1] == 89 and val.tolist() == list(range(90, 100))
