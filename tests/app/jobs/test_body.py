"""The job body: messages, checkpoints, resume after a stop, failures as messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from app.jobs.body import JobSpec, run_job
from model.checkpoint import load_model

from ..conftest import CORPUS, QUICK

HP = {**QUICK, "max_steps": 30}


def spec(tmp_path: Path, corpus: str = CORPUS, **overrides: Any) -> JobSpec:
    (tmp_path / "corpus.txt").write_text(corpus, encoding="utf-8")
    fields: dict[str, Any] = {
        "job_id": "j1",
        "corpus_path": str(tmp_path / "corpus.txt"),
        "state_path": str(tmp_path / "state.npz"),
        "model_path": str(tmp_path / "model.npz"),
        "hyperparameters": HP,
        "seed": 3,
        "threads": 1,
        **overrides,
    }
    return JobSpec(**fields)


def run(s: JobSpec, stop_after: int | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    def should_stop() -> bool:
        seen = sum(m["type"] == "progress" for m in messages)
        return stop_after is not None and seen >= stop_after

    run_job(s, messages.append, should_stop)
    return messages


def test_a_job_reports_progress_and_ends_with_a_stored_model(tmp_path: Path) -> None:
    messages = run(spec(tmp_path, extra={"name": "fox"}))
    assert [m["type"] for m in messages].count("progress") >= 3
    final = messages[-1]
    assert final["type"] == "succeeded"
    ckpt = load_model(final["model_file"])
    assert ckpt.extra == {"name": "fox"} and ckpt.params.n_a == 16
    assert final["metrics"]["steps"] == 30 and final["metrics"]["val_loss"] is not None
    steps = [m["step"] for m in messages if m["type"] == "progress"]
    assert steps == sorted(steps) and steps[-1] == 30


def test_a_stopped_job_resumes_from_its_state_to_the_same_model(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run(spec(tmp_path / "a"))
    first = run(spec(tmp_path / "b"), stop_after=1)
    assert first[-1]["type"] == "stopped"
    assert (tmp_path / "b" / "state.npz").exists()
    second = run(spec(tmp_path / "b"))
    assert second[-1]["type"] == "succeeded"
    a = load_model(straight[-1]["model_file"]).params.flat
    b = load_model(second[-1]["model_file"]).params.flat
    np.testing.assert_array_equal(a, b)


def test_periodic_checkpoints_are_announced(tmp_path: Path) -> None:
    messages = run(spec(tmp_path, checkpoint_every_s=0.0))
    assert any(m["type"] == "checkpoint" for m in messages)
    assert (tmp_path / "state.npz").exists()


def test_problems_with_the_job_end_it_as_failed_with_a_clear_reason(tmp_path: Path) -> None:
    diverging = {**HP, "optimizer": "sgd", "learning_rate": 10.0, "max_steps": 300}
    messages = run(spec(tmp_path, hyperparameters=diverging))
    assert messages[-1]["type"] == "failed"
    assert messages[-1]["error"].startswith("diverged at step")
    assert not (tmp_path / "model.npz").exists()
    (tmp_path / "x").mkdir()
    messages = run(spec(tmp_path / "x", corpus="zzzzzzzzzz" * 10))
    assert messages == [
        {
            "type": "failed",
            "error": "the corpus has only one distinct character; give a text with at "
            "least 2 different characters",
        }
    ]
