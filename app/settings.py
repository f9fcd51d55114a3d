"""Service settings, read once from ``CHARNN_*`` environment variables.

Every field carries a description because the README settings table is
generated from them; the bounds reject nonsense at start-up rather than at the
first request that trips over it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .domain import ModelLimits

_JOB_THREADS = 2
MAX_WORKERS = 64  # API processes of one `charnn serve`


def _default_concurrent_jobs() -> int:
    # Each job uses ``job_threads`` (2) cores: half the machine's cores, at least one job.
    return max(1, (os.cpu_count() or 1) // _JOB_THREADS)


class Settings(BaseSettings):
    """All service configuration; each field is ``CHARNN_<FIELD>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="CHARNN_", extra="ignore")

    data_dir: Path = Field(
        default=Path("./charnn-data"),
        description="Directory holding the SQLite database, corpora, resume states and models.",
    )
    max_body_bytes: int = Field(
        default=20_000_000,
        ge=1024,
        description="Largest accepted request body in bytes (corpus uploads, checkpoints).",
    )
    max_corpus_chars: int = Field(
        default=10_000_000,
        ge=1,
        description="Largest training corpus, in characters.",
    )
    max_hidden_size: int = Field(
        default=1024, ge=1, le=65_536, description="Ceiling for the hidden_size hyperparameter."
    )
    max_seq_length: int = Field(
        default=512, ge=1, le=65_536, description="Ceiling for the seq_length hyperparameter."
    )
    max_batch_size: int = Field(
        default=512, ge=1, le=65_536, description="Ceiling for the batch_size hyperparameter."
    )
    max_steps: int = Field(
        default=1_000_000, ge=1, description="Ceiling for the max_steps hyperparameter."
    )
    max_time_limit_s: float = Field(
        default=86_400,
        gt=0,
        allow_inf_nan=False,
        description="Ceiling for the time_limit_s hyperparameter, in seconds.",
    )
    max_vocab_size: int = Field(
        default=10_000,
        ge=2,
        le=1_114_112,
        description=(
            "Most distinct characters a corpus (or an uploaded model) may have: the output "
            "layer and its softmax grow with it."
        ),
    )
    max_model_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description=(
            "Largest model weights in bytes (hidden size, vocabulary and dtype decide it), "
            "for jobs and uploads alike."
        ),
    )
    max_job_memory_bytes: int = Field(
        default=4 * 1024**3,
        ge=1024 * 1024,
        description=(
            "Largest estimated memory of one training job (weights, optimizer, activations, "
            "evaluation, corpus); a job over it is refused when submitted."
        ),
    )
    job_files_retention_s: float = Field(
        default=7 * 86_400,
        ge=0,
        allow_inf_nan=False,
        description=(
            "Seconds a finished job's corpus and resume state are kept (the job's row, "
            "metrics and model stay); 0 removes them as soon as the job ends."
        ),
    )
    max_concurrent_jobs: int = Field(
        default_factory=_default_concurrent_jobs,
        ge=1,
        description="Training jobs run at once; default is half the CPU cores (each job uses 2).",
    )
    max_queued_jobs: int = Field(
        default=16,
        ge=0,
        description="Jobs that may wait for a slot; beyond this, new jobs are refused.",
    )
    max_paused_jobs: int = Field(
        default=16,
        ge=0,
        le=100_000,
        description=(
            "Jobs that may be paused at once (each keeps its corpus and checkpoint); "
            "beyond this, a pause is refused (429) until one is resumed or cancelled."
        ),
    )
    idempotency_ttl_s: float = Field(
        default=86_400,
        ge=1,
        le=30 * 86_400,
        allow_inf_nan=False,
        description=(
            "Seconds a POST /jobs Idempotency-Key holds: the same key and body answer "
            "the first job until then; after it, the key may start a new job."
        ),
    )
    job_threads: int = Field(
        default=_JOB_THREADS,
        ge=1,
        le=256,
        description="CPU cores (BLAS threads / shards) each training job uses.",
    )
    job_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description=(
            "Scheduling niceness of training processes: above 0, requests are served "
            "first when jobs and requests compete for the CPU."
        ),
    )
    checkpoint_every_s: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds between resume checkpoints of a running job.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed by CORS, as a JSON list; empty disables CORS.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "Key that requests which change state (start or cancel a job, upload or delete "
            "a model) must send, as Bearer token or X-API-Key; unset or empty: no auth."
        ),
    )
    model_cache_size: int = Field(
        default=8, ge=0, le=1024, description="Loaded models kept in memory for predictions."
    )
    max_batch: int = Field(
        default=64,
        ge=1,
        le=4096,
        description=(
            "Requests for one model whose RNN steps run together, one GEMM per step "
            "(uncached /predict prefixes, /score, /generate); 1 turns batching off."
        ),
    )
    max_batch_delay_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        allow_inf_nan=False,
        description=(
            "Milliseconds a batch waits for more requests before it steps; 0: batch what is "
            "already waiting (Triton's max_queue_delay)."
        ),
    )
    max_sessions: int = Field(
        default=256,
        ge=0,
        le=100_000,
        description=(
            "Typing sessions (WebSocket /sessions) open at once per server process; "
            "beyond, a new one is closed with code 4429."
        ),
    )
    session_idle_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="Seconds a typing session may go without a message before it is closed (4408).",
    )
    session_history: int = Field(
        default=64,
        ge=0,
        le=10_000,
        description=(
            "Hidden states a typing session keeps for `back` (one per last character); "
            "backing up further recomputes the state."
        ),
    )
    session_max_chars: int = Field(
        default=100_000,
        ge=1,
        le=1_000_000,
        description="Characters a typing session's text may hold.",
    )
    api_blas_threads: int = Field(
        default=1,
        ge=1,
        le=256,
        description="BLAS threads for prediction requests in the API process.",
    )

    keep_alive_s: float = Field(
        default=65.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description=(
            "Seconds an idle kept-alive connection stays open; longer than common clients' "
            "own (httpx 5 s, browsers 60 s or more) so the server never closes one as a "
            "client reuses it."
        ),
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description=(
            "Seconds a client may take to send a request's headers once it started "
            "(slow-header clients are disconnected). `charnn serve` only."
        ),
    )
    shutdown_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description=(
            "On SIGTERM or SIGINT: seconds open requests get to finish before they are "
            "cut (event streams end at once); running jobs then get up to 10 s to checkpoint."
        ),
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description=(
            "`charnn serve`'s log lines: text, or json (one object per line: time, level, "
            "logger, message; access lines add request_id, method, route, path, status, "
            "duration_ms)."
        ),
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description=(
            "API processes `charnn serve` runs on one port, each serving every route; with "
            "the embedded store one of them runs the training jobs. `charnn serve` only."
        ),
    )

    database_url: str | None = Field(
        default=None,
        description=(
            "PostgreSQL URL of the shared store (e.g. postgresql://user@db/charnn); set together "
            "with broker_url to run jobs on Celery workers. Unset: SQLite in data_dir."
        ),
    )
    broker_url: str | None = Field(
        default=None,
        description=(
            "Redis URL of the Celery broker (e.g. redis://redis:6379/0), also used for job "
            "events between machines; set together with database_url. Unset: jobs run in "
            "processes of the API server."
        ),
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Training jobs each `charnn worker` runs at once (each uses one core).",
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "Port on which each `charnn worker` serves its Prometheus metrics (its pool "
            "processes' too, in prometheus-client's multiprocess mode); unset: none."
        ),
    )
    heartbeat_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        allow_inf_nan=False,
        description=(
            "Seconds between a worker's heartbeats for its running job; a cancellation "
            "reaches the job within about this long."
        ),
    )
    dead_after_s: float = Field(
        default=10.0,
        gt=0,
        allow_inf_nan=False,
        description=(
            "A running job whose worker has not sent a heartbeat for this many seconds is "
            "re-queued and resumes from its checkpoint on another worker."
        ),
    )
    visibility_timeout_s: int = Field(
        default=3600,
        ge=60,
        description=(
            "Redis broker visibility timeout: an unacknowledged job message is delivered "
            "again after this many seconds (duplicates are harmless; heartbeats re-queue "
            "a dead worker's job sooner)."
        ),
    )

    @model_validator(mode="after")
    def _both_urls_or_neither(self) -> Settings:
        # Workers on other machines need the shared store, and the embedded runner
        # needs the local files of the SQLite store: a half-configured pair is a mistake.
        if (self.database_url is None) != (self.broker_url is None):
            given, missing = (
                ("database_url", "broker_url")
                if self.broker_url is None
                else ("broker_url", "database_url")
            )
            raise ValueError(
                f"{given} is set but {missing} is not: set both CHARNN_DATABASE_URL and "
                "CHARNN_BROKER_URL to run jobs on Celery workers with a shared PostgreSQL "
                "store, or neither for the embedded runner"
            )
        if self.dead_after_s <= self.heartbeat_s:
            raise ValueError("dead_after_s must be longer than heartbeat_s")
        return self

    @property
    def hyperparameter_ceilings(self) -> dict[str, float]:
        """This server's ceiling of each hyperparameter that has one (the HTTP API's
        absolute bounds may be higher): checked at submit, shown by GET /hyperparameters."""
        return {
            "hidden_size": self.max_hidden_size,
            "seq_length": self.max_seq_length,
            "batch_size": self.max_batch_size,
            "max_steps": self.max_steps,
            "time_limit_s": self.max_time_limit_s,
        }

    @property
    def model_limits(self) -> ModelLimits:
        """The ceilings every stored model meets, uploaded or trained."""
        return ModelLimits(self.max_hidden_size, self.max_vocab_size, self.max_model_bytes)

    @property
    def distributed(self) -> bool:
        """Jobs run on Celery workers and state lives in PostgreSQL."""
        return self.database_url is not None

    @field_validator("api_key", "database_url", "broker_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # ``CHARNN_API_KEY=`` (as compose files often leave it) means "no key", not "the empty
        # key"; likewise an empty URL means "not set".
        if isinstance(value, str) and not value.strip():
            return None
        return value


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; cached so the environment is read once."""
    return Settings()
