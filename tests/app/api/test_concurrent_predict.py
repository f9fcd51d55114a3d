"""Concurrent /predict requests: the same numbers as alone, no cross-talk between models,
no starvation of short prefixes by a long one."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.checkpoint import ModelCheckpoint, model_to_bytes
from model.inference import advance, initial_state, next_distribution, sample, score
from model.params import init_params
from model.vocab import Vocab

from ..conftest import asgi_client, settings_for

ALPHABET = "abcdefghijklmnopqrstuvwxyz ."


def model_bytes(seed: int, hidden: int = 64) -> tuple[bytes, ModelCheckpoint]:
    vocab = Vocab.from_text(ALPHABET)
    params = init_params(hidden, len(vocab), np.random.default_rng(seed))
    params.flat[...] *= 1  # away from uniform: distributions that differ between prefixes
    ckpt = ModelCheckpoint(params, vocab)
    return model_to_bytes(ckpt), ckpt


def expected(ckpt: ModelCheckpoint, text: str) -> dict[str, float]:
    p = ckpt.params
    probs = next_distribution(p, advance(p, initial_state(p), ckpt.vocab.encode(text)))
    return dict(zip(ckpt.vocab.chars, probs.tolist(), strict=True))


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(ALPHABET), size=int(k))) for k in rng.integers(1, 300, n)]


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_concurrent_predictions_equal_each_alone(tmp_path: Path, batch: int) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            models = []
            for seed in (1, 2):  # two models at once: every answer is its own model's
                data, ckpt = model_bytes(seed)
                r = await c.post("/models", content=data)
                assert r.status_code == 201, r.text
                models.append((r.json()["id"], ckpt))
            asks = [(models[i % 2], t) for i, t in enumerate(texts(batch, batch))]

            async def ask(model: tuple[str, ModelCheckpoint], text: str) -> dict[str, Any]:
                r = await c.post("/predict", json={"model": model[0], "text": text})
                assert r.status_code == 200, r.text
                out: dict[str, Any] = r.json()
                return out

            answers = await asyncio.gather(*(ask(m, t) for m, t in asks))
            for ((model_id, ckpt), text), out in zip(asks, answers, strict=True):
                assert out["model"] == model_id and out["text"] == text
                want = expected(ckpt, text)
                got = {n["char"]: n["prob"] for n in out["next"]}
                assert got.keys() == want.keys()
                for ch, q in want.items():
                    assert abs(got[ch] - q) <= 1e-6, (text, ch, got[ch], q)

    asyncio.run(go())


def test_a_long_prefix_does_not_hold_short_ones_back(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            data, _ = model_bytes(3, hidden=128)
            model = (await c.post("/models", content=data)).json()["id"]
            finished: dict[str, float] = {}

            async def ask(label: str, text: str) -> None:
                r = await c.post("/predict", json={"model": model, "text": text})
                assert r.status_code == 200, r.text
                finished[label] = time.monotonic()

            long = "the quick brown fox. " * 2000  # 42,000 characters: ~170 slices
            tasks = [asyncio.create_task(ask("long", long))]  # first in: first stepped
            tasks += [asyncio.create_task(ask(f"short{i}", t)) for i, t in enumerate(texts(8, 6))]
            await asyncio.gather(*tasks)
            shorts = [t for k, t in finished.items() if k != "long"]
            assert len(shorts) == 8 and max(shorts) < finished["long"], finished

    asyncio.run(go())


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_concurrent_scores_and_generations_equal_each_alone(tmp_path: Path, batch: int) -> None:
    """/score and /generate (plain and streamed) of two models at once, batched with
    /predict: every answer is the in-process one, seeded samples the same text."""

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            models = []
            for seed in (4, 5):
                data, ckpt = model_bytes(seed)
                r = await c.post("/models", content=data)
                assert r.status_code == 201, r.text
                models.append((r.json()["id"], ckpt))

            async def ask(i: int, text: str) -> None:
                model_id, ckpt = models[i % 2]
                p, vocab = ckpt.params, ckpt.vocab
                kind = i % 4
                if kind == 0:
                    r = await c.post("/score", json={"model": model_id, "text": text})
                    assert r.status_code == 200, r.text
                    want = score(p, vocab.encode(text))
                    np.testing.assert_allclose(r.json()["logprobs"], want, rtol=1e-5, atol=1e-6)
                elif kind == 1:
                    got = (await c.post("/predict", json={"model": model_id, "text": text})).json()
                    want_p = expected(ckpt, text)
                    for n in got["next"]:
                        assert abs(n["prob"] - want_p[n["char"]]) <= 1e-6
                else:
                    body = {"model": model_id, "prompt": text[:20], "max_chars": 80, "seed": i}
                    if i % 3 == 0:
                        body["stop"] = [" a"]
                    want_text, reason = sample(
                        p, vocab, text[:20], max_chars=80, seed=i, stop=body.get("stop", ())
                    )
                    if kind == 2:
                        g = (await c.post("/generate", json=body)).json()
                        assert (g["text"], g["finish_reason"]) == (want_text, reason)
                    else:
                        async with c.stream(
                            "POST", "/generate", json={**body, "stream": True}
                        ) as s:
                            raw = "".join([part async for part in s.aiter_text()])
                        chunks = [
                            json.loads(line[5:])["text"]
                            for block in raw.split("\n\n")
                            if "event: chunk" in block
                            for line in block.splitlines()
                            if line.startswith("data:")
                        ]
                        assert "".join(chunks) == want_text, raw[-300:]

            await asyncio.gather(*(ask(i, t) for i, t in enumerate(texts(batch, 100 + batch))))

    asyncio.run(go())
