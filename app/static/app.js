// charnn demo page: plain JavaScript over the public HTTP API (the one documented at /docs).
// No build step, no dependencies, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

// Fixed presets; "auto" asks the server for settings fitted to the text's size
// (GET /hyperparameters?corpus_chars=N), "full" leaves every field to the server.
const PRESETS = {
  tiny: { hidden_size: 32, seq_length: 32, batch_size: 16, learning_rate: 0.01, max_steps: 300, eval_every: 50 },
  full: {},
};
const HP_FIELDS = ["hidden_size", "seq_length", "batch_size", "learning_rate", "max_steps", "eval_every", "patience"];
const VISIBLE = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };
const ETA_MIN_SECONDS = 2; // an ETA from less than this much training is a guess

// ---------------------------------------------------------------------------- the API

class ApiError extends Error {}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

// The server's own sentence for what went wrong: {"error": {"code", "message", "details"}}.
async function errorFrom(response) {
  let message = `${response.status} ${response.statusText || "error"}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    /* not JSON: keep the status line */
  }
  return new ApiError(message);
}

async function api(path, { method = "GET", body } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError("cannot reach the server: is it still running?");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

// Server-Sent Events from a POST (EventSource only does GET): yields {event, data}.
async function* postEvents(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of raw.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function showError(id, error) {
  const el = $(id);
  const text = error ? (error instanceof ApiError ? error.message : String(error.message || error)) : "";
  el.textContent = text;
  el.hidden = !text;
}

function visible(ch) {
  return VISIBLE[ch] ?? ch;
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

function duration(seconds) {
  if (!Number.isFinite(seconds)) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  return `${m} min ${Math.round(seconds - 60 * m)} s`;
}

// ---------------------------------------------------------------------------- training

const chart = { train: [], val: [], total: null };
let currentJob = null;
let events = null;
let corpusChars = 0;
let suggestTimer = null;
let suggestSeq = 0;
let rate = null; // {step, time}: the first progress event seen, for the ETA

function setFields(hp) {
  for (const name of HP_FIELDS) $(`hp-${name}`).value = hp[name] ?? "";
}

async function applyPreset() {
  const preset = $("preset").value;
  if (preset === "custom") return;
  if (preset !== "auto") {
    setFields(PRESETS[preset]);
    $("preset-reason").textContent = preset === "full" ? "Every hyperparameter at the server's default." : "";
    return;
  }
  if (!corpusChars) {
    setFields({});
    $("preset-reason").textContent = "Paste or pick a text: the settings will fit its size.";
    return;
  }
  const seq = ++suggestSeq;
  try {
    const out = await api(`hyperparameters?corpus_chars=${corpusChars}`);
    if (seq !== suggestSeq || $("preset").value !== "auto") return;
    setFields(out.suggested || {});
    $("preset-reason").textContent = out.reason || "";
  } catch (error) {
    showError("train-error", error);
  }
}

// What the text is, as the server will count it (code points, not UTF-16 units).
async function describeCorpus() {
  const file = $("corpus-file").files[0];
  const pasted = $("corpus").value;
  let text = pasted;
  let source = "";
  if (!pasted && file) { text = await file.text(); source = `${file.name}: `; }
  const chars = Array.from(text);
  corpusChars = chars.length;
  $("corpus-info").textContent = corpusChars
    ? `${source}${corpusChars.toLocaleString("en-US")} characters, ${new Set(chars).size} distinct`
    : "";
  clearTimeout(suggestTimer);
  suggestTimer = setTimeout(applyPreset, 250);
}

function readHyperparameters() {
  const hp = {};
  for (const name of HP_FIELDS) {
    const raw = $(`hp-${name}`).value.trim();
    if (raw === "") continue; // the server's default
    hp[name] = Number(raw);
  }
  return hp;
}

// Round tick steps (1, 2, 2.5, 5 x 10^k) covering [lo, hi] with about n intervals.
function ticks(lo, hi, n) {
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || 10 * mag;
  const first = Math.floor(lo / step) * step;
  const out = [];
  for (let v = first; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  if (out[out.length - 1] < hi - step * 1e-9) out.push(Number((first + out.length * step).toPrecision(12)));
  return { values: out, step };
}

// As many decimals as the tick step has (0.25 -> 2, 0.5 -> 1, 5 -> 0): ticks read alike.
function tickText(v, step) {
  const decimals = (String(Number(step.toPrecision(12))).split(".")[1] || "").length;
  return v.toFixed(Math.min(4, decimals));
}

// Drawn in CSS pixels (no viewBox): on a phone the labels stay as large as the page's text.
function drawChart() {
  const svg = $("loss-chart");
  const W = Math.max(240, Math.round(svg.clientWidth || svg.parentElement.clientWidth || 600));
  const H = W < 480 ? 200 : 240;
  svg.setAttribute("width", String(W));
  svg.setAttribute("height", String(H));
  const L = 46, R = 14, T = 14, B = 30;
  const all = chart.train.concat(chart.val);
  svg.dataset.trainPoints = String(chart.train.length);
  svg.dataset.valPoints = String(chart.val.length);
  svg.dataset.bestStep = "";
  const parts = [];
  if (all.length) {
    const xMax = Math.max(1, chart.total || 0, ...all.map((p) => p.step));
    const losses = all.map((p) => p.loss);
    let lo = Math.min(...losses), hi = Math.max(...losses);
    if (hi - lo < 1e-6) { hi += 0.5; lo = Math.max(0, lo - 0.5); }
    const ys = ticks(lo, hi, 4);
    const yMin = ys.values[0], yMax = ys.values[ys.values.length - 1];
    const x = (s) => L + ((W - L - R) * s) / xMax;
    const y = (v) => T + ((H - T - B) * (yMax - v)) / (yMax - yMin);
    for (const v of ys.values) {
      parts.push(`<line class="grid-line" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`);
      parts.push(`<text class="tick ytick" x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${tickText(v, ys.step)}</text>`);
    }
    const xs = ticks(0, xMax, W < 480 ? 3 : 5);
    for (const v of xs.values) {
      if (v > xMax) continue;
      parts.push(`<text class="tick" x="${x(v)}" y="${H - 10}" text-anchor="middle">${v}</text>`);
    }
    parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
    // Where overfitting starts: the best validation point, when later ones are worse.
    if (chart.val.length >= 2) {
      const best = chart.val.reduce((a, b) => (b.loss < a.loss ? b : a));
      const last = chart.val[chart.val.length - 1];
      if (last.step > best.step && last.loss > best.loss) {
        svg.dataset.bestStep = String(best.step);
        parts.push(`<rect class="overfit" x="${x(best.step)}" y="${T}" width="${x(last.step) - x(best.step)}" height="${H - T - B}"/>`);
        parts.push(`<line class="best" x1="${x(best.step)}" x2="${x(best.step)}" y1="${T}" y2="${H - B}"/>`);
        const anchor = x(best.step) > W / 2 ? "end" : "start";
        const dx = anchor === "end" ? -4 : 4;
        parts.push(`<text class="best-label" x="${x(best.step) + dx}" y="${T + 12}" text-anchor="${anchor}">${W < 480 ? `best: step ${best.step}` : `best at step ${best.step}; validation worse since`}</text>`);
      }
    }
    const line = (pts) => pts.map((p) => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ");
    if (chart.train.length) parts.push(`<polyline class="train" points="${line(chart.train)}"/>`);
    if (chart.val.length) {
      parts.push(`<polyline class="val" points="${line(chart.val)}"/>`);
      for (const p of chart.val) parts.push(`<circle class="val" r="3" cx="${x(p.step)}" cy="${y(p.loss)}"/>`);
    }
  } else {
    parts.push(`<text x="${W / 2}" y="${H / 2}" text-anchor="middle">the loss curve appears here while a model trains</text>`);
  }
  svg.innerHTML = parts.join("");
}

function addPoint(p) {
  const add = (series, loss) => {
    if (loss === null || loss === undefined) return;
    if (series.length && series[series.length - 1].step >= p.step) return; // already plotted
    series.push({ step: p.step, loss });
  };
  add(chart.train, p.train_loss);
  add(chart.val, p.val_loss);
  addDiagnostics(p);
}

// Under the chart: the latest log point's gradient norm, learning rate and speed, and
// the latest few samples of the current weights (taken at evaluations), with their step.
const SAMPLES_SHOWN = 4;
const diagnostics = { samples: new Map(), last: null };

function resetDiagnostics() {
  diagnostics.samples = new Map();
  diagnostics.last = null;
  drawDiagnostics();
}

function addDiagnostics(p) {
  if (typeof p.sample === "string") diagnostics.samples.set(p.step, p.sample);
  if (typeof p.grad_norm === "number" && (!diagnostics.last || p.step >= diagnostics.last.step)) {
    diagnostics.last = p;
  }
}

function drawDiagnostics() {
  const line = $("train-diagnostics");
  const d = diagnostics.last;
  if (d) {
    const parts = [`step ${d.step}`, `gradient norm ${Number(d.grad_norm.toPrecision(3))}${d.clipped ? " (clipped)" : ""}`];
    if (typeof d.learning_rate === "number") parts.push(`learning rate ${d.learning_rate.toExponential(2)}`);
    if (typeof d.chars_per_sec === "number") parts.push(`${Math.round(d.chars_per_sec).toLocaleString("en-US")} chars/s`);
    line.textContent = parts.join(" · ");
    line.dataset.step = String(d.step);
  } else {
    line.textContent = "";
    delete line.dataset.step;
  }
  line.hidden = !d;
  const steps = [...diagnostics.samples.keys()].sort((a, b) => a - b).slice(-SAMPLES_SHOWN);
  const list = $("sample-list");
  list.replaceChildren(...steps.map((step) => {
    const item = document.createElement("li");
    item.dataset.step = String(step);
    const label = document.createElement("span");
    label.className = "sample-step";
    label.textContent = `step ${step}`;
    const text = document.createElement("pre");
    text.className = "sample-text";
    text.textContent = diagnostics.samples.get(step); // the model's text: never markup
    item.append(label, text);
    return item;
  }));
  $("train-samples").hidden = steps.length === 0;
}

// The curve so far, from the store: a stream that (re)connects mid-job, or a job that
// ended before the stream did, still shows every point. Live points then extend it.
async function loadCurve(jobId) {
  try {
    const out = await api(`jobs/${encodeURIComponent(jobId)}/metrics`);
    const live = { train: chart.train, val: chart.val };
    chart.train = [];
    chart.val = [];
    for (const p of out.points) addPoint(p);
    for (const p of live.train) addPoint({ step: p.step, train_loss: p.loss });
    for (const p of live.val) addPoint({ step: p.step, val_loss: p.loss });
    chart.train.sort((a, b) => a.step - b.step);
    chart.val.sort((a, b) => a.step - b.step);
    drawChart();
    drawDiagnostics();
  } catch (error) {
    showError("train-error", error);
  }
}

// The ETA from this page's own clock over the steps it saw: the job's start-up and a
// first slow step do not count, and nothing is promised from under ETA_MIN_SECONDS.
function eta(step, total) {
  const now = performance.now() / 1000;
  if (rate === null || step < rate.step) { rate = { step, time: now }; return null; }
  const seconds = now - rate.time, steps = step - rate.step;
  if (seconds < ETA_MIN_SECONDS || steps < Math.max(3, 0.05 * total)) return null;
  return (seconds / steps) * (total - step);
}

function showProgress(step, total, status, note) {
  const bar = $("train-progress");
  if (total) { bar.max = total; bar.value = Math.min(step, total); }
  let text = `${status}: step ${step}${total ? ` of ${total}` : ""}`;
  if (status === "running" && total) {
    const left = eta(step, total);
    text += left === null ? " · estimating the time left…" : ` · about ${duration(left)} left`;
  }
  if (note) text += ` · ${note}`;
  $("train-status").textContent = text;
}

function setRunning(running, paused = false) {
  $("train-start").disabled = running;
  $("train-cancel").disabled = !running;
  $("train-pause").disabled = !running || paused;
  $("train-resume").disabled = !running || !paused;
}

async function finished(job) {
  if (events) { events.close(); events = null; }
  chart.total = null; // the axis ends where the run did (early stopping may end it soon)
  await loadCurve(job.id); // every point, even if the stream saw none
  setRunning(false);
  const total = job.progress.total_steps || job.progress.step;
  $("train-progress").max = Math.max(1, total);
  $("train-progress").value = job.status === "succeeded" ? Math.max(1, total) : job.progress.step;
  let text = `${job.status} after ${job.progress.step} steps`;
  if (job.note) text += ` · ${job.note}`;
  if (job.metrics.val_loss !== null) text += ` · best validation loss ${fmt(job.metrics.val_loss)} nats/char`;
  if (job.error) text += ` · ${job.error}`;
  $("train-status").textContent = text;
  loadJobs();
  if (job.status === "succeeded" && job.model_id) await loadModels(job.model_id);
}

// While the stream runs: the best validation so far, and how long since it improved.
function liveNote(data) {
  if (data.best_step === null || data.best_step === undefined) return "";
  if (data.best_step === data.step) return `validation improving (best at step ${data.best_step})`;
  return `validation not better since step ${data.best_step}`;
}

function follow(job) {
  currentJob = job;
  chart.train = [];
  chart.val = [];
  chart.total = job.progress.total_steps;
  rate = null;
  resetDiagnostics();
  drawChart();
  setRunning(true, job.status === "paused");
  showProgress(job.progress.step, job.progress.total_steps, job.status, job.note);
  if (events) events.close();
  events = new EventSource(`jobs/${encodeURIComponent(job.id)}/events`);
  // The browser reconnects by itself with Last-Event-ID: the stream then sends only what
  // this page missed (no snapshot, no point twice).
  events.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data); // one metric point, as GET jobs/{id}/metrics has it
    if (data.total_steps) chart.total = data.total_steps;
    addPoint(data);
    drawChart();
    drawDiagnostics();
    if (!$("train-pause").disabled) showProgress(data.step, data.total_steps, "running", liveNote(data));
  });
  events.addEventListener("status", (e) => {
    const now = JSON.parse(e.data); // the job: a new stream's first event, each change, the end
    if (["succeeded", "failed", "cancelled"].includes(now.status)) { finished(now); return; }
    chart.total = now.progress.total_steps;
    setRunning(true, now.status === "paused");
    showProgress(now.progress.step, now.progress.total_steps, now.status, now.note);
    loadCurve(job.id); // the points from before this stream began
  });
  events.onerror = async () => {
    // The stream broke (server restart?): ask once whether the job is over.
    try {
      const now = await api(`jobs/${encodeURIComponent(job.id)}`);
      if (["succeeded", "failed", "cancelled"].includes(now.status)) await finished(now);
    } catch (error) {
      showError("train-error", error);
    }
  };
}

async function readCorpus() {
  const file = $("corpus-file").files[0];
  if (file && !$("corpus").value) return await file.text();
  return $("corpus").value;
}

async function startTraining() {
  showError("train-error", null);
  $("train-start").disabled = true;
  try {
    const corpus = await readCorpus();
    const name = $("model-name").value.trim();
    const body = { corpus, hyperparameters: readHyperparameters() };
    if (name) body.name = name;
    const job = await api("jobs", { method: "POST", body });
    follow(job);
    $("train-live").scrollIntoView({ block: "nearest" }); // the chart in view while it trains
    loadJobs();
  } catch (error) {
    showError("train-error", error);
    setRunning(false);
  }
}

// Pause checkpoints the run at its next step and frees its slot; resume continues it
// exactly where it stopped (the same curve as an uninterrupted run). The stream stays open.
async function steerTraining(action) {
  if (!currentJob) return;
  showError("train-error", null);
  try {
    const answer = await api(`jobs/${encodeURIComponent(currentJob.id)}/${action}`, { method: "POST" });
    const job = answer.job || answer; // 202: still stopping ({state, message, job})
    const paused = action === "pause";
    setRunning(true, paused);
    const status = answer.state || job.status;
    showProgress(job.progress.step, job.progress.total_steps, status, answer.message || job.note);
  } catch (error) {
    showError("train-error", error);
  }
}

async function cancelTraining() {
  if (!currentJob) return;
  try {
    await api(`jobs/${encodeURIComponent(currentJob.id)}/cancel`, { method: "POST" });
  } catch (error) {
    showError("train-error", error);
  }
}

// Recent jobs; on load, the newest running (or queued) one is followed again.
async function loadJobs() {
  let page;
  try {
    page = await api("jobs?limit=5");
  } catch (error) {
    return null; // the form still works; the error shows where the user acts
  }
  const list = $("job-list");
  list.innerHTML = "";
  for (const j of page.items) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "job";
    button.dataset.job = j.id;
    const when = new Date(j.created_at * 1000).toLocaleTimeString();
    const val = j.metrics.val_loss === null ? "" : ` · val ${fmt(j.metrics.val_loss)}`;
    button.textContent = `${j.name} · ${j.status} · step ${j.progress.step}${val} · ${when}`;
    button.title = j.note || j.error || "";
    button.addEventListener("click", () => showJob(j.id));
    item.append(button);
    list.append(item);
  }
  $("recent").hidden = !page.items.length;
  return page.items;
}

async function showJob(jobId) {
  try {
    const job = await api(`jobs/${encodeURIComponent(jobId)}`);
    if (job.status === "running" || job.status === "queued") { follow(job); return; }
    if (events) { events.close(); events = null; }
    currentJob = job;
    chart.train = [];
    chart.val = [];
    chart.total = job.progress.total_steps;
    resetDiagnostics();
    await finished(job);
  } catch (error) {
    showError("train-error", error);
  }
}

async function reattach() {
  const items = await loadJobs();
  if (!items) return;
  const live = items.find((j) => j.status === "running") || items.find((j) => j.status === "queued");
  if (live) {
    follow(live);
    $("train-status").textContent = `${live.status}: following job ${live.name} again (started before this page loaded)`;
  }
}

// ---------------------------------------------------------------------------- models

let models = [];

function selectedModel() {
  return models.find((m) => m.id === $("model-select").value) || null;
}

function describeModel(m) {
  const created = new Date(m.created_at * 1000).toLocaleString();
  return `${m.name} · H=${m.hidden_size} · val ${fmt(m.val_loss)} · ${created}`;
}

async function loadModels(select) {
  showError("models-error", null);
  try {
    const page = await api("models?limit=200");
    models = page.items;
  } catch (error) {
    showError("models-error", error);
    return;
  }
  const el = $("model-select");
  const keep = select || el.value;
  el.innerHTML = "";
  if (!models.length) el.add(new Option("no models yet: train one", ""));
  for (const m of models) el.add(new Option(describeModel(m), m.id));
  if (models.some((m) => m.id === keep)) el.value = keep;
  modelChanged();
}

function modelChanged() {
  const m = selectedModel();
  $("model-info").textContent = m
    ? `${m.vocab_size} characters · ${m.param_count.toLocaleString()} parameters · ${(m.size_bytes / 1024).toFixed(0)} kB · ${m.dtype}`
    : "";
  predictSoon();
}

// ---------------------------------------------------------------------------- predict

let predictTimer = null;
let predictSeq = 0;

function predictSoon() {
  clearTimeout(predictTimer);
  // In the page a prediction costs well under a millisecond: no need to wait for a pause.
  predictTimer = setTimeout(predict, $("predict-local").checked ? 0 : 40);
}

function renderBars(next) {
  const bars = $("predict-bars");
  bars.innerHTML = "";
  for (const n of next) {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.char = n.char;
    bar.dataset.prob = String(n.prob);
    bar.title = `${JSON.stringify(n.char)}: ${(100 * n.prob).toFixed(2)} %`;
    // Heights on an absolute scale, 0 to 100 %: a flat distribution looks flat.
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.height = `${(100 * n.prob).toFixed(2)}%`;
    track.append(fill);
    const ch = document.createElement("span");
    ch.className = "char";
    ch.textContent = visible(n.char);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * n.prob).toFixed(n.prob >= 0.1 ? 0 : 1)}%`;
    bar.append(track, ch, pct);
    bar.addEventListener("click", () => {
      const text = $("predict-text");
      text.value += n.char;
      text.focus();
      predictSoon();
    });
    bars.append(bar);
  }
}

// In-page predictions: the model's web export, run by charnn.js (loaded on first use).
let charnnModule = null;
const pageModels = new Map(); // model id -> Promise<charnn.Model>

function pageModel(m) {
  if (!pageModels.has(m.id)) {
    charnnModule ||= import("./charnn.js");
    const loading = charnnModule.then((charnn) => charnn.load(`models/${encodeURIComponent(m.id)}/web`));
    loading.catch(() => pageModels.delete(m.id)); // a failed load is tried again next time
    pageModels.set(m.id, loading);
  }
  return pageModels.get(m.id);
}

function entropyOf(next) {
  let h = 0;
  for (const { prob } of next) if (prob > 0) h -= prob * Math.log2(prob);
  return h;
}

async function predict() {
  const m = selectedModel();
  if (!m) {
    $("predict-bars").innerHTML = "";
    $("predict-info").textContent = "Train or pick a model first.";
    return;
  }
  const seq = ++predictSeq;
  const text = $("predict-text").value;
  const local = $("predict-local").checked;
  try {
    let next, entropy, took;
    if (local) {
      const model = await pageModel(m);
      if (seq !== predictSeq) return;
      const t0 = performance.now();
      const all = model.predict(text); // the whole distribution: its entropy, then the top 10
      took = `${(performance.now() - t0).toFixed(2)} ms in this page (${model.engine})`;
      next = all.slice(0, 10);
      entropy = entropyOf(all);
    } else {
      const t0 = performance.now();
      const out = await api("predict", { method: "POST", body: { model: m.id, text, top_k: 10 } });
      if (seq !== predictSeq) return; // an older answer arriving late
      took = `${(performance.now() - t0).toFixed(1)} ms from the server`;
      next = out.next;
      entropy = out.entropy_bits;
    }
    showError("predict-error", null);
    renderBars(next);
    $("predict-info").textContent = `entropy ${fmt(entropy, 2)} bits · ${took}`;
  } catch (error) {
    if (seq !== predictSeq) return;
    showError("predict-error", error);
    $("predict-bars").innerHTML = "";
    $("predict-info").textContent = "";
  }
}

// ---------------------------------------------------------------------------- generate

async function generate() {
  const m = selectedModel();
  showError("gen-error", null);
  if (!m) { showError("gen-error", new ApiError("Train or pick a model first.")); return; }
  const out = $("gen-output");
  out.textContent = "";
  const prompt = $("gen-prompt").value;
  const shownPrompt = document.createElement("span");
  shownPrompt.className = "prompt";
  out.append(shownPrompt);
  $("gen-status").textContent = "generating…";
  $("gen-start").disabled = true;
  const body = {
    model: m.id,
    prompt,
    include_prompt: true,
    max_chars: Number($("gen-length").value || 300),
    temperature: Number($("gen-temperature").value),
    stream: true,
  };
  const seed = $("gen-seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  try {
    let first = true;
    for await (const { event, data } of postEvents("generate", body)) {
      if (event === "chunk" && first && prompt) shownPrompt.textContent = data.text; // the prompt
      else if (event === "chunk") out.append(data.text);
      else if (event === "done") {
        const n = Array.from(data.text).length - Array.from(prompt).length;
        $("gen-status").textContent = data.finish_reason === "stop"
          ? `done: stopped at a stop string after ${n} characters`
          : `done: stopped at ${n} characters, the length asked for`;
      }
      if (event === "chunk") first = false;
    }
  } catch (error) {
    showError("gen-error", error);
    $("gen-status").textContent = "";
  } finally {
    $("gen-start").disabled = false;
  }
}

// ---------------------------------------------------------------------------- wiring

function init() {
  $("key-form").addEventListener("submit", (e) => e.preventDefault());
  $("api-key").value = sessionStorage.getItem("charnn-api-key") || "";
  $("api-key").addEventListener("change", () => sessionStorage.setItem("charnn-api-key", $("api-key").value));
  $("preset").addEventListener("change", applyPreset);
  for (const name of HP_FIELDS) {
    $(`hp-${name}`).addEventListener("input", () => {
      $("preset").value = "custom"; // edited by hand: a new text no longer overwrites it
      $("preset-reason").textContent = "";
    });
  }
  applyPreset();
  $("corpus").addEventListener("input", describeCorpus);
  $("corpus-file").addEventListener("change", () => {
    if (!$("corpus-file").files[0]) return;
    $("corpus").value = "";
    describeCorpus();
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(drawChart, 100); });
  $("train-start").addEventListener("click", startTraining);
  $("train-cancel").addEventListener("click", cancelTraining);
  $("train-pause").addEventListener("click", () => steerTraining("pause"));
  $("train-resume").addEventListener("click", () => steerTraining("resume"));
  $("models-refresh").addEventListener("click", () => loadModels());
  $("model-select").addEventListener("change", modelChanged);
  $("predict-text").addEventListener("input", predictSoon);
  $("predict-local").addEventListener("change", predictSoon);
  $("gen-temperature").addEventListener("input", () => {
    $("gen-temperature-value").textContent = Number($("gen-temperature").value).toFixed(2);
  });
  $("gen-start").addEventListener("click", generate);
  drawChart();
  loadModels();
  reattach();
}

init();
