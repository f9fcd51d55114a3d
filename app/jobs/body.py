"""The body of one training job: run in a job process (embedded) or a Celery worker.

It reads the job's corpus file, trains with model/'s Trainer (resuming from the
job's state file when one exists), writes a resumable checkpoint every
``checkpoint_every_s`` and reports through ``send`` as JSON-able dicts:

    {"type": "progress", "step", "epoch", "train_loss", "val_loss", "chars_per_sec",
     "elapsed_s", "total_steps", "best_val_loss", "best_step",
     "grad_norm", "clipped", "learning_rate", "sample"}   (model/train.py: Progress)
    {"type": "checkpoint", "step"}
    {"type": "succeeded", "model_file", "metrics", "param_count"}  (model written atomically)
    {"type": "stopped", "step"}        (should_stop said so; state saved, resumable)
    {"type": "failed", "error"}                                    (a clear, path-free message)

Exactly one of the last three ends every run that is not killed. Messages are
plain data, so the runner can carry them over a pipe as JSON (never pickles)
and a distributed runner over a broker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.atomic import atomic_write_bytes
from model.checkpoint import from_result, load_model, load_state, model_to_bytes, save_state
from model.config import TrainConfig
from model.errors import ModelError
from model.params import flat_size
from model.train import Trainer

from ..store.faults import describe_os_error

Send = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class JobSpec:
    """Everything a job process needs; plain data so it crosses process boundaries."""

    job_id: str
    corpus_path: str
    state_path: str
    model_path: str  # where the finished model is written
    hyperparameters: dict[str, Any]
    seed: int = 0
    init_model_path: str | None = None
    threads: int = 2
    nice: int = 0  # added to the process's niceness before training (0: unchanged)
    checkpoint_every_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)  # saved in the model's meta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def in_folder(
        cls,
        job_id: str,
        name: str,
        hyperparameters: dict[str, Any],
        seed: int,
        folder: Path,
        *,
        init_model: Path | None,
        threads: int,
        nice: int,
        checkpoint_every_s: float,
    ) -> JobSpec:
        """A job whose files are in ``folder``: ``corpus.txt`` there, ``state.npz`` (read
        when it exists) and ``model.npz`` written there. Both runners build it here."""
        return cls(
            job_id=job_id,
            corpus_path=str(folder / "corpus.txt"),
            state_path=str(folder / "state.npz"),
            model_path=str(folder / "model.npz"),
            hyperparameters=hyperparameters,
            seed=seed,
            init_model_path=str(init_model) if init_model is not None else None,
            threads=threads,
            nice=nice,
            checkpoint_every_s=checkpoint_every_s,
            extra={"name": name, "job_id": job_id},
        )


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def run_job(spec: JobSpec, send: Send, should_stop: Callable[[], bool]) -> None:
    """Train, checkpoint, report; never raises for a problem with the job itself."""
    try:
        _run(spec, send, should_stop)
    except ModelError as e:
        send({"type": "failed", "error": str(e)})
    except MemoryError:
        send({"type": "failed", "error": "out of memory; try a smaller hidden_size or batch_size"})
    except (BrokenPipeError, EOFError):
        raise  # the runner is gone: nobody to tell
    except FileNotFoundError:
        send({"type": "failed", "error": "the job's files are missing from the data directory"})
    except OSError as e:  # e.g. the disk filled up while checkpointing: say so, without a path
        send(
            {
                "type": "failed",
                "error": f"{describe_os_error(e)}: the job's files could not be written",
            }
        )


def _run(spec: JobSpec, send: Send, should_stop: Callable[[], bool]) -> None:
    # Bytes, then decode: text mode would turn "\r\n" into "\n" (no normalisation, ever).
    text = Path(spec.corpus_path).read_bytes().decode("utf-8")
    state_path = Path(spec.state_path)
    if state_path.exists():
        trainer = Trainer(text, resume=load_state(state_path), threads=spec.threads)
    else:
        config = TrainConfig.from_dict({**spec.hyperparameters, "seed": spec.seed})
        init = None
        if spec.init_model_path is not None:
            base = load_model(spec.init_model_path)
            init = (base.params, base.vocab)
        trainer = Trainer(text, config, init=init, threads=spec.threads)

    last_checkpoint = time.monotonic()
    for event in trainer.run(should_stop):
        send({"type": "progress", **asdict(event)})
        if time.monotonic() - last_checkpoint >= spec.checkpoint_every_s:
            save_state(state_path, trainer.state)
            last_checkpoint = time.monotonic()
            send({"type": "checkpoint", "step": trainer.state.step})

    if trainer.state.stop_reason == "stopped":
        save_state(state_path, trainer.state)
        send({"type": "stopped", "step": trainer.state.step})
        return
    result = trainer.result()
    ckpt = from_result(result, extra=spec.extra)
    atomic_write_bytes(spec.model_path, model_to_bytes(ckpt))
    metrics = {k: (_finite(v) if isinstance(v, float) else v) for k, v in result.metrics.items()}
    send(
        {
            "type": "succeeded",
            "model_file": spec.model_path,
            "metrics": metrics,
            "param_count": flat_size(result.params.n_a, result.params.n_x),
            "vocab": list(result.vocab.chars),
            "hyperparameters": result.config.to_dict(),
            "dtype": str(result.params.dtype),
        }
    )
