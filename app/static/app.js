// charnn demo page: plain JavaScript over the public HTTP API (the one documented at /docs).
// No build step, no dependencies, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

// Hyperparameters of each size preset: shown in the form, editable before starting.
const PRESETS = {
  tiny: { hidden_size: 32, seq_length: 32, batch_size: 16, learning_rate: 0.01, max_steps: 300, eval_every: 50 },
  small: { hidden_size: 128, seq_length: 64, batch_size: 32, learning_rate: 0.008, max_steps: 1000, eval_every: 100 },
  medium: { hidden_size: 256, seq_length: 64, batch_size: 64, learning_rate: 0.008, max_steps: 2000, eval_every: 200 },
};
const HP_FIELDS = Object.keys(PRESETS.tiny);
const VISIBLE = { " ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍" };

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

const chart = { train: [], val: [] };
let currentJob = null;
let events = null;

function applyPreset() {
  const preset = PRESETS[$("preset").value];
  for (const name of HP_FIELDS) $(`hp-${name}`).value = preset[name];
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

function drawChart() {
  const svg = $("loss-chart");
  const W = 600, H = 240, L = 44, R = 12, T = 12, B = 28;
  const all = chart.train.concat(chart.val);
  svg.dataset.trainPoints = String(chart.train.length);
  svg.dataset.valPoints = String(chart.val.length);
  const parts = [];
  if (all.length) {
    const xMax = Math.max(1, ...all.map((p) => p.step));
    let yMin = Math.min(...all.map((p) => p.loss));
    let yMax = Math.max(...all.map((p) => p.loss));
    if (yMax - yMin < 1e-6) { yMax += 0.5; yMin = Math.max(0, yMin - 0.5); }
    const x = (s) => L + ((W - L - R) * s) / xMax;
    const y = (v) => T + ((H - T - B) * (yMax - v)) / (yMax - yMin);
    for (let i = 0; i <= 4; i++) {
      const v = yMin + ((yMax - yMin) * i) / 4;
      parts.push(`<line class="grid-line" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`);
      parts.push(`<text x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${v.toFixed(2)}</text>`);
    }
    parts.push(`<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`);
    parts.push(`<text x="${W - R}" y="${H - 8}" text-anchor="end">step ${xMax}</text>`);
    parts.push(`<text x="${L}" y="${H - 8}">0</text>`);
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
  } catch (error) {
    showError("train-error", error);
  }
}

function showProgress(step, total, elapsed, status) {
  const bar = $("train-progress");
  if (total) { bar.max = total; bar.value = Math.min(step, total); }
  let text = `${status}: step ${step}${total ? ` of ${total}` : ""}`;
  if (status === "running" && total && step > 0 && elapsed > 0) {
    text += ` · about ${duration((elapsed / step) * (total - step))} left`;
  }
  $("train-status").textContent = text;
}

function setRunning(running) {
  $("train-start").disabled = running;
  $("train-cancel").disabled = !running;
}

async function finished(job) {
  if (events) { events.close(); events = null; }
  await loadCurve(job.id); // every point, even if the stream saw none
  setRunning(false);
  const total = job.progress.total_steps || job.progress.step;
  $("train-progress").max = Math.max(1, total);
  $("train-progress").value = job.status === "succeeded" ? Math.max(1, total) : job.progress.step;
  let text = `${job.status} after ${job.progress.step} steps`;
  if (job.metrics.val_loss !== null) text += ` · best validation loss ${fmt(job.metrics.val_loss)} nats/char`;
  if (job.error) text += ` · ${job.error}`;
  $("train-status").textContent = text;
  if (job.status === "succeeded" && job.model_id) await loadModels(job.model_id);
}

function follow(job) {
  currentJob = job;
  chart.train = [];
  chart.val = [];
  drawChart();
  setRunning(true);
  showProgress(0, job.progress.total_steps, 0, job.status);
  events = new EventSource(`jobs/${encodeURIComponent(job.id)}/events`);
  events.addEventListener("progress", (e) => {
    const data = JSON.parse(e.data);
    if (data.job) { // the snapshot every (re)connected stream starts with
      showProgress(data.job.progress.step, data.job.progress.total_steps, 0, data.job.status);
      loadCurve(job.id);
      return;
    }
    addPoint(data);
    drawChart();
    showProgress(data.step, data.total_steps, data.elapsed_s, "running");
  });
  events.addEventListener("status", (e) => finished(JSON.parse(e.data)));
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
  } catch (error) {
    showError("train-error", error);
    setRunning(false);
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
  predictTimer = setTimeout(predict, 40);
}

function renderBars(next) {
  const bars = $("predict-bars");
  bars.innerHTML = "";
  const top = next.length ? next[0].prob : 1;
  for (const n of next) {
    const bar = document.createElement("button");
    bar.type = "button";
    bar.className = "bar";
    bar.dataset.char = n.char;
    bar.dataset.prob = String(n.prob);
    bar.title = `${JSON.stringify(n.char)}: ${(100 * n.prob).toFixed(2)} %`;
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.height = `${Math.max(1, (70 * n.prob) / top)}%`;
    const ch = document.createElement("span");
    ch.className = "char";
    ch.textContent = visible(n.char);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${(100 * n.prob).toFixed(n.prob >= 0.1 ? 0 : 1)}%`;
    bar.append(fill, ch, pct);
    bar.addEventListener("click", () => {
      const text = $("predict-text");
      text.value += n.char;
      text.focus();
      predictSoon();
    });
    bars.append(bar);
  }
}

async function predict() {
  const m = selectedModel();
  if (!m) {
    $("predict-bars").innerHTML = "";
    $("predict-info").textContent = "Train or pick a model first.";
    return;
  }
  const seq = ++predictSeq;
  try {
    const out = await api("predict", { method: "POST", body: { model: m.id, text: $("predict-text").value, top_k: 10 } });
    if (seq !== predictSeq) return; // an older answer arriving late
    showError("predict-error", null);
    renderBars(out.next);
    $("predict-info").textContent = `entropy ${fmt(out.entropy_bits, 2)} bits`;
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
  $("gen-status").textContent = "generating…";
  $("gen-start").disabled = true;
  const body = {
    model: m.id,
    prompt: $("gen-prompt").value,
    max_chars: Number($("gen-length").value || 300),
    temperature: Number($("gen-temperature").value),
    stream: true,
  };
  const seed = $("gen-seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  try {
    for await (const { event, data } of postEvents("generate", body)) {
      if (event === "chunk") out.textContent += data.text;
      else if (event === "done") $("gen-status").textContent = `done (${data.finish_reason}, ${data.text.length} characters)`;
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
  applyPreset();
  $("corpus-file").addEventListener("change", async () => {
    const file = $("corpus-file").files[0];
    if (!file) return;
    $("corpus").value = "";
    $("corpus-info").textContent = `${file.name}: ${(file.size / 1024).toFixed(0)} kB`;
  });
  $("train-start").addEventListener("click", startTraining);
  $("train-cancel").addEventListener("click", cancelTraining);
  $("models-refresh").addEventListener("click", () => loadModels());
  $("model-select").addEventListener("change", modelChanged);
  $("predict-text").addEventListener("input", predictSoon);
  $("gen-temperature").addEventListener("input", () => {
    $("gen-temperature-value").textContent = Number($("gen-temperature").value).toFixed(2);
  });
  $("gen-start").addEventListener("click", generate);
  drawChart();
  loadModels();
}

init();
