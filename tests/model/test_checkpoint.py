"""Checkpoints: bit-exact round trips, the documented layout, and every malformed input."""

from __future__ import annotations

import io
import json
import os
import re
import struct
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model import atomic
from model.atomic import atomic_write_bytes
from model.checkpoint import (
    DEFAULT_MAX_BYTES,
    ModelCheckpoint,
    from_result,
    load_model,
    load_state,
    model_from_bytes,
    model_to_bytes,
    save_model,
    save_state,
    state_from_bytes,
    state_to_bytes,
)
from model.errors import CheckpointError
from model.optim import init_state
from model.params import PARAM_NAMES, Params, flat_size, param_shapes
from model.train import TrainConfig, Trainer, TrainResult, TrainState, corpus_digest
from model.vocab import Vocab

REPO = Path(__file__).resolve().parents[2]
CHARS = ("\n", " ", "a", "b", "é", "😀", "\\", '"')
N_A = 6


def random_params(n_a: int, n_x: int, dtype: str, seed: int = 0) -> Params:
    rng = np.random.default_rng(seed)
    p = Params.zeros(n_a, n_x, dtype)
    p.flat[...] = rng.standard_normal(p.flat.size)
    # Values that a lossy round trip (text, float64 detour, ...) would change.
    p.flat[0] = -0.0
    p.flat[1] = np.finfo(dtype).smallest_subnormal
    p.flat[2] = np.finfo(dtype).max
    p.flat[3] = np.nextafter(np.asarray(1.0, dtype), np.asarray(2.0, dtype))
    return p


def make_model(dtype: str = "float32") -> ModelCheckpoint:
    return ModelCheckpoint(
        params=random_params(N_A, len(CHARS), dtype),
        vocab=Vocab(CHARS),
        hyperparameters=TrainConfig(hidden_size=N_A, dtype=dtype).to_dict(),
        metrics={"val_loss": 1.2345678901234567, "steps": 10, "stop_reason": None},
        extra={"name": "tiny", "created_at": "2024-01-01T00:00:00Z"},
    )


def assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def assert_params_equal(a: Params, b: Params) -> None:
    assert_bits_equal(a.flat, b.flat)
    for name in PARAM_NAMES:
        assert_bits_equal(getattr(a, name), getattr(b, name))
        assert np.shares_memory(getattr(b, name), b.flat)  # b is a real Params, not loose arrays


# ---------------------------------------------------------------- malformed-input helpers


def good_parts(dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and meta of a valid model checkpoint, to be broken one way at a time."""
    with np.load(io.BytesIO(model_to_bytes(make_model(dtype))), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(str(arrays.pop("meta")[()]))
    return arrays, meta


def pack(arrays: dict[str, Any], meta: dict[str, Any] | str | None = None) -> bytes:
    buf = io.BytesIO()
    extra = (
        {}
        if meta is None
        else {"meta": np.array(meta if isinstance(meta, str) else json.dumps(meta))}
    )
    np.savez(buf, allow_pickle=True, **arrays, **extra)  # True only to plant object arrays
    return buf.getvalue()


def rejects(data: bytes, match: str, **kwargs: Any) -> None:
    with pytest.raises(CheckpointError, match=match):
        model_from_bytes(data, **kwargs)


# ---------------------------------------------------------------- model round trip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_round_trip_is_bit_exact(dtype: str) -> None:
    ckpt = make_model(dtype)
    back = model_from_bytes(model_to_bytes(ckpt))
    assert back.params.dtype == np.dtype(dtype)
    assert_params_equal(ckpt.params, back.params)
    assert back.vocab == ckpt.vocab
    assert back.vocab.chars == CHARS
    assert back.hyperparameters == ckpt.hyperparameters
    assert back.metrics == ckpt.metrics
    assert back.extra == ckpt.extra


def test_save_and_load_model_through_a_file(tmp_path: Path) -> None:
    ckpt = make_model("float64")
    path = tmp_path / "m.npz"
    save_model(path, ckpt)
    back = load_model(path)
    assert_params_equal(ckpt.params, back.params)
    assert back.vocab.chars == CHARS
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_serialisation_is_deterministic() -> None:
    assert model_to_bytes(make_model()) == model_to_bytes(make_model())


def test_from_result_keeps_config_and_metrics() -> None:
    config = TrainConfig(hidden_size=N_A)
    params = random_params(N_A, len(CHARS), "float32")
    result = TrainResult(params, Vocab(CHARS), config, {"val_loss": np.float32(0.5), "steps": 3})
    back = model_from_bytes(model_to_bytes(from_result(result, {"name": "r"})))
    assert TrainConfig.from_dict(back.hyperparameters) == config
    assert back.metrics == {"val_loss": 0.5, "steps": 3}  # numpy scalars stored as JSON numbers
    assert back.extra == {"name": "r"}
    assert_params_equal(params, back.params)


def test_npz_layout_is_the_documented_one() -> None:
    data = model_to_bytes(make_model("float32"))
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(["Wax", "Waa", "Wya", "ba", "by", "meta"])
        n_x = len(CHARS)
        expected = {"Wax": (N_A, n_x), "Waa": (N_A, N_A), "Wya": (n_x, N_A), "ba": (N_A, 1)}
        expected["by"] = (n_x, 1)
        for name, shape in expected.items():
            assert npz[name].shape == shape, name
            assert npz[name].dtype == np.float32
        meta_arr = npz["meta"]
        assert meta_arr.ndim == 0 and meta_arr.dtype.kind == "U"
        meta = json.loads(str(meta_arr[()]))
    assert meta["format"] == "charnn-model"
    assert meta["format_version"] == 1
    assert meta["vocab"] == list(CHARS)
    assert meta["dtype"] == "float32"
    assert meta["hyperparameters"]["hidden_size"] == N_A
    assert meta["metrics"]["steps"] == 10
    assert meta["name"] == "tiny"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:  # np.savez, uncompressed
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_saving_refuses_what_loading_would_reject() -> None:
    bad = make_model()
    bad.params.Waa[0, 0] = np.nan
    with pytest.raises(CheckpointError, match="refusing to save.*NaN"):
        model_to_bytes(bad)
    wrong_vocab = replace(make_model(), vocab=Vocab(("a", "b")))
    with pytest.raises(CheckpointError, match="refusing to save.*vocabulary size"):
        model_to_bytes(wrong_vocab)
    with pytest.raises(CheckpointError, match="reserved"):
        model_to_bytes(replace(make_model(), extra={"format": "x"}))
    with pytest.raises(CheckpointError, match="JSON"):
        model_to_bytes(replace(make_model(), metrics={"loss": float("nan")}))
    with pytest.raises(CheckpointError, match="JSON"):
        model_to_bytes(replace(make_model(), metrics={"x": object()}))


# ---------------------------------------------------------------- malformed model checkpoints


def test_rejects_bytes_that_are_not_a_zip() -> None:
    rejects(b"hello, this is not a checkpoint", "expected an .npz")
    rejects(b"", "expected an .npz")
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    rejects(buf.getvalue(), "single .npy array")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_rejects_a_truncated_file(keep: float) -> None:
    data = model_to_bytes(make_model())
    rejects(data[: int(len(data) * keep)], "corrupt or truncated")


def test_rejects_a_zip_bomb_before_inflating_it() -> None:
    arrays, meta = good_parts()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in {**arrays, "Wax": np.zeros((N_A, 2**18))}.items():
            member = io.BytesIO()
            np.save(member, arr)
            zf.writestr(f"{name}.npy", member.getvalue())
        zf.writestr("meta.npy", _npy(np.array(json.dumps(meta))))
    data = buf.getvalue()
    assert len(data) < 100_000  # 12 MB of zeros deflates to a few kB
    rejects(data, "uncompress to .* over the limit of 1000000", max_bytes=1_000_000)


def test_rejects_a_member_claiming_a_huge_size_under_the_default_limit() -> None:
    data = bytearray(model_to_bytes(make_model()))
    assert data[-22:-18] == b"PK\x05\x06"  # end of central directory, no comment
    (cd_offset,) = struct.unpack("<I", data[-6:-2])
    assert data[cd_offset : cd_offset + 4] == b"PK\x01\x02"
    data[cd_offset + 24 : cd_offset + 28] = struct.pack("<I", 0x7FFF_FFF0)  # uncompressed size
    rejects(bytes(data), f"over the limit of {DEFAULT_MAX_BYTES}")


def test_rejects_an_npy_header_declaring_more_data_than_stored() -> None:
    arrays, meta = good_parts()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 10**3)}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("Wax.npy", header.getvalue() + b"\0" * 64)
        for name, arr in arrays.items():
            if name != "Wax":
                zf.writestr(f"{name}.npy", _npy(arr))
        zf.writestr("meta.npy", _npy(np.array(json.dumps(meta))))
    rejects(buf.getvalue(), "'Wax' declares shape")


def test_rejects_a_pickled_object_array() -> None:
    arrays, meta = good_parts()
    arrays["Wax"] = np.array([{"evil": "payload"}] * N_A, dtype=object)
    rejects(pack(arrays, meta), "object array.*pickle")


def test_rejects_a_member_that_is_not_an_npy_file() -> None:
    data = bytearray(model_to_bytes(make_model()))
    buf = io.BytesIO(data)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("notes.txt", "hi")
    rejects(buf.getvalue(), "must all be .npy")


def test_rejects_a_missing_array() -> None:
    arrays, meta = good_parts()
    del arrays["Wya"]
    rejects(pack(arrays, meta), r"missing arrays \['Wya'\]")


def test_rejects_an_extra_array() -> None:
    arrays, meta = good_parts()
    arrays["Wzz"] = np.zeros(3, np.float32)
    rejects(pack(arrays, meta), r"unexpected arrays \['Wzz'\]")


def test_rejects_a_missing_meta() -> None:
    arrays, _ = good_parts()
    rejects(pack(arrays), "'meta' array .* is missing")


def test_rejects_meta_that_is_not_a_string() -> None:
    arrays, _ = good_parts()
    arrays["meta"] = np.zeros(3)
    rejects(pack(arrays), "0-d unicode string")


@pytest.mark.parametrize(
    "name,shape",
    [("Wax", (N_A, len(CHARS) + 1)), ("Waa", (N_A, N_A + 1)), ("ba", (N_A,)), ("by", (1, 1))],
)
def test_rejects_a_wrong_shape(name: str, shape: tuple[int, ...]) -> None:
    arrays, meta = good_parts()
    arrays[name] = np.zeros(shape, np.float32)
    rejects(pack(arrays, meta), f"{name}.*shape|{name}.*2-D")


def test_rejects_an_int_dtype() -> None:
    arrays, meta = good_parts()
    arrays["Waa"] = arrays["Waa"].astype(np.int64)
    rejects(pack(arrays, meta), "'Waa' has dtype int64; expected float32 or float64")


def test_rejects_float16() -> None:
    arrays, meta = good_parts()
    arrays["by"] = arrays["by"].astype(np.float16)
    rejects(pack(arrays, meta), "'by' has dtype float16")


def test_rejects_mixed_dtypes() -> None:
    arrays, meta = good_parts("float32")
    arrays["Wax"] = arrays["Wax"].astype(np.float64)
    rejects(pack(arrays, meta), "mix dtypes")


def test_rejects_meta_dtype_disagreeing_with_the_arrays() -> None:
    arrays, meta = good_parts("float32")
    meta["dtype"] = "float64"
    rejects(pack(arrays, meta), "meta.dtype")


@pytest.mark.parametrize("value,word", [(np.nan, "1 NaN"), (np.inf, "1 inf"), (-np.inf, "1 inf")])
def test_rejects_non_finite_weights(value: float, word: str) -> None:
    arrays, meta = good_parts()
    arrays["Wya"][2, 3] = value
    rejects(pack(arrays, meta), f"'Wya' has 1 non-finite values .*{word}")


def test_accepts_big_endian_arrays_bit_exactly() -> None:
    arrays, meta = good_parts("float64")
    swapped = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    back = model_from_bytes(pack(swapped, meta))
    assert back.params.dtype == np.dtype("float64")
    for name in PARAM_NAMES:
        assert_bits_equal(getattr(back.params, name), arrays[name])


@pytest.mark.parametrize("text", ["{not json", "", "NaN", '{"format": NaN}'])
def test_rejects_meta_that_is_not_json(text: str) -> None:
    arrays, _ = good_parts()
    rejects(pack(arrays, text), "not valid JSON")


def test_rejects_meta_that_is_not_an_object() -> None:
    arrays, _ = good_parts()
    rejects(pack(arrays, "[1, 2]"), "JSON object")


def test_rejects_a_wrong_format_name() -> None:
    arrays, meta = good_parts()
    meta["format"] = "something-else"
    rejects(pack(arrays, meta), "meta.format is 'something-else'; expected 'charnn-model'")


def test_a_training_state_loaded_as_a_model_says_what_it_is() -> None:
    rejects(state_to_bytes(make_state()), "load it with load_state")


@pytest.mark.parametrize("version", [999, 2])
def test_rejects_a_newer_format_version(version: int) -> None:
    arrays, meta = good_parts()
    meta["format_version"] = version
    rejects(pack(arrays, meta), f"format_version {version} is newer.*upgrade charnn")


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_rejects_an_invalid_format_version(version: Any) -> None:
    arrays, meta = good_parts()
    meta["format_version"] = version
    rejects(pack(arrays, meta), "format_version must be a positive integer")


def test_rejects_vocab_with_duplicates() -> None:
    arrays, meta = good_parts()
    meta["vocab"][1] = meta["vocab"][0]
    rejects(pack(arrays, meta), "distinct; repeated: \\['\\\\n'\\]")


@pytest.mark.parametrize("vocab", [[], "abcdefgh", ["ab"] + list(CHARS[1:]), [1] + list(CHARS[1:])])
def test_rejects_a_malformed_vocab(vocab: Any) -> None:
    arrays, meta = good_parts()
    meta["vocab"] = vocab
    rejects(pack(arrays, meta), "meta.vocab")


def test_rejects_a_vocab_size_mismatch() -> None:
    arrays, meta = good_parts()
    meta["vocab"].append("z")
    rejects(
        pack(arrays, meta),
        f"vocabulary size mismatch.*{len(CHARS)} characters.*has {len(CHARS) + 1}",
    )


@pytest.mark.parametrize("key", ["hyperparameters", "metrics"])
def test_rejects_sections_that_are_not_objects(key: str) -> None:
    arrays, meta = good_parts()
    meta[key] = [1]
    rejects(pack(arrays, meta), f"meta.{key} must be a JSON object")


def test_limit_on_the_raw_size() -> None:
    data = model_to_bytes(make_model())
    rejects(data, "over the limit", max_bytes=len(data) - 1)
    model_from_bytes(data, max_bytes=len(data) + 1000)


def test_load_model_limits_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    save_model(path, make_model())
    with pytest.raises(CheckpointError, match="larger than the limit"):
        load_model(path, max_bytes=100)


def test_random_corruption_only_ever_raises_checkpoint_error() -> None:
    data = model_to_bytes(make_model())
    rng = np.random.default_rng(0)
    for _ in range(300):
        broken = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            broken[pos] ^= int(rng.integers(1, 256))
        cut = int(rng.integers(len(data) // 2, len(data) + 1))
        try:
            model_from_bytes(bytes(broken[:cut]))
        except CheckpointError:
            pass


# ---------------------------------------------------------------- training state


def make_state(dtype: str = "float32", optimizer: str = "adam", best: bool = True) -> TrainState:
    config = TrainConfig(hidden_size=N_A, batch_size=3, optimizer=optimizer, dtype=dtype)
    params = random_params(N_A, len(CHARS), dtype, seed=1)
    rng = np.random.default_rng(2)
    opt = init_state(optimizer, params.flat.size, params.dtype)
    for arr in opt.values():
        arr[...] = rng.random(arr.size)
    return TrainState(
        config=config,
        vocab=Vocab(CHARS),
        corpus_sha256=corpus_digest("some corpus"),
        params=params,
        optimizer=opt,
        hidden=rng.standard_normal((3, N_A)).astype(dtype),
        step=17,
        epoch=2,
        chunk=5,
        elapsed_s=12.345678901234567,
        best_params=random_params(N_A, len(CHARS), dtype, seed=3) if best else None,
        best_val_loss=1.0000000000000002 if best else None,
        best_step=15 if best else None,
        evals_since_best=1,
        last_train_loss=1.2,
        last_val_loss=1.1,
        last_eval_step=16,
        stop_reason="time_limit",
    )


def assert_states_equal(a: TrainState, b: TrainState) -> None:
    assert b.config == a.config
    assert b.vocab == a.vocab
    assert_params_equal(a.params, b.params)
    if a.best_params is None:
        assert b.best_params is None
    else:
        assert b.best_params is not None
        assert_params_equal(a.best_params, b.best_params)
    assert sorted(b.optimizer) == sorted(a.optimizer)
    for key in a.optimizer:
        assert_bits_equal(a.optimizer[key], b.optimizer[key])
    assert_bits_equal(a.hidden, b.hidden)
    for f in (
        "corpus_sha256", "step", "epoch", "chunk", "elapsed_s", "best_val_loss", "best_step",
        "evals_since_best", "last_train_loss", "last_val_loss", "last_eval_step", "stop_reason",
    ):  # fmt: skip
        assert getattr(b, f) == getattr(a, f), f
        assert type(getattr(b, f)) is type(getattr(a, f)), f


@pytest.mark.parametrize(
    "dtype,optimizer,best",
    [("float32", "adam", True), ("float64", "adam", True), ("float32", "sgd", False),
     ("float64", "adagrad", False)],
)  # fmt: skip
def test_state_round_trip_is_bit_exact(dtype: str, optimizer: str, best: bool) -> None:
    state = make_state(dtype, optimizer, best)
    assert_states_equal(state, state_from_bytes(state_to_bytes(state)))


def test_state_layout_names_every_array() -> None:
    with np.load(io.BytesIO(state_to_bytes(make_state())), allow_pickle=False) as npz:
        names = set(npz.files)
        meta = json.loads(str(npz["meta"][()]))
        assert npz["optimizer.m"].shape == (flat_size(N_A, len(CHARS)),)
        assert npz["hidden"].shape == (3, N_A)
        assert npz["best.Wya"].shape == param_shapes(N_A, len(CHARS))["Wya"]
    assert names == {
        *PARAM_NAMES, *(f"best.{n}" for n in PARAM_NAMES), "optimizer.m", "optimizer.v",
        "hidden", "meta",
    }  # fmt: skip
    assert meta["format"] == "charnn-train-state"
    assert meta["format_version"] == 1
    assert meta["config"]["optimizer"] == "adam"
    assert meta["step"] == 17


def test_save_and_load_state_through_a_file(tmp_path: Path) -> None:
    state = make_state()
    save_state(tmp_path / "run.state.npz", state)
    assert_states_equal(state, load_state(tmp_path / "run.state.npz"))


def test_resumed_training_matches_an_uninterrupted_run() -> None:
    text = "the quick brown fox jumps over the lazy dog. " * 40
    config = TrainConfig(hidden_size=12, seq_length=8, batch_size=4, max_steps=10, eval_every=3)
    whole = Trainer(text, config, threads=1)
    for _ in whole.run():
        pass
    first = Trainer(text, config, threads=1)
    for _ in first.run(should_stop=lambda: first.state.step >= 6):
        pass
    state = state_from_bytes(state_to_bytes(first.state))
    rest = Trainer(text, resume=state, threads=1)
    for _ in rest.run():
        pass
    assert rest.state.step == whole.state.step == 10
    assert_bits_equal(whole.state.params.flat, rest.state.params.flat)
    assert whole.state.best_params is not None and rest.state.best_params is not None
    assert_bits_equal(whole.state.best_params.flat, rest.state.best_params.flat)
    for key in whole.state.optimizer:
        assert_bits_equal(whole.state.optimizer[key], rest.state.optimizer[key])
    assert rest.state.best_val_loss == whole.state.best_val_loss


def state_parts() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(io.BytesIO(state_to_bytes(make_state())), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return arrays, json.loads(str(arrays.pop("meta")[()]))


def state_rejects(arrays: dict[str, Any], meta: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        state_from_bytes(pack(arrays, meta))


def test_state_rejects_a_wrong_optimizer_shape() -> None:
    arrays, meta = state_parts()
    arrays["optimizer.v"] = arrays["optimizer.v"][:-1]
    state_rejects(arrays, meta, r"'optimizer.v' has shape \(\d+,\); expected")


def test_state_rejects_optimizer_arrays_of_another_optimizer() -> None:
    arrays, meta = state_parts()
    meta["config"]["optimizer"] = "adagrad"
    state_rejects(arrays, meta, r"missing arrays \['optimizer.sum_sq'\].*unexpected arrays")


def test_state_rejects_a_wrong_hidden_shape() -> None:
    arrays, meta = state_parts()
    arrays["hidden"] = np.zeros((3, N_A + 1), np.float32)
    state_rejects(arrays, meta, r"'hidden' has shape \(3, 7\); expected \(B, 6\)")


def test_state_rejects_a_hidden_of_another_dtype() -> None:
    arrays, meta = state_parts()
    arrays["hidden"] = arrays["hidden"].astype(np.float64)
    state_rejects(arrays, meta, "'hidden' has dtype float64; expected float32")


def test_state_rejects_partial_best_params() -> None:
    arrays, meta = state_parts()
    del arrays["best.by"]
    state_rejects(arrays, meta, r"missing arrays \['best.by'\]")


def test_state_rejects_nan_in_the_optimizer() -> None:
    arrays, meta = state_parts()
    arrays["optimizer.m"][0] = np.nan
    state_rejects(arrays, meta, "'optimizer.m' has 1 non-finite")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("step", -1, "meta.step must be an integer >= 0"),
        ("step", 1.5, "meta.step must be an integer"),
        ("best_step", 99, "meta.best_step .* is after meta.step"),
        ("elapsed_s", "soon", "meta.elapsed_s"),
        ("last_val_loss", "x", "meta.last_val_loss must be a number or null"),
        ("stop_reason", "bored", "meta.stop_reason"),
        ("corpus_sha256", "abc", "corpus_sha256"),
        ("config", [], "meta.config must be a JSON object"),
    ],
)
def test_state_rejects_bad_meta(key: str, value: Any, match: str) -> None:
    arrays, meta = state_parts()
    meta[key] = value
    state_rejects(arrays, meta, match)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("hidden_size", N_A + 1, "hidden_size is 7 but the weights have n_a=6"),
        ("hidden_size", "6", "config.hidden_size must be int"),
        ("learning_rate", -1.0, "not a valid training configuration.*learning_rate"),
        ("dtype", "float64", "config.dtype is 'float64' but the weights are float32"),
        ("unknown_knob", 1, "unknown hyperparameters: unknown_knob"),
    ],
)
def test_state_rejects_a_bad_config(key: str, value: Any, match: str) -> None:
    arrays, meta = state_parts()
    meta["config"][key] = value
    state_rejects(arrays, meta, match)


def test_saving_a_state_with_nan_hidden_is_refused() -> None:
    state = make_state()
    state.hidden[0, 0] = np.inf
    with pytest.raises(CheckpointError, match="refusing to save.*'hidden'"):
        state_to_bytes(state)


def test_a_model_loaded_as_a_state_says_what_it_is() -> None:
    with pytest.raises(CheckpointError, match="load it with load_model"):
        state_from_bytes(model_to_bytes(make_model()))


# ---------------------------------------------------------------- hostile headers, archives, meta


def npy_with_header(text: bytes, version: int = 1) -> bytes:
    """A .npy member whose header is ``text`` verbatim (padded as numpy pads), then data."""
    prefix = 10 if version == 1 else 12
    header = text + b" " * (63 - (prefix + len(text)) % 64) + b"\n"
    size = len(header).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + header + b"\0" * 64


def with_member(name: str, body: bytes) -> bytes:
    """A valid model checkpoint, except that member ``name``.npy holds ``body``."""
    arrays, meta = good_parts()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, arr in {**arrays, "meta": np.array(json.dumps(meta))}.items():
            zf.writestr(f"{key}.npy", body if key == name else _npy(arr))
    return buf.getvalue()


_HEADER_START = b"{'descr': '<f4', 'fortran_order': False, 'shape': "


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "text,match",
    [
        (_HEADER_START + b"(2, 2), ", "malformed .npy header"),  # never closes: SyntaxError
        (_HEADER_START + b"(2,\n 2),\n", "malformed .npy header"),
        (_HEADER_START + b"(" * 500 + b")" * 500 + b"}", "malformed .npy header"),
        (b"{'descr': " + b"(" * 300 + b"'<f4'" + b", 1)" * 300 + b", 'fortran_order': False, "
         b"'shape': (2,)}", "malformed .npy header"),
        (b"{'descr': [1, 2], 'fortran_order': False, 'shape': (2,)}", "malformed .npy header"),
        (b"[1, 2]", "malformed .npy header"),
        (_HEADER_START + b"(-1, 6)}", "negative dimension"),
        # a zero-size dtype: the shape alone would be allocated (OverflowError past int64)
        (b"{'descr': '|V0', 'fortran_order': False, 'shape': (" + str(10**30).encode() + b",)}",
         "declares shape .* more data than the archive holds"),
        (b"{'descr': '|V0', 'fortran_order': False, 'shape': (1099511627776, 1048576)}",
         "declares shape .* more data than the archive holds"),
    ],
)  # fmt: skip
def test_rejects_a_malformed_npy_header_naming_the_member(
    text: bytes, match: str, version: int
) -> None:
    rejects(with_member("Waa", npy_with_header(text, version)), f"array 'Waa' .*{match}")


def test_rejects_a_member_too_short_for_its_magic() -> None:
    rejects(with_member("ba", b"\x93NUM"), "array 'ba' has a malformed .npy header")


@pytest.mark.slow  # over a second: the full suite runs it
def test_rejects_an_archive_with_tens_of_thousands_of_members() -> None:
    # Counted before any per-member work: this used to take minutes (names.count per name).
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(60_000):
            zf.writestr(f"m{i}.npy", b"")
    rejects(buf.getvalue(), "archive has 60000 members; a charnn checkpoint has at most 64")
    with pytest.raises(CheckpointError, match="60000 members"):
        state_from_bytes(buf.getvalue())


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_rejects_corrupt_compressed_members(method: int) -> None:
    arrays, meta = good_parts()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, arr in {**arrays, "meta": np.array(json.dumps(meta))}.items():
            zf.writestr(f"{name}.npy", _npy(arr))
    data = bytearray(buf.getvalue())
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    for pos in range(start + 9, start + 16):  # in the first stream (LZMA: after its header)
        broken = bytearray(data)
        broken[pos] ^= 0xFF
        rejects(bytes(broken), "corrupt or truncated checkpoint archive")


def test_rejects_duplicate_members() -> None:
    data = model_to_bytes(make_model())
    buf = io.BytesIO(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(buf, "a") as zf:
            zf.writestr("Wax.npy", _npy(np.zeros((N_A, len(CHARS)), np.float32)))
    rejects(buf.getvalue(), r"duplicate members \['Wax.npy'\]")


def _model_meta_with(place: str, bad: str) -> dict[str, Any]:
    _, meta = good_parts()
    if place == "vocab":
        meta["vocab"][3] = bad
    elif place == "name":
        meta["name"] = "tiny" + bad
    elif place == "hyperparameters key":
        meta["hyperparameters"][bad] = 1
    elif place == "metrics key":
        meta["metrics"]["note" + bad] = 1
    elif place == "nested":
        meta["metrics"]["history"] = [{"step": 1}, {"notes": ["ok", bad]}]
    elif place == "top-level key":
        meta[bad] = "x"
    return meta


_SURROGATE_PLACES = [
    ("vocab", r"meta.vocab\[3\] holds a lone UTF-16 surrogate \(U\+D800 at index 0\)"),
    ("name", r"meta.name holds a lone UTF-16 surrogate \(U\+D800 at index 4\)"),
    ("hyperparameters key", r"meta.hyperparameters key '\\ud800' holds a lone"),
    ("metrics key", r"meta.metrics key 'note\\ud800' holds a lone"),
    ("nested", r"meta.metrics.history\[1\].notes\[1\] holds a lone"),
    ("top-level key", r"^meta key '\\ud800' holds a lone"),
]


@pytest.mark.parametrize("ascii_escape", [True, False])  # "\ud800" in the JSON, or raw
@pytest.mark.parametrize("place,match", _SURROGATE_PLACES)
def test_rejects_lone_surrogates_anywhere_in_model_meta(
    place: str, match: str, ascii_escape: bool
) -> None:
    arrays, _ = good_parts()
    text = json.dumps(_model_meta_with(place, "\ud800"), ensure_ascii=ascii_escape)
    assert ("\\ud800" in text) is ascii_escape
    rejects(pack(arrays, text), match)


def test_a_low_surrogate_is_refused_and_a_surrogate_pair_is_a_character() -> None:
    arrays, meta = good_parts()
    meta["name"] = "\udc00"
    rejects(pack(arrays, meta), r"meta.name holds a lone UTF-16 surrogate \(U\+DC00")
    text = json.dumps({**meta, "name": "x"}).replace('"x"', '"\\ud83d\\ude00"')
    assert model_from_bytes(pack(arrays, text)).extra["name"] == "😀"


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m["vocab"].__setitem__(2, "\ud800"), r"meta.vocab\[2\]"),
        (lambda m: m["config"].__setitem__("\udfff", 1), r"meta.config key '\\udfff'"),
        (lambda m: m.__setitem__("corpus_sha256", "\ud800"), "meta.corpus_sha256"),
    ],
)
def test_state_rejects_lone_surrogates_in_meta(edit: Any, match: str) -> None:
    arrays, meta = state_parts()
    edit(meta)
    state_rejects(arrays, meta, match + " holds a lone UTF-16 surrogate")


def test_saving_refuses_lone_surrogates() -> None:
    for ckpt, match in [
        (replace(make_model(), extra={"name": "a\ud800"}), "meta.name"),
        (replace(make_model(), hyperparameters={"\ud800": 1}), "meta.hyperparameters key"),
        (replace(make_model(), metrics={"m": [{"x": "\udc00"}]}), r"meta.metrics.m\[0\].x"),
        (replace(make_model(), vocab=Vocab((*CHARS[:-1], "\ud800"))), r"meta.vocab\[7\]"),
    ]:
        with pytest.raises(CheckpointError, match=f"refusing to save.*{match}.*surrogate"):
            model_to_bytes(ckpt)
    state = make_state()
    state.vocab = Vocab((*CHARS[:-1], "\ud800"))
    with pytest.raises(CheckpointError, match=r"refusing to save.*meta.vocab\[7\].*surrogate"):
        state_to_bytes(state)


def test_rejects_meta_holding_code_points_past_unicode() -> None:
    arrays, meta = good_parts()
    units = np.frombuffer(json.dumps(meta).encode("utf-32-le"), "<u4").copy()
    units[units.tolist().index(ord("t"))] = 0xFFFF_FFFF  # inside "tiny"
    arrays["meta"] = np.frombuffer(units.tobytes(), f"<U{units.size}").reshape(())
    rejects(pack(arrays), "'meta' holds code point 0xffffffff, past the last Unicode one")


def test_meta_numbers_out_of_float_range_are_refused() -> None:
    arrays, meta = good_parts()
    text = json.dumps({**meta, "metrics": {"loss": 123.5}}).replace("123.5", "1e999")
    rejects(pack(arrays, text), "not valid JSON: number 1e999 is out of range")
    arrays, meta = state_parts()
    for key, match in [
        ("elapsed_s", "meta.elapsed_s is out of the range of a float"),
        ("best_val_loss", "meta.best_val_loss is out of the range of a float"),
        ("step", r"meta.step must be an integer >= 0 and < 2\*\*63"),
    ]:
        state_rejects(arrays, {**meta, key: 10**400}, match)
    state_rejects(
        arrays, {**meta, "step": 2**63}, r"meta.step must be an integer >= 0 and < 2\*\*63"
    )
    config = {**meta["config"], "learning_rate": 10**400}
    state_rejects(arrays, {**meta, "config": config}, "not a valid training configuration")


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old content that is longer")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    atomic_write_bytes(str(tmp_path / "other.bin"), b"x" * 100_000)
    assert sorted(os.listdir(tmp_path)) == ["file.bin", "other.bin"]


def test_atomic_write_keeps_existing_permissions(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    atomic_write_bytes(target, b"new")
    assert target.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.bin"
    atomic_write_bytes(fresh, b"new")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~atomic._umask()


def test_a_failed_atomic_write_keeps_the_old_file_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


# ---------------------------------------------------------------- no unpickling anywhere


def test_no_code_loads_pickles() -> None:
    pattern = re.compile(r"allow_pickle\s*=\s*True|\bpickle\.load|\bcPickle\b")
    offenders = []
    files = [p for d in ("model", "app") if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    assert any(p.name == "checkpoint.py" for p in files)  # the scan does look at the code
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
