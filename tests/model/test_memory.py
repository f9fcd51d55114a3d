"""Memory estimates: above what a real run allocates, and not absurdly so."""

from __future__ import annotations

import string
import tracemalloc

import numpy as np
import pytest

from model.data import split_lengths
from model.memory import model_bytes, training_bytes
from model.params import init_params
from model.train import TrainConfig, Trainer
from model.vocab import Vocab

_CHARS = string.ascii_letters + string.digits + string.punctuation + "äöüßéèàçñ"


def corpus(n_x: int, n: int) -> str:
    rng = np.random.default_rng(n_x)
    return "".join(np.array(list(_CHARS[:n_x]))[rng.integers(0, n_x, n)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_a,n_x", [(1, 2), (7, 11), (64, 90)])
def test_model_bytes_is_the_size_of_real_parameters(n_a: int, n_x: int, dtype: str) -> None:
    params = init_params(n_a, n_x, np.random.default_rng(0), dtype)
    assert model_bytes(n_a, n_x, dtype) == params.flat.nbytes
    assert model_bytes(n_a, n_x, dtype) == sum(a.nbytes for a in params.arrays().values())


def measured_peak(text: str, config: TrainConfig, threads: int) -> tuple[int, int]:
    """(peak bytes traced while encoding the corpus, peak while building and running a Trainer)."""
    Vocab.from_text(text).encode(text)  # first-call costs (lazy imports) are not the corpus's
    tracemalloc.start()
    try:
        vocab = Vocab.from_text(text)
        vocab.encode(text)
        _, corpus_peak = tracemalloc.get_traced_memory()
        del vocab
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        trainer = Trainer(text, config, threads=threads, shard_mode="thread")
        events = list(trainer.run())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(e.val_loss is not None for e in events) == (2 if config.val_fraction else 0)
    return corpus_peak, peak - base


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "n_a,n_x,T,B,dtype,optimizer,chars,val_fraction",
    [
        (8, 10, 8, 4, "float32", "sgd", 40_000, 0.5),  # the largest validation pass
        (16, 30, 16, 8, "float64", "adam", 40_000, 0.5),
        (64, 60, 32, 16, "float32", "adagrad", 40_000, 0.5),
        (128, 80, 64, 2, "float64", "adam", 40_000, 0.5),
        (33, 80, 150, 31, "float32", "adam", 30_000, 0.1),  # short validation: fewer streams
        (100, 5, 1, 1, "float64", "sgd", 4_000, 0.1),  # one shard
        (48, 40, 16, 64, "float32", "adagrad", 2_000, 0.0),  # B shrunk to the corpus, no eval
    ],
)  # fmt: skip
def test_training_estimate_bounds_a_real_run(
    n_a: int,
    n_x: int,
    T: int,
    B: int,
    dtype: str,
    optimizer: str,
    chars: int,
    val_fraction: float,
    threads: int,
) -> None:
    text = corpus(n_x, chars)
    config = TrainConfig(
        hidden_size=n_a,
        seq_length=T,
        batch_size=B,
        dtype=dtype,
        optimizer=optimizer,
        max_steps=3,
        eval_every=2,  # evaluations at steps 2 and 3: a best copy replaced
        val_fraction=val_fraction,
    )
    corpus_peak, peak = measured_peak(text, config, threads)
    train_chars, val_chars = split_lengths(chars, val_fraction)
    estimate = training_bytes(
        n_a, n_x, T, B, dtype, optimizer, train_chars=train_chars, val_chars=val_chars
    )
    # The corpus is the caller's to add; the documented allowance covers its encoding.
    assert corpus_peak <= 25 * chars + 2**20
    assert peak <= estimate + corpus_peak
    assert estimate <= 3 * peak + 2**20
    # Without the split's sizes: the configured B and the largest validation pass.
    worst = training_bytes(n_a, n_x, T, B, dtype, optimizer)
    assert worst >= estimate
    if val_chars > 128 * 128:
        assert worst <= 3 * peak + 2**20


def test_what_the_estimate_grows_with() -> None:
    base = training_bytes(64, 50, 32, 16, "float32", "adam")
    assert training_bytes(64, 50, 32, 16, "float64", "adam") > 1.9 * base
    assert training_bytes(64, 50, 32, 16, "float32", "sgd") < base
    assert training_bytes(64, 50, 32, 16, "float32", "adagrad") < base
    assert training_bytes(64, 500, 32, 16, "float32", "adam") > 3 * base  # probs (128*128, V)
    assert training_bytes(64, 50, 32, 16, "float32", "adam", val_chars=0) < base / 5
    # A 4096-unit float64 model is refused long before it would run: gigabytes.
    assert training_bytes(4096, 200, 64, 64, "float64", "adam") > 2 * 10**9
