"""The web export of a model: one file that ``charnn.js`` reads in a browser.

One file, not a manifest plus a binary: one request and one ETag per model (a page
can never pair one model's manifest with another's weights), one atomic write for
``charnn export``, and the layout is Hugging Face's *safetensors*, which its
libraries for Python, Rust and JavaScript read as is:

    8 bytes   N, the header's length, a little-endian unsigned 64-bit integer
    N bytes   the header: UTF-8 JSON, padded with spaces to a multiple of 8
    the rest  the tensors' bytes, little-endian float32, C order, back to back

The header maps each of ``Wax (n_a, n_x)``, ``Waa (n_a, n_a)``, ``Wya (n_y, n_a)``,
``ba (n_a, 1)``, ``by (n_y, 1)`` to ``{"dtype": "F32", "shape": [...],
"data_offsets": [begin, end]}`` (offsets from the start of the data), and
``__metadata__`` (string values only, as safetensors requires) to::

    {"format": "charnn-web", "format_version": "1", "hidden_size": "256",
     "vocab_size": "65", "vocab": "<JSON list of the characters in index order>",
     ...extra strings, e.g. "model_id", "name"}

The data starts at a multiple of 8 and every tensor at a multiple of 4, so a
browser makes ``Float32Array`` views on the fetched buffer without copying.
Weights are float32 whatever the checkpoint's dtype, as the server serves them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

from .checkpoint import ModelCheckpoint
from .errors import CheckpointError
from .params import PARAM_NAMES, Params, param_shapes
from .vocab import Vocab

WEB_FORMAT = "charnn-web"
WEB_FORMAT_VERSION = 1
MEDIA_TYPE = "application/octet-stream"
FILE_NAME = "model.safetensors"


def web_bytes(ckpt: ModelCheckpoint, extra: Mapping[str, str] | None = None) -> bytes:
    """The export of ``ckpt``; ``extra`` adds string fields to the metadata."""
    p = ckpt.params
    arrays = {name: np.ascontiguousarray(getattr(p, name), dtype="<f4") for name in PARAM_NAMES}
    header: dict[str, object] = {}
    offset = 0
    for name, arr in arrays.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    meta = {
        **{str(k): str(v) for k, v in (extra or {}).items()},
        "format": WEB_FORMAT,
        "format_version": str(WEB_FORMAT_VERSION),
        "hidden_size": str(p.Waa.shape[0]),
        "vocab_size": str(len(ckpt.vocab)),
        "vocab": json.dumps(list(ckpt.vocab.chars), ensure_ascii=False),
    }
    header["__metadata__"] = meta
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(a.tobytes() for a in arrays.values())


def read_web(data: bytes) -> tuple[ModelCheckpoint, dict[str, str]]:
    """The model and metadata of an export (what charnn.js checks, in Python)."""
    if len(data) < 8:
        raise CheckpointError("not a charnn web export: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n % 8:
        raise CheckpointError("not a charnn web export: bad header length")
    try:
        header = json.loads(data[8 : 8 + n].decode())
        meta = header.pop("__metadata__")
    except (ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(f"not a charnn web export: bad header ({e})") from None
    if meta.get("format") != WEB_FORMAT:
        raise CheckpointError(f"not a charnn web export (format {meta.get('format')!r})")
    if meta.get("format_version") != str(WEB_FORMAT_VERSION):
        raise CheckpointError(
            f"web export format version {meta.get('format_version')!r}; "
            f"this charnn reads version {WEB_FORMAT_VERSION}"
        )
    vocab = Vocab(tuple(json.loads(meta["vocab"])))
    n_a = int(meta["hidden_size"])
    body = memoryview(data)[8 + n :]
    shapes = param_shapes(n_a, len(vocab))
    arrays = {}
    for name in PARAM_NAMES:
        entry = header.get(name)
        if entry is None or entry.get("dtype") != "F32":
            raise CheckpointError(f"web export: {name} missing or not F32")
        begin, end = entry["data_offsets"]
        if tuple(entry["shape"]) != shapes[name] or not 0 <= begin <= end <= len(body):
            raise CheckpointError(f"web export: {name} has a bad shape or offsets")
        arrays[name] = np.frombuffer(body[begin:end], dtype="<f4").reshape(shapes[name])
    params = Params.from_arrays(arrays)
    return ModelCheckpoint(params, vocab), meta
