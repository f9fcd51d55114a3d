"""The web export: what charnn.js reads, written and read back in Python."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from model.checkpoint import ModelCheckpoint
from model.errors import CheckpointError
from model.params import PARAM_NAMES, init_params
from model.vocab import Vocab
from model.web import WEB_FORMAT_VERSION, read_web, web_bytes


def checkpoint(dtype: str = "float32") -> ModelCheckpoint:
    vocab = Vocab.from_text("abc \n€😀'\"\\")
    return ModelCheckpoint(init_params(12, len(vocab), np.random.default_rng(0), dtype), vocab)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_in_float32_with_the_layout_charnn_js_expects(dtype: str) -> None:
    ckpt = checkpoint(dtype)
    data = web_bytes(ckpt, {"name": "x", "model_id": "m1"})
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0  # the data starts 8-aligned: Float32Array views need no copy
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert meta["format"] == "charnn-web" and meta["format_version"] == str(WEB_FORMAT_VERSION)
    assert json.loads(meta["vocab"]) == list(ckpt.vocab.chars)
    assert (meta["hidden_size"], meta["vocab_size"]) == ("12", str(len(ckpt.vocab)))
    assert list(header) == list(PARAM_NAMES)
    for name, entry in header.items():
        assert entry["dtype"] == "F32" and entry["data_offsets"][0] % 4 == 0
        assert tuple(entry["shape"]) == getattr(ckpt.params, name).shape
    back, meta2 = read_web(data)
    assert meta2 == meta and back.vocab == ckpt.vocab
    for name in PARAM_NAMES:
        want = getattr(ckpt.params, name).astype(np.float32)
        assert np.array_equal(getattr(back.params, name), want)
    assert len(data) == 8 + n + 4 * ckpt.params.flat.size


def test_bad_files_are_refused_in_words() -> None:
    data = web_bytes(checkpoint())
    (n,) = struct.unpack("<Q", data[:8])
    newer = data.replace(b'"format_version":"1"', b'"format_version":"2"')
    cases = [
        (b"", "shorter than"),
        (struct.pack("<Q", 10**9) + data[8:], "bad header length"),
        (data[:8] + b"[" + data[9:], "bad header"),
        (data.replace(b"charnn-web", b"charnn-xyz"), "format 'charnn-xyz'"),
        (newer, "version '2'"),
        (data[: 8 + n + 16], "bad shape or offsets"),
    ]
    for bad, words in cases:
        with pytest.raises(CheckpointError) as e:
            read_web(bad)
        assert words in str(e.value), (words, str(e.value))
