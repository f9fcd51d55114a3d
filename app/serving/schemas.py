"""Request and response bodies of the models and prediction APIs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ModelRef = Field(None, max_length=200, description="model id or name; omitted: the newest model")


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: str | None = ModelRef
    text: str = Field("", max_length=100_000, description="the prefix; empty is valid")
    top_k: int | None = Field(None, ge=1, le=100_000, description="omitted: the whole vocabulary")
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    unknown: Literal["error", "skip"] = "error"


class NextChar(BaseModel):
    char: str
    prob: float = Field(
        description="7 significant digits (float32's precision): a whole distribution "
        "sums to 1 within 1e-6"
    )


class PredictOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    text: str
    next: list[NextChar]
    entropy_bits: float


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: str | None = ModelRef
    prompt: str = Field("", max_length=100_000)
    max_chars: int = Field(200, ge=0, le=10_000)
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, le=100_000)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stream: bool = False
    include_prompt: bool = Field(
        False, description="start the answer's text (and the stream) with the prompt"
    )


class GenerateOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    text: str
    finish_reason: Literal["length", "stop"]


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=())

    model: str | None = ModelRef
    text: str = Field(min_length=1, max_length=1_000_000)


class ScoreOut(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    chars: int
    logprobs: list[float]
    mean_nats: float
    bits_per_char: float
    perplexity: float


class ModelOut(BaseModel):
    id: str
    name: str
    created_at: float
    job_id: str | None
    vocab: list[str]
    vocab_size: int
    hidden_size: int
    hyperparameters: dict[str, Any]
    train_loss: float | None
    val_loss: float | None
    metrics: dict[str, Any]
    param_count: int
    size_bytes: int
    dtype: str


class ModelList(BaseModel):
    items: list[ModelOut]
    total: int
    limit: int
    offset: int
