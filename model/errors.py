"""Exceptions raised by model/; app/errors.py maps each one to an HTTP status."""

from __future__ import annotations


class ModelError(Exception):
    """Base class for every error model/ raises on purpose."""


class UnknownCharactersError(ModelError, ValueError):
    """Text contains characters that are not in the model's vocabulary."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        shown = ", ".join(repr(c) for c in chars[:20])
        more = f" and {len(chars) - 20} more" if len(chars) > 20 else ""
        super().__init__(f"characters not in the model's vocabulary: {shown}{more}")


class CorpusError(ModelError, ValueError):
    """The corpus cannot train a model (too short, one distinct character, ...)."""


class ConfigError(ModelError, ValueError):
    """A hyperparameter is out of range or inconsistent with the others."""


class CheckpointError(ModelError, ValueError):
    """A checkpoint file is malformed, inconsistent or of an unknown version."""


class DivergedError(ModelError, ArithmeticError):
    """The training loss became NaN/inf or rose far above a uniform guess's."""

    def __init__(self, step: int, loss: float) -> None:
        self.step = step
        self.loss = loss
        super().__init__(
            f"diverged at step {step}: loss is {loss}; "
            "lower learning_rate or grad_clip, or use optimizer 'adam'"
        )
