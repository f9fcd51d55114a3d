"""Typing sessions over WebSocket (/sessions), against a real uvicorn server: every answer
equals the in-process distribution of the session's text; refusals change nothing; the
limits close with their codes; a vanished client frees its place."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from model.checkpoint import ModelCheckpoint

from ..conftest import Server
from .test_concurrent_predict import ALPHABET, expected, model_bytes

Serve = Callable[..., Server]
pytestmark = pytest.mark.slow  # every test starts a real server


def ws_url(server: Server, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/sessions{query}"


def upload(server: Server, seed: int, hidden: int = 32, key: str | None = None) -> tuple[str, Any]:
    data, ckpt = model_bytes(seed, hidden)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server.url + "/models", content=data, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"], ckpt


async def ask(ws: ClientConnection, **op: Any) -> dict[str, Any]:
    await ws.send(json.dumps(op))
    answer: dict[str, Any] = json.loads(await ws.recv())
    return answer


def check(answer: dict[str, Any], ckpt: ModelCheckpoint, text: str) -> None:
    assert answer["type"] == "next", answer
    assert answer["length"] == len(text)
    want = expected(ckpt, text)
    got = {n["char"]: n["prob"] for n in answer["next"]}
    assert got.keys() == want.keys()
    for ch, p in want.items():
        assert abs(got[ch] - p) <= 1e-6, (text, ch, got[ch], p)
    probs = [n["prob"] for n in answer["next"]]
    assert probs == sorted(probs, reverse=True)


async def closed_with(ws: ClientConnection) -> tuple[int, str, list[dict[str, Any]]]:
    """Read to the end: (close code, close reason, the messages before it)."""
    messages = []
    try:
        while True:
            messages.append(json.loads(await ws.recv()))
    except ConnectionClosed as e:
        assert e.rcvd is not None, "the server did not send a close frame"
        return e.rcvd.code, e.rcvd.reason, messages


def test_feed_back_set_reset_follow_the_text(serve: Serve) -> None:
    server = serve(CHARNN_SESSION_HISTORY="4")  # small: `back` beyond it recomputes
    model, ckpt = upload(server, 1)

    async def go() -> None:
        async with connect(ws_url(server, f"?model={model}")) as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready" and ready["model"] == model
            assert ready["vocab"] == list(ckpt.vocab.chars) and ready["history"] == 4
            check({**ready, "type": "next", "length": 0}, ckpt, "")
            text = ""
            rng = np.random.default_rng(7)
            for i in range(60):
                kind = ["feed", "feed", "feed", "back", "set", "reset"][int(rng.integers(6))]
                if kind == "feed":
                    piece = "".join(rng.choice(list(ALPHABET), size=int(rng.integers(1, 12))))
                    answer = await ask(ws, op="feed", text=piece, id=i)
                    text += piece
                elif kind == "back":
                    n = int(rng.integers(1, len(text) + 1)) if text else 0
                    if not n:
                        continue
                    answer = await ask(ws, op="back", n=n, id=f"b{i}")
                    text = text[:-n]
                elif kind == "set":  # an edit somewhere in the middle
                    cut = int(rng.integers(0, len(text) + 1))
                    text = text[:cut] + "".join(rng.choice(list(ALPHABET), size=3))
                    answer = await ask(ws, op="set", text=text, id=i)
                else:
                    answer = await ask(ws, op="reset", id=i)
                    text = ""
                assert answer["id"] == (f"b{i}" if kind == "back" else i)
                check(answer, ckpt, text)
            top = await ask(ws, op="feed", text="a", top_k=3)
            assert len(top["next"]) == 3

    asyncio.run(go())


def test_top_k_and_temperature_of_the_session(serve: Serve) -> None:
    server = serve()
    model, ckpt = upload(server, 2)

    async def go() -> None:
        async with connect(ws_url(server, f"?model={model}&top_k=5&temperature=0.5")) as ws:
            ready = json.loads(await ws.recv())
            assert len(ready["next"]) == 5
            answer = await ask(ws, op="feed", text="the ")
            r = httpx.post(
                server.url + "/predict",
                json={"model": model, "text": "the ", "top_k": 5, "temperature": 0.5},
            )
            assert answer["next"] == r.json()["next"]
            assert answer["entropy_bits"] == r.json()["entropy_bits"]

    asyncio.run(go())


def test_refused_messages_change_nothing(serve: Serve) -> None:
    server = serve(CHARNN_SESSION_MAX_CHARS="20")
    model, ckpt = upload(server, 3)

    async def go() -> None:
        async with connect(ws_url(server, f"?model={model}")) as ws:
            await ws.recv()
            check(await ask(ws, op="feed", text="abc"), ckpt, "abc")
            refusals: list[tuple[str | bytes, str, str]] = [
                ("not json", "invalid", "one JSON object"),
                (b"\xff\xfe", "invalid", ""),
                (json.dumps({"op": "fly"}), "invalid", "fly"),
                (json.dumps({"op": "feed"}), "invalid", "text"),
                (json.dumps({"op": "feed", "text": ""}), "invalid", "text"),
                (json.dumps({"op": "feed", "text": "a", "extra": 1}), "invalid", "extra"),
                (json.dumps({"op": "back", "n": 0}), "invalid", "n"),
                (json.dumps({"op": "back", "n": "1"}), "invalid", "n"),
                (json.dumps({"op": "back", "n": 4}), "invalid", "has 3 characters"),
                (json.dumps({"op": "feed", "text": "xyZ€"}), "unknown_characters", "'Z'"),
                (json.dumps({"op": "set", "text": "ab€"}), "unknown_characters", "€"),
                (json.dumps({"op": "feed", "text": "a" * 18}), "invalid", "at most 20"),
                (json.dumps({"op": "set", "text": "a" * 21}), "invalid", "at most 20"),
                (json.dumps({"op": "feed", "text": "a", "top_k": 0}), "invalid", "top_k"),
                (json.dumps([1, 2]), "invalid", ""),
                ('{"op": "feed", "text": "a\\ud800"}', "invalid", "surrogate"),
            ]
            for raw, code, words in refusals:
                await ws.send(raw)
                answer = json.loads(await ws.recv())
                assert answer["type"] == "error", (raw, answer)
                assert answer["error"]["code"] == code, (raw, answer)
                assert words in answer["error"]["message"], (raw, answer)
                check(await ask(ws, op="feed", text="d"), ckpt, "abcd")  # unchanged, then on
                check(await ask(ws, op="back", n=1), ckpt, "abc")
            bad = await ask(ws, op="feed", text="Q", id="mine")
            assert bad["id"] == "mine" and bad["error"]["details"] == {"chars": ["Q"]}

    asyncio.run(go())


def test_open_refusals_close_with_their_codes(serve: Serve) -> None:
    server = serve(CHARNN_CORS_ORIGINS='["https://demo.example"]')

    async def closes(query: str, origin: str | None = None) -> tuple[int, str, str]:
        headers = {"Origin": origin} if origin else {}
        async with connect(ws_url(server, query), additional_headers=headers) as ws:
            code, reason, messages = await closed_with(ws)
        assert len(messages) == 1 and messages[0]["type"] == "error"
        assert reason and messages[0]["error"]["message"].startswith(reason[:40])
        return code, reason, messages[0]["error"]["code"]

    async def go() -> None:
        code, reason, _ = await closes("")
        assert code == 4404 and "no trained model yet" in reason
        model, _ = upload(server, 4)
        code, reason, _ = await closes("?model=nope")
        assert code == 4404 and "'nope'" in reason
        for query, words in [
            ("?top_k=0", "top_k"),
            ("?top_k=x", "top_k"),
            ("?temperature=-1", "temperature"),
            ("?temperature=nan", "temperature"),
            ("?colour=red", "colour"),
            ("?model=" + "m" * 201, "model"),
        ]:
            code, reason, error = await closes(query)
            assert (code, error) == (4422, "invalid") and words in reason, (query, reason)
        code, reason, error = await closes("", origin="https://evil.example")
        assert (code, error) == (4403, "forbidden_origin") and "CHARNN_CORS_ORIGINS" in reason
        for origin in ("https://demo.example", f"http://127.0.0.1:{server.port}", None):
            headers = {"Origin": origin} if origin else {}
            async with connect(ws_url(server), additional_headers=headers) as ws:
                assert json.loads(await ws.recv())["model"] == model

    asyncio.run(go())


def test_sessions_are_open_when_an_api_key_is_set_like_predict(serve: Serve) -> None:
    server = serve(CHARNN_API_KEY="sesame")
    model, ckpt = upload(server, 5, key="sesame")
    assert httpx.post(server.url + "/predict", json={"text": "ab"}).status_code == 200

    async def go() -> None:
        async with connect(ws_url(server)) as ws:
            assert json.loads(await ws.recv())["model"] == model
            check(await ask(ws, op="feed", text="ab"), ckpt, "ab")

    asyncio.run(go())


def open_sessions(server: Server) -> float:
    metrics = httpx.get(server.url + "/metrics").text
    found = re.search(r"^charnn_sessions_open (\S+)$", metrics, re.M)
    assert found, "no charnn_sessions_open gauge"
    return float(found.group(1))


async def until(condition: Callable[[], bool], tries: int = 400) -> None:
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never held")


def test_the_count_limit_and_a_vanished_client_frees_its_place(serve: Serve) -> None:
    server = serve(CHARNN_MAX_SESSIONS="2")
    model, ckpt = upload(server, 6)

    async def go() -> None:
        first = await connect(ws_url(server))
        second = await connect(ws_url(server))
        for ws in (first, second):
            await ws.recv()
        async with connect(ws_url(server)) as third:
            code, reason, messages = await closed_with(third)
        assert code == 4429 and "2 sessions are open" in reason
        assert messages[0]["error"]["code"] == "too_many_sessions"
        assert open_sessions(server) == 2
        await first.close()
        await until(lambda: open_sessions(server) == 1)
        # A client that vanishes without a close frame, in the middle of a long feed.
        await second.send(json.dumps({"op": "feed", "text": "ab" * 40_000}))
        second.transport.abort()
        await until(lambda: open_sessions(server) == 0)
        # A raw socket that completes the handshake, then drops.
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(
                b"GET /sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            assert raw.recv(4096).startswith(b"HTTP/1.1 101")
        await until(lambda: open_sessions(server) == 0)
        async with connect(ws_url(server)) as ws, connect(ws_url(server)) as ws2:
            await ws.recv()
            await ws2.recv()
            check(await ask(ws, op="feed", text="ok"), ckpt, "ok")

    asyncio.run(go())


def test_an_idle_session_is_closed(serve: Serve) -> None:
    server = serve(CHARNN_SESSION_IDLE_S="0.5")
    upload(server, 7)

    async def go() -> None:
        async with connect(ws_url(server)) as ws:
            await ws.recv()
            code, reason, _ = await closed_with(ws)
        assert code == 4408 and "idle for 0.5 s" in reason

    asyncio.run(go())


def test_many_sessions_on_two_models_get_their_own_answers(serve: Serve) -> None:
    server = serve()
    models = [upload(server, 10 + i, hidden=64) for i in range(2)]

    async def one(k: int) -> None:
        model, ckpt = models[k % 2]
        rng = np.random.default_rng(k)
        async with connect(ws_url(server, f"?model={model}")) as ws:
            await ws.recv()
            text = ""
            for _ in range(15):
                ch = str(rng.choice(list(ALPHABET)))
                text += ch
                check(await ask(ws, op="feed", text=ch), ckpt, text)
            check(await ask(ws, op="back", n=5), ckpt, text[:-5])

    async def go() -> None:
        await asyncio.gather(*(one(k) for k in range(32)))

    asyncio.run(go())


def test_shutdown_closes_sessions_with_going_away(serve: Serve) -> None:
    server = serve()
    upload(server, 8)

    async def go() -> None:
        async with connect(ws_url(server)) as ws:
            await ws.recv()
            server.proc.send_signal(signal.SIGTERM)
            code, reason, _ = await closed_with(ws)
        assert code == 1001 and "shutting down" in reason

    asyncio.run(go())
    assert server.proc.wait(timeout=30) is not None


@pytest.mark.parametrize("query", ["", "?top_k=2"])
def test_the_ready_message_names_the_limits(serve: Serve, query: str) -> None:
    server = serve(CHARNN_SESSION_MAX_CHARS="500", CHARNN_SESSION_IDLE_S="60")
    upload(server, 9)

    async def go() -> None:
        async with connect(ws_url(server, query)) as ws:
            ready = json.loads(await ws.recv())
        assert (ready["max_chars"], ready["idle_s"], ready["history"]) == (500, 60, 64)
        assert abs(sum(n["prob"] for n in ready["next"]) - 1) < 1e-5 or query
        assert len(ready["next"]) == (2 if query else len(ALPHABET))

    asyncio.run(go())


def test_the_readme_session_example_runs(serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "/sessions" in b]
    assert len(blocks) == 1
    server = serve()
    upload(server, 11)
    code = blocks[0].replace("ws://127.0.0.1:8000", f"ws://127.0.0.1:{server.port}")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[-1] == "2"
    assert lines[1].startswith("t [{'char':") and lines[1].count("'prob'") == 3


def garbage(rng: np.random.Generator) -> str | bytes:
    """A message that must be refused: malformed, or an op with one bad field."""
    ops: list[dict[str, Any]] = [
        {"op": "feed", "text": "ab"},
        {"op": "back", "n": 1},
        {"op": "set", "text": "abc"},
        {"op": "reset"},
    ]
    bad_fields: list[tuple[str, Any]] = [
        ("id", 1.5),
        ("id", [1]),
        ("id", {"a": 1}),
        ("id", "i" * 201),
        ("id", 2**70),
        ("id", True),
        ("top_k", 0),
        ("top_k", -3),
        ("top_k", 10**6),
        ("top_k", "3"),
        ("top_k", 2.5),
        ("top_k", False),
        ("surplus", 1),
    ]
    per_op: list[dict[str, Any]] = [
        {"op": "feed", "text": 5},
        {"op": "feed", "text": None},
        {"op": "feed", "text": ["a"]},
        {"op": "feed", "text": "a\u00e9\u2603"},
        {"op": "back", "n": -1},
        {"op": "back", "n": 1.0},
        {"op": "back", "n": True},
        {"op": "back", "n": 10**7},
        {"op": "set", "text": 0},
        {"op": "set", "text": "ok" + "\U0001f600"},
        {"op": ""},
        {"op": "FEED", "text": "a"},
        {"op": None},
        {"text": "a"},
    ]
    raw_forms: list[str | bytes] = [
        "",
        "{",
        "null",
        "[]",
        "3",
        '"feed"',
        '{"op": "feed", "text": "a\\ud800"}',
        '{"op": "feed", "text": "a", "id": "\\udc00"}',
        b"\xff\x00\x81",
        b'{"op": "reset"',
        "{" * 5000,
    ]
    kind = int(rng.integers(3))
    if kind == 0:
        field, value = bad_fields[int(rng.integers(len(bad_fields)))]
        op = dict(ops[int(rng.integers(len(ops)))])
        op[field] = value
        return json.dumps(op)
    if kind == 1:
        return json.dumps(per_op[int(rng.integers(len(per_op)))])
    return raw_forms[int(rng.integers(len(raw_forms)))]


def test_random_bad_messages_are_refused_and_change_nothing(serve: Serve) -> None:
    server = serve(CHARNN_SESSION_HISTORY="3")
    model, ckpt = upload(server, 12)

    async def go() -> None:
        async with connect(ws_url(server, f"?model={model}")) as ws:
            await ws.recv()
            rng = np.random.default_rng(0)
            text = ""
            for i in range(300):
                raw = garbage(rng)
                await ws.send(raw)
                answer = json.loads(await ws.recv())
                assert answer["type"] == "error", (raw, answer)
                assert answer["error"]["code"] in ("invalid", "unknown_characters"), answer
                assert answer["error"]["message"], answer
                if i % 10 == 0:  # the state is still the text's
                    ch = str(rng.choice(list(ALPHABET)))
                    text += ch
                    check(await ask(ws, op="feed", text=ch), ckpt, text)
            check(await ask(ws, op="back", n=len(text)), ckpt, "")

    asyncio.run(go())


def as_answer(out: Any) -> dict[str, Any]:
    return {"type": "next", **out.model_dump()}


def test_the_python_clients_sessions(serve: Serve) -> None:
    from app.client import ApiError, AsyncClient, Client

    server = serve(CHARNN_MAX_SESSIONS="1")
    model, ckpt = upload(server, 13)
    with Client(server.url) as client:
        with client.session(model, top_k=4) as s:
            assert s.ready is not None and s.ready.model == model
            assert len(s.feed("ab").next) == 4
            full = s.feed("c", top_k=100)
            check(as_answer(full), ckpt, "abc")
            check(as_answer(s.back(2, top_k=100)), ckpt, "a")
            check(as_answer(s.set("zz", top_k=100)), ckpt, "zz")
            with pytest.raises(ApiError) as refused:
                s.feed("Q")
            assert refused.value.code == "unknown_characters" and "'Q'" in str(refused.value)
            check(as_answer(s.reset(top_k=100)), ckpt, "")
            with pytest.raises(ApiError) as full_up, client.session(model):
                pass
            assert full_up.value.status == 429 and "1 sessions are open" in str(full_up.value)
        with pytest.raises(ApiError) as missing, client.session("nope"):
            pass
        assert missing.value.status == 404 and "'nope'" in str(missing.value)

    async def go() -> None:
        async with AsyncClient(server.url) as client, client.session(model, top_k=100) as s:
            check(as_answer(await s.feed("ab")), ckpt, "ab")
            check(as_answer(await s.back()), ckpt, "a")
            check(as_answer(await s.set("a b")), ckpt, "a b")
            check(as_answer(await s.reset()), ckpt, "")

    asyncio.run(go())
    with pytest.raises(ApiError) as gone, Client(f"http://127.0.0.1:{free_closed_port()}") as c:
        with c.session():
            pass
    assert gone.value.code == "unreachable"


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns: nobody listens
