"""Model and training-state checkpoints: versioned ``.npz`` files, never pickles.

A **model checkpoint** is what the service loads to generate text: the five
arrays ``Wax, Waa, Wya, ba, by`` under their classic names and shapes, plus
``meta``, a 0-d unicode array holding JSON::

    {"format": "charnn-model", "format_version": 1, "dtype": "float32",
     "vocab": [chars in index order], "hyperparameters": {...}, "metrics": {...},
     ...any extra fields, e.g. "name", "created_at"}

A **training-state checkpoint** (format ``charnn-train-state``) holds everything
``Trainer(resume=...)`` needs to continue a run bit-exactly: the current weights
(same names), ``best.<name>`` for the best-validation weights when there are
any, ``optimizer.<key>`` per optimizer state vector, ``hidden`` (B, n_a), and
the counters, losses and config in ``meta``.

Both are plain ``np.savez`` archives, readable with
``np.load(path, allow_pickle=False)`` from any language with a zip and .npy
reader. Files come from users, so loading trusts nothing: every problem (not a
zip, zip bomb, thousands of members, malformed .npy headers, pickled or
non-float arrays, wrong shapes, NaN, bad or newer meta, text that UTF-8 cannot
encode, ...) is a ``CheckpointError`` that says what is wrong and what was
expected; tests/model/test_checkpoint_fuzz.py holds the loaders to it. Saving
runs the same checks, so a file that was saved can be loaded.
"""

from __future__ import annotations

import io
import json
import lzma
import math
import os
import re
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, cast, get_args

import numpy as np

from .atomic import atomic_write_bytes
from .config import StopReason, TrainConfig
from .errors import CheckpointError, ConfigError
from .optim import init_state
from .params import PARAM_NAMES, Params, flat_size, param_shapes
from .state import TrainResult, TrainState
from .vocab import Vocab

MODEL_FORMAT = "charnn-model"
MODEL_FORMAT_VERSION = 1
STATE_FORMAT = "charnn-train-state"
STATE_FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 512 * 1024 * 1024  # uncompressed; a 4096-unit float64 model is ~140 MB

META = "meta"
HIDDEN = "hidden"
BEST_PREFIX = "best."
OPTIMIZER_PREFIX = "optimizer."

_FORMAT_HINTS = {
    MODEL_FORMAT: "a model checkpoint; load it with load_model",
    STATE_FORMAT: "a training-state (resume) checkpoint; load it with load_state",
}
# Meta keys the model format owns; everything else round-trips through ``extra``.
_MODEL_META_KEYS = ("format", "format_version", "dtype", "vocab", "hyperparameters", "metrics")
_MAX_NPY_HEADER = 10_000  # numpy's own default limit
# A training state has at most 14 members (5 weights, 5 best, 2 optimizer, hidden, meta);
# refusing more before any per-member work keeps a million-entry zip cheap to refuse.
_MAX_MEMBERS = 64
_MAX_INT = 2**63 - 1  # meta counters must fit the int64 (SQLite) columns they end up in
_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,  # a corrupt LZMA-compressed member
    NotImplementedError,  # unsupported zip compression method
    RuntimeError,  # encrypted zip member
    MemoryError,
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields would raise
class ModelCheckpoint:
    """A trained model plus what it takes to use and describe it."""

    params: Params
    vocab: Vocab
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. name, created_at


def from_result(result: TrainResult, extra: Mapping[str, Any] | None = None) -> ModelCheckpoint:
    """The checkpoint of a finished training run (its best-validation weights)."""
    return ModelCheckpoint(
        params=result.params,
        vocab=result.vocab,
        hyperparameters=result.config.to_dict(),
        metrics=dict(result.metrics),
        extra=dict(extra or {}),
    )


# --------------------------------------------------------------------------- model


def model_to_bytes(ckpt: ModelCheckpoint) -> bytes:
    """Serialise a model checkpoint; raises CheckpointError if it could not be loaded back."""
    clash = sorted(set(ckpt.extra) & set(_MODEL_META_KEYS))
    if clash:
        raise CheckpointError(
            f"refusing to save: extra fields {clash} would overwrite reserved meta"
        )
    meta: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "dtype": str(ckpt.params.dtype),
        "vocab": list(ckpt.vocab.chars),
        "hyperparameters": ckpt.hyperparameters,
        "metrics": ckpt.metrics,
        **ckpt.extra,
    }
    arrays = ckpt.params.arrays()
    meta_text = _dump_meta(meta)
    try:
        _model_from_parts(arrays, _parse_meta(meta_text, MODEL_FORMAT, MODEL_FORMAT_VERSION))
    except CheckpointError as e:
        raise CheckpointError(f"refusing to save an invalid model checkpoint: {e}") from None
    return _npz_bytes(arrays, meta_text)


def model_from_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ModelCheckpoint:
    """Parse and fully validate a model checkpoint (untrusted input)."""
    arrays = _read_npz(data, max_bytes)
    meta = _parse_meta(_meta_text(arrays), MODEL_FORMAT, MODEL_FORMAT_VERSION)
    return _model_from_parts(arrays, meta)


def save_model(path: str | os.PathLike[str], ckpt: ModelCheckpoint) -> None:
    """Write atomically: a crash never leaves a half-written model for the service to load."""
    atomic_write_bytes(path, model_to_bytes(ckpt))


def load_model(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> ModelCheckpoint:
    """Read a model checkpoint; OSError if the file cannot be read, else CheckpointError."""
    return model_from_bytes(_read_file(path, max_bytes), max_bytes=max_bytes)


def _model_from_parts(arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> ModelCheckpoint:
    _expect_names(arrays, set(PARAM_NAMES), "a model checkpoint")
    vocab = _vocab(meta)
    params = _params(arrays, "", vocab)
    _check_meta_dtype(meta, params)
    sections = {}
    for key in ("hyperparameters", "metrics"):
        value = meta.get(key)
        if not isinstance(value, dict):
            _fail(f"meta.{key} must be a JSON object, got {_describe(value)}")
        sections[key] = value
    extra = {k: v for k, v in meta.items() if k not in _MODEL_META_KEYS}
    return ModelCheckpoint(params, vocab, sections["hyperparameters"], sections["metrics"], extra)


# --------------------------------------------------------------------------- training state


def state_to_bytes(state: TrainState) -> bytes:
    """Serialise everything a resumed run needs to continue bit-exactly."""
    arrays: dict[str, np.ndarray] = dict(state.params.arrays())
    if state.best_params is not None:
        arrays.update({BEST_PREFIX + k: v for k, v in state.best_params.arrays().items()})
    arrays.update({OPTIMIZER_PREFIX + k: v for k, v in state.optimizer.items()})
    arrays[HIDDEN] = state.hidden
    meta: dict[str, Any] = {
        "format": STATE_FORMAT,
        "format_version": STATE_FORMAT_VERSION,
        "dtype": str(state.params.dtype),
        "config": state.config.to_dict(),
        "vocab": list(state.vocab.chars),
        "corpus_sha256": state.corpus_sha256,
        "step": state.step,
        "epoch": state.epoch,
        "chunk": state.chunk,
        "elapsed_s": state.elapsed_s,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "evals_since_best": state.evals_since_best,
        "last_train_loss": state.last_train_loss,
        "last_val_loss": state.last_val_loss,
        "last_eval_step": state.last_eval_step,
        "stop_reason": state.stop_reason,
        "loss_sum": state.loss_sum,
        "loss_n": state.loss_n,
    }
    meta_text = _dump_meta(meta)
    try:
        _state_from_parts(arrays, _parse_meta(meta_text, STATE_FORMAT, STATE_FORMAT_VERSION))
    except CheckpointError as e:
        raise CheckpointError(f"refusing to save an invalid training state: {e}") from None
    return _npz_bytes(arrays, meta_text)


def state_from_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> TrainState:
    """Parse and fully validate a training-state checkpoint (untrusted input)."""
    arrays = _read_npz(data, max_bytes)
    meta = _parse_meta(_meta_text(arrays), STATE_FORMAT, STATE_FORMAT_VERSION)
    return _state_from_parts(arrays, meta)


def save_state(path: str | os.PathLike[str], state: TrainState) -> None:
    """Write atomically, so an interrupted save keeps the previous resume point intact."""
    atomic_write_bytes(path, state_to_bytes(state))


def load_state(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES) -> TrainState:
    """Read a training state; OSError if the file cannot be read, else CheckpointError."""
    return state_from_bytes(_read_file(path, max_bytes), max_bytes=max_bytes)


def _state_from_parts(arrays: Mapping[str, np.ndarray], meta: dict[str, Any]) -> TrainState:
    raw_config = meta.get("config")
    if not isinstance(raw_config, dict):
        _fail(f"meta.config must be a JSON object of hyperparameters, got {_describe(raw_config)}")
    _check_config_types(raw_config)
    try:
        config = TrainConfig.from_dict(raw_config)
    except (ConfigError, TypeError, ValueError, OverflowError) as e:  # Overflow: 10**400
        _fail(f"meta.config is not a valid training configuration: {e}")

    opt_keys = set(init_state(config.optimizer, 0, np.dtype(np.float64)))
    has_best = any(name.startswith(BEST_PREFIX) for name in arrays)
    expected = {*PARAM_NAMES, HIDDEN, *(OPTIMIZER_PREFIX + k for k in opt_keys)}
    if has_best:
        expected |= {BEST_PREFIX + name for name in PARAM_NAMES}
    _expect_names(arrays, expected, f"a training state with optimizer {config.optimizer!r}")

    vocab = _vocab(meta)
    params = _params(arrays, "", vocab)
    dtype = params.dtype
    _check_meta_dtype(meta, params)
    if config.dtype != str(dtype):
        _fail(f"meta.config.dtype is {config.dtype!r} but the weights are {dtype}")
    if config.hidden_size != params.n_a:
        _fail(
            f"meta.config.hidden_size is {config.hidden_size} but the weights have n_a={params.n_a}"
        )
    best = _params(arrays, BEST_PREFIX, vocab) if has_best else None
    if best is not None and best.dtype != dtype:
        _fail(f"best.* arrays are {best.dtype} but the current weights are {dtype}")

    size = flat_size(params.n_a, params.n_x)
    optimizer = {
        k: _float_array(arrays, OPTIMIZER_PREFIX + k, dtype, lambda s: s == (size,), f"({size},)")
        for k in sorted(opt_keys)
    }
    hidden = _float_array(
        arrays,
        HIDDEN,
        dtype,
        lambda s: len(s) == 2 and s[0] >= 1 and s[1] == params.n_a,
        f"(B, {params.n_a}) with B >= 1",
    )

    digest = meta.get("corpus_sha256")
    if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        _fail(f"meta.corpus_sha256 must be 64 lowercase hex digits, got {_describe(digest)}")
    stop_reason = meta.get("stop_reason")
    if stop_reason is not None and stop_reason not in get_args(StopReason):
        _fail(
            f"meta.stop_reason must be null or one of {get_args(StopReason)}, got {stop_reason!r}"
        )
    step = _meta_int(meta, "step")
    best_step = _meta_opt_int(meta, "best_step")
    last_eval_step = _meta_opt_int(meta, "last_eval_step")
    for name, value in (("best_step", best_step), ("last_eval_step", last_eval_step)):
        if value is not None and value > step:
            _fail(f"meta.{name} ({value}) is after meta.step ({step})")
    elapsed = _meta_opt_float(meta, "elapsed_s")
    if elapsed is None or not elapsed >= 0:
        _fail(f"meta.elapsed_s must be a number >= 0, got {_describe(meta.get('elapsed_s'))}")

    return TrainState(
        config=config,
        vocab=vocab,
        corpus_sha256=digest,
        params=params,
        optimizer=optimizer,
        hidden=hidden,
        step=step,
        epoch=_meta_int(meta, "epoch"),
        chunk=_meta_int(meta, "chunk"),
        elapsed_s=elapsed,
        best_params=best,
        best_val_loss=_meta_opt_float(meta, "best_val_loss"),
        best_step=best_step,
        evals_since_best=_meta_int(meta, "evals_since_best"),
        last_train_loss=_meta_opt_float(meta, "last_train_loss"),
        last_val_loss=_meta_opt_float(meta, "last_val_loss"),
        last_eval_step=last_eval_step,
        stop_reason=cast("StopReason | None", stop_reason),
        # Absent from states saved before pause existed: the mean restarts there.
        loss_sum=_meta_opt_float(meta, "loss_sum") or 0.0,
        loss_n=_meta_int(meta, "loss_n") if "loss_n" in meta else 0,
    )


# --------------------------------------------------------------------------- the .npz layer


def _npz_bytes(arrays: Mapping[str, np.ndarray], meta_text: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays, **{META: np.array(meta_text)})
    return buf.getvalue()


def _read_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        _fail(f"{os.fspath(path)!r} is larger than the limit of {max_bytes} bytes")
    return data


def _read_npz(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """All arrays of an .npz, after checking sizes and headers so nothing huge is allocated."""
    if len(data) > max_bytes:
        _fail(f"the checkpoint is {len(data)} bytes, over the limit of {max_bytes}")
    if data[:6] == b"\x93NUMPY":
        _fail("this is a single .npy array, not a checkpoint; expected an .npz (zip) archive")
    if data[:4] != b"PK\x03\x04":
        _fail(f"not a checkpoint: expected an .npz (zip) archive, got data starting {data[:8]!r}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            _check_members(infos, max_bytes)
            for info in infos:
                _check_npy_header(zf, info)
        arrays: dict[str, np.ndarray] = {}
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for name in npz.files:
                arrays[name] = npz[name]
    except CheckpointError:
        raise
    except _READ_ERRORS as e:
        _fail(f"corrupt or truncated checkpoint archive: {type(e).__name__}: {e}")
    return arrays


def _check_members(infos: list[zipfile.ZipInfo], max_bytes: int) -> None:
    if len(infos) > _MAX_MEMBERS:
        _fail(f"archive has {len(infos)} members; a charnn checkpoint has at most {_MAX_MEMBERS}")
    names = [info.filename for info in infos]
    bad = [n for n in names if not n.endswith(".npy")]
    if bad:
        _fail(f"archive members must all be .npy arrays; found {bad[:5]}")
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        _fail(f"archive has duplicate members {dupes[:5]}")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        _fail(
            f"archive would uncompress to {total} bytes, over the limit of {max_bytes} "
            "(a corrupt file or a zip bomb)"
        )


def _check_npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    name = info.filename[: -len(".npy")]
    with zf.open(info) as f:  # archive errors (CRC, inflate, ...) propagate as such
        head = f.read(12 + _MAX_NPY_HEADER)  # magic, version, length, longest header accepted
    # numpy parses the header text as a Python literal: besides ValueError it can raise
    # SyntaxError, tokenize.TokenError, TypeError, MemoryError, RecursionError, ... on
    # crafted text. Every one of them means a malformed header.
    try:
        buf = io.BytesIO(head)
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(buf, _MAX_NPY_HEADER)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(buf, _MAX_NPY_HEADER)
        else:
            header = None
    except Exception as e:
        _fail(f"array {name!r} has a malformed .npy header: {type(e).__name__}: {e}")
    if header is None:
        _fail(f"array {name!r} uses .npy format version {version}; expected 1.0 or 2.0")
    shape, _, dtype = header
    if any(d < 0 for d in shape):
        _fail(f"array {name!r} declares a negative dimension in shape {shape}")
    if dtype.hasobject:
        _fail(
            f"array {name!r} is an object array, which would need pickle to load; "
            "checkpoints hold only numeric arrays and are never unpickled"
        )
    # max(.., 1): a zero-size dtype with a huge shape would still allocate the shape
    if math.prod(shape) * max(dtype.itemsize, 1) > info.file_size:
        _fail(f"array {name!r} declares shape {shape} {dtype}, more data than the archive holds")


# --------------------------------------------------------------------------- meta


def _json_default(obj: object) -> Any:
    if isinstance(obj, np.generic):  # numpy scalars that slip into metrics
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _dump_meta(meta: dict[str, Any]) -> str:
    try:
        return json.dumps(meta, ensure_ascii=False, allow_nan=False, default=_json_default)
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"refusing to save: meta is not plain JSON: {e}") from None


def _meta_text(arrays: Mapping[str, np.ndarray]) -> str:
    if META not in arrays:
        _fail(f"the {META!r} array (JSON describing the checkpoint) is missing")
    meta = arrays[META]
    if meta.ndim != 0 or meta.dtype.kind != "U":
        _fail(
            f"{META!r} must be a 0-d unicode string array holding JSON, "
            f"got dtype {meta.dtype} with shape {meta.shape}"
        )
    # numpy turns any 32-bit unit into a character, even past U+10FFFF, and such a str
    # breaks whatever touches it later (SystemError, not even ValueError).
    codes = np.frombuffer(meta.astype(meta.dtype.newbyteorder("<")).tobytes(), "<u4")
    if codes.size and int(codes.max()) > 0x10FFFF:
        _fail(f"{META!r} holds code point {int(codes.max()):#x}, past the last Unicode one")
    return str(meta[()])


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON, but inf once parsed
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _parse_meta(text: str, fmt: str, version: int) -> dict[str, Any]:
    try:
        meta = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        _fail(f"{META!r} is not valid JSON: {e}")
    if not isinstance(meta, dict):
        _fail(f"{META!r} must be a JSON object, got {_describe(meta)}")
    _check_encodable(meta)
    found = meta.get("format")
    if found != fmt:
        hint = (
            f" ({_FORMAT_HINTS[found]})"
            if isinstance(found, str) and found in _FORMAT_HINTS
            else ""
        )
        _fail(f"meta.format is {found!r}{hint}; expected {fmt!r}")
    v = meta.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        _fail(f"meta.format_version must be a positive integer, got {_describe(v)}")
    if v > version:
        _fail(
            f"{fmt} format_version {v} is newer than this charnn supports ({version}); "
            "upgrade charnn to load it"
        )
    return meta


def _check_encodable(meta: dict[str, Any]) -> None:
    """Refuse lone UTF-16 surrogates anywhere in meta (keys too).

    ``"\\ud800"`` is valid JSON, but the string it makes cannot be encoded as UTF-8,
    so storing or serving it (SQLite, JSON responses) would fail long after loading.
    Iterative, so a deeply nested meta that json accepted cannot overflow the stack.
    """
    stack: list[tuple[object, str]] = [(meta, "meta")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, dict):
            for k in value:
                _check_string(k, f"{path} key {_short(k)}")
            stack.extend((v, f"{path}.{k}") for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))


def _check_string(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        _fail(
            f"{where} holds a lone UTF-16 surrogate (U+{ord(text[e.start]):04X} at index "
            f"{e.start}), which cannot be encoded as UTF-8"
        )


def _meta_opt_int(meta: Mapping[str, Any], key: str, *, optional: bool = True) -> int | None:
    value = meta.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT:
        kind = "an integer >= 0 and < 2**63" + (" or null" if optional else "")
        _fail(f"meta.{key} must be {kind}, got {_describe(value)}")
    return value


def _meta_int(meta: Mapping[str, Any], key: str) -> int:
    value = _meta_opt_int(meta, key, optional=False)
    assert value is not None
    return value


def _meta_opt_float(meta: Mapping[str, Any], key: str) -> float | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _fail(f"meta.{key} must be a number or null, got {_describe(value)}")
    try:
        return float(value)
    except OverflowError:  # an integer with hundreds of digits
        _fail(f"meta.{key} is out of the range of a float, got {_describe(value)}")


def _vocab(meta: Mapping[str, Any]) -> Vocab:
    chars = meta.get("vocab")
    if not isinstance(chars, list) or not chars:
        _fail(f"meta.vocab must be a non-empty list of characters, got {_describe(chars)}")
    bad = [c for c in chars if not (isinstance(c, str) and len(c) == 1)]
    if bad:
        _fail(f"meta.vocab entries must be single-character strings; invalid: {bad[:5]!r}")
    dupes = sorted(c for c, n in Counter(chars).items() if n > 1)
    if dupes:
        _fail(f"meta.vocab entries must be distinct; repeated: {dupes[:10]!r}")
    return Vocab(tuple(chars))


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "None": (type(None),),
}


def _check_config_types(raw: Mapping[str, Any]) -> None:
    """Type-check against TrainConfig's annotations: its own checks assume the right types."""
    for f in fields(TrainConfig):
        if f.name not in raw or not isinstance(f.type, str):
            continue  # missing: the default applies
        parts = [p.strip() for p in f.type.split("|")]
        if not all(p in _JSON_TYPES for p in parts):
            continue  # an annotation this check does not know; TrainConfig decides
        value = raw[f.name]
        ok = any(isinstance(value, _JSON_TYPES[p]) for p in parts)
        if isinstance(value, bool) and "bool" not in parts:
            ok = False
        if not ok:
            _fail(f"meta.config.{f.name} must be {f.type}, got {_describe(value)}")


def _check_meta_dtype(meta: Mapping[str, Any], params: Params) -> None:
    if meta.get("dtype") != str(params.dtype):
        _fail(f"meta.dtype is {_describe(meta.get('dtype'))} but the weights are {params.dtype}")


# --------------------------------------------------------------------------- arrays


def _expect_names(arrays: Mapping[str, np.ndarray], expected: set[str], what: str) -> None:
    """Check the array names; ``meta`` is checked on its own (saving has none yet)."""
    names = set(arrays) - {META}
    missing, extra = sorted(expected - names), sorted(names - expected)
    if missing or extra:
        parts = ([f"missing arrays {missing}"] if missing else []) + (
            [f"unexpected arrays {extra}"] if extra else []
        )
        _fail(f"{'; '.join(parts)}; {what} holds exactly {sorted(expected | {META})}")


def _float_dtype(name: str, arr: np.ndarray) -> np.dtype[Any]:
    """The native-byte-order float32/float64 of arr, else CheckpointError."""
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (4, 8):
        _fail(f"array {name!r} has dtype {arr.dtype}; expected float32 or float64")
    return np.dtype(f"f{arr.dtype.itemsize}")


def _check_finite(name: str, arr: np.ndarray) -> None:
    ok = np.isfinite(arr)
    if not ok.all():
        bad = arr[~ok]
        _fail(
            f"array {name!r} has {bad.size} non-finite values "
            f"({int(np.isnan(bad).sum())} NaN, {int(np.isinf(bad).sum())} inf); "
            "a trained model must be all finite"
        )


def _params(arrays: Mapping[str, np.ndarray], prefix: str, vocab: Vocab) -> Params:
    named = {name: arrays[prefix + name] for name in PARAM_NAMES}
    dtypes = {name: _float_dtype(prefix + name, arr) for name, arr in named.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{prefix}{k} {v}" for k, v in dtypes.items())
        _fail(f"the weights mix dtypes ({listed}); all five must be float32, or all float64")
    for name, arr in named.items():
        if arr.ndim != 2:
            _fail(f"array {prefix + name!r} must be 2-D, got shape {arr.shape}")
    waa = named["Waa"].shape
    if waa[0] != waa[1] or waa[0] < 1:
        _fail(f"array {prefix}Waa must be square (n_a, n_a) with n_a >= 1, got shape {waa}")
    n_a, n_x = waa[0], len(vocab)
    wax_cols = named["Wax"].shape[1]
    if wax_cols != n_x and all(named[k].shape == s for k, s in param_shapes(n_a, wax_cols).items()):
        _fail(
            f"vocabulary size mismatch: the weights are for {wax_cols} characters "
            f"but meta.vocab has {n_x}"
        )
    for name, shape in param_shapes(n_a, n_x).items():
        if named[name].shape != shape:
            _fail(
                f"array {prefix + name!r} has shape {named[name].shape}; expected {shape} "
                f"(n_a={n_a} from Waa, n_x={n_x} from the vocabulary)"
            )
    for name, arr in named.items():
        _check_finite(prefix + name, arr)
    dtype = next(iter(dtypes.values()))
    return Params.from_arrays(named, str(dtype))


def _float_array(
    arrays: Mapping[str, np.ndarray],
    name: str,
    dtype: np.dtype[Any],
    shape_ok: Callable[[tuple[int, ...]], bool],
    shape_text: str,
) -> np.ndarray:
    arr = arrays[name]
    if _float_dtype(name, arr) != dtype:
        _fail(f"array {name!r} has dtype {arr.dtype}; expected {dtype} like the weights")
    if not shape_ok(arr.shape):
        _fail(f"array {name!r} has shape {arr.shape}; expected {shape_text}")
    _check_finite(name, arr)
    return np.array(arr, dtype=dtype, order="C", copy=True)


# --------------------------------------------------------------------------- misc


def _short(value: object) -> str:
    text = repr(value)
    return text[:60] + "..." if len(text) > 60 else text


def _describe(value: object) -> str:
    return f"{type(value).__name__} {_short(value)}"


def _fail(message: str) -> NoReturn:
    raise CheckpointError(message)
