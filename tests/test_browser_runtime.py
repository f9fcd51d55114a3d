"""charnn.js in a real browser (Debian's Chromium through Playwright): models trained by the
service, loaded from GET /models/{id}/web, give the server's numbers; the folder
`charnn export --web` writes works from a plain static file server."""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from .conftest import CHARNN, Served, charnn_serve
from .test_demo import browser, select_model, train_via_api  # noqa: F401 (the browser fixture)

pytestmark = pytest.mark.slow

CORPUS = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of "
    "such a man may be on his first entering a neighbourhood, this truth is so well fixed "
    "in the minds of the surrounding families, that he is considered the rightful property "
    "of some one or other of their daughters.\n"
) * 20
PREFIXES = ["", "I", "It is a ", "the rightful property of some one", "\nHowever, "]
SIZES = (16, 128, 256)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with charnn_serve(tmp_path_factory.mktemp("runtime")) as served:
        yield served


@pytest.fixture(scope="module")
def models(server: Served) -> dict[int, str]:
    """A model of each hidden size, trained through the API (briefly: the numbers, not the
    quality, are under test)."""
    out = {}
    for h in SIZES:
        hp: dict[str, Any] = {"hidden_size": h, "seq_length": 32, "batch_size": 8}
        hp |= {"max_steps": 40, "eval_every": 20, "patience": None}
        out[h] = train_via_api(server.url, CORPUS, f"runtime-{h}", hp)
    return out


@pytest.fixture(scope="module")
def page(browser: Browser, server: Served) -> Iterator[Page]:  # noqa: F811
    """The demo page (its CSP in force), with charnn.js imported as `window.charnn`."""
    context = browser.new_context()
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    p.goto(server.url + "/")
    p.evaluate("async () => { window.charnn = await import('/static/charnn.js'); }")
    yield p
    context.close()
    assert not errors, errors


def server_distribution(url: str, model: str, text: str) -> dict[str, float]:
    r = httpx.post(url + "/predict", json={"model": model, "text": text}, timeout=30)
    assert r.status_code == 200, r.text
    return {n["char"]: n["prob"] for n in r.json()["next"]}


def in_page(page: Page, script: str, arg: Any) -> Any:
    return page.evaluate(script, arg)


PREDICT = """async ({url, wasm, prefixes}) => {
  const m = await charnn.load(url, {wasm});
  return {engine: m.engine, out: prefixes.map((t) => m.predict(t))};
}"""


@pytest.mark.parametrize("wasm", [True, False], ids=["wasm", "js"])
@pytest.mark.parametrize("hidden", SIZES)
def test_distributions_equal_the_servers(
    page: Page, server: Served, models: dict[int, str], hidden: int, wasm: bool
) -> None:
    model = models[hidden]
    got = in_page(
        page, PREDICT, {"url": f"/models/{model}/web", "wasm": wasm, "prefixes": PREFIXES}
    )
    assert got["engine"] == ("wasm-simd" if wasm else "js")
    for text, answer in zip(PREFIXES, got["out"], strict=True):
        want = server_distribution(server.url, model, text)
        probs = [n["prob"] for n in answer]
        assert probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1) < 1e-9
        mine = {n["char"]: n["prob"] for n in answer}
        assert mine.keys() == want.keys()
        for ch, p in want.items():
            assert abs(mine[ch] - p) <= 1e-5, (hidden, text, ch, mine[ch], p)


SCORE_AND_GREEDY = """async ({url, wasm, text, prompt}) => {
  const m = await charnn.load(url, {wasm});
  const greedy = await m.generateText({prompt, length: 200, temperature: 0});
  const stopped = await m.generateText({prompt, length: 200, temperature: 0, stop: ["e t", "of"]});
  return {score: m.score(text), greedy, stopped};
}"""


@pytest.mark.parametrize("wasm", [True, False], ids=["wasm", "js"])
@pytest.mark.parametrize("hidden", SIZES)
def test_score_and_greedy_generation_equal_the_servers(
    page: Page, server: Served, models: dict[int, str], hidden: int, wasm: bool
) -> None:
    model = models[hidden]
    text, prompt = CORPUS[:300], "It is "
    got = in_page(
        page,
        SCORE_AND_GREEDY,
        {"url": f"/models/{model}/web", "wasm": wasm, "text": text, "prompt": prompt},
    )
    r = httpx.post(server.url + "/score", json={"model": model, "text": text}, timeout=30)
    want = r.json()
    assert got["score"]["chars"] == want["chars"] == len(text)
    for mine, theirs in zip(got["score"]["logprobs"], want["logprobs"], strict=True):
        assert abs(mine - theirs) <= 1e-4
    assert abs(got["score"]["bitsPerChar"] - want["bits_per_char"]) <= 1e-4
    for key, stop in (("greedy", []), ("stopped", ["e t", "of"])):
        body = {"model": model, "prompt": prompt, "max_chars": 200, "temperature": 0, "stop": stop}
        r = httpx.post(server.url + "/generate", json=body, timeout=30)
        assert got[key] == r.json()["text"], (hidden, key)


STATEFUL = """async ({url, text}) => {
  const m = await charnn.load(url);
  const a = m.feed(text.slice(0, 10));
  const b = m.feed(text.slice(10));
  const saved = m.state;
  m.reset();
  const fromStart = m.feed("");
  m.state = saved;
  const again = m.feed("");
  return {b, fromStart, again, whole: m.predict(text), vocab: m.vocab, hidden: m.hiddenSize};
}"""


def test_feed_reset_and_state(page: Page, server: Served, models: dict[int, str]) -> None:
    model = models[128]
    text = "It is a truth universally"
    got = in_page(page, STATEFUL, {"url": f"/models/{model}/web", "text": text})
    info = httpx.get(f"{server.url}/models/{model}", timeout=30).json()
    assert got["vocab"] == info["vocab"] and got["hidden"] == 128
    assert got["b"] == got["again"] == got["whole"]
    empty = server_distribution(server.url, model, "")
    assert {n["char"]: n["prob"] for n in got["fromStart"]} == pytest.approx(empty, abs=1e-5)


ERRORS = """async ({url}) => {
  const m = await charnn.load(url);
  const said = (e) => ({name: e.name, code: e.code, message: e.message, details: e.details});
  const caught = async (f) => {
    try { await f(); return null; } catch (e) { return said(e); }
  };
  const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
  const at = new TextDecoder().decode(bytes).indexOf('"format_version":"1"');
  const newer = bytes.slice();
  newer[at + '"format_version":"'.length] = "9".charCodeAt(0);
  return {
    unknown: await caught(() => m.predict("It is Ω and ☃ and Ω")),
    topK: await caught(() => m.predict("", {topK: 0})),
    temperature: await caught(() => m.predict("", {temperature: -1})),
    version: await caught(() => charnn.fromBuffer(newer.buffer)),
    missing: await caught(() => charnn.load(url + "-nope")),
    junk: await caught(() => charnn.fromBuffer(new Uint8Array([1, 2, 3]).buffer)),
  };
}"""


RESPONSIVE = """async ({url}) => {
  const m = await charnn.load(url);
  let beats = 0;
  const timer = setInterval(() => { beats++; }, 0);
  let during = 0, chars = 0;
  for await (const ch of m.generate({length: 30000, seed: 3})) {
    chars++;
    if (chars === 29999) during = beats;
  }
  clearInterval(timer);
  return {during, chars};
}"""


def test_generation_lets_the_page_run(page: Page, models: dict[int, str]) -> None:
    """A long sample yields to the page as it goes: timers fire while it runs (if it never
    yielded, none could until it ended)."""
    got = in_page(page, RESPONSIVE, {"url": f"/models/{models[256]}/web"})
    assert got["chars"] == 30000
    assert got["during"] >= 3, got


def test_clear_errors(page: Page, models: dict[int, str]) -> None:
    got = in_page(page, ERRORS, {"url": f"/models/{models[16]}/web"})
    unknown = got["unknown"]
    assert unknown["name"] == "CharnnError" and unknown["code"] == "unknown_characters"
    assert unknown["message"] == "characters not in the model's vocabulary: 'Ω', '☃'"
    assert unknown["details"] == {"chars": ["Ω", "☃"]}
    assert got["topK"]["code"] == got["temperature"]["code"] == "invalid"
    assert got["version"]["code"] == "unsupported_version"
    assert '"9"' in got["version"]["message"] and "reads version 1" in got["version"]["message"]
    assert got["missing"]["code"] == "fetch_failed" and "404" in got["missing"]["message"]
    assert got["junk"]["code"] == "bad_file"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def static_site(tmp_path: Path, server: Served, models: dict[int, str]) -> Iterator[str]:
    """`charnn export --web` of the H=128 model, served by a plain static file server."""
    npz = tmp_path / "model.npz"
    npz.write_bytes(httpx.get(f"{server.url}/models/{models[128]}/checkpoint").content)
    folder = tmp_path / "site"
    done = subprocess.run(
        [str(CHARNN), "export", str(npz), "--web", str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == [
        "charnn.js",
        "index.html",
        "model.safetensors",
    ]
    handler = functools.partial(_Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_exported_folder_works_from_a_static_server(
    browser: Browser,  # noqa: F811
    static_site: str,
    server: Served,
    models: dict[int, str],
) -> None:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    foreign: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(static_site) else foreign.append(r.url))
    page.goto(static_site + "/index.html")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    page.locator("#text").fill("It is a ")
    expect(page.locator("#bars .bar")).to_have_count(10)
    expect(page.locator("#timing")).to_contain_text("ms for this prediction")
    page.click("#generate")
    expect(page.locator("#sample")).not_to_have_text("")
    got = page.evaluate(
        """async (prefixes) => {
            const charnn = await import('./charnn.js');
            const m = await charnn.load('model.safetensors');
            return prefixes.map((t) => m.predict(t));
        }""",
        PREFIXES,
    )
    for text, answer in zip(PREFIXES, got, strict=True):
        want = server_distribution(server.url, models[128], text)
        mine = {n["char"]: n["prob"] for n in answer}
        assert mine == pytest.approx(want, abs=1e-5), text
    text, prompt = CORPUS[:200], "It is "
    mine = page.evaluate(
        """async ({text, prompt}) => {
            const charnn = await import('./charnn.js');
            const m = await charnn.load('model.safetensors');
            return {score: m.score(text), greedy: await m.generateText({prompt, temperature: 0})};
        }""",
        {"text": text, "prompt": prompt},
    )
    want = httpx.post(server.url + "/score", json={"model": models[128], "text": text}).json()
    assert mine["score"]["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)
    body = {"model": models[128], "prompt": prompt, "max_chars": 200, "temperature": 0}
    assert mine["greedy"] == httpx.post(server.url + "/generate", json=body).json()["text"]
    context.close()
    assert not errors, errors
    assert not foreign, foreign


def test_the_demo_predicts_in_the_page_and_on_the_server(
    browser: Browser,  # noqa: F811
    server: Served,
    models: dict[int, str],
) -> None:
    context = browser.new_context()
    page = context.new_page()
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    page.goto(server.url + "/")
    select_model(page, models[256])
    expect(page.locator("#predict-local")).to_be_checked()
    page.locator("#predict-text").fill("It is a truth")
    expect(page.locator("#predict-info")).to_contain_text("in this page")
    page.locator("#predict-text").press("Backspace")
    page.locator("#predict-text").press("Home")
    page.locator("#predict-text").type("X")  # an edit at the start: not in the vocabulary
    expect(page.locator("#predict-error")).to_contain_text("'X'")
    page.locator("#predict-text").press("Backspace")  # the X again
    expect(page.locator("#predict-info")).to_contain_text("in this page")
    assert not any(u.endswith("/predict") for u in posted), "the page asked the server"
    shown = page.eval_on_selector_all(
        "#predict-bars .bar", "bars => bars.map(b => [b.dataset.char, Number(b.dataset.prob)])"
    )
    want = server_distribution(server.url, models[256], "It is a trut")
    assert len(shown) == 10
    for ch, p in shown:
        assert abs(p - want[ch]) <= 1e-5
    page.uncheck("#predict-local")
    expect(page.locator("#predict-info")).to_contain_text("from the server")
    assert any(u.endswith("/predict") for u in posted)
    context.close()


def test_the_web_file_is_what_model_web_reads(server: Served, models: dict[int, str]) -> None:
    from model.web import read_web

    r = httpx.get(f"{server.url}/models/{models[16]}/web", timeout=30)
    ckpt, meta = read_web(r.content)
    assert meta["model_id"] == models[16] and meta["name"] == "runtime-16"
    assert json.loads(meta["vocab"]) == list(ckpt.vocab.chars)
