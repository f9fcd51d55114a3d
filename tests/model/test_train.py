"""Training loop: learning, reproducibility, resuming, stopping, best-model choice."""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from model.errors import ConfigError, CorpusError, DivergedError, UnknownCharactersError
from model.train import Progress, TrainConfig, Trainer, evaluate, train

PERIODIC = "abcd" * 300
SENTENCES = "the quick brown fox jumps over the lazy dog. " * 60
BASE = TrainConfig(
    hidden_size=24, seq_length=16, batch_size=8, eval_every=20, log_every=5, patience=None
)


def cfg(**overrides: Any) -> TrainConfig:
    return replace(BASE, **overrides)


def test_learns_a_periodic_corpus() -> None:
    result = train(PERIODIC, cfg(max_steps=150))
    assert result.metrics["val_loss"] < 0.05  # nats: "abcd" is fully predictable
    assert result.vocab.chars == ("a", "b", "c", "d")


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adagrad", 0.05), ("adam", 0.01)])
def test_every_optimizer_lowers_the_loss(optimizer: str, lr: float) -> None:
    events: list[Progress] = []
    train(
        SENTENCES,
        cfg(max_steps=100, optimizer=optimizer, learning_rate=lr),
        on_progress=events.append,
    )
    assert events[-1].train_loss < events[0].train_loss - 0.5


def test_same_seed_gives_bit_identical_weights_whatever_the_threads() -> None:
    config = cfg(max_steps=30, seed=7)
    a = train(SENTENCES, config, threads=1)
    b = train(SENTENCES, config, threads=2)
    c = train(SENTENCES, config, threads=2)
    np.testing.assert_array_equal(a.params.flat, b.params.flat)
    np.testing.assert_array_equal(b.params.flat, c.params.flat)
    d = train(SENTENCES, cfg(max_steps=30, seed=8))
    assert not np.array_equal(a.params.flat, d.params.flat)


def test_float64_on_request() -> None:
    result = train(SENTENCES, cfg(max_steps=5, dtype="float64"))
    assert result.params.flat.dtype == np.float64
    assert train(SENTENCES, cfg(max_steps=5)).params.flat.dtype == np.float32


def test_resume_continues_exactly_where_it_stopped() -> None:
    config = cfg(max_steps=40, seed=3)
    straight = Trainer(SENTENCES, config)
    list(straight.run())

    first = Trainer(SENTENCES, config)
    list(first.run(should_stop=lambda: first.state.step >= 23))
    assert first.state.step == 23 and first.state.stop_reason == "stopped"
    saved = copy.deepcopy(first.state)

    second = Trainer(SENTENCES, resume=saved)
    list(second.run())
    assert second.state.step == 40
    np.testing.assert_array_equal(second.state.params.flat, straight.state.params.flat)
    for key, arr in straight.state.optimizer.items():
        np.testing.assert_array_equal(second.state.optimizer[key], arr)
    assert second.result().metrics["val_loss"] == straight.result().metrics["val_loss"]


def test_resume_refuses_another_corpus() -> None:
    t = Trainer(SENTENCES, cfg(max_steps=2))
    list(t.run())
    with pytest.raises(CorpusError, match="different corpus"):
        Trainer(SENTENCES + "x", resume=t.state)


def test_result_is_the_best_validation_model() -> None:
    # A learning rate too high for sgd makes the validation loss jump around, so the best
    # evaluation is not the last one. Where that edge lies depends on the CPU's and the
    # numpy build's rounding (2.5 was past it on 2026-12-03, short of it with numpy 2.4.6
    # a day later), so a few rates and seeds are tried: any run that does not diverge
    # must return its best model, and at least one must have had its best model before
    # its last evaluation.
    best_before_last = 0
    for lr, seed in itertools.product((2.5, 3.0, 3.5), range(4)):
        config = cfg(eval_every=5, max_steps=60, optimizer="sgd", learning_rate=lr, seed=seed)
        trainer = Trainer(SENTENCES, config)
        try:
            vals = [e.val_loss for e in trainer.run() if e.val_loss is not None]
        except DivergedError:
            continue
        result = trainer.result()
        assert result.metrics["val_loss"] == min(vals)
        assert evaluate(result.params, trainer.val_ids) == pytest.approx(min(vals), rel=1e-6)
        assert result.metrics["best_step"] % 5 == 0
        best_before_last += result.metrics["best_step"] < 60
    assert best_before_last >= 1


def test_early_stopping_after_patience_evals_without_improvement() -> None:
    # An update far below float32 resolution leaves the weights, so the loss, unchanged.
    config = cfg(eval_every=2, max_steps=1000, optimizer="sgd", learning_rate=1e-30, patience=3)
    trainer = Trainer(SENTENCES, config)
    list(trainer.run())
    assert trainer.state.stop_reason == "early_stopping"
    assert trainer.state.step == 8  # evals at 2 (best), 4, 6, 8 -> three without improvement


def test_cooperative_stop_and_time_limit() -> None:
    trainer = Trainer(SENTENCES, cfg(max_steps=1000))
    list(trainer.run(should_stop=lambda: trainer.state.step >= 5))
    assert (trainer.state.step, trainer.state.stop_reason) == (5, "stopped")
    timed = Trainer(SENTENCES, cfg(max_steps=None, time_limit_s=0.3))
    list(timed.run())
    assert timed.state.stop_reason == "time_limit"
    assert timed.state.elapsed_s >= 0.3


def test_progress_events_carry_the_documented_fields() -> None:
    events: list[Progress] = []
    train(SENTENCES, cfg(max_steps=40), on_progress=events.append)
    assert [e.step for e in events] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [e.step for e in events if e.val_loss is not None] == [20, 40]
    last = events[-1]
    assert last.total_steps == 40 and last.epoch >= 0 and last.chars_per_sec > 0
    assert last.elapsed_s >= events[0].elapsed_s and math.isfinite(last.train_loss)


def test_divergence_raises_with_the_step() -> None:
    with pytest.raises(DivergedError, match=r"diverged at step \d+") as info:
        train(SENTENCES, cfg(max_steps=300, optimizer="sgd", learning_rate=10.0))
    assert 1 <= info.value.step <= 300


def test_small_corpus_shrinks_the_batch() -> None:
    text = "hello world! " * 4  # 52 characters
    result = train(text, TrainConfig(hidden_size=8, seq_length=16, batch_size=64, max_steps=3))
    assert result.metrics["batch_size_used"] == 2  # (46 train chars - 1) // 16


@pytest.mark.parametrize(
    "text,match",
    [("", "empty"), ("aaaaaaaa" * 10, "one distinct"), ("abcabc", "lower seq_length to at most")],
)
def test_untrainable_corpora_are_rejected(text: str, match: str) -> None:
    with pytest.raises(CorpusError, match=match):
        Trainer(text, cfg())


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 0),
        ("learning_rate", -1.0),
        ("learning_rate", math.nan),
        ("optimizer", "rmsprop"),
        ("val_fraction", 1.0),
        ("dtype", "float16"),
        ("max_steps", 0),
    ],
)
def test_bad_hyperparameters_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_through_a_dict() -> None:
    config = TrainConfig(hidden_size=12, optimizer="sgd")
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown hyperparameters: colour"):
        TrainConfig.from_dict({"colour": 1})


def test_fine_tuning_starts_from_a_model_and_keeps_its_vocabulary() -> None:
    base = train(SENTENCES, cfg(max_steps=20))
    tuned = Trainer(
        "a lazy dog jumps over the quick fox. " * 40,
        cfg(max_steps=5),
        init=(base.params, base.vocab),
    )
    assert tuned.state.vocab == base.vocab
    np.testing.assert_array_equal(tuned.state.params.flat, base.params.flat)
    list(tuned.run())
    assert not np.array_equal(tuned.state.params.flat, base.params.flat)
    with pytest.raises(UnknownCharactersError, match="'Z'"):
        Trainer("Zebras " * 50, cfg(max_steps=5), init=(base.params, base.vocab))
