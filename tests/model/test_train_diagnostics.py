"""Live diagnostics of a run: gradient norm, clipping, learning rate, speed, samples."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from model import data
from model.errors import ConfigError
from model.params import init_params
from model.rnn import loss_and_grads
from model.train import Progress, TrainConfig, Trainer, eval_sample
from model.vocab import Vocab

SENTENCES = "the quick brown fox jumps over the lazy dog. " * 60
BASE = TrainConfig(
    hidden_size=24, seq_length=16, batch_size=8, eval_every=20, log_every=5, patience=None
)


def cfg(**overrides: Any) -> TrainConfig:
    return replace(BASE, **overrides)


def run(config: TrainConfig, text: str = SENTENCES) -> tuple[Trainer, list[Progress]]:
    trainer = Trainer(text, config)
    return trainer, list(trainer.run())


def test_the_first_steps_grad_norm_is_loss_and_grads_norm_before_clipping() -> None:
    config = cfg(max_steps=1, log_every=1, dtype="float64", grad_clip=0.01)
    (event,) = run(config)[1]
    # The same first batch, computed whole by hand from the same initial weights.
    vocab = Vocab.from_text(SENTENCES)
    train_ids, _ = data.split(vocab.encode(SENTENCES), config.val_fraction)
    streams = data.Streams.fit(train_ids, config.seq_length, config.batch_size, config.seed)
    params = init_params(config.hidden_size, len(vocab), np.random.default_rng(0), "float64")
    X, Y = streams.chunk(0, 0)
    _, grads, _ = loss_and_grads(params, X, Y, np.zeros((streams.B, config.hidden_size)))
    expected = math.sqrt(float(np.dot(grads.flat, grads.flat)))
    assert event.grad_norm is not None
    assert event.grad_norm == pytest.approx(expected, rel=1e-9)
    assert expected > 0.01 and event.clipped is True  # the norm above the clip: it was clipped


def test_clipped_says_whether_grad_clip_scaled_the_gradient() -> None:
    tiny = run(cfg(max_steps=20, grad_clip=1e-6))[1]
    assert tiny and all(e.clipped is True for e in tiny)
    none = run(cfg(max_steps=20, grad_clip=0.0))[1]  # 0: no clipping at all
    assert all(e.clipped is False for e in none)
    huge = run(cfg(max_steps=20, grad_clip=1e6))[1]
    assert all(e.clipped is False and e.grad_norm is not None for e in huge)
    assert all(0 < (e.grad_norm or 0) < 1e6 for e in huge)


def test_learning_rate_follows_the_cosine_schedule_to_lr_final() -> None:
    config = cfg(max_steps=40, log_every=1, learning_rate=0.02, lr_final=0.1)
    events = run(config)[1]
    assert [e.step for e in events] == list(range(1, 41))
    for e in events:
        done = (e.step - 1) / 40  # the step's lr is set before it is taken
        expected = 0.02 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
        assert e.learning_rate == pytest.approx(expected, rel=1e-12)
    assert events[0].learning_rate == pytest.approx(0.02)
    assert (events[-1].learning_rate or 1) < 0.0025  # close to lr_final * learning_rate


def test_every_log_point_has_its_speed_and_only_evaluations_have_samples() -> None:
    events = run(cfg(max_steps=50, sample_length=30))[1]
    assert all(e.chars_per_sec > 0 and e.grad_norm is not None for e in events)
    assert all(e.learning_rate is not None and e.clipped is not None for e in events)
    sampled = [e.step for e in events if e.sample is not None]
    assert sampled == [20, 40, 50]  # eval_every, and the last step
    vocab = set(SENTENCES)
    for e in events:
        if e.sample is not None:
            assert len(e.sample) == 30 and set(e.sample) <= vocab


def test_sample_length_zero_means_no_sample() -> None:
    events = run(cfg(max_steps=45, sample_length=0))[1]
    assert events and all(e.sample is None for e in events)


def test_samples_do_not_change_the_training_run() -> None:
    """Samples draw from their own generator: the losses and weights are bit-identical."""
    a_trainer, a = run(cfg(max_steps=60, seed=3, sample_length=0))
    b_trainer, b = run(cfg(max_steps=60, seed=3, sample_length=100))
    assert [e.train_loss for e in a] == [e.train_loss for e in b]
    assert [e.val_loss for e in a] == [e.val_loss for e in b]
    assert [e.grad_norm for e in a] == [e.grad_norm for e in b]
    np.testing.assert_array_equal(a_trainer.state.params.flat, b_trainer.state.params.flat)
    assert any(e.sample for e in b)


def test_the_sample_is_set_by_seed_and_step_and_is_of_the_current_weights() -> None:
    config = cfg(max_steps=40, seed=5, sample_length=60, sample_temperature=1.0)
    trainer, events = run(config)
    last = events[-1]
    # The last event's sample is the final (current, not best) weights' at that step.
    assert last.sample == eval_sample(trainer.state.params, trainer.state.vocab, config, 40)
    again = run(config)[1]
    assert [e.sample for e in again] == [e.sample for e in events]
    other_seed = run(replace(config, seed=6))[1]
    assert [e.sample for e in other_seed] != [e.sample for e in events]
    params, vocab = trainer.state.params, trainer.state.vocab
    assert eval_sample(params, vocab, config, 41) != eval_sample(params, vocab, config, 40)
    assert eval_sample(params, vocab, replace(config, sample_length=0), 40) == ""


def test_samples_improve_with_training() -> None:
    """min-char-rnn's point: the later samples look more like the corpus."""
    text = "abcd" * 300
    config = cfg(max_steps=200, eval_every=1, log_every=100, sample_length=80)
    events = run(replace(config, sample_temperature=0.5), text)[1]
    samples = [e.sample for e in events if e.sample is not None]

    def fit(s: str) -> float:  # share of transitions the corpus has
        pairs = zip(s, s[1:], strict=False)
        return sum(b == "abcd"[("abcd".index(a) + 1) % 4] for a, b in pairs) / (len(s) - 1)

    assert fit(samples[-1]) > 0.95 and fit(samples[-1]) > fit(samples[0])


def test_a_resumed_run_shows_the_same_samples() -> None:
    config = cfg(max_steps=60, seed=2, sample_length=40)
    whole = run(config)[1]
    first = Trainer(SENTENCES, config)
    events = []
    for e in first.run(should_stop=lambda: first.state.step >= 25):
        events.append(e)
    resumed = Trainer(SENTENCES, resume=first.state)
    events += list(resumed.run())
    assert [(e.step, e.sample) for e in events] == [(e.step, e.sample) for e in whole]


@pytest.mark.parametrize(
    "overrides,word",
    [
        ({"sample_length": -1}, "sample_length"),
        ({"sample_length": 1001}, "sample_length"),
        ({"sample_temperature": -0.5}, "sample_temperature"),
        ({"sample_temperature": math.nan}, "sample_temperature"),
    ],
)
def test_sample_settings_are_checked(overrides: dict[str, Any], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        cfg(**overrides)
