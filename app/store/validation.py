"""What the store accepts as a model: one validation for uploaded and trained checkpoints.

``model/checkpoint.py`` checks a checkpoint's structure (arrays, shapes, dtypes,
finite weights, vocabulary). This module checks the rest at the service's doors,
with pydantic: every field of the metadata (types, ranges, lengths, finite
numbers, valid Unicode; unknown fields refused) and this server's ceilings
(hidden size, vocabulary size, model bytes). A model that passes is one every
route can read back and list; one that does not is a 422 that says which field
is wrong, before anything is stored. A job's own model goes through the same
check, so no door is looser than another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.checkpoint import ModelCheckpoint, model_from_bytes
from model.errors import CheckpointError
from model.params import flat_size

from ..domain import ModelLimits, Name, first_text_problem, text_problem
from .base import NewModel

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
Count = Annotated[int, Field(ge=0, le=2**62)]
Loss = Annotated[float, Field(ge=0, le=1e6)]
Seconds = Annotated[float, Field(ge=0, le=1e9)]


class ModelHyperparameters(BaseModel):
    """``TrainConfig`` as saved in a checkpoint; a field may be absent (third-party files)."""

    model_config = _STRICT

    hidden_size: int | None = Field(None, ge=1, le=65_536)
    seq_length: int | None = Field(None, ge=1, le=65_536)
    batch_size: int | None = Field(None, ge=1, le=65_536)
    learning_rate: float | None = Field(None, gt=0, le=1e3)
    optimizer: Literal["sgd", "adagrad", "adam"] | None = None
    weight_decay: float | None = Field(None, ge=0, le=10)
    grad_clip: float | None = Field(None, ge=0, le=1e9)
    max_steps: int | None = Field(None, ge=1, le=2**62)
    time_limit_s: float | None = Field(None, gt=0, le=1e9)
    val_fraction: float | None = Field(None, ge=0, lt=1)
    eval_every: int | None = Field(None, ge=1, le=2**62)
    patience: int | None = Field(None, ge=1, le=2**62)
    lr_final: float | None = Field(None, gt=0, le=1)
    dtype: Literal["float32", "float64"] | None = None
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    log_every: int | None = Field(None, ge=1, le=2**62)
    sample_length: int | None = Field(None, ge=0, le=2**62)
    sample_temperature: float | None = Field(None, ge=0, le=1e9)


class ModelMetrics(BaseModel):
    """What a training run reports about its model (``TrainResult.metrics``)."""

    model_config = _STRICT

    steps: Count | None = None
    epochs: Count | None = None
    train_loss: Loss | None = None
    val_loss: Loss | None = None
    best_step: Count | None = None
    last_val_loss: Loss | None = None
    elapsed_s: Seconds | None = None
    chars_per_sec: float | None = Field(None, ge=0, le=1e15)
    stop_reason: Literal["max_steps", "time_limit", "early_stopping", "stopped"] | None = None
    train_chars: Count | None = None
    val_chars: Count | None = None
    batch_size_used: Count | None = None


class ModelExtra(BaseModel):
    """The metadata fields beyond the format's own (``ModelCheckpoint.extra``)."""

    model_config = _STRICT

    name: Name | None = None
    job_id: str | None = Field(None, pattern=r"^[0-9a-f]{32}$")
    created_at: float | None = Field(None, ge=0, le=1e11)


@dataclass(frozen=True)
class ValidModel:
    """A checkpoint that passed every check, and what its row records."""

    checkpoint: ModelCheckpoint
    name: str | None  # from the metadata, if it names itself
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    vocab: list[str]
    hidden_size: int
    param_count: int
    dtype: str

    def to_store(self, name: str, data: bytes) -> NewModel:
        """What the store keeps of it, under ``name``, with its checkpoint ``data``."""
        return NewModel(
            name,
            data,
            self.hyperparameters,
            self.metrics,
            self.vocab,
            self.param_count,
            self.dtype,
        )


def weight_bytes(n_a: int, n_x: int, dtype: str) -> int:
    """Bytes of the five parameters: what a model costs in memory once loaded."""
    return flat_size(n_a, n_x) * (4 if dtype == "float32" else 8)


def _problem(section: str, e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in (section, *first["loc"]))
    return f"{where}: {first['msg']}"


def check_limits(n_a: int, n_x: int, dtype: str, limits: ModelLimits, what: str) -> None:
    """CheckpointError naming the setting when a model is over this server's ceilings."""
    problems = []
    if n_a > limits.max_hidden_size:
        problems.append(
            f"hidden size {n_a} is over this server's limit of {limits.max_hidden_size} "
            "(max_hidden_size)"
        )
    if n_x > limits.max_vocab_size:
        problems.append(
            f"vocabulary of {n_x} characters is over this server's limit of "
            f"{limits.max_vocab_size} (max_vocab_size)"
        )
    size = weight_bytes(n_a, n_x, dtype)
    if size > limits.max_model_bytes:
        problems.append(
            f"weights of {size} bytes are over this server's limit of {limits.max_model_bytes} "
            "(max_model_bytes)"
        )
    if problems:
        raise CheckpointError(f"{what}: {'; '.join(problems)}")


def validate_checkpoint(ckpt: ModelCheckpoint, limits: ModelLimits) -> ValidModel:
    """Every metadata field and every ceiling; CheckpointError (a 422) saying what is wrong."""
    p = ckpt.params
    dtype = str(p.dtype)
    vocab = list(ckpt.vocab.chars)
    for i, ch in enumerate(vocab):
        if problem := text_problem(ch):
            raise CheckpointError(f"meta.vocab[{i}] {problem}")
    check_limits(p.n_a, p.n_x, dtype, limits, "the model is too big for this server")
    for section, value in (
        ("meta.hyperparameters", ckpt.hyperparameters),
        ("meta.metrics", ckpt.metrics),
        ("meta", ckpt.extra),
    ):
        if problem := first_text_problem(value, section):
            raise CheckpointError(problem)
    try:
        hp = ModelHyperparameters.model_validate(ckpt.hyperparameters)
    except ValidationError as e:
        raise CheckpointError(_problem("meta.hyperparameters", e)) from None
    try:
        metrics = ModelMetrics.model_validate(ckpt.metrics)
    except ValidationError as e:
        raise CheckpointError(_problem("meta.metrics", e)) from None
    try:
        extra = ModelExtra.model_validate(ckpt.extra)
    except ValidationError as e:
        raise CheckpointError(_problem("meta", e)) from None
    if hp.hidden_size is not None and hp.hidden_size != p.n_a:
        raise CheckpointError(
            f"meta.hyperparameters.hidden_size is {hp.hidden_size} but the weights have n_a={p.n_a}"
        )
    if hp.dtype is not None and hp.dtype != dtype:
        raise CheckpointError(
            f"meta.hyperparameters.dtype is {hp.dtype} but the weights are {dtype}"
        )
    return ValidModel(
        checkpoint=ckpt,
        name=extra.name,
        hyperparameters=hp.model_dump(exclude_unset=True),
        metrics=metrics.model_dump(exclude_unset=True),
        vocab=vocab,
        hidden_size=p.n_a,
        param_count=flat_size(p.n_a, p.n_x),
        dtype=dtype,
    )


def validate_model_bytes(data: bytes, limits: ModelLimits, *, max_bytes: int) -> ValidModel:
    """Parse (``model_from_bytes``, never unpickling) and validate an untrusted checkpoint."""
    return validate_checkpoint(model_from_bytes(data, max_bytes=max_bytes), limits)
