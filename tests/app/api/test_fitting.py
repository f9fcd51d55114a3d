"""What a newcomer meets first: settings sized to the text, early stopping that says what it
did, models named as /predict names them, the prompt kept on request."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest

from model.config import SERVED, TrainConfig
from model.presets import for_corpus

from ..conftest import asgi_client, settings_for, wait_status

PERIODIC = "abcd" * 300
TINY = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "eval_every": 10}


def noise(n: int, seed: int = 1) -> str:
    """Letters without a pattern: validation can only get worse once training memorises."""
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefgh") for _ in range(n))


async def run_job(c: httpx.AsyncClient, corpus: str, name: str, **hp: Any) -> dict[str, Any]:
    r = await c.post("/jobs", json={"corpus": corpus, "name": name, "hyperparameters": hp})
    assert r.status_code == 202, r.text
    job = await wait_status(c, r.json()["id"], ("succeeded", "failed"))
    assert job["status"] == "succeeded", job
    return job


def test_early_stopping_is_on_by_default_and_the_job_says_what_it_kept(tmp_path: Path) -> None:
    assert TrainConfig().patience == 5

    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            hp = {**TINY, "hidden_size": 64, "max_steps": 5000, "patience": 3}
            job = await run_job(c, noise(3000), "overfits", **hp)
            assert job["hyperparameters"]["patience"] == 3
            best, step = job["metrics"]["best_step"], job["progress"]["step"]
            assert best is not None and best < step < 5000, job
            assert job["metrics"]["evals_since_best"] >= 3
            assert job["note"] == (
                f"stopped early at step {step}: validation loss had not improved since step "
                f"{best}; the model from step {best} was kept"
            )
            model = (await c.get(f"/models/{job['model_id']}")).json()
            assert model["metrics"]["best_step"] == best
            assert model["metrics"]["stop_reason"] == "early_stopping"
            points = (await c.get(f"/jobs/{job['id']}/metrics")).json()["points"]
            vals = [(p["val_loss"], p["step"]) for p in points if p["val_loss"] is not None]
            assert min(vals)[1] == best  # the note's step is the curve's best
            listed = (await c.get("/jobs")).json()["items"]
            assert listed[0]["note"] == job["note"] and listed[0]["metrics"]["best_step"] == best

            # patience null: the same run goes on to max_steps, and says where its best was
            off = await run_job(
                c, noise(3000), "no-stop", **{**hp, "max_steps": 120, "patience": None}
            )
            assert off["progress"]["step"] == 120 and off["hyperparameters"]["patience"] is None
            assert off["note"].startswith("stopped at step 120"), off["note"]

    asyncio.run(go())


def test_hyperparameters_lists_every_one_and_fits_a_corpus(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path, max_hidden_size=100)) as c:
            r = await c.get("/hyperparameters")
            assert r.status_code == 200, r.text
            out = r.json()
            assert [h["name"] for h in out["hyperparameters"]] == [h.name for h in SERVED]
            by_name = {h["name"]: h for h in out["hyperparameters"]}
            assert by_name["patience"]["default"] == 5 and by_name["patience"]["minimum"] == 1
            assert by_name["hidden_size"]["maximum"] == 100  # this server's ceiling
            assert by_name["optimizer"]["choices"] == ["sgd", "adagrad", "adam"]
            assert out["suggested"] is None and out["reason"] is None

            for chars in (5_000, 20_000, 1_000_000):
                fit = (await c.get("/hyperparameters", params={"corpus_chars": chars})).json()
                want = for_corpus(chars).hyperparameters
                assert fit["suggested"] == {**want, "hidden_size": min(100, want["hidden_size"])}
                assert fit["reason"].startswith(f"{chars:,} characters")
            for bad in ("0", "-3", "many", "1.5"):
                r = await c.get("/hyperparameters", params={"corpus_chars": bad})
                assert r.status_code == 422 and "corpus_chars" in r.text, (bad, r.text)

            # a suggestion is a valid job for the text it was made for
            text = noise(5_000)
            fit = (await c.get("/hyperparameters", params={"corpus_chars": len(text)})).json()
            job = await run_job(c, text, "fitted", **fit["suggested"])
            assert job["hyperparameters"]["max_steps"] == fit["suggested"]["max_steps"]

    asyncio.run(go())


@pytest.mark.parametrize("chars", [100, 1_000, 5_000, 20_000, 100_000, 1_000_000, 10**8])
def test_suggestions_are_valid_configs_that_fit_in_one_epoch_or_more(chars: int) -> None:
    hp = for_corpus(chars).hyperparameters
    config = TrainConfig.from_dict(dict(hp))  # valid, every bound
    train_chars = int(chars * 0.9)
    assert config.seq_length + 1 <= train_chars  # one chunk at least
    assert config.max_steps is not None and config.eval_every * 4 <= config.max_steps
    bigger = for_corpus(chars * 10).hyperparameters
    assert bigger["hidden_size"] >= hp["hidden_size"]  # more text, never a smaller model


def test_models_by_name_and_the_prompt_on_request(tmp_path: Path) -> None:
    async def go() -> None:
        async with asgi_client(settings_for(tmp_path)) as c:
            first = await run_job(c, PERIODIC, "twin", **TINY, max_steps=30)
            second = await run_job(c, PERIODIC, "twin", **TINY, max_steps=40)
            newest = second["model_id"]
            r = await c.get("/models/twin")
            assert r.status_code == 200 and r.json()["id"] == newest  # a name: the newest
            assert (await c.get(f"/models/{first['model_id']}")).json()["name"] == "twin"
            r = await c.get("/models/twin/checkpoint")
            assert r.status_code == 200 and r.headers["x-model-id"] == newest
            assert r.content == (await c.get(f"/models/{newest}/checkpoint")).content
            r = await c.get("/models/nobody")
            assert r.status_code == 404 and "no model with id or name 'nobody'" in r.text
            r = await c.delete("/models/twin")
            assert r.status_code == 404
            assert "DELETE takes a model id" in r.text and newest in r.text
            assert (await c.get("/models/twin")).status_code == 200  # nothing deleted

            body = {"model": "twin", "prompt": "abca", "max_chars": 12, "seed": 3}
            plain = (await c.post("/generate", json=body)).json()
            kept = (await c.post("/generate", json={**body, "include_prompt": True})).json()
            assert len(plain["text"]) == 12 and kept["text"] == "abca" + plain["text"]
            async with c.stream(
                "POST", "/generate", json={**body, "include_prompt": True, "stream": True}
            ) as s:
                raw = (await s.aread()).decode()
            data = [json.loads(line[5:]) for line in raw.splitlines() if line.startswith("data:")]
            assert data[0] == {"text": "abca"} and data[-1]["text"] == kept["text"]
            assert "".join(d["text"] for d in data[:-1]) == kept["text"]

    asyncio.run(go())


def test_the_note_in_words_for_every_status() -> None:
    from app.domain import JobStatus
    from app.jobs.service import job_out
    from app.store.base import JobRecord

    def job(status: JobStatus, step: int, **hp: Any) -> JobRecord:
        return JobRecord(
            id="0" * 32,
            name="n",
            status=status,
            created_at=0.0,
            started_at=None,
            finished_at=None,
            hyperparameters={"max_steps": 100, **hp},
            seed=0,
            init_from=None,
            corpus_chars=10,
            vocab_size=2,
            step=step,
            total_steps=None,
            train_loss=None,
            val_loss=None,
            chars_per_sec=None,
            eta_s=None,
            model_id=None,
            error=None,
        )

    rising = [(10, 2.0), (20, 1.5), (30, 1.6), (40, 1.7)]
    falling = [(10, 2.0), (20, 1.5)]
    cases = [
        (job("queued", 0), rising, None),
        (job("running", 5), [], None),
        (job("running", 20), falling, "validation loss improving: best so far at step 20"),
        (
            job("running", 40, patience=5),
            rising,
            "validation loss has not improved since step 20 (2 of 5 evaluations before early "
            "stopping)",
        ),
        (
            job("running", 40, patience=None),
            rising,
            "validation loss has not improved since step 20",
        ),
        (
            job("succeeded", 40, patience=2),
            rising,
            "stopped early at step 40: validation loss had not improved since step 20; the model "
            "from step 20 was kept",
        ),
        (
            job("succeeded", 100, patience=None),
            rising,
            "stopped at step 100; validation loss was best at step 20, and that model was kept",
        ),
        (job("succeeded", 20), falling, "stopped at step 20, at the best validation loss so far"),
        (job("cancelled", 40), rising, "cancelled at step 40; validation loss was best at step 20"),
        (job("failed", 40), rising, None),
    ]
    for record, evals, want in cases:
        out = job_out(record, evals)
        assert out.note == want, (record.status, out.note)
        assert out.metrics.best_step == (max(evals, key=lambda e: -e[1])[0] if evals else None)
