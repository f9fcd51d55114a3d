"""Training configuration: ``TrainConfig`` and the hyperparameters others may set.

Importable without numpy (a client, a schema or ``charnn --help`` must not pay
for it): this is where every hyperparameter's name, default, meaning and the
HTTP API's absolute bounds are written once. ``model/train.py`` trains with a
``TrainConfig``; ``app/`` builds its request schema, its CLI flags and its
documentation from :data:`SERVED`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from .errors import ConfigError

Optimizer = Literal["sgd", "adagrad", "adam"]
DType = Literal["float32", "float64"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(Optimizer)
DTYPE_NAMES: tuple[str, ...] = get_args(DType)
StopReason = Literal["max_steps", "time_limit", "early_stopping", "stopped"]
# A sample rides in every evaluation's event and metric point: short by rule.
MAX_SAMPLE_LENGTH = 1000


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; saved in every checkpoint. Defaults chosen by measurement."""

    hidden_size: int = 256  # n_a
    seq_length: int = 64  # T: characters per truncated-BPTT chunk
    batch_size: int = 64  # B: parallel streams
    learning_rate: float = 1e-2
    optimizer: str = "adam"  # sgd | adagrad | adam
    weight_decay: float = 0.02  # decoupled (AdamW-style) shrinkage per unit learning rate
    grad_clip: float = 5.0  # max global L2 norm of the gradient; 0 = no clipping
    max_steps: int | None = 2000  # None: until time_limit_s
    time_limit_s: float | None = None  # wall-clock budget for training, evals included
    val_fraction: float = 0.1  # tail of the corpus held out for validation
    eval_every: int = 200  # steps between validation losses
    patience: int | None = 5  # stop after this many evals without improvement (None: never)
    lr_final: float = 0.01  # cosine decay of the learning rate to this fraction of it
    dtype: str = "float32"  # float32 | float64
    seed: int = 0
    log_every: int = 10  # steps between progress events
    sample_length: int = 100  # characters sampled from the current weights at each eval; 0: off
    sample_temperature: float = 0.8  # of those samples; 0 is greedy

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size < 1:
            problems.append("hidden_size must be >= 1")
        if self.seq_length < 1:
            problems.append("seq_length must be >= 1")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append("learning_rate must be a finite number > 0")
        if self.optimizer not in OPTIMIZER_NAMES:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 10):
            problems.append("weight_decay must be in [0, 10]")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            problems.append("grad_clip must be a finite number >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("max_steps must be >= 1 (or None)")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            problems.append("time_limit_s must be > 0 (or None)")
        if self.max_steps is None and self.time_limit_s is None:
            problems.append("set max_steps, time_limit_s or both")
        if not 0 <= self.val_fraction < 1:
            problems.append("val_fraction must be in [0, 1)")
        if self.eval_every < 1 or self.log_every < 1:
            problems.append("eval_every and log_every must be >= 1")
        if self.patience is not None and self.patience < 1:
            problems.append("patience must be >= 1 (or None)")
        if not 0 < self.lr_final <= 1:
            problems.append("lr_final must be in (0, 1]")
        if self.dtype not in DTYPE_NAMES:
            problems.append(f"dtype must be one of {', '.join(DTYPE_NAMES)}")
        if not 0 <= self.sample_length <= MAX_SAMPLE_LENGTH:
            problems.append(f"sample_length must be in [0, {MAX_SAMPLE_LENGTH}]")
        if not (math.isfinite(self.sample_temperature) and 0 <= self.sample_temperature <= 10):
            problems.append("sample_temperature must be in [0, 10]")
        if problems:
            raise ConfigError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown hyperparameters: {', '.join(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter a client may set: its default is ``TrainConfig``'s, the bounds
    are the HTTP API's absolute ones (a server's settings may lower the ceilings)."""

    name: str
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.name]

    @property
    def kind(self) -> type[int] | type[float] | type[str]:
        """The Python type of a value (``TrainConfig``'s annotation, ``None`` aside)."""
        annotation = _TYPES[self.name]
        return int if annotation.startswith("int") else float if "float" in annotation else str


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
_TYPES = {f.name: str(f.type) for f in fields(TrainConfig)}

# The hyperparameters the HTTP API and `charnn train` take, in the order they show them.
SERVED: tuple[Hyperparameter, ...] = (
    Hyperparameter("hidden_size", "n_a, hidden units", ge=1, le=4096),
    Hyperparameter("seq_length", "T, chars per BPTT chunk", ge=1, le=4096),
    Hyperparameter("batch_size", "B, parallel streams", ge=1, le=4096),
    Hyperparameter("learning_rate", "peak step size (cosine decay to lr_final of it)", gt=0, le=10),
    Hyperparameter(
        "lr_final", "the last step's learning rate, as a fraction of the peak", gt=0, le=1
    ),
    Hyperparameter("optimizer", "update rule", choices=OPTIMIZER_NAMES),
    Hyperparameter("weight_decay", "decoupled shrinkage per unit learning rate", ge=0, le=10),
    Hyperparameter("grad_clip", "0 = no clipping", ge=0, le=1e6),
    Hyperparameter("max_steps", "stop after this many steps (null: time only)", ge=1, le=10**9),
    Hyperparameter("time_limit_s", "wall-clock budget, s", gt=0, le=10**7),
    Hyperparameter("val_fraction", "tail held out for validation", ge=0, lt=1),
    Hyperparameter("eval_every", "steps between validation losses", ge=1, le=10**9),
    Hyperparameter(
        "patience",
        "stop after this many evaluations without a better validation loss (null: never)",
        ge=1,
        le=10**6,
    ),
    Hyperparameter("log_every", "steps between progress events", ge=1, le=10**9),
    Hyperparameter("dtype", "precision of weights and math", choices=DTYPE_NAMES),
    Hyperparameter(
        "sample_length",
        "characters sampled from the current weights at each evaluation (0: none)",
        ge=0,
        le=MAX_SAMPLE_LENGTH,
    ),
    Hyperparameter("sample_temperature", "of those samples (0: greedy)", ge=0, le=10),
)
HYPERPARAMETERS: dict[str, Hyperparameter] = {h.name: h for h in SERVED}
