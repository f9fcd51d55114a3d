"""Request and response bodies of the jobs API (separate models for in and out).

Hyperparameter defaults are model/'s TrainConfig defaults (one source of
truth); the bounds here are absolute, and the settings narrow them further
(``max_hidden_size`` and friends), checked when a job is submitted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.train import TrainConfig

from .text import Name

_D = TrainConfig()

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Hyperparameters(BaseModel):
    """Every field optional; omitted ones take model/'s measured defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is not 1, "16" not 16

    hidden_size: int = Field(_D.hidden_size, ge=1, le=4096, description="n_a, hidden units")
    seq_length: int = Field(_D.seq_length, ge=1, le=4096, description="T, chars per BPTT chunk")
    batch_size: int = Field(_D.batch_size, ge=1, le=4096, description="B, parallel streams")
    learning_rate: float = Field(
        _D.learning_rate,
        gt=0,
        le=10,
        allow_inf_nan=False,
        description="peak step size; cosine decay to 1 %",
    )
    optimizer: Literal["sgd", "adagrad", "adam"] = _D.optimizer  # type: ignore[assignment]
    grad_clip: float = Field(
        _D.grad_clip, ge=0, le=1e6, allow_inf_nan=False, description="0 = no clipping"
    )
    max_steps: int | None = Field(
        _D.max_steps, ge=1, le=10**9, description="stop after this many steps (null: time only)"
    )
    time_limit_s: float | None = Field(
        _D.time_limit_s, gt=0, le=10**7, allow_inf_nan=False, description="wall-clock budget, s"
    )
    val_fraction: float = Field(
        _D.val_fraction, ge=0, lt=1, allow_inf_nan=False, description="tail held out for validation"
    )
    eval_every: int = Field(
        _D.eval_every, ge=1, le=10**9, description="steps between validation losses"
    )
    dtype: Literal["float32", "float64"] = _D.dtype  # type: ignore[assignment]


class JobCreate(BaseModel):
    """``POST /jobs`` as JSON; multipart sends the same minus ``corpus`` in ``config``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    corpus: str = Field(description="UTF-8 training text")
    name: Name | None = None
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters())
    seed: int = Field(0, ge=0, le=2**32 - 1)
    init_from: str | None = Field(None, max_length=200, description="model id or name")


class HyperparametersOut(BaseModel):
    """A job's hyperparameters as answered: no bounds (the request checked them, and a
    server's ceilings may have changed since), so a stored job can always be shown."""

    hidden_size: int = _D.hidden_size
    seq_length: int = _D.seq_length
    batch_size: int = _D.batch_size
    learning_rate: float = _D.learning_rate
    optimizer: str = _D.optimizer
    grad_clip: float = _D.grad_clip
    max_steps: int | None = _D.max_steps
    time_limit_s: float | None = _D.time_limit_s
    val_fraction: float = _D.val_fraction
    eval_every: int = _D.eval_every
    dtype: str = _D.dtype


class JobConfig(BaseModel):
    """The ``config`` part of a multipart ``POST /jobs``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name | None = None
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters())
    seed: int = Field(0, ge=0, le=2**32 - 1)
    init_from: str | None = Field(None, max_length=200)


class CorpusInfo(BaseModel):
    chars: int
    vocab_size: int


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    fraction: float | None
    eta_s: float | None


class JobMetrics(BaseModel):
    train_loss: float | None = Field(description="mean over the latest logged steps")
    val_loss: float | None = Field(description="best validation loss so far")
    chars_per_sec: float | None


class JobOut(BaseModel):
    id: str
    name: str | None
    status: JobStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    hyperparameters: HyperparametersOut
    seed: int
    init_from: str | None
    corpus: CorpusInfo
    progress: JobProgress
    metrics: JobMetrics
    model_id: str | None
    error: str | None


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class MetricPointOut(BaseModel):
    step: int
    elapsed_s: float
    train_loss: float
    val_loss: float | None


class MetricsOut(BaseModel):
    job_id: str
    points: list[MetricPointOut]
