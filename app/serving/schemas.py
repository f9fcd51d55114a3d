"""Request and response bodies of the models and prediction APIs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


# ------------------------------------------------------------------ typing sessions (WebSocket)
MessageId = Annotated[str, Field(max_length=200)] | Annotated[int, Field(ge=-(2**63), lt=2**63)]
SessionTopK = Field(None, ge=1, le=100_000, description="omitted: the session's top_k")


class SessionOpen(BaseModel):
    """The query of ``/sessions``: which model, and how to answer."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = ModelRef
    top_k: int | None = Field(
        None, ge=1, le=100_000, description="characters per answer; omitted: the whole vocabulary"
    )
    temperature: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: MessageId | None = Field(None, description="echoed in the answer (string or integer)")
    top_k: int | None = SessionTopK


class FeedOp(_Op):
    """Append characters to the session's text."""

    op: Literal["feed"]
    text: str = Field(min_length=1, max_length=100_000)


class BackOp(_Op):
    """Remove the last ``n`` characters."""

    op: Literal["back"]
    n: int = Field(1, ge=1, le=1_000_000)


class SetOp(_Op):
    """Replace the text; only what differs from the current text is stepped."""

    op: Literal["set"]
    text: str = Field(max_length=1_000_000)


class ResetOp(_Op):
    """Back to the empty text."""

    op: Literal["reset"]


SessionOp = Annotated[FeedOp | BackOp | SetOp | ResetOp, Field(discriminator="op")]


class SessionReady(BaseModel):
    """The first message of a session: the model, the limits, the distribution after ''."""

    model_config = ConfigDict(protected_namespaces=())

    type: Literal["ready"] = "ready"
    model: str
    vocab: list[str]
    max_chars: int
    history: int
    idle_s: float
    next: list[NextChar]
    entropy_bits: float


class SessionNext(BaseModel):
    """The answer to each operation: the next-character distribution after the text."""

    type: Literal["next"] = "next"
    id: MessageId | None = None
    length: int = Field(description="characters in the session's text now")
    next: list[NextChar]
    entropy_bits: float


class SessionErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class SessionError(BaseModel):
    """A refused message (the session is unchanged and stays open), or why it is closing."""

    type: Literal["error"] = "error"
    id: MessageId | None = None
    error: SessionErrorDetail
