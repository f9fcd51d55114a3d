"""app.client, sync and async, against a real uvicorn server (plus a few canned answers)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import ApiError, AsyncClient, Client, JobEvent, JobFailed
from app.jobs.schemas import (
    CorpusInfo,
    HyperparametersOut,
    JobMetrics,
    JobOut,
    JobProgress,
    JobStatus,
)

from .conftest import Server, free_port

PERIODIC = "abcd" * 300
SMALL: dict[str, Any] = {
    "hidden_size": 16,
    "seq_length": 16,
    "batch_size": 8,
    "max_steps": 150,
    "eval_every": 50,
}
ENDLESS: dict[str, Any] = {**SMALL, "max_steps": 10**6, "patience": None}


@pytest.mark.slow  # over a second: the full suite runs it
def test_sync_client_trains_serves_and_manages_models(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    server = serve()
    with Client(server.url) as c:
        assert c.health().status == "ok" and c.health(ready=True).status == "ready"

        # train, following the events
        job = c.train(PERIODIC, name="abcd", seed=3, **SMALL)
        assert job.last is not None and job.last.hyperparameters.max_steps == 150
        seen: list[JobEvent] = []
        done = job.wait(progress=seen.append)
        assert done.status == "succeeded" and done.model_id is not None and done.seed == 3
        assert seen and all(e.event == "progress" for e in seen)
        assert seen[-1].step is not None and seen[-1].step > 0
        model_id = done.model_id
        assert c.job(job.id).refresh() == done
        assert c.jobs(status="succeeded").items[0].id == job.id
        assert c.jobs(status="failed").total == 0
        points = job.metrics().points
        assert points and points[-1].train_loss < points[0].train_loss
        assert [p.step for p in job.metrics(after_step=points[0].step).points] == [
            p.step for p in points[1:]
        ]

        # predict, generate (also streamed), score
        out = c.predict("abcdabc", model="abcd")
        assert out.model == model_id and out.next[0].char == "d" and out.next[0].prob > 0.9
        assert len(c.predict(top_k=2).next) == 2
        assert c.predict("abcxda", unknown="skip").next[0].char == "b"
        g1 = c.generate("ab", max_chars=40, seed=7)
        assert g1 == c.generate("ab", max_chars=40, seed=7)
        assert len(g1.text) == 40 and g1.finish_reason == "length"
        pieces = list(c.stream_generate("ab", max_chars=40, seed=7))
        assert len(pieces) > 1 and "".join(pieces) == g1.text
        with_prompt = c.generate("ab", max_chars=40, seed=7, include_prompt=True)
        assert with_prompt.text == "ab" + g1.text
        assert "".join(c.stream_generate("ab", max_chars=40, seed=7, include_prompt=True)) == (
            with_prompt.text
        )
        stopped = c.generate("ab", max_chars=40, seed=7, stop="da")
        assert stopped.finish_reason == "stop" and "da" not in stopped.text
        sc = c.score("abca")
        assert sc.chars == 4 and len(sc.logprobs) == 4
        p_d = next(n.prob for n in c.predict("abc").next if n.char == "d")
        assert math.isclose(c.score("abcd").logprobs[3], math.log(p_d), rel_tol=1e-6, abs_tol=1e-6)

        # models: list, inspect, download -> upload (bytes and file), delete
        listed = c.models()
        assert listed.total == 1 and listed.items[0].id == model_id
        assert c.model(model_id).vocab == ["a", "b", "c", "d"]
        assert c.model("abcd").id == model_id  # by name
        assert c.download("abcd") == c.download(model_id)
        info = c.hyperparameters(corpus_chars=20_000)
        assert info.suggested is not None and info.suggested["hidden_size"] == 128
        assert "patience" in [h.name for h in c.hyperparameters().hyperparameters]
        path = tmp_path / "m.npz"
        data = c.download(model_id, path)
        assert data[:2] == b"PK" and path.read_bytes() == data
        copy = c.upload(data, name="copy")
        from_file = c.upload(path)
        assert copy.name == "copy" and copy.id != model_id and from_file.id != copy.id
        want = c.predict("abcab", model=model_id).next
        assert c.predict("abcab", model=copy.id).next == want
        assert c.predict("abcab", model=from_file.id).next == want
        c.delete_model(copy.id)
        with pytest.raises(ApiError) as gone:
            c.predict("a", model=copy.id)
        assert gone.value.status == 404 and gone.value.code == "not_found"
        assert copy.id in gone.value.message
        with pytest.raises(ApiError) as twice:
            c.delete_model(copy.id)
        assert twice.value.status == 404

        # a request the server rejects: its code, message and details, as one line
        with pytest.raises(ApiError) as bad:
            c.predict("a", top_k=0)
        e = bad.value
        assert e.status == 422 and e.code == "invalid" and "top_k" in e.message
        assert isinstance(e.details, list) and e.details[0]["loc"][-1] == "top_k"
        assert "\n" not in str(e) and e.message in str(e) and "422" in str(e)
        with pytest.raises(ApiError) as unknown:
            c.predict("abxyz")
        assert unknown.value.code == "unknown_characters"
        assert unknown.value.details == {"chars": ["x", "y", "z"]}
        with pytest.raises(ApiError) as bad_hp:
            c.train(PERIODIC, hidden_sise=8)
        assert bad_hp.value.status == 422 and "hidden_sise" in bad_hp.value.message

        # a job that does not succeed: wait times out, then raises JobFailed
        endless = c.train(PERIODIC, **ENDLESS)
        with pytest.raises(ApiError) as slow:
            endless.wait(timeout=0.5)
        assert slow.value.code == "timeout" and endless.id in slow.value.message
        assert endless.cancel().status == "cancelled"
        with pytest.raises(JobFailed) as failed:
            endless.wait()
        assert failed.value.code == "job_cancelled" and failed.value.job.status == "cancelled"
        events = list(endless.events())  # a finished job: just its final status
        assert [e.event for e in events] == ["status"] and events[0].job == failed.value.job
        with pytest.raises(ApiError) as conflict:
            endless.cancel()
        assert conflict.value.status == 409 and conflict.value.code == "conflict"
        with pytest.raises(ApiError) as no_job:
            list(c.job("nope").events())
        assert no_job.value.status == 404


@pytest.mark.slow  # over a second: the full suite runs it
def test_async_client_trains_serves_and_manages_models(serve: Callable[..., Server]) -> None:
    server = serve()

    async def go() -> None:
        async with AsyncClient(server.url) as c:
            assert (await c.health()).status == "ok"
            job = await c.train(PERIODIC, name="abcd", **SMALL)
            seen: list[JobEvent] = []
            done = await job.wait(progress=seen.append)
            assert done.status == "succeeded" and done.model_id is not None
            assert seen and all(e.event == "progress" for e in seen)
            model_id = done.model_id
            assert (await c.job(job.id).refresh()).model_id == model_id
            assert (await c.jobs()).total == 1 and (await job.metrics()).points

            out = await c.predict("abcdabc")
            assert out.model == model_id and out.next[0].char == "d" and out.next[0].prob > 0.9
            g1 = await c.generate("ab", max_chars=40, seed=11)
            assert g1 == await c.generate("ab", max_chars=40, seed=11)
            pieces = [p async for p in c.stream_generate("ab", max_chars=40, seed=11)]
            assert "".join(pieces) == g1.text and len(g1.text) == 40
            sc = await c.score("abcd", model=model_id)
            assert sc.chars == 4 and sc.perplexity < 2

            assert (await c.models()).items[0].id == model_id
            assert (await c.model(model_id)).vocab_size == 4
            copy = await c.upload(await c.download(model_id), name="copy")
            want = (await c.predict("abcab", model=model_id)).next
            assert (await c.predict("abcab", model="copy")).next == want
            await c.delete_model(copy.id)
            with pytest.raises(ApiError) as gone:
                await c.predict("a", model=copy.id)
            assert gone.value.status == 404 and gone.value.code == "not_found"
            with pytest.raises(ApiError) as bad:
                await c.generate(top_k=0)
            assert bad.value.status == 422 and bad.value.code == "invalid"
            assert "top_k" in bad.value.message
            with pytest.raises(ApiError) as bad_stream:  # refused before the stream starts
                [p async for p in c.stream_generate(max_chars=-1)]
            assert bad_stream.value.status == 422 and "max_chars" in bad_stream.value.message

            # cancelled while being waited on: the waiter sees JobFailed
            endless = await c.train(PERIODIC, **ENDLESS)
            with pytest.raises(ApiError) as slow:
                await endless.wait(timeout=0.3)
            assert slow.value.code == "timeout"
            first: asyncio.Future[JobEvent] = asyncio.get_running_loop().create_future()

            def on_progress(e: JobEvent) -> None:
                if not first.done():
                    first.set_result(e)

            waiter = asyncio.create_task(endless.wait(progress=on_progress))
            await asyncio.wait_for(first, 30)  # following the live stream
            assert (await endless.cancel()).status == "cancelled"
            with pytest.raises(JobFailed) as failed:
                await waiter
            assert failed.value.code == "job_cancelled" and failed.value.status == 0
            assert failed.value.job.id == endless.id and failed.value.job.model_id is None

    asyncio.run(go())


def test_api_key_is_sent_as_a_bearer_token(serve: Callable[..., Server]) -> None:
    server = serve(CHARNN_API_KEY="s3cret")
    for key in (None, "wrong"):
        with Client(server.url, api_key=key) as anonymous:
            with pytest.raises(ApiError) as denied:
                anonymous.train(PERIODIC, **SMALL)
            assert denied.value.status == 401 and denied.value.code == "unauthorized"
            assert anonymous.jobs().total == 0  # reading needs no key
    with Client(server.url, api_key="s3cret") as c:
        job = c.train(PERIODIC, **{**SMALL, "max_steps": 20})
        assert job.wait().status == "succeeded"

    async def go() -> None:
        async with AsyncClient(server.url) as anonymous:
            with pytest.raises(ApiError) as denied:
                await anonymous.train(PERIODIC, **SMALL)
            assert denied.value.status == 401
        async with AsyncClient(server.url, api_key="s3cret") as c:
            assert (await c.train(PERIODIC, **SMALL)).last is not None
            assert (await c.jobs()).total == 2

    asyncio.run(go())


def test_an_unreachable_server_is_one_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url) as c, pytest.raises(ApiError) as e:
        c.health()
    assert e.value.status == 0 and e.value.code == "unreachable"
    assert str(e.value) == f"cannot reach {url}: connection refused (unreachable)"

    async def go() -> None:
        async with AsyncClient(url) as c:
            with pytest.raises(ApiError) as e:
                await c.predict("a")
            assert e.value.code == "unreachable" and url in e.value.message
            with pytest.raises(ApiError) as e:
                [x async for x in c.job("x").events()]
            assert e.value.code == "unreachable"

    asyncio.run(go())
    with pytest.raises(ApiError) as bad_url:
        Client("localhost:8000")
    assert bad_url.value.code == "bad_url"


def test_answers_that_are_not_charnn_ones() -> None:
    """A proxy's error page, or some other server answering 200: still one ApiError."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/healthz":
            return httpx.Response(200, text="<html>welcome to nginx</html>")
        if request.url.path == "/generate":  # an event stream cut short, without 'done'
            body = 'event: chunk\ndata: {"text": "a"}\n\n'
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(502, text="<html><h1>502 Bad Gateway</h1></html>")

    with Client("http://proxy.test", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(ApiError) as page:
            c.models()
        assert (page.value.status, page.value.code, page.value.message) == (
            502,
            "http_502",
            "Bad Gateway",
        )
        with pytest.raises(ApiError) as other:
            c.health()
        assert other.value.status == 200 and other.value.code == "bad_response"
        with pytest.raises(ApiError) as cut:
            list(c.stream_generate("a"))
        assert "done" in cut.value.message


def job_record(status: JobStatus, error: str | None = None) -> dict[str, Any]:
    return JobOut(
        id="j1",
        name="x",
        status=status,
        created_at=0.0,
        started_at=None,
        finished_at=None,
        hyperparameters=HyperparametersOut(),
        seed=0,
        init_from=None,
        corpus=CorpusInfo(chars=1200, vocab_size=4),
        progress=JobProgress(step=5, total_steps=10, fraction=0.5, eta_s=None),
        metrics=JobMetrics(train_loss=None, val_loss=None, chars_per_sec=None),
        model_id=None,
        error=error,
    ).model_dump()


def test_wait_follows_on_after_a_stream_ends_early_and_reports_a_failure() -> None:
    """A stream cut before its final status (a server restarting): wait asks, then follows
    a new stream; a job that failed raises JobFailed carrying the job's error."""
    sse = {"content-type": "text/event-stream"}
    error = "the training process died (exit code -9)"

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/jobs/j1":
            return httpx.Response(200, json=job_record("running"))
        if calls.count("/jobs/j1/events") == 1:  # the first stream stops short
            return httpx.Response(200, text='event: progress\ndata: {"step": 5}\n\n', headers=sse)
        final = json.dumps(job_record("failed", error))
        return httpx.Response(200, text=f"event: status\ndata: {final}\n\n", headers=sse)

    calls: list[str] = []
    seen: list[JobEvent] = []
    with Client("http://x.test", transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(JobFailed) as failed:
            c.job("j1").wait(progress=seen.append)
    assert failed.value.code == "job_failed" and failed.value.message == error
    assert calls == ["/jobs/j1/events", "/jobs/j1", "/jobs/j1/events"]
    assert [e.step for e in seen] == [5]

    async def go() -> None:
        async with AsyncClient("http://x.test", transport=httpx.MockTransport(handler)) as c:
            with pytest.raises(JobFailed) as failed:
                await c.job("j1").wait()
        assert failed.value.job.error == error and str(failed.value) == f"{error} (job_failed)"

    calls.clear()
    asyncio.run(go())
    assert calls == ["/jobs/j1/events", "/jobs/j1", "/jobs/j1/events"]
