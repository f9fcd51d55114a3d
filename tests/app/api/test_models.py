"""Predict, generate, score and manage models, on models trained by real jobs."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.serving.batcher import slice_steps
from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.inference import advance, initial_state, next_distribution, sample, score
from model.params import init_params
from model.vocab import Vocab

from ..conftest import asgi_client, settings_for, wait_status

PERIODIC = "abcd" * 300
SMALL = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "max_steps": 150, "eval_every": 50}


async def trained(
    c: httpx.AsyncClient, name: str = "abcd", corpus: str = PERIODIC
) -> dict[str, Any]:
    r = await c.post("/jobs", json={"corpus": corpus, "name": name, "hyperparameters": SMALL})
    assert r.status_code == 202, r.text
    job = await wait_status(c, r.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    return job


def test_predict_generate_score_and_manage(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            r = await c.post("/predict", json={"text": "ab"})
            assert r.status_code == 404 and "no trained model" in r.text
            job = await trained(c)
            model_id = job["model_id"]

            # predict: the periodic corpus is learnt; the whole vocabulary sums to 1
            r = await c.post("/predict", json={"model": "abcd", "text": "abcdabc"})
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["model"] == model_id and out["next"][0]["char"] == "d"
            assert out["next"][0]["prob"] > 0.9
            assert math.isclose(sum(n["prob"] for n in out["next"]), 1.0, abs_tol=1e-6)
            assert all(len(repr(n["prob"])) <= 14 for n in out["next"])  # 7 significant digits
            probs = [n["prob"] for n in out["next"]]
            assert probs == sorted(probs, reverse=True) and len(probs) == 4
            top = (await c.post("/predict", json={"text": "", "top_k": 2})).json()
            assert len(top["next"]) == 2 and top["model"] == model_id  # newest, empty prefix
            typed = [
                (await c.post("/predict", json={"text": "abcda"[:k]})).json() for k in range(6)
            ]
            assert typed[-1]["next"][0]["char"] == "b"
            bad = await c.post("/predict", json={"text": "abxyz"})
            assert bad.status_code == 422
            assert bad.json()["error"]["details"] == {"chars": ["x", "y", "z"]}
            skip = await c.post("/predict", json={"text": "abcxyzda", "unknown": "skip"})
            assert skip.json()["next"][0]["char"] == "b"
            for wrong in ({"text": "a", "top_k": 0}, {"text": "a", "temperature": -1}):
                assert (await c.post("/predict", json=wrong)).status_code == 422

            # generate: deterministic by seed, stop strings, streaming
            body = {"prompt": "ab", "max_chars": 40, "seed": 7, "temperature": 1.0}
            g1 = (await c.post("/generate", json=body)).json()
            g2 = (await c.post("/generate", json=body)).json()
            assert g1 == g2 and g1["finish_reason"] == "length" and len(g1["text"]) == 40
            stopped = (await c.post("/generate", json={**body, "stop": ["da"]})).json()
            assert stopped["finish_reason"] == "stop" and "da" not in stopped["text"]
            async with c.stream("POST", "/generate", json={**body, "stream": True}) as s:
                lines = [line async for line in s.aiter_lines() if line.startswith("data: ")]
            final = json.loads(lines[-1][6:])
            assert final["text"] == g1["text"] and final["finish_reason"] == "length"
            assert (await c.post("/generate", json={"max_chars": 10**6})).status_code == 422

            # score agrees with predict, character by character
            sc = (await c.post("/score", json={"text": "abca"})).json()
            assert sc["chars"] == 4 and len(sc["logprobs"]) == 4
            for k, ch in enumerate("abca"):
                nxt = (await c.post("/predict", json={"text": "abca"[:k]})).json()["next"]
                p = next(n["prob"] for n in nxt if n["char"] == ch)
                assert math.isclose(sc["logprobs"][k], math.log(p), rel_tol=1e-6, abs_tol=1e-6)
            assert math.isclose(sc["bits_per_char"], sc["mean_nats"] / math.log(2), rel_tol=1e-6)
            assert math.isclose(sc["perplexity"], math.exp(sc["mean_nats"]), rel_tol=1e-6)

            # manage: list, inspect, download -> upload gives identical predictions
            listed = (await c.get("/models")).json()
            assert listed["total"] == 1 and listed["items"][0]["id"] == model_id
            info = (await c.get(f"/models/{model_id}")).json()
            assert info["vocab"] == ["a", "b", "c", "d"] and info["hidden_size"] == 16
            data = (await c.get(f"/models/{model_id}/checkpoint")).content
            up = await c.post(
                "/models",
                files={"file": ("m.npz", data, "application/octet-stream")},
                data={"name": "copy"},
            )
            assert up.status_code == 201, up.text
            copy_id = up.json()["id"]
            a = (await c.post("/predict", json={"model": model_id, "text": "abcab"})).json()
            b = (await c.post("/predict", json={"model": "copy", "text": "abcab"})).json()
            assert a["next"] == b["next"]
            for junk in (b"not a zip at all", data[: len(data) // 2]):
                r = await c.post(
                    "/models", content=junk, headers={"content-type": "application/octet-stream"}
                )
                assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_checkpoint"

            # delete: gone at once, from every route
            assert (await c.delete(f"/models/{copy_id}")).status_code == 204
            assert (
                await c.post("/predict", json={"model": copy_id, "text": "a"})
            ).status_code == 404
            assert (await c.get(f"/models/{copy_id}/checkpoint")).status_code == 404
            assert (await c.delete(f"/models/{copy_id}")).status_code == 404
            for bad_id in ("../../etc/passwd", "x" * 3000):
                assert (await c.get(f"/models/{bad_id}")).status_code == 404

    asyncio.run(go())


TEXT = "It is a truth universally acknowledged, that a single man in possession "


def checkpoint(seed: int, hidden: int = 16) -> tuple[ModelCheckpoint, bytes]:
    vocab = Vocab.from_text(TEXT)
    ckpt = ModelCheckpoint(init_params(hidden, len(vocab), np.random.default_rng(seed)), vocab)
    return ckpt, model_to_bytes(ckpt)


async def upload(c: httpx.AsyncClient, data: bytes, name: str) -> str:
    r = await c.post("/models", content=data, params={"name": name})
    assert r.status_code == 201, r.text
    model_id: str = r.json()["id"]
    return model_id


def test_model_references_follow_uploads_and_deletes(tmp_path: Path) -> None:
    """Lookups are cached between model changes; every change shows on the next request."""

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:

            async def served(ref: str | None) -> str | int:
                body = {"text": "It is"} | ({} if ref is None else {"model": ref})
                r = await c.post("/predict", json=body)
                return str(r.json()["model"]) if r.status_code == 200 else r.status_code

            first = await upload(c, checkpoint(1)[1], "same")
            assert await served("same") == first and await served(None) == first
            second = await upload(c, checkpoint(2)[1], "same")
            assert await served("same") == second and await served(None) == second
            assert await served(first) == first
            assert (await c.delete(f"/models/{second}")).status_code == 204
            assert await served("same") == first and await served(None) == first
            assert (await c.delete(f"/models/{first}")).status_code == 204
            assert await served("same") == 404 and await served(None) == 404

    asyncio.run(go())


def test_long_inputs_are_stepped_in_slices_with_the_same_numbers(tmp_path: Path) -> None:
    """At H=256 a lone request's slice is 61 steps: a 700-character prefix takes twelve,
    with the loop free between them, and must give exactly what the model computes in
    one go."""
    ckpt, data = checkpoint(3, hidden=256)
    assert slice_steps(256, rows=1) == 61
    text = (TEXT * 10)[:700]
    ids = ckpt.vocab.encode(text)
    p = ckpt.params
    want = next_distribution(p, advance(p, initial_state(p), ids))
    want_lp = score(p, ids)

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            model_id = await upload(c, data, "big")
            for prefix in (text, text[:-1], text):  # uncached, then cached ones
                r = (await c.post("/predict", json={"model": model_id, "text": prefix})).json()
                got = {n["char"]: n["prob"] for n in r["next"]}
                exp = (
                    want
                    if prefix == text
                    else next_distribution(p, advance(p, initial_state(p), ids[:-1]))
                )
                for i, ch in enumerate(ckpt.vocab.chars):
                    assert math.isclose(got[ch], exp[i], rel_tol=1e-5, abs_tol=1e-9)
            sc = (await c.post("/score", json={"model": model_id, "text": text})).json()
            np.testing.assert_allclose(sc["logprobs"], want_lp, rtol=1e-5, atol=1e-6)
            body = {"model": model_id, "prompt": text, "max_chars": 150, "seed": 5}
            g = (await c.post("/generate", json=body)).json()
            expected, _ = sample(p, ckpt.vocab, text, max_chars=150, seed=5)
            assert g["text"] == expected

    asyncio.run(go())
