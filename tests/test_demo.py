"""The browser demo at ``/``, driven in a real Chromium (Playwright) by a real ``charnn serve``.

Chromium is Debian's (``apt-get install chromium``; .ci/run installs it), never a Playwright
download. Without it these tests skip locally and fail in CI (``CI=true``).

Every test asserts that the page logged no console error and threw no uncaught exception,
and that it requested nothing outside the server's origin. Screenshots land in
``test-artifacts/demo/<test>-<step>.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    expect,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from .conftest import ROOT, Served, charnn_serve

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "test-artifacts" / "demo"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium phones home, and this machine's closed network refuses it.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TRAIN_TIMEOUT = 60_000  # ms; a tiny job takes a second or two
UI_TIMEOUT = 15_000  # ms; anything else the page does

ABCD = "abcd" * 300
ABCD_NAME = "demo-abcd"
FOX = "the quick brown fox jumps over the lazy dog. " * 40
FOX_NAME = "demo-fox"
FOX_HP = {"hidden_size": 32, "seq_length": 16, "batch_size": 8, "max_steps": 300, "eval_every": 100}
SHOWN = {" ": "␣", "\n": "↵", "\t": "⇥"}  # how a bar shows characters one cannot see

expect.set_options(timeout=UI_TIMEOUT)


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found is None and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    return found


# --- servers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module: the tests share its models (keeps the file fast)."""
    with charnn_serve(tmp_path_factory.mktemp("demo")) as served:
        yield served


def train_via_api(url: str, corpus: str, name: str, hp: dict[str, Any]) -> str:
    """The model id of a job run through the HTTP API (faster than through the page)."""
    body = {"corpus": corpus, "name": name, "hyperparameters": hp}
    r = httpx.post(url + "/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job: dict[str, Any] = r.json()
    deadline = time.monotonic() + 60
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job stuck at {job['status']}"
        time.sleep(0.1)
        job = httpx.get(f"{url}/jobs/{job['id']}", timeout=30).json()
    assert job["status"] == "succeeded", job
    model_id: str = job["model_id"]
    return model_id


def model_named(url: str, name: str) -> dict[str, Any] | None:
    items: list[dict[str, Any]] = httpx.get(url + "/models", timeout=30).json()["items"]
    return next((m for m in items if m["name"] == name), None)


@pytest.fixture(scope="module")
def abcd_model(server: Served) -> str:
    """The "abcd" model test_train_from_pasted_text trained through the page; trained
    through the API when that test did not run (or failed), so the others still can."""
    found = model_named(server.url, ABCD_NAME)
    if found is not None:
        model_id: str = found["id"]
        return model_id
    hp = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "max_steps": 300, "eval_every": 50}
    return train_via_api(server.url, ABCD, ABCD_NAME, hp)


@pytest.fixture(scope="module")
def fox_model(server: Served) -> str:
    """A model with a vocabulary of more than ten characters."""
    return train_via_api(server.url, FOX, FOX_NAME, FOX_HP)


# --- the browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    if path is None:
        why = "Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: CI must run the browser tests")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Ui:
    """A fresh page, with everything it logged and requested."""

    page: Page
    test: str
    origin: str = ""
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # (status, path) of the HTTP errors a test provokes on purpose: Chromium itself logs
    # "Failed to load resource: ... status of 422" for them, which is not the page's doing.
    expected_http_errors: set[tuple[int, str]] = field(default_factory=set)

    def open(self, url: str) -> None:
        self.origin = url
        response = self.page.goto(url + "/")
        assert response is not None and response.ok, response
        assert urlsplit(self.page.url).path == "/", f"/ went to {self.page.url}, not the demo"

    def shot(self, step: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=ARTIFACTS / f"{self.test}-{step}.png", full_page=True)

    def expect_http_error(self, status: int, path: str) -> None:
        self.expected_http_errors.add((status, path))

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        where = msg.location.get("url", "")
        for status, path in self.expected_http_errors:
            failed = f"Failed to load resource: the server responded with a status of {status}"
            if msg.text.startswith(failed) and urlsplit(where).path == path:
                return
        self.console_errors.append(f"{msg.text} (at {where}:{msg.location.get('lineNumber')})")

    def assert_clean(self) -> None:
        """No console error, no uncaught exception, nothing fetched from elsewhere."""
        assert not self.page_errors, f"uncaught errors in the page: {self.page_errors}"
        assert not self.console_errors, f"the page logged errors: {self.console_errors}"
        foreign = [
            r.url
            for r in self.requests
            if not r.url.startswith(self.origin + "/") and not r.url.startswith("data:")
        ]
        assert not foreign, f"requests outside {self.origin}: {foreign}"


@pytest.fixture
def ui(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Ui]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(UI_TIMEOUT)
    page = context.new_page()
    u = Ui(page, request.node.name)
    page.on("console", u._on_console)
    page.on("pageerror", lambda e: u.page_errors.append(f"{e.name}: {e.message}\n{e.stack}"))
    page.on("request", lambda r: u.requests.append(r))
    try:
        yield u
    finally:
        if u.console_errors or u.page_errors:  # shown with a failure's captured output
            print("console errors:", u.console_errors, "page errors:", u.page_errors)
        context.close()


# --- helpers -------------------------------------------------------------------------------


def bars(page: Page) -> list[tuple[str, float]]:
    """(data-char, data-prob) of every #predict-bars .bar, in order."""
    found: list[list[str]] = page.eval_on_selector_all(
        "#predict-bars .bar",
        "bars => bars.map(b => [b.getAttribute('data-char'), b.getAttribute('data-prob')])",
    )
    return [(c, float(p)) for c, p in found]


SAME_BARS = """want => {
    const bars = [...document.querySelectorAll('#predict-bars .bar')];
    return bars.length === want.length && bars.every((b, i) =>
        b.getAttribute('data-char') === want[i][0] &&
        Math.abs(Number(b.getAttribute('data-prob')) - want[i][1]) <= 1e-3);
}"""


def api_top10(url: str, model_id: str, text: str) -> list[tuple[str, float]]:
    body = {"model": model_id, "text": text, "top_k": 10}
    r = httpx.post(url + "/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return [(n["char"], n["prob"]) for n in r.json()["next"]]


def expect_bars_for(page: Page, url: str, model_id: str, text: str) -> list[tuple[str, float]]:
    """Wait for the bars to show the API's top 10 after ``text``, and check each one."""
    want = api_top10(url, model_id, text)
    expect(page.locator("#predict-text")).to_have_value(text)
    # Bars for an earlier prefix may look alike (after "ab" and "abcdab" alike "c" leads):
    # wait for these very ones; on a timeout the assertions below say what differs.
    try:
        page.wait_for_function(SAME_BARS, arg=want)
    except PlaywrightTimeoutError:
        pass
    got = bars(page)
    assert len(got) == len(want), (text, got, want)
    assert [c for c, _ in got] == [c for c, _ in want], (text, got, want)
    for (c, p), (_, q) in zip(got, want, strict=True):
        assert p == pytest.approx(q, abs=1e-3), (c, p, q)
    probs = [p for _, p in got]
    assert probs == sorted(probs, reverse=True), f"bars not sorted by probability: {got}"
    for i, (c, _) in enumerate(got):
        shown = page.locator("#predict-bars .bar").nth(i).inner_text()
        assert SHOWN.get(c, c) in shown, f"bar {c!r} shows {shown!r}"
    return got


def assert_absolute_heights(page: Page) -> None:
    """Each bar's fill is its probability of the bar's full height (0-100 %), not of the
    top bar's: ten 2 % bars must look like 2 %, not like certainty."""
    page.wait_for_timeout(300)  # the fill's height transition (120 ms)
    found: list[list[float]] = page.eval_on_selector_all(
        "#predict-bars .bar",
        """bars => bars.map(b => [Number(b.dataset.prob),
            b.querySelector('.fill').getBoundingClientRect().height,
            b.querySelector('.track').getBoundingClientRect().height])""",
    )
    assert found
    for prob, fill, track in found:
        assert track > 50, f"the bars' track is {track}px tall"
        assert abs(fill / track - prob) <= 0.02 + 2 / track, (prob, fill, track)


def select_model(page: Page, model_id: str) -> None:
    page.click("#models-refresh")
    expect(page.locator(f'#model-select option[value="{model_id}"]')).to_have_count(1)
    page.select_option("#model-select", model_id)
    expect(page.locator("#model-select")).to_have_value(model_id)


def retype(page: Page, selector: str, text: str) -> None:
    """Clear a field, then type ``text`` key by key (input events, as a person types)."""
    box = page.locator(selector)
    box.fill("")
    box.press_sequentially(text)


def readable(message: str) -> None:
    assert message.strip(), "the error is empty"
    for junk in ("[object Object]", "undefined", "Traceback", "TypeError", "\n    at "):
        assert junk not in message, f"unreadable error: {message!r}"


# --- the tests -----------------------------------------------------------------------------


def test_page_loads_self_contained(server: Served, ui: Ui) -> None:
    ui.open(server.url)
    expect(ui.page).to_have_title(re.compile("charnn"))
    for control in ("#train-start", "#model-select", "#predict-text", "#gen-start"):
        section = ui.page.locator("section").filter(has=ui.page.locator(control))
        expect(section).to_have_count(1)
        expect(section).to_be_visible()
    expect(ui.page.locator("#train-cancel")).to_be_disabled()
    expect(ui.page.locator("#train-error")).to_be_hidden()
    ui.page.wait_for_load_state("networkidle")
    ui.shot("loaded")
    assert any(r.url.endswith(".js") for r in ui.requests), "no script loaded"
    # On a phone the page reflows to one column: nothing sticks out sideways.
    ui.page.set_viewport_size({"width": 390, "height": 844})
    overflow = ui.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    boxes = [ui.page.locator(f"#{s}").bounding_box() for s in ("train", "models", "predict")]
    assert all(b is not None for b in boxes)
    xs = {round(b["x"]) for b in boxes if b is not None}
    assert len(xs) == 1, f"sections not stacked in one column on a phone: x = {xs}"
    ui.shot("phone")
    ui.assert_clean()


def suggested(url: str, chars: int) -> dict[str, Any]:
    r = httpx.get(url + "/hyperparameters", params={"corpus_chars": chars}, timeout=30)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_settings_follow_the_texts_size(server: Served, ui: Ui) -> None:
    page = ui.page
    ui.open(server.url)
    expect(page.locator("#preset")).to_have_value("auto")
    expect(page.locator("#preset-reason")).to_contain_text("Paste or pick a text")
    page.fill("#corpus", FOX)
    info = page.locator("#corpus-info")
    expect(info).to_have_text(f"{len(FOX):,} characters, {len(set(FOX))} distinct")
    small = suggested(server.url, len(FOX))
    for name, value in small["suggested"].items():
        expect(page.locator(f"#hp-{name}")).to_have_value(str(value))
    expect(page.locator("#preset-reason")).to_contain_text(f"{len(FOX):,} characters")
    ui.shot("small-text")

    bigger = FOX * 30  # another tier: a bigger model, more steps
    page.fill("#corpus", bigger)
    expect(info).to_contain_text(f"{len(bigger):,} characters")
    large = suggested(server.url, len(bigger))["suggested"]
    assert large["hidden_size"] > small["suggested"]["hidden_size"]
    expect(page.locator("#hp-hidden_size")).to_have_value(str(large["hidden_size"]))
    expect(page.locator("#hp-max_steps")).to_have_value(str(large["max_steps"]))

    # Edited by hand, the fields stay as edited when the text changes.
    page.fill("#hp-max_steps", "77")
    expect(page.locator("#preset")).to_have_value("custom")
    page.fill("#corpus", FOX)
    expect(info).to_contain_text(f"{len(FOX):,} characters")
    page.wait_for_timeout(600)  # longer than the page waits before asking the server
    expect(page.locator("#hp-max_steps")).to_have_value("77")
    page.select_option("#preset", "tiny")
    expect(page.locator("#hp-max_steps")).to_have_value("300")
    page.select_option("#preset", "full")
    expect(page.locator("#hp-hidden_size")).to_have_value("")  # the server's default
    ui.assert_clean()


def random_text(n: int, seed: int = 3) -> str:
    """Letters with no pattern to learn: validation can only get worse once the model
    memorises the training part, so a short run overfits for sure."""
    import random

    rng = random.Random(seed)
    return "".join(rng.choice("abcdefgh") for _ in range(n))


def test_training_says_what_happened(server: Served, ui: Ui) -> None:
    """The chart is in view while training (1280x800), overfitting is marked where it
    starts, the status ends in plain words, and on a phone the chart stays readable."""
    page = ui.page
    page.set_viewport_size({"width": 1280, "height": 800})
    ui.open(server.url)
    page.fill("#corpus", random_text(3000))
    hp = {"hidden_size": "128", "seq_length": "32", "batch_size": "8", "learning_rate": "0.01"}
    hp |= {"max_steps": "3000", "eval_every": "10", "patience": "4"}
    for name, value in hp.items():
        page.fill(f"#hp-{name}", value)
    page.fill("#model-name", "demo-overfit")
    page.click("#train-start")
    page.wait_for_function("() => document.querySelector('#train-progress').value > 0")
    box = page.locator("#loss-chart").bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= 800, box
    status = page.locator("#train-status")
    expect(status).to_contain_text("succeeded", timeout=TRAIN_TIMEOUT)
    expect(status).to_contain_text("stopped early at step")
    expect(status).to_contain_text("was kept")
    job = httpx.get(server.url + "/jobs", params={"limit": 1}, timeout=30).json()["items"][0]
    assert job["note"].startswith("stopped early at step"), job
    best = job["metrics"]["best_step"]
    assert best is not None and job["progress"]["step"] > best
    chart = page.locator("#loss-chart")
    expect(chart).to_have_attribute("data-best-step", str(best))
    expect(chart.locator("text.best-label")).to_contain_text(f"best at step {best}")
    ticks = [t.strip() for t in chart.locator("text.ytick").all_text_contents()]
    decimals = {len(t.partition(".")[2]) for t in ticks}
    assert len(decimals) == 1 and max(decimals) <= 2, f"y ticks not round: {ticks}"
    ui.shot("overfit")

    # A phone: the chart is redrawn at the screen's width, its text in CSS pixels.
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_function(
        "() => Number(document.querySelector('#loss-chart').getAttribute('width')) < 390"
    )
    heights = page.eval_on_selector_all(
        "#loss-chart text.tick", "ts => ts.map(t => t.getBoundingClientRect().height)"
    )
    assert heights and min(heights) >= 11, f"chart text {heights}px tall on a phone"
    ui.shot("phone")
    expect(chart.locator("text.best-label")).to_have_text(f"best: step {best}")  # fits
    legend = page.locator("#train-live .legend").bounding_box()
    assert legend is not None and legend["height"] < 40, f"the legend wraps: {legend}"
    select = page.locator("#model-select").bounding_box()
    assert select is not None and select["x"] + select["width"] <= 390, select
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow}px wider than a phone screen"
    ui.assert_clean()


def test_reload_follows_the_running_job(server: Served, ui: Ui) -> None:
    page = ui.page
    body = {
        "corpus": ABCD,
        "name": "demo-long",
        "hyperparameters": {
            "hidden_size": 16,
            "seq_length": 16,
            "batch_size": 8,
            "max_steps": 1_000_000,
            "eval_every": 500,
            "patience": None,  # until cancelled
        },
    }
    r = httpx.post(server.url + "/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    try:
        ui.open(server.url)
        status = page.locator("#train-status")
        expect(status).to_contain_text("running")
        expect(page.locator("#train-cancel")).to_be_enabled()
        expect(page.locator("#loss-chart")).to_have_attribute(
            "data-train-points", re.compile(r"^[1-9]\d*$")
        )
        # No ETA from a few steps of a million: it says it is estimating instead.
        expect(status).to_contain_text("estimating the time left")
        expect(page.locator(f'#job-list button[data-job="{job_id}"]')).to_contain_text("demo-long")
        ui.shot("reattached")
        page.click("#train-cancel")
        expect(status).to_contain_text("cancelled", timeout=TRAIN_TIMEOUT)
    finally:
        httpx.post(f"{server.url}/jobs/{job_id}/cancel", timeout=30)
    ui.assert_clean()
    page.close()


def test_pause_and_resume_from_the_train_card(server: Served, ui: Ui) -> None:
    """Pause and Resume beside Cancel: the job pauses (checkpointed, its step kept), then
    trains on from there."""
    page = ui.page
    hp = {"hidden_size": 16, "seq_length": 16, "batch_size": 8, "max_steps": 1_000_000}
    body = {"corpus": ABCD, "name": "demo-pause", "hyperparameters": {**hp, "patience": None}}
    r = httpx.post(server.url + "/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    try:
        ui.open(server.url)
        status = page.locator("#train-status")
        expect(status).to_contain_text("running")
        expect(page.locator("#train-resume")).to_be_disabled()
        page.click("#train-pause")
        expect(status).to_contain_text("paused", timeout=TRAIN_TIMEOUT)
        expect(page.locator("#train-resume")).to_be_enabled()
        expect(page.locator("#train-pause")).to_be_disabled()
        job = httpx.get(f"{server.url}/jobs/{job_id}", timeout=30).json()
        assert job["status"] == "paused", job
        page.click("#train-resume")
        expect(page.locator("#train-pause")).to_be_enabled()
        page.wait_for_function(
            f"async () => (await (await fetch('jobs/{job_id}')).json()).progress.step > "
            f"{job['progress']['step']}"
        )  # it trains on from where it paused
        expect(status).to_contain_text("running")
        ui.shot("resumed")
        page.click("#train-cancel")
        expect(status).to_contain_text("cancelled", timeout=TRAIN_TIMEOUT)
    finally:
        httpx.post(f"{server.url}/jobs/{job_id}/cancel", timeout=30)
    ui.assert_clean()
    page.close()


def test_samples_and_diagnostics_appear_under_the_chart(server: Served, ui: Ui) -> None:
    """While a job runs the latest samples of its current weights appear under the chart,
    each with its step, beside the gradient norm, learning rate and speed; a finished
    job shown again from the list shows its last samples, as the metrics have them."""
    page = ui.page
    hp: dict[str, Any] = {"hidden_size": 16, "seq_length": 16, "batch_size": 8}
    hp |= {"max_steps": 1_000_000, "eval_every": 40, "patience": None, "sample_length": 50}
    body = {"corpus": FOX, "name": "demo-samples", "hyperparameters": hp}
    r = httpx.post(server.url + "/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    try:
        ui.open(server.url)
        samples = page.locator("#sample-list li")
        expect(page.locator("#train-status")).to_contain_text("running")
        page.wait_for_function("() => document.querySelectorAll('#sample-list li').length >= 3")
        expect(page.locator("#train-samples")).to_be_visible()
        diag = page.locator("#train-diagnostics")
        expect(diag).to_be_visible()
        expect(diag).to_contain_text("gradient norm")
        expect(diag).to_contain_text("learning rate")
        expect(diag).to_contain_text("chars/s")
        steps = [int(s) for s in samples.evaluate_all("ls => ls.map(l => l.dataset.step)")]
        assert len(steps) <= 4 and steps == sorted(steps), steps
        assert all(step % 40 == 0 for step in steps), steps
        for text in samples.locator(".sample-text").all_text_contents():
            assert len(text) == 50 and set(text) <= set(FOX), text
        ui.shot("samples-live")
        page.click("#train-cancel")
        expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=TRAIN_TIMEOUT)
    finally:
        httpx.post(f"{server.url}/jobs/{job_id}/cancel", timeout=30)
    points = httpx.get(f"{server.url}/jobs/{job_id}/metrics", timeout=30).json()["points"]
    stored = [(p["step"], p["sample"]) for p in points if p["sample"] is not None][-4:]
    assert len(stored) >= 3
    # Shown again after the end: the same last samples the metrics hold, with their steps.
    page.reload()
    page.locator("#recent summary").click()
    page.click(f'#job-list button[data-job="{job_id}"]')
    expect(samples).to_have_count(len(stored))
    shown_steps = [int(s) for s in samples.evaluate_all("ls => ls.map(l => l.dataset.step)")]
    texts = samples.locator(".sample-text").all_text_contents()
    shown = list(zip(shown_steps, texts, strict=True))
    assert shown == stored
    ui.assert_clean()


def test_train_from_pasted_text(server: Served, ui: Ui) -> None:
    page = ui.page
    ui.open(server.url)
    page.fill("#corpus", ABCD)
    page.select_option("#preset", "tiny")
    for hp in ("hidden_size", "seq_length", "batch_size", "learning_rate"):
        value = page.input_value(f"#hp-{hp}")
        assert value and float(value) > 0, f"preset tiny left #hp-{hp} at {value!r}"
    hidden_size = page.input_value("#hp-hidden_size")
    page.fill("#hp-max_steps", "300")
    page.fill("#hp-eval_every", "50")
    page.fill("#model-name", ABCD_NAME)
    ui.shot("filled")
    page.click("#train-start")

    chart = page.locator("#loss-chart")
    expect(chart).to_have_attribute("data-train-points", re.compile(r"^[1-9]\d*$"))
    page.wait_for_function("() => document.querySelector('#train-progress').value > 0")
    ui.shot("training")
    status = page.locator("#train-status")
    expect(status).to_contain_text("succeeded", timeout=TRAIN_TIMEOUT)
    expect(chart).to_have_attribute("data-val-points", re.compile(r"^[1-9]\d*$"))
    value, maximum = page.eval_on_selector("#train-progress", "p => [p.value, p.max]")
    assert (value, maximum) == (300, 300)
    expect(page.locator("#train-cancel")).to_be_disabled()
    expect(page.locator("#train-error")).to_be_hidden()
    assert any(re.search(r"/jobs/[^/]+/events$", r.url) for r in ui.requests), "no SSE stream"

    model = model_named(server.url, ABCD_NAME)
    assert model is not None, "the job made no model"
    select = page.locator("#model-select")
    expect(select).to_have_value(model["id"], timeout=UI_TIMEOUT)
    option = select.locator(f'option[value="{model["id"]}"]')
    text = option.inner_text()
    assert ABCD_NAME in text and hidden_size in text, f"model option says {text!r}"
    ui.shot("succeeded")
    ui.assert_clean()


def test_train_from_file(server: Served, ui: Ui) -> None:
    """#corpus-file instead of pasted text."""
    page = ui.page
    ui.open(server.url)
    corpus = "xyz\n" * 300
    page.set_input_files(
        "#corpus-file", {"name": "xyz.txt", "mimeType": "text/plain", "buffer": corpus.encode()}
    )
    expect(page.locator("#corpus")).to_have_value("")
    page.select_option("#preset", "tiny")
    page.fill("#hp-max_steps", "60")
    page.fill("#hp-eval_every", "20")
    page.fill("#model-name", "demo-file")
    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text("succeeded", timeout=TRAIN_TIMEOUT)
    model = model_named(server.url, "demo-file")
    assert model is not None, "the job made no model"
    assert sorted(model["vocab"]) == ["\n", "x", "y", "z"], "the corpus was not the file's"
    expect(page.locator("#model-select")).to_have_value(model["id"])
    # The newline is a bar like any other character, shown as "↵".
    retype(page, "#predict-text", "xyz")
    got = expect_bars_for(page, server.url, model["id"], "xyz")
    assert got[0][0] == "\n", got
    ui.shot("succeeded")
    ui.assert_clean()


def test_predict_bars(server: Served, ui: Ui, abcd_model: str, fox_model: str) -> None:
    page = ui.page
    ui.open(server.url)
    select_model(page, abcd_model)
    retype(page, "#predict-text", "abcdab")
    got = expect_bars_for(page, server.url, abcd_model, "abcdab")
    assert len(got) == 4  # the whole vocabulary: fewer than ten characters
    assert got[0][0] == "c" and got[0][1] > 0.9, got
    assert_absolute_heights(page)
    ui.shot("abcd")

    select_model(page, fox_model)
    prefix = "the quick brown fox jumps over the lazy do"
    retype(page, "#predict-text", prefix)
    got = expect_bars_for(page, server.url, fox_model, prefix)
    assert len(got) == 10 and got[0][0] == "g", got
    assert_absolute_heights(page)
    ui.shot("fox")
    page.locator("#predict-bars .bar").first.click()
    expect_bars_for(page, server.url, fox_model, prefix + "g")
    expect(page.locator("#predict-error")).to_be_hidden()
    ui.shot("clicked")
    ui.assert_clean()


def test_generate_with_seed(server: Served, ui: Ui, fox_model: str) -> None:
    page = ui.page
    ui.open(server.url)
    select_model(page, fox_model)
    prompt = "the "
    page.fill("#gen-prompt", prompt)
    page.fill("#gen-temperature", "0.85")
    expect(page.locator("#gen-temperature-value")).to_have_text(re.compile(r"0\.85"))
    page.fill("#gen-length", "40")
    page.fill("#gen-seed", "7")

    outputs = []
    for run in (1, 2):
        page.click("#gen-start")
        expect(page.locator("#gen-status")).to_contain_text("done")
        expect(page.locator("#gen-error")).to_be_hidden()
        outputs.append(page.locator("#gen-output").text_content() or "")
        ui.shot(f"run{run}")
    assert outputs[0] == outputs[1], "the same seed generated different text"
    # The prompt stays in the text, set apart; the status says in words why it stopped.
    expect(page.locator("#gen-output .prompt")).to_have_text(prompt)
    expect(page.locator("#gen-status")).to_have_text(
        "done: stopped at 40 characters, the length asked for"
    )

    body = {"model": fox_model, "prompt": prompt, "max_chars": 40, "temperature": 0.85, "seed": 7}
    r = httpx.post(server.url + "/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["text"]) == 40
    assert outputs[0] == prompt + r.json()["text"], "the page and the API generated different text"
    assert any(r.url.endswith("/generate") and r.method == "POST" for r in ui.requests)
    ui.assert_clean()


def test_bad_input_shows_readable_errors(server: Served, ui: Ui, abcd_model: str) -> None:
    page = ui.page
    ui.expect_http_error(422, "/predict")
    ui.expect_http_error(422, "/jobs")
    ui.open(server.url)
    select_model(page, abcd_model)
    retype(page, "#predict-text", "abcx")
    error = page.locator("#predict-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("characters not in the model's vocabulary: 'x'")
    readable(error.inner_text())
    ui.shot("predict-error")
    page.locator("#predict-text").press("Backspace")
    expect(error).to_be_hidden()
    expect_bars_for(page, server.url, abcd_model, "abc")

    page.fill("#corpus", "")
    page.select_option("#preset", "tiny")
    page.click("#train-start")
    train_error = page.locator("#train-error")
    expect(train_error).to_be_visible()
    expect(train_error).to_contain_text("corpus")
    readable(train_error.inner_text())
    expect(page.locator("#train-cancel")).to_be_disabled()
    ui.shot("train-error")
    ui.assert_clean()


def test_api_key(tmp_path: Path, ui: Ui) -> None:
    page = ui.page
    with charnn_serve(tmp_path, CHARNN_API_KEY="s3cret") as keyed:
        ui.expect_http_error(401, "/jobs")
        ui.open(keyed.url)
        page.fill("#corpus", ABCD)
        page.select_option("#preset", "tiny")
        page.fill("#hp-max_steps", "1000000")  # long enough to cancel it while it runs
        page.fill("#hp-patience", "1000000")  # and no early stop
        page.fill("#hp-eval_every", "50")
        page.click("#train-start")
        error = page.locator("#train-error")
        expect(error).to_be_visible()
        expect(error).to_contain_text("API key")
        readable(error.inner_text())
        ui.shot("no-key")

        page.fill("#api-key", "s3cret")
        page.click("#train-start")
        expect(error).to_be_hidden()
        cancel = page.locator("#train-cancel")
        expect(cancel).to_be_enabled()
        page.wait_for_function("() => document.querySelector('#train-progress').value > 0")
        expect(page.locator("#loss-chart")).to_have_attribute(
            "data-train-points", re.compile(r"^[1-9]\d*$")
        )
        ui.shot("running")
        sent = [r for r in ui.requests if r.method == "POST" and r.url == keyed.url + "/jobs"]
        assert sent[-1].headers.get("authorization") == "Bearer s3cret"
        cancel.click()  # the cancel endpoint needs the key too
        expect(page.locator("#train-status")).to_contain_text("cancelled", timeout=TRAIN_TIMEOUT)
        expect(cancel).to_be_disabled()
        expect(error).to_be_hidden()
        ui.shot("cancelled")
        ui.assert_clean()
        page.close()  # before the server stops: no EventSource left to retry against it


def test_api_docs_work_offline(server: Served, browser: Browser) -> None:
    """/docs and /redoc with every request to another origin refused (an air-gapped
    cluster): the operations render and "Try it out" reaches the server."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(UI_TIMEOUT)
    refused: list[str] = []

    def only_this_origin(route: Any) -> None:
        url = route.request.url
        if url.startswith(server.url + "/") or url.startswith("data:"):
            route.continue_()
        else:
            refused.append(url)
            route.abort()

    context.route("**/*", only_this_origin)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(server.url + "/docs")
        operations = page.locator(".opblock")
        expect(operations.first).to_be_visible()
        assert operations.count() >= 15, operations.count()
        health = page.locator("#operations-health-healthz_healthz_get")
        health.locator(".opblock-summary").click()
        health.get_by_role("button", name="Try it out").click()
        health.get_by_role("button", name="Execute").click()
        status = health.locator(".live-responses-table tbody .response-col_status")
        expect(status.first).to_have_text("200")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "docs-offline.png")

        page.goto(server.url + "/redoc")
        expect(page.locator("h1").first).to_contain_text("charnn")
        expect(page.get_by_text("POST /jobs").first).to_be_attached()
        page.screenshot(path=ARTIFACTS / "redoc-offline.png")
        assert refused == [], f"the docs asked another origin for {refused}"
        assert errors == [], errors
    finally:
        context.close()
