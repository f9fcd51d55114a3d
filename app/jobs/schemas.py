"""Request and response bodies of the jobs API (separate models for in and out).

Hyperparameter defaults are model/'s TrainConfig defaults (one source of
truth); the bounds here are absolute, and the settings narrow them further
(``max_hidden_size`` and friends), checked when a job is submitted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.config import HYPERPARAMETERS, DType, Optimizer

from ..domain import JobStatus, Name

__all__ = ["JobStatus"]  # re-exported: the client names job statuses through here


def _hp(name: str, *, number: bool = False) -> Any:
    """The field of hyperparameter ``name``: default, bounds and meaning, from model/config."""
    h = HYPERPARAMETERS[name]
    return Field(
        h.default,
        description=h.help,
        ge=h.ge,
        gt=h.gt,
        le=h.le,
        lt=h.lt,
        allow_inf_nan=False if number else None,
    )


class Hyperparameters(BaseModel):
    """Every field optional; omitted ones take model/'s measured defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)  # true is not 1, "16" not 16

    hidden_size: int = _hp("hidden_size")
    seq_length: int = _hp("seq_length")
    batch_size: int = _hp("batch_size")
    learning_rate: float = _hp("learning_rate", number=True)
    lr_final: float = _hp("lr_final", number=True)
    optimizer: Optimizer = _hp("optimizer")
    weight_decay: float = _hp("weight_decay", number=True)
    grad_clip: float = _hp("grad_clip", number=True)
    max_steps: int | None = _hp("max_steps")
    time_limit_s: float | None = _hp("time_limit_s", number=True)
    val_fraction: float = _hp("val_fraction", number=True)
    eval_every: int = _hp("eval_every")
    patience: int | None = _hp("patience")
    log_every: int = _hp("log_every")
    dtype: DType = _hp("dtype")
    sample_length: int = _hp("sample_length")
    sample_temperature: float = _hp("sample_temperature", number=True)


class JobCreate(BaseModel):
    """``POST /jobs`` as JSON; multipart sends the same minus ``corpus`` in ``config``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    corpus: str = Field(description="UTF-8 training text")
    name: Name | None = None
    hyperparameters: Hyperparameters = Field(default_factory=lambda: Hyperparameters())
    seed: int = Field(0, ge=0, le=2**32 - 1)
    init_from: str | None = Field(None, max_length=200, description="model id or name")


def _default(name: str) -> Any:
    return HYPERPARAMETERS[name].default


class HyperparametersOut(BaseModel):
    """A job's hyperparameters as answered: no bounds (the request checked them, and a
    server's ceilings may have changed since), so a stored job can always be shown."""

    hidden_size: int = _default("hidden_size")
    seq_length: int = _default("seq_length")
    batch_size: int = _default("batch_size")
    learning_rate: float = _default("learning_rate")
    lr_final: float = _default("lr_final")
    optimizer: str = _default("optimizer")
    weight_decay: float = _default("weight_decay")
    grad_clip: float = _default("grad_clip")
    max_steps: int | None = _default("max_steps")
    time_limit_s: float | None = _default("time_limit_s")
    val_fraction: float = _default("val_fraction")
    eval_every: int = _default("eval_every")
    patience: int | None = _default("patience")
    log_every: int = _default("log_every")
    dtype: str = _default("dtype")
    sample_length: int = _default("sample_length")
    sample_temperature: float = _default("sample_temperature")


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
    best_step: int | None = Field(
        None, description="the step of the best validation loss: the model kept is that one"
    )
    evals_since_best: int | None = Field(
        None, description="evaluations since then; early stopping ends the run at `patience`"
    )


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
    note: str | None = Field(
        None,
        description="how the run is going or how it ended, in words (e.g. 'stopped early at "
        "step 600: validation loss had not improved since step 350; the model from step 350 "
        "was kept')",
    )


class JobStopping(BaseModel):
    """The 202 of a cancel or pause that has not taken effect within the wait: the job
    is still stopping (``job.status`` is its stored status, still ``running``)."""

    state: Literal["cancelling", "pausing"] = Field(
        description="what is under way: the job stops at its next step (pausing: checkpointed "
        "there); poll GET /jobs/{id} or follow its events for the outcome"
    )
    message: str
    job: JobOut


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
    # Diagnostics at the point (null on points recorded before charnn reported them).
    grad_norm: float | None = Field(
        None, description="global L2 norm of the step's gradient, before clipping"
    )
    clipped: bool | None = Field(None, description="whether grad_clip scaled that gradient down")
    learning_rate: float | None = Field(None, description="the step size that step used")
    chars_per_sec: float | None = Field(
        None, description="training characters per second since the previous point"
    )
    sample: str | None = Field(
        None,
        description="at evaluations: sample_length characters of the current weights (not "
        "the best), at sample_temperature, seeded by the job's seed and the step",
    )


class MetricsOut(BaseModel):
    job_id: str
    points: list[MetricPointOut]


class HyperparameterInfo(BaseModel):
    name: str
    default: Any
    help: str
    minimum: float | None = Field(description="inclusive lower bound, if any")
    exclusive_minimum: float | None
    maximum: float | None = Field(description="inclusive upper bound on this server, if any")
    exclusive_maximum: float | None
    choices: list[str] | None


class HyperparametersInfo(BaseModel):
    hyperparameters: list[HyperparameterInfo]
    suggested: dict[str, Any] | None = Field(
        description="for corpus_chars: hidden size, streams, steps and evaluations scaled "
        "to the text (the rest: the defaults)"
    )
    reason: str | None = Field(description="the suggestion in words")
