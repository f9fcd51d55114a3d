"""Seeded mutation fuzzing of the checkpoint loaders: CheckpointError or a load, nothing else.

Files come from users (uploads, resume states on disk), and any other exception
is a 500 in the service; what loads must have metadata the service can store
and serve as UTF-8 JSON, and every refusal a message it can send. Every case
is derived from ``np.random.default_rng([SEED, kind, i, target])``, so a failure
names the case that reproduces it alone:
``python -c "from tests.model.test_checkpoint_fuzz import *; replay('model', 'flip', 7)"``.
"""

from __future__ import annotations

import io
import json
import struct
import warnings
import zipfile
from collections.abc import Callable

import numpy as np
import pytest

from model.checkpoint import (
    META,
    model_from_bytes,
    model_to_bytes,
    state_from_bytes,
    state_to_bytes,
)
from model.errors import CheckpointError

from .test_checkpoint import make_model, make_state

SEED = 20240601
CASES = 300  # per (target, mutation): 2 x 13 x 300 = 7,800 loads, ~5 s

Rng = np.random.Generator
Members = dict[str, bytes]

# Pieces of .npy headers and of meta JSON, so mutations reach the parsers' deep paths.
_HEADER_BITS = [
    b"{", b"}", b"(", b")", b"[", b"]", b"'", b",", b":", b" ", b"\n", b"\\", b"L", b"0", b"-1",
    b"'descr'", b"'shape'", b"'fortran_order'", b"True", b"False", b"None", b"'<f4'", b"'<f8'",
    b"'|V0'", b"'<U0'", b"'|O'", b"'>f8'", b"'<i4'", b"1e999", b"2**64", b"99999999999999999999",
    b"lambda", b"\x00", b"\xff", b"# ", b'"',
]  # fmt: skip
_JSON_BITS = [
    "{", "}", "[", "]", ",", ":", '"', " ", "\\", '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"',
    "\ud800", "\U0010ffff", "1e999", "-1e999", "NaN", "Infinity", "-0", "0.5", "1" * 400,
    "-1", "true", "false", "null", '"format"', '"charnn-model"', '"charnn-train-state"',
    '"format_version"', '"vocab"', '"dtype"', '"float32"', '"float64"', '"config"',
    '"hyperparameters"', '"metrics"', '"step"', '"elapsed_s"', '"optimizer"', '"adam"',
    '"hidden_size"', '"learning_rate"', '"a"', '""', "[" * 50, "]" * 50, "{" * 3,
]  # fmt: skip
_JSON_VALUES: list[object] = [
    None, True, False, 0, -1, 1.5, -0.0, 10**400, 2**63, -(2**63), "", "a", "ab", "\ud800",
    "\udfff", "😀", [], {}, [[[]]], {"\ud800": 1}, ["a", "a"], list("abcdef"), "float16",
    "charnn-model", "charnn-train-state", 6, 3, 1e308,
]  # fmt: skip


def members_of(data: bytes) -> Members:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def zip_of(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    """A well-formed zip (valid CRCs), so the mutation reaches the .npy and meta parsers."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" when a case duplicates a member
        with zipfile.ZipFile(buf, "w", compression) as zf:
            for name, body in members:
                zf.writestr(name, body)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _header_end(body: bytes) -> int:
    if body[6:7] == b"\x01":
        return 10 + int.from_bytes(body[8:10], "little")
    return 12 + int.from_bytes(body[8:12], "little")


def _random_bytes(rng: Rng, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _pick(rng: Rng, members: Members) -> str:
    names = sorted(members)
    return names[int(rng.integers(len(names)))]


# ---------------------------------------------------------------- mutations: raw bytes


def flip(rng: Rng, data: bytes, members: Members) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), int(rng.integers(1, 9))):
        out[pos] ^= int(rng.integers(1, 256))
    return bytes(out)


def insert(rng: Rng, data: bytes, members: Members) -> bytes:
    pos = int(rng.integers(0, len(data) + 1))
    return data[:pos] + _random_bytes(rng, int(rng.integers(1, 64))) + data[pos:]


def delete(rng: Rng, data: bytes, members: Members) -> bytes:
    pos = int(rng.integers(0, len(data)))
    return data[:pos] + data[pos + int(rng.integers(1, 256)) :]


def truncate(rng: Rng, data: bytes, members: Members) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def central_directory(rng: Rng, data: bytes, members: Members) -> bytes:
    """Overwrite bytes or whole fields (method, sizes, offsets, name lengths) of the directory."""
    out = bytearray(data)
    eocd = out.rfind(b"PK\x05\x06")
    (cd_offset,) = struct.unpack("<I", out[eocd + 16 : eocd + 20])
    entries = [i for i in range(cd_offset, eocd) if out[i : i + 4] == b"PK\x01\x02"]
    for _ in range(int(rng.integers(1, 4))):
        start = entries[int(rng.integers(len(entries)))]
        if rng.random() < 0.5:  # a field: method, crc, sizes, name/extra lengths, offset
            field, width = [(10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)][
                int(rng.integers(7))
            ]
            value = [0, 1, 8, 12, 14, 99, 2**16 - 1, 2**31, 2**32 - 1, int(rng.integers(2**16))][
                int(rng.integers(10))
            ] % (256**width)
            out[start + field : start + field + width] = value.to_bytes(width, "little")
        else:
            pos = int(rng.integers(cd_offset, len(out)))
            n = int(rng.integers(1, 16))
            out[pos : pos + n] = _random_bytes(rng, n)[: len(out) - pos]
    return bytes(out)


# ---------------------------------------------------------------- mutations: re-zipped


def npy_header(rng: Rng, data: bytes, members: Members) -> bytes:
    """Overwrite a range inside one member's .npy header with bytes or header-like tokens."""
    name = _pick(rng, members)
    body = bytearray(members[name])
    end = _header_end(bytes(body))
    start = int(rng.integers(0, end))
    if rng.random() < 0.3:
        patch = _random_bytes(rng, int(rng.integers(1, 12)))
    else:
        picks = rng.integers(0, len(_HEADER_BITS), int(rng.integers(1, 6)))
        patch = b"".join(_HEADER_BITS[int(i)] for i in picks)
    if rng.random() < 0.5:
        body[start : start + len(patch)] = patch  # same length when it fits
    else:
        body[start : start + int(rng.integers(0, 8))] = patch  # the header grows or shrinks
    new = {**members, name: bytes(body)}
    return zip_of(list(new.items()))


def npy_data(rng: Rng, data: bytes, members: Members) -> bytes:
    """Overwrite bytes after a member's header: NaN weights, code points past U+10FFFF in meta."""
    name = _pick(rng, members)
    body = bytearray(members[name])
    start = _header_end(bytes(body))
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(start, len(body)))
        n = int(rng.integers(1, 9))
        body[pos : pos + n] = _random_bytes(rng, n)[: len(body) - pos]
    return zip_of(list({**members, name: bytes(body)}.items()))


def compressed(rng: Rng, data: bytes, members: Members) -> bytes:
    """Deflate, bzip2 or LZMA members, then corrupt the compressed bytes."""
    method = [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA][int(rng.integers(3))]
    packed = zip_of(list(members.items()), method)
    return flip(rng, packed, members) if rng.random() < 0.9 else packed


def npy_array(rng: Rng, data: bytes, members: Members) -> bytes:
    """Replace one member with a well-formed .npy of another shape or dtype."""
    name = _pick(rng, members)
    dtype = ["<f4", "<f8", ">f8", "<f2", "<i8", "<U3", "|V0", "<c8", "|b1", "<f16"][
        int(rng.integers(10))
    ]
    shape = tuple(int(d) for d in rng.integers(0, 9, int(rng.integers(0, 4))))
    arr = np.zeros(shape, dtype)
    if dtype.endswith(("f4", "f8")) and arr.size and rng.random() < 0.5:
        arr.flat[0] = [np.nan, np.inf, -np.inf, 3e38][int(rng.integers(4))]
    return zip_of(list({**members, name: _npy(arr)}.items()))


def meta_text(rng: Rng, data: bytes, members: Members) -> bytes:
    """The meta string replaced by random JSON-ish text, or the real text with a token swapped."""
    text = str(np.load(io.BytesIO(members[META + ".npy"]), allow_pickle=False)[()])
    if rng.random() < 0.4:
        picks = rng.integers(0, len(_JSON_BITS), int(rng.integers(1, 40)))
        new = "".join(_JSON_BITS[int(i)] for i in picks)
    else:
        new = text
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(new)))
            bit = _JSON_BITS[int(rng.integers(len(_JSON_BITS)))]
            new = new[:pos] + bit + new[pos + int(rng.integers(0, 12)) :]
    return zip_of(list({**members, META + ".npy": _npy(np.array(new))}.items()))


def meta_value(rng: Rng, data: bytes, members: Members) -> bytes:
    """One value (or key) anywhere in the parsed meta replaced by a hostile JSON value."""
    meta = json.loads(str(np.load(io.BytesIO(members[META + ".npy"]), allow_pickle=False)[()]))
    spots: list[tuple[dict[str, object] | list[object], str | int]] = []
    stack: list[object] = [meta]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            spots += [(node, k) for k in node]
            stack += node.values()
        elif isinstance(node, list):
            spots += [(node, i) for i in range(len(node))]
            stack += node
    for _ in range(int(rng.integers(1, 3))):
        node, key = spots[int(rng.integers(len(spots)))]
        value = _JSON_VALUES[int(rng.integers(len(_JSON_VALUES)))]
        if isinstance(node, dict) and key not in node:
            continue  # renamed by the first replacement
        if isinstance(node, dict) and isinstance(key, str) and rng.random() < 0.2:
            node[str(value)] = node.pop(key)  # a hostile key
        else:
            node[key] = value  # type: ignore[index]
    text = json.dumps(meta, ensure_ascii=bool(rng.random() < 0.5))
    return zip_of(list({**members, META + ".npy": _npy(np.array(text))}.items()))


def duplicate(rng: Rng, data: bytes, members: Members) -> bytes:
    """A member written twice (same or other content), or the archive deflated and shuffled."""
    items = list(members.items())
    name = _pick(rng, members)
    other = items[int(rng.integers(len(items)))][1]
    items.insert(int(rng.integers(0, len(items) + 1)), (name, other))
    if rng.random() < 0.3:
        items = [items[int(i)] for i in rng.permutation(len(items))]
    return zip_of(items, zipfile.ZIP_DEFLATED if rng.random() < 0.3 else zipfile.ZIP_STORED)


MUTATIONS: dict[str, Callable[[Rng, bytes, Members], bytes]] = {
    "flip": flip,
    "insert": insert,
    "delete": delete,
    "truncate": truncate,
    "central_directory": central_directory,
    "npy_header": npy_header,
    "npy_data": npy_data,
    "npy_array": npy_array,
    "compressed": compressed,
    "meta_text": meta_text,
    "meta_value": meta_value,
    "duplicate": duplicate,
}
MUTATIONS["two_at_once"] = lambda rng, data, members: flip(
    rng, npy_header(rng, data, members), members
)


def _model_meta(data: bytes) -> object:
    ckpt = model_from_bytes(data)
    return [ckpt.vocab.chars, ckpt.hyperparameters, ckpt.metrics, ckpt.extra]


def _state_meta(data: bytes) -> object:
    state = state_from_bytes(data)
    return [state.vocab.chars, state.config.to_dict(), state.corpus_sha256, state.step]


# Each loader returns the loaded metadata, which the service stores and serves as UTF-8 JSON.
TARGETS: dict[str, tuple[Callable[[], bytes], Callable[[bytes], object]]] = {
    "model": (lambda: model_to_bytes(make_model()), _model_meta),
    "state": (lambda: state_to_bytes(make_state()), _state_meta),
}


def replay(target: str, kind: str, i: int) -> None:
    """Run one case alone, letting its exception (if any) through."""
    build, load = TARGETS[target]
    data = build()
    kinds = sorted(MUTATIONS)
    rng = np.random.default_rng([SEED, kinds.index(kind), i, target == "state"])
    meta = load(MUTATIONS[kind](rng, data, members_of(data)))
    json.dumps(meta, ensure_ascii=False, allow_nan=False).encode().decode()


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_mutation_loads_or_raises_checkpoint_error(target: str) -> None:
    build, load = TARGETS[target]
    data = build()
    members = members_of(data)
    load(data)  # the unmutated file is valid
    kinds = sorted(MUTATIONS)
    escapes: list[str] = []
    outcomes = {"loaded": 0, "refused": 0}
    for k, kind in enumerate(kinds):
        for i in range(CASES):
            rng = np.random.default_rng([SEED, k, i, target == "state"])
            case = f"replay({target!r}, {kind!r}, {i})  # seed [{SEED}, {k}, {i}]"
            try:
                broken = MUTATIONS[kind](rng, data, members)
            except Exception as e:  # a bug of the mutation itself, not of the loader
                raise AssertionError(f"{case}: the mutation failed: {e!r}") from e
            try:
                meta = load(broken)
                outcomes["loaded"] += 1
            except CheckpointError as e:
                outcomes["refused"] += 1
                try:
                    str(e).encode("utf-8")  # the message itself must be servable
                except UnicodeEncodeError:
                    escapes.append(f"{case}: unencodable message {str(e)[:200]!r}")
            except Exception as e:
                escapes.append(f"{case}: {type(e).__name__}: {str(e)[:200]}")
            else:
                try:  # decode too: numpy makes strs past U+10FFFF that encode to invalid UTF-8
                    json.dumps(meta, ensure_ascii=False, allow_nan=False).encode().decode()
                except Exception as e:
                    escapes.append(f"{case}: loaded, but its meta is unservable: {e!r}"[:300])
    assert not escapes, f"{len(escapes)} escapes:\n" + "\n".join(escapes[:30])
    assert outcomes["refused"] > len(kinds) * CASES // 2  # the mutations do break files
