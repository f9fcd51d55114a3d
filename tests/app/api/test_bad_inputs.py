"""Bad inputs: each one a 4xx in the one error shape, saying what was wrong and what is
allowed, and storing nothing; Unicode text trained and served exactly as sent.

Statuses: 422 for a request the server understood but refuses (schema, corpus,
hyperparameters, checkpoint, characters outside the vocabulary), 404 for ids
and model references that name nothing, 413 for a body over ``max_body_bytes``.
The table in docs/reliability.md ("Bad inputs") maps each case to its test here.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.params import init_params
from model.vocab import Vocab

from ..conftest import CORPUS, QUICK, asgi_client, settings_for, wait_status
from .test_jobs import BAD_BODIES

MAX_CORPUS = 5_000
TEXT = "hello world, the model's whole vocabulary\n"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def refused(r: httpx.Response, status: int, code: str | None, *words: str) -> None:
    """Status, the error shape, the code, and the words the message must hold."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details", "request_id"}
    assert body["error"]["request_id"] == r.headers["x-request-id"]
    if code is not None:
        assert body["error"]["code"] == code, body
    else:
        assert body["error"]["code"] in ("invalid", "invalid_corpus", "invalid_hyperparameters")
    message = body["error"]["message"].lower()
    for word in words:
        assert word.lower() in message, (word, body["error"]["message"])


async def assert_nothing_stored(c: httpx.AsyncClient, data_dir: Path, models: int = 0) -> None:
    assert (await c.get("/jobs")).json()["total"] == 0
    assert (await c.get("/models")).json()["total"] == models
    assert list((data_dir / "jobs").iterdir()) == []
    assert len(list((data_dir / "models").iterdir())) == models


@asynccontextmanager
async def client(tmp_path: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(tmp_path / "data", **{"max_corpus_chars": MAX_CORPUS, **overrides})
    async with asgi_client(settings) as c:
        yield c


def raw_json(text: str) -> bytes:
    return text.encode()


# ------------------------------------------------------------------ POST /jobs, JSON

OK = CORPUS[:2000]
# (label, body: dict or raw bytes, status, code or None for any 422 code, words in the message)
JOB_JSON: list[tuple[str, Any, int, str | None, tuple[str, ...]]] = [
    *((label, body, 422, None, (msg,)) for label, body, msg in BAD_BODIES),
    ("single character", {"corpus": "a"}, 422, "invalid_corpus", ("one distinct", "at least 2")),
    (
        "too short",
        {"corpus": "ab" * 10},
        422,
        "invalid_corpus",
        (
            "seq_length + 1 = 65",
            "lower seq_length to at most 17",
            "or lower val_fraction",
            "or give more text",
        ),
    ),
    (
        "validation part leaves too little",
        {"corpus": OK[:200], "hyperparameters": {"val_fraction": 0.9}},
        422,
        "invalid_corpus",
        ("training part", "lower val_fraction (180 characters are held out"),
    ),
    ("corpus over max_corpus_chars", {"corpus": "ab" * MAX_CORPUS}, 422, "invalid", ("5000",)),
    ("corpus not a string", {"corpus": 123}, 422, "invalid", ("corpus", "valid string")),
    ("corpus missing", {"name": "x"}, 422, "invalid", ("corpus", "required")),
    ("body not an object", [1, 2], 422, "invalid", ("object",)),
    *(
        (f"{hp}={value!r}", {"corpus": OK, "hyperparameters": {hp: value}}, 422, "invalid", words)
        for hp, value, words in [
            ("hidden_size", 0, ("hidden_size", "greater than or equal to 1")),
            ("hidden_size", -5, ("hidden_size", "greater than or equal to 1")),
            ("hidden_size", 10**6, ("hidden_size", "less than or equal to 4096")),
            ("hidden_size", 1.5, ("hidden_size", "valid integer")),
            ("hidden_size", True, ("hidden_size", "valid integer")),
            ("hidden_size", "16", ("hidden_size", "valid integer")),
            ("seq_length", 0, ("seq_length", "greater than or equal to 1")),
            ("batch_size", 10**9, ("batch_size", "less than or equal to 4096")),
            ("batch_size", [4], ("batch_size", "valid integer")),
            ("max_steps", 0, ("max_steps", "greater than or equal to 1")),
            ("learning_rate", 0, ("learning_rate", "greater than 0")),
            ("learning_rate", 1e9, ("learning_rate", "less than or equal to 10")),
            ("learning_rate", "fast", ("learning_rate", "valid number")),
            ("grad_clip", -1, ("grad_clip", "greater than or equal to 0")),
            ("time_limit_s", 0, ("time_limit_s", "greater than 0")),
            ("val_fraction", 1, ("val_fraction", "less than 1")),
            ("dtype", "float16", ("dtype", "'float32' or 'float64'")),
            ("optimizer", 3, ("optimizer", "'sgd', 'adagrad' or 'adam'")),
        ]
    ),
    (
        "batch_size over the server's ceiling",
        {"corpus": OK, "hyperparameters": {"batch_size": 600}},
        422,
        "invalid",
        ("batch_size 600", "limit of 512"),
    ),
    ("seed negative", {"corpus": OK, "seed": -1}, 422, "invalid", ("seed", "greater than")),
    ("seed bool", {"corpus": OK, "seed": False}, 422, "invalid", ("seed", "valid integer")),
    ("name too long", {"corpus": OK, "name": "n" * 201}, 422, "invalid", ("name", "200")),
    ("NUL in the name", {"corpus": OK, "name": "a\x00b"}, 422, "invalid", ("name", "NUL")),
    (
        "NaN learning_rate",
        raw_json(f'{{"corpus": "{OK}", "hyperparameters": {{"learning_rate": NaN}}}}'),
        422,
        "invalid",
        ("learning_rate", "finite"),
    ),
    (
        "Infinity time_limit_s",
        raw_json(f'{{"corpus": "{OK}", "hyperparameters": {{"time_limit_s": Infinity}}}}'),
        422,
        "invalid",
        ("time_limit_s", "finite"),
    ),
    (
        "lone surrogate in the corpus",
        raw_json('{"corpus": "ab\\ud800cd"}'),
        422,
        "invalid",
        ("surrogate", "valid unicode"),
    ),
    (
        "lone low surrogate followed by text",
        raw_json(f'{{"corpus": "{OK}\\udc00{OK}"}}'),
        422,
        "invalid",
        ("surrogate", "valid unicode"),
    ),
    (
        "lone surrogate in the name",
        raw_json(f'{{"corpus": "{OK}", "name": "\\ud800"}}'),
        422,
        "invalid",
        ("surrogate", "valid unicode"),
    ),
    ("not JSON", b"{not json", 422, "invalid", ("json", "multipart/form-data")),
    ("empty body", b"", 422, "invalid", ("json", "multipart/form-data")),
    ("invalid UTF-8 JSON", b'{"corpus": "\xff\xfe"}', 422, "invalid", ("json",)),
    ("init_from unknown", {"corpus": OK, "init_from": "nope"}, 404, "not_found", ("no model",)),
]


@pytest.mark.parametrize("label,body,status,code,words", JOB_JSON, ids=[c[0] for c in JOB_JSON])
def test_post_jobs_json_refusals(
    tmp_path: Path, label: str, body: Any, status: int, code: str | None, words: tuple[str, ...]
) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            if isinstance(body, bytes):
                headers = {"content-type": "application/json"}
                r = await c.post("/jobs", content=body, headers=headers)
            else:
                r = await c.post("/jobs", json=body)
            refused(r, status, code, *words)
            await assert_nothing_stored(c, tmp_path / "data")

    run(go())


# ------------------------------------------------------------------ POST /jobs, multipart

GOOD_FILE = ("corpus.txt", OK.encode(), "text/plain")
JOB_MULTIPART: list[tuple[str, dict[str, Any], dict[str, str], str | None, tuple[str, ...]]] = [
    ("invalid UTF-8", {"corpus": ("c.txt", b"ab\xff\xfe" * 100, "text/plain")}, {}, "invalid",
     ("not valid utf-8", "byte 2")),
    ("NUL bytes", {"corpus": ("c.txt", b"ab\x00" * 100, "text/plain")}, {}, "invalid", ("NUL",)),
    ("empty file", {"corpus": ("c.txt", b"", "text/plain")}, {}, "invalid", ("empty",)),
    ("whitespace file", {"corpus": ("c.txt", b" \r\n\t" * 50, "text/plain")}, {}, "invalid",
     ("only whitespace",)),
    ("one character", {"corpus": ("c.txt", b"z" * 300, "text/plain")}, {}, "invalid_corpus",
     ("one distinct",)),
    ("too short", {"corpus": ("c.txt", b"abc", "text/plain")}, {}, "invalid_corpus",
     ("seq_length + 1",)),
    ("over max_corpus_chars", {"corpus": ("c.txt", b"ab" * MAX_CORPUS, "text/plain")}, {},
     "invalid", ("max_corpus_chars", "5000")),
    ("no corpus part", {"text": GOOD_FILE}, {}, "invalid", ("'corpus' part",)),
    ("config not JSON", {"corpus": GOOD_FILE}, {"config": "{oops"}, "invalid",
     ("config", "json", "JobConfig")),
    ("config not UTF-8", {"corpus": GOOD_FILE, "config": ("c.json", b"\xff", "application/json")},
     {}, "invalid", ("config",)),
    ("config hidden_size 0", {"corpus": GOOD_FILE},
     {"config": '{"hyperparameters": {"hidden_size": 0}}'}, "invalid",
     ("hyperparameters.hidden_size", "greater than or equal to 1")),
    ("config unknown field", {"corpus": GOOD_FILE}, {"config": '{"corpus": "x"}'}, "invalid",
     ("corpus", "extra inputs")),
    ("config lone surrogate", {"corpus": GOOD_FILE}, {"config": '{"name": "\\ud800"}'}, "invalid",
     ("surrogate",)),
]  # fmt: skip


@pytest.mark.parametrize(
    "label,files,data,code,words", JOB_MULTIPART, ids=[c[0] for c in JOB_MULTIPART]
)
def test_post_jobs_multipart_refusals(
    tmp_path: Path,
    label: str,
    files: dict[str, Any],
    data: dict[str, str],
    code: str | None,
    words: tuple[str, ...],
) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            refused(await c.post("/jobs", files=files, data=data), 422, code, *words)
            await assert_nothing_stored(c, tmp_path / "data")

    run(go())


# ------------------------------------------------------------------ POST /models (.npz)


def good_npz() -> bytes:
    vocab = Vocab.from_text(TEXT)
    return model_to_bytes(
        ModelCheckpoint(init_params(8, len(vocab), np.random.default_rng(0)), vocab)
    )


def npz_parts() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(io.BytesIO(good_npz()), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return arrays, json.loads(str(arrays.pop("meta")[()]))


def zipped(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=isinstance(arr, np.ndarray) and arr.dtype.hasobject)
    return buf.getvalue()


def repacked(change: dict[str, np.ndarray], meta_change: dict[str, Any] | None = None) -> bytes:
    arrays, meta = npz_parts()
    arrays.update(change)
    meta.update(meta_change or {})
    members = {f"{k}.npy": npy(v) for k, v in arrays.items()}
    return zipped({**members, "meta.npy": npy(np.array(json.dumps(meta)))})


def zip_bomb(claimed: int = 0x7FFF_FFF0) -> bytes:
    """A valid archive whose directory claims a member inflates to ``claimed`` bytes."""
    data = bytearray(good_npz())
    (cd_offset,) = struct.unpack("<I", data[-6:-2])
    data[cd_offset + 24 : cd_offset + 28] = struct.pack("<I", claimed)
    return bytes(data)


def test_an_upload_may_expand_at_most_4x_the_body_limit(tmp_path: Path) -> None:
    """Under the loader's 512 MB default but far over the upload's own cap: refused
    before anything is inflated, so a small body cannot make the server allocate much."""

    async def go() -> None:
        async with client(tmp_path, max_body_bytes=1_000_000) as c:
            headers = {"content-type": "application/octet-stream"}
            r = await c.post("/models", content=zip_bomb(50_000_000), headers=headers)
            refused(r, 422, "invalid_checkpoint", "uncompress", "4000000")
            ok = await c.post("/models", content=good_npz(), headers=headers)
            assert ok.status_code == 201, ok.text
            r = await c.post(
                "/models", content=good_npz(), headers=headers, params={"name": "a\x00b"}
            )
            refused(r, 422, "invalid", "nul")

    run(go())


def bad_npz(kind: str) -> bytes:
    arrays, _ = npz_parts()
    n_a, n_x = arrays["Wax"].shape
    if kind == "not a zip":
        return b"this is not a checkpoint"
    if kind == "empty":
        return b""
    if kind == "single .npy":
        return npy(np.zeros(3))
    if kind == "truncated":
        return good_npz()[:300]
    if kind == "zip bomb":
        return zip_bomb()
    if kind == "pickled object array":
        return repacked({"Wax": np.array([{"evil": 1}] * n_a, dtype=object)})
    if kind == "wrong shape":
        return repacked({"Waa": np.zeros((n_a, n_a + 1), np.float32)})
    if kind == "NaN weights":
        return repacked({"by": np.full((n_x, 1), np.nan, np.float32)})
    if kind == "vocabulary mismatch":
        return repacked({}, {"vocab": list("ab")})
    if kind == "not .npy members":
        return zipped({"notes.txt": b"hi"})
    if kind == "missing meta":
        return zipped({f"{k}.npy": npy(v) for k, v in arrays.items()})
    raise AssertionError(kind)


NPZ: list[tuple[str, tuple[str, ...]]] = [
    ("not a zip", ("not a checkpoint", ".npz")),
    ("empty", ("not a checkpoint", ".npz")),
    ("single .npy", ("single .npy", "expected an .npz")),
    ("truncated", ("corrupt or truncated",)),
    ("zip bomb", ("uncompress", "over the limit", "zip bomb")),
    ("pickled object array", ("object array", "never unpickled")),
    ("wrong shape", ("waa", "shape")),
    ("NaN weights", ("non-finite", "nan")),
    ("vocabulary mismatch", ("vocabulary size mismatch",)),
    ("not .npy members", (".npy arrays",)),
    ("missing meta", ("'meta'", "missing")),
]


@pytest.mark.parametrize("multipart", [False, True], ids=["octet-stream", "multipart"])
@pytest.mark.parametrize("kind,words", NPZ, ids=[c[0] for c in NPZ])
def test_post_models_refuses_malformed_checkpoints(
    tmp_path: Path, kind: str, words: tuple[str, ...], multipart: bool
) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            data = bad_npz(kind)
            if multipart:
                r = await c.post("/models", files={"file": ("m.npz", data, "application/zip")})
            else:
                headers = {"content-type": "application/octet-stream"}
                r = await c.post("/models", content=data, headers=headers)
            refused(r, 422, "invalid_checkpoint", *words)
            await assert_nothing_stored(c, tmp_path / "data")

    run(go())


def test_post_models_refuses_bad_forms_and_names(tmp_path: Path) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            r = await c.post("/models", files={"npz": ("m.npz", good_npz(), "application/zip")})
            refused(r, 422, "invalid", "'file' part", ".npz")
            r = await c.post("/models", content=good_npz(), params={"name": "n" * 201})
            refused(r, 422, "invalid", "name", "200 characters")
            r = await c.post(
                "/models", files={"file": ("m.npz", good_npz())}, data={"name": "n" * 201}
            )
            refused(r, 422, "invalid", "name", "200 characters")
            await assert_nothing_stored(c, tmp_path / "data")
            assert (await c.post("/models", content=good_npz())).status_code == 201  # the control

    run(go())


# ------------------------------------------------------------------ ids

IDS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "a" * 5000, "abc%00def", "%00", "0" * 32]
ROUTES = [
    ("GET", "/jobs/{}"),
    ("GET", "/jobs/{}/metrics"),
    ("GET", "/jobs/{}/events"),
    ("POST", "/jobs/{}/cancel"),
    ("GET", "/models/{}"),
    ("GET", "/models/{}/checkpoint"),
    ("DELETE", "/models/{}"),
]


def test_hostile_ids_are_404_and_touch_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            model_id = (await c.post("/models", content=good_npz())).json()["id"]
            for bad in IDS:
                for method, template in ROUTES:
                    r = await c.request(method, template.format(bad))
                    refused(r, 404, "not_found")
                    message = r.json()["error"]["message"]
                    assert "no such route" in message or "with id" in message, message
                    assert len(message) < 200  # a 5000-character id is not echoed whole
                for path in ("/predict", "/generate", "/score"):
                    text = {"prompt": "h"} if path == "/generate" else {"text": "h"}
                    r = await c.post(path, json={"model": bad, **text})
                    if len(bad) > 200:  # model references are names or ids: at most 200 characters
                        refused(r, 422, "invalid", "model", "at most 200 characters")
                    else:
                        refused(r, 404, "not_found", "no model")
            refused(await c.post("/predict", json={"model": "a\x00b"}), 404, "not_found")
            # the real model is still there, and nothing else was created
            assert (await c.get(f"/models/{model_id}")).status_code == 200
            await assert_nothing_stored(c, tmp_path / "data", models=1)

    run(go())


# ------------------------------------------------------------------ predict / generate / score

COMPUTE: list[tuple[str, str, Any, str, tuple[str, ...]]] = [
    ("prefix outside the vocabulary", "/predict", {"text": "héllo"}, "unknown_characters",
     ("not in the model's vocabulary", "'é'")),
    ("NUL in the prefix", "/predict", {"text": "h\x00"}, "unknown_characters", ("\\x00",)),
    ("top_k 0", "/predict", {"top_k": 0}, "invalid", ("top_k", "greater than or equal to 1")),
    ("top_k string", "/predict", {"top_k": "5"}, "invalid", ("top_k", "valid integer")),
    ("temperature negative", "/predict", {"temperature": -1}, "invalid",
     ("temperature", "greater than or equal to 0")),
    ("temperature NaN", "/predict", b'{"temperature": NaN}', "invalid", ("temperature", "finite")),
    ("unknown field", "/predict", {"text": "h", "colour": 1}, "invalid",
     ("colour", "extra inputs")),
    ("unknown mode", "/predict", {"unknown": "drop"}, "invalid", ("unknown", "'error' or 'skip'")),
    ("lone surrogate", "/predict", b'{"text": "h\\ud800"}', "invalid",
     ("text", "surrogate", "valid unicode")),
    ("not JSON", "/predict", b"{", "invalid", ("json",)),
    ("huge max_chars", "/generate", {"max_chars": 10**9}, "invalid",
     ("max_chars", "less than or equal to 10000")),
    ("negative max_chars", "/generate", {"max_chars": -1}, "invalid", ("max_chars",)),
    ("top_k 0", "/generate", {"top_k": 0}, "invalid", ("top_k", "greater than or equal to 1")),
    ("temperature negative", "/generate", {"temperature": -0.5}, "invalid", ("temperature",)),
    ("top_p 0", "/generate", {"top_p": 0}, "invalid", ("top_p", "greater than 0")),
    ("empty stop string", "/generate", {"stop": [""]}, "invalid", ("stop", "empty")),
    ("prompt outside the vocabulary", "/generate", {"prompt": "qxz"}, "unknown_characters",
     ("'q', 'x', 'z'",)),
    ("lone surrogate", "/generate", b'{"prompt": "\\udfff"}', "invalid", ("surrogate",)),
    ("empty text", "/score", {"text": ""}, "invalid", ("text", "at least 1 character")),
    ("text outside the vocabulary", "/score", {"text": "hi 😀"}, "unknown_characters",
     ("'i'", "'😀'")),
    ("lone surrogate", "/score", b'{"text": "h\\ud800"}', "invalid", ("surrogate",)),
]  # fmt: skip


@pytest.mark.parametrize(
    "label,path,body,code,words", COMPUTE, ids=[f"{c[1]} {c[0]}" for c in COMPUTE]
)
def test_compute_refusals(
    tmp_path: Path, label: str, path: str, body: Any, code: str, words: tuple[str, ...]
) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            assert (await c.post("/models", content=good_npz())).status_code == 201
            if isinstance(body, bytes):
                r = await c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = await c.post(path, json=body)
            refused(r, 422, code, *words)
            if code == "unknown_characters":
                assert r.json()["error"]["details"]["chars"]

    run(go())


def test_top_k_over_the_vocabulary_size_means_the_whole_vocabulary(tmp_path: Path) -> None:
    async def go() -> None:
        async with client(tmp_path) as c:
            assert (await c.post("/models", content=good_npz())).status_code == 201
            V = len(set(TEXT))
            r = await c.post("/predict", json={"text": "hel", "top_k": 100_000})
            assert r.status_code == 200, r.text
            nexts = r.json()["next"]
            assert sorted(n["char"] for n in nexts) == sorted(set(TEXT))
            assert len(nexts) == V and abs(sum(n["prob"] for n in nexts) - 1) < 1e-6
            exact = await c.post("/predict", json={"text": "hel", "top_k": V})
            assert exact.json()["next"] == nexts
            g = await c.post("/generate", json={"top_k": 10**5, "max_chars": 20, "seed": 3})
            assert g.status_code == 200 and len(g.json()["text"]) == 20
            assert set(g.json()["text"]) <= set(TEXT)

    run(go())


# ------------------------------------------------------------------ Unicode, end to end

# Every character once per period, so the next one is a function of the current one.
UNIT = "a\r\n" + "e\u0301" + "\u00e9" + "😀" + "שלום" + "سلام"
UNICODE_CORPUS = UNIT * 120
UNICODE_HP = {**QUICK, "hidden_size": 32, "max_steps": 300, "eval_every": 100}


def test_unicode_is_trained_and_served_code_point_for_code_point(tmp_path: Path) -> None:
    """No normalisation: CRLF is two characters, a combining mark is its own character,
    precomposed "é" differs from "e" + U+0301, an emoji outside the BMP is one character,
    and right-to-left text is stored in logical order like any other."""
    assert len(UNIT) == len(set(UNIT)) == 15

    async def go() -> None:
        async with client(tmp_path, max_corpus_chars=10**6) as c:
            files = {"corpus": ("mixed.txt", UNICODE_CORPUS.encode("utf-8"), "text/plain")}
            config = json.dumps({"name": "unicode", "hyperparameters": UNICODE_HP})
            r = await c.post("/jobs", files=files, data={"config": config})
            assert r.status_code == 202, r.text
            assert r.json()["corpus"] == {"chars": len(UNICODE_CORPUS), "vocab_size": 15}
            job = await wait_status(c, r.json()["id"], ("succeeded", "failed"), timeout=120)
            assert job["status"] == "succeeded", job
            model = (await c.get(f"/models/{job['model_id']}")).json()
            assert model["vocab"] == sorted(UNIT) and model["vocab_size"] == 15

            for i in range(len(UNIT)):  # the character after each one, prefix from the corpus
                prefix = UNIT + UNIT[: i + 1]
                p = await c.post("/predict", json={"text": prefix, "top_k": 3})
                assert p.status_code == 200, p.text
                assert p.json()["text"] == prefix
                best = p.json()["next"][0]
                assert best["char"] == (UNIT * 2)[i + 1] and best["prob"] > 0.5, (prefix, best)

            g = await c.post("/generate", json={"prompt": "a", "max_chars": 45, "temperature": 0})
            assert g.status_code == 200, g.text
            assert g.json()["text"] == (UNIT * 4)[1:46]
            events = await c.post(
                "/generate",
                json={"prompt": "😀", "max_chars": 15, "temperature": 0, "stream": True},
            )
            chunks = [
                json.loads(line[len("data: ") :])["text"]
                for line in events.text.split("\n")
                if line.startswith("data: ") and "finish_reason" not in line
            ]
            assert chunks == list((UNIT * 2)[UNIT.index("😀") + 1 :][:15])

            s = await c.post("/score", json={"text": UNIT * 2})
            assert s.status_code == 200, s.text
            assert s.json()["chars"] == 30 and len(s.json()["logprobs"]) == 30
            assert s.json()["mean_nats"] < 0.5  # learnt, far below ln 15 = 2.7

            # Same letter, other code points: refused by name, never normalised into the vocab.
            for text, unknown in (
                ("e\u0300", "\u0300"),
                ("\u00ea", "\u00ea"),
                ("\n\r\u2028", "\u2028"),
            ):
                r = await c.post("/predict", json={"text": text})
                refused(r, 422, "unknown_characters", "not in the model's vocabulary")
                assert r.json()["error"]["details"]["chars"] == [unknown]

    run(go())
