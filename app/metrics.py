"""Prometheus metrics (``GET /metrics``), from the maintained client library.

Names follow Prometheus conventions with a ``charnn_`` prefix: counters end in
``_total``, durations are ``_seconds`` histograms, everything in base units.
Labels are bounded: route templates (never raw paths), methods, status codes,
model ids and running job ids; never a corpus, a prompt or other user text.

The counters live in the process's default registry beside the library's
process and platform collectors. The job gauges are read from the store at
scrape time by :class:`JobsCollector`: in scale-out mode every replica reads the
same shared store, so they agree (aggregate them with ``max``, not ``sum``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .domain import JOB_STATUSES

# ------------------------------------------------------------------ HTTP (app/api/observe.py)
HTTP_REQUESTS = Counter(
    "charnn_http_requests_total",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "charnn_http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route template.",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

# ------------------------------------------------------------------ serving (app/serving)
PREDICTIONS = Counter("charnn_predictions_total", "POST /predict answered, by model.", ["model"])
GENERATIONS = Counter("charnn_generations_total", "POST /generate started, by model.", ["model"])
SCORES = Counter("charnn_scores_total", "POST /score answered, by model.", ["model"])
CHARS_STEPPED = Counter(
    "charnn_chars_stepped_total",
    "Characters run through a model's recurrence for requests (cached prefixes excluded; "
    "sampled characters included).",
)
MODEL_CACHE = Counter(
    "charnn_model_cache_requests_total",
    "Loaded-model cache lookups, by result (hit: in memory; miss: read from the store).",
    ["result"],
)
PREFIX_CACHE = Counter(
    "charnn_prefix_cache_requests_total",
    "Prefix hidden-state cache lookups, by result (hit: some prefix of the text was cached).",
    ["result"],
)
BATCH_ROWS = Histogram(
    "charnn_batch_rows",
    "Requests stepped together in one slice of a model's batch (app/serving/batcher.py).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODELS_LOADED = Gauge("charnn_models_loaded", "Models held in memory for predictions.")
SESSIONS_OPEN = Gauge("charnn_sessions_open", "Typing sessions (WebSocket /sessions) open.")
SESSION_MESSAGES = Counter(
    "charnn_session_messages_total",
    "Typing-session messages answered, by operation (invalid: refused, the session unchanged).",
    ["op"],
)
SESSIONS_CLOSED = Counter(
    "charnn_sessions_closed_total",
    "Typing sessions ended, by reason (client, idle, full, shutdown, refused).",
    ["reason"],
)

# ------------------------------------------------------------------ jobs (app/jobs/lifecycle.py)
JOBS_STARTED = Counter("charnn_jobs_started_total", "Training jobs started (or resumed).")
JOBS_FINISHED = Counter(
    "charnn_jobs_finished_total",
    "Training jobs ended, by outcome (succeeded, failed, cancelled).",
    ["outcome"],
)

Reader = Callable[[], dict[str, Any]]


def job_gauges(store: Any) -> dict[str, Any]:
    """What ``charnn_jobs``, the queue length and the running jobs' gauges show, read
    from a ``Store`` (typed loosely: this module sits below the store's layer)."""
    return {
        "by_status": {s: store.count_jobs(s) for s in JOB_STATUSES},
        "queued": store.count_queued(),
        "running": store.list_jobs("running", 100, 0),
    }


class JobsCollector(Collector):
    """Job gauges read at scrape time from whatever ``read`` returns (set by the app's
    lifespan; nothing while no app runs): ``{"by_status": {status: n}, "queued": n,
    "running": [JobRecord, ...]}``."""

    def __init__(self) -> None:
        self.read: Reader | None = None

    def collect(self) -> Iterator[Metric]:
        read = self.read
        if read is None:
            return
        try:
            state = read()
        except Exception:  # a store that cannot answer now: no job gauges this scrape
            return
        jobs = GaugeMetricFamily(
            "charnn_jobs", "Training jobs in the store, by status.", labels=["status"]
        )
        for status, n in state["by_status"].items():
            jobs.add_metric([status], n)
        yield jobs
        yield GaugeMetricFamily(
            "charnn_job_queue_length", "Jobs waiting for a slot.", value=state["queued"]
        )
        per_job = {
            "chars_per_second": (
                "charnn_job_chars_per_second",
                "Training characters per second of each running job.",
                "chars_per_sec",
            ),
            "step": ("charnn_job_step", "Steps done by each running job.", "step"),
            "train_loss": (
                "charnn_job_train_loss",
                "Latest training loss (nats/char) of each running job.",
                "train_loss",
            ),
            "val_loss": (
                "charnn_job_val_loss",
                "Best validation loss so far (nats/char) of each running job.",
                "val_loss",
            ),
        }
        for name, help_text, attr in per_job.values():
            family = GaugeMetricFamily(name, help_text, labels=["job"])
            for job in state["running"]:
                value = getattr(job, attr)
                if value is not None:
                    family.add_metric([job.id], float(value))
            yield family


JOBS = JobsCollector()
REGISTRY.register(JOBS)
