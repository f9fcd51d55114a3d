"""Inference against a naive float64 transcription of the equations.

a_t = tanh(Waa a_{t-1} + Wax x_t + ba)   x_t = one_hot(char_t),  a_0 = 0
y_t = softmax(Wya a_t + by)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.errors import UnknownCharactersError
from model.inference import (
    InferenceWeights,
    advance,
    advance_many,
    entropy_bits,
    initial_state,
    iter_sample,
    log_softmax,
    next_distribution,
    sample,
    score,
    score_from,
    score_summary,
)
from model.params import Params, init_params
from model.vocab import Vocab

CORPUS = "the quick brown fox jumps over the lazy dog. "
VOCAB = Vocab.from_text(CORPUS)
V = len(VOCAB)
H = 16


def make_params(dtype: str = "float64", seed: int = 0, spread: float = 1.0) -> Params:
    """Random parameters; ``spread`` scales Wya and by (large = peaked predictions)."""
    rng = np.random.default_rng(seed)
    p = init_params(H, V, rng, dtype)
    p.ba[...] = rng.standard_normal((H, 1)) * 0.3
    p.Wya[...] *= spread
    p.by[...] = rng.standard_normal((V, 1)) * 0.5 * spread
    return p


def ref_state(
    params: Params, ids: np.ndarray | list[int], h0: np.ndarray | None = None
) -> np.ndarray:
    """The equations one one-hot column vector at a time, in float64."""
    P = {k: v.astype(np.float64) for k, v in params.arrays().items()}
    eye = np.eye(V)
    a = np.zeros((H, 1)) if h0 is None else h0.astype(np.float64).reshape(H, 1)
    for x in ids:
        a = np.tanh(P["Waa"] @ a + P["Wax"] @ eye[x][:, None] + P["ba"])
    return a[:, 0]


def ref_probs(params: Params, a: np.ndarray) -> np.ndarray:
    logits = params.Wya.astype(np.float64) @ a + params.by[:, 0].astype(np.float64)
    e = np.exp(logits - logits.max())
    probs: np.ndarray = e / e.sum()
    return probs


def ref_greedy(params: Params, prompt: str, n: int) -> str:
    ids = list(VOCAB.encode(prompt))
    out = ""
    for _ in range(n):
        i = int(np.argmax(ref_probs(params, ref_state(params, ids))))
        ids.append(i)
        out += VOCAB.chars[i]
    return out


# --------------------------------------------------------------------------- advance


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-12), ("float32", 2e-5)])
def test_advance_matches_reference(dtype: str, tol: float) -> None:
    p = make_params(dtype)
    ids = VOCAB.encode(CORPUS)
    h = advance(p, initial_state(p), ids)
    assert h.dtype == p.dtype and h.shape == (H,)
    np.testing.assert_allclose(h, ref_state(p, ids), atol=tol, rtol=0)
    # from a non-zero state, and split into two calls
    h1 = advance(p, h, ids[:7])
    h2 = advance(p, advance(p, h, ids[:3]), ids[3:7])
    np.testing.assert_allclose(h1, ref_state(p, ids[:7], h), atol=tol, rtol=0)
    np.testing.assert_allclose(h2, h1, atol=tol, rtol=0)


def test_advance_returns_new_array_and_leaves_inputs_alone() -> None:
    p = make_params()
    flat = p.flat.copy()
    h = np.random.default_rng(1).standard_normal(H) * 0.5
    h_before = h.copy()
    ids = VOCAB.encode("fox")
    ids_before = ids.copy()
    out = advance(p, h, ids)
    assert not np.shares_memory(out, h)
    np.testing.assert_array_equal(h, h_before)
    np.testing.assert_array_equal(ids, ids_before)
    np.testing.assert_array_equal(p.flat, flat)
    same = advance(p, h, np.empty(0, dtype=np.int32))
    np.testing.assert_array_equal(same, h)
    assert not np.shares_memory(same, h)


def test_initial_state_is_zero_in_params_dtype() -> None:
    p = make_params("float32")
    h = initial_state(p)
    assert h.shape == (H,) and h.dtype == np.float32 and not h.any()


# --------------------------------------------------------------------------- distributions


def test_next_distribution_empty_prefix_and_after_text() -> None:
    p = make_params(spread=3.0)
    d0 = next_distribution(p, initial_state(p))
    assert d0.dtype == np.float64
    assert abs(d0.sum() - 1.0) < 1e-12
    by = p.by[:, 0]
    np.testing.assert_allclose(d0, np.exp(by - by.max()) / np.exp(by - by.max()).sum(), atol=1e-14)
    ids = VOCAB.encode("lazy do")
    d = next_distribution(p, advance(p, initial_state(p), ids))
    assert abs(d.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(d, ref_probs(p, ref_state(p, ids)), atol=1e-12)


def test_next_distribution_float32_sums_to_one() -> None:
    p = make_params("float32", spread=5.0)
    h = advance(p, initial_state(p), VOCAB.encode(CORPUS))
    for t in (0.3, 1.0, 2.5):
        assert abs(next_distribution(p, h, t).sum() - 1.0) < 1e-12


def test_temperature() -> None:
    p = make_params(spread=2.0)
    a = advance(p, initial_state(p), VOCAB.encode("over"))
    logits = p.Wya @ a + p.by[:, 0]
    for t in (0.5, 2.0):
        e = np.exp((logits - logits.max()) / t)
        np.testing.assert_allclose(next_distribution(p, a, t), e / e.sum(), atol=1e-12)
    greedy = next_distribution(p, a, 0.0)
    expected = np.zeros(V)
    expected[np.argmax(logits)] = 1.0
    np.testing.assert_array_equal(greedy, expected)
    # a vanishing temperature tends to greedy without overflow warnings or nan
    np.testing.assert_allclose(next_distribution(p, a, 1e-300), expected, atol=0)


def test_log_softmax_and_entropy() -> None:
    x = np.random.default_rng(2).standard_normal((4, 9)) * 30
    ls = log_softmax(x)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(ls, np.log(e / e.sum(axis=1, keepdims=True)), atol=1e-12)
    np.testing.assert_allclose(np.exp(ls).sum(axis=1), 1.0, atol=1e-12)
    # shift invariance: without subtracting the max, exp(x + 1000) overflows
    np.testing.assert_allclose(log_softmax(x + 1000.0), ls, atol=1e-12)
    assert entropy_bits(np.full(8, 1 / 8)) == pytest.approx(3.0, abs=1e-12)
    assert entropy_bits(np.array([0.0, 1.0, 0.0])) == 0.0
    assert entropy_bits(np.array([0.5, 0.25, 0.25, 0.0])) == pytest.approx(1.5, abs=1e-12)


# --------------------------------------------------------------------------- score


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-10), ("float32", 1e-4)])
def test_score_is_log_of_next_distribution_step_by_step(dtype: str, tol: float) -> None:
    p = make_params(dtype, spread=3.0)
    text = "the lazy fox. "
    ids = VOCAB.encode(text)
    lp = score(p, ids)
    assert lp.dtype == np.float64 and lp.shape == (len(text),)
    h = initial_state(p)
    for i, x in enumerate(ids):
        assert lp[i] == pytest.approx(math.log(next_distribution(p, h)[x]), abs=tol)
        assert lp[i] == pytest.approx(math.log(ref_probs(p, ref_state(p, ids[:i]))[x]), abs=tol)
        h = advance(p, h, ids[i : i + 1])
    by = p.by[:, 0].astype(np.float64)
    assert lp[0] == pytest.approx(float(log_softmax(by)[ids[0]]), abs=tol)


def test_score_empty_and_summary() -> None:
    p = make_params()
    assert score(p, np.empty(0, dtype=np.int32)).shape == (0,)
    with pytest.raises(ValueError, match="text is empty"):
        score_summary(np.empty(0))
    lp = np.log(np.array([0.5, 0.25, 0.125]))
    s = score_summary(lp)
    assert s.chars == 3
    assert s.mean_nats == pytest.approx(2 * math.log(2))
    assert s.bits_per_char == pytest.approx(2.0)
    assert s.perplexity == pytest.approx(4.0)


def test_score_does_not_modify_params() -> None:
    p = make_params("float32")
    flat = p.flat.copy()
    score(p, VOCAB.encode(CORPUS))
    np.testing.assert_array_equal(p.flat, flat)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("prompt", ["", "the ", "quick brown"])
def test_greedy_is_argmax_chain(prompt: str) -> None:
    p = make_params(seed=2, spread=4.0)  # seed 2: greedy cycles through several chars
    text, reason = sample(p, VOCAB, prompt, max_chars=30, temperature=0.0)
    assert (text, reason) == (ref_greedy(p, prompt, 30), "length")
    assert len(set(text[-10:])) > 1
    # greedy ignores the seed
    assert sample(p, VOCAB, prompt, max_chars=30, temperature=0.0, seed=5)[0] == text


def test_top_k_1_and_tiny_top_p_equal_greedy() -> None:
    p = make_params(seed=2, spread=4.0)
    greedy, _ = sample(p, VOCAB, "the ", max_chars=40, temperature=0.0)
    for seed in (0, 1, 2):
        assert sample(p, VOCAB, "the ", max_chars=40, top_k=1, seed=seed)[0] == greedy
        assert sample(p, VOCAB, "the ", max_chars=40, top_p=1e-9, seed=seed)[0] == greedy
        hot = sample(p, VOCAB, "the ", max_chars=40, top_k=1, temperature=3.0, seed=seed)
        assert hot[0] == greedy


def ranks_along(p: Params, prompt: str, text: str) -> list[tuple[int, float]]:
    """(rank of the chosen char, probability mass strictly above it) at each step."""
    h = advance(p, initial_state(p), VOCAB.encode(prompt))
    out = []
    for x in VOCAB.encode(text):
        d = next_distribution(p, h)
        out.append((int((d > d[x]).sum()), float(d[d > d[x]].sum())))
        h = advance(p, h, [int(x)])
    return out


def test_top_k_and_top_p_restrict_the_choice() -> None:
    p = make_params(spread=1.5)
    text, _ = sample(p, VOCAB, "a", max_chars=300, top_k=3, seed=7)
    ranks = [r for r, _ in ranks_along(p, "a", text)]
    assert max(ranks) <= 2 and len(set(ranks)) > 1
    text, _ = sample(p, VOCAB, "a", max_chars=300, top_p=0.5, seed=7)
    # a char is in the nucleus iff the mass strictly above it is below p
    above = [m for _, m in ranks_along(p, "a", text)]
    assert max(above) < 0.5 and max(above) > 0.0


def test_seeds() -> None:
    p = make_params(spread=0.5)  # near-uniform predictions
    assert entropy_bits(next_distribution(p, initial_state(p))) > 0.8 * math.log2(V)
    a = sample(p, VOCAB, "the", max_chars=60, seed=123)
    assert a == sample(p, VOCAB, "the", max_chars=60, seed=123)
    assert a == sample(p, VOCAB, "the", max_chars=60, rng=np.random.default_rng(123))
    assert len(a[0]) == 60 and set(a[0]) <= set(VOCAB.chars)
    others = {sample(p, VOCAB, "the", max_chars=60, seed=s)[0] for s in range(5)}
    assert len(others) == 5


def test_max_chars_only_truncates() -> None:
    p = make_params(seed=2)
    assert sample(p, VOCAB, "fox", max_chars=0, seed=0) == ("", "length")
    for temperature in (0.0, 1.0):
        full, _ = sample(p, VOCAB, "fox", max_chars=25, temperature=temperature, seed=6)
        assert len(set(full[-10:])) > 1  # not stuck on one character
        for n in range(1, 25):
            text, reason = sample(p, VOCAB, "fox", max_chars=n, temperature=temperature, seed=6)
            assert (text, reason) == (full[:n], "length")


def first_stop(text: str, stops: list[str]) -> str:
    """Reference: cut at the first position where some stop string is complete."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)]
    raise AssertionError("no stop string in text")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_strings_honoured_and_excluded(temperature: float) -> None:
    p = make_params(seed=2, spread=1.0)
    full, reason = sample(p, VOCAB, "the ", max_chars=80, temperature=temperature, seed=3)
    assert reason == "length" and len(full) == 80
    for stops in ([full[40:43]], [full[50:52], full[30:33]], [full[60], full[59:61]]):
        text, reason = sample(
            p, VOCAB, "the ", max_chars=80, temperature=temperature, seed=3, stop=stops
        )
        assert reason == "stop"
        assert text == first_stop(full, stops)
        assert all(s not in text for s in stops)


def test_simultaneous_stops_cut_at_the_earliest_start() -> None:
    p = make_params(seed=2)
    full, _ = sample(p, VOCAB, "", max_chars=60, seed=1)
    k = next(k for k in range(1, len(full)) if full[k] not in full[:k])
    # both complete for the first time at k; the longer one starts earlier
    for stops in ([full[k], full[k - 1 : k + 1]], [full[k - 1 : k + 1], full[k]]):
        assert sample(p, VOCAB, "", max_chars=60, seed=1, stop=stops) == (full[: k - 1], "stop")


def test_stream_is_not_delayed_by_stops_that_cannot_start() -> None:
    p = make_params()
    plain_rng, stop_rng = np.random.default_rng(8), np.random.default_rng(8)
    plain = iter_sample(p, VOCAB, "the", max_chars=20, rng=plain_rng)
    with_stop = iter_sample(p, VOCAB, "the", max_chars=20, rng=stop_rng, stop=["@", "#!"])
    for _ in range(20):
        assert next(plain) == next(with_stop)
        # same randomness consumed so far: no look-ahead before yielding
        assert plain_rng.bit_generator.state == stop_rng.bit_generator.state


def test_partial_stop_is_released() -> None:
    p = make_params(spread=1.0)
    full, _ = sample(p, VOCAB, "", max_chars=50, seed=9)
    stop = full[-3:] + "#"  # begins like the tail of the text, never completes
    stream = iter_sample(p, VOCAB, "", max_chars=50, seed=9, stop=[stop, "@"])
    pieces = list(stream)
    assert all(len(c) == 1 for c in pieces)
    assert "".join(pieces) == full
    assert stream.finish_reason == "length"


def test_stop_considers_only_generated_text() -> None:
    p = make_params(spread=4.0)
    full = ref_greedy(p, "fox", 40)
    stop = "x" + full[0]  # completed across the prompt boundary only
    text, reason = sample(p, VOCAB, "fox", max_chars=40, temperature=0.0, stop=stop)
    if stop in full:
        assert (text, reason) == (full[: full.index(stop)], "stop")
    else:
        assert (text, reason) == (full, "length")


def test_iter_sample_streams_the_same_text() -> None:
    p = make_params()
    stream = iter_sample(p, VOCAB, "dog", max_chars=25, seed=4, stop=["zz"])
    before = stream.finish_reason
    assert before is None
    chars = list(stream)
    assert all(len(c) == 1 for c in chars)
    assert ("".join(chars), stream.finish_reason) == sample(
        p, VOCAB, "dog", max_chars=25, seed=4, stop=["zz"]
    )


def test_finish_reason_survives_reading_past_the_end() -> None:
    p = make_params(spread=4.0)
    full = ref_greedy(p, "", 40)
    stop = full[5:7]
    stream = iter_sample(p, VOCAB, "", max_chars=40, temperature=0.0, stop=stop)
    assert "".join(stream) == full[: full.index(stop)] and stream.finish_reason == "stop"
    assert list(stream) == [] and stream.finish_reason == "stop"  # a second read changes nothing


def test_sampling_from_a_given_prompt_state_matches_stepping_the_prompt() -> None:
    p = make_params()
    h = advance(p, initial_state(p), VOCAB.encode("the lazy"))
    kept = h.copy()
    given = sample(p, VOCAB, "the lazy", max_chars=30, seed=3, state=h)
    assert given == sample(p, VOCAB, "the lazy", max_chars=30, seed=3)
    np.testing.assert_array_equal(h, kept)  # the caller's state is not stepped in place


def test_scoring_in_pieces_equals_scoring_whole() -> None:
    p = make_params()
    ids = VOCAB.encode(CORPUS * 3)
    whole = score(p, ids)
    h, pieces = initial_state(p), []
    for i in range(0, ids.size, 17):
        lp, h = score_from(p, h, ids[i : i + 17])
        pieces.append(lp)
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(h, advance(p, initial_state(p), ids), rtol=0, atol=1e-12)


def test_inference_weights_are_a_snapshot_giving_the_same_numbers() -> None:
    p = make_params("float32")
    w = InferenceWeights.of(p)
    ids = VOCAB.encode(CORPUS)
    np.testing.assert_array_equal(
        advance(w, initial_state(w), ids), advance(p, initial_state(p), ids)
    )
    np.testing.assert_array_equal(score(w, ids), score(p, ids))
    before = next_distribution(w, initial_state(w))
    p.flat[:] += 1.0  # training mutates Params in place; the snapshot must not follow
    np.testing.assert_array_equal(next_distribution(w, initial_state(w)), before)


def test_sampling_does_not_modify_params() -> None:
    p = make_params("float32")
    flat = p.flat.copy()
    sample(p, VOCAB, "the", max_chars=20, seed=0, top_k=5, top_p=0.9, stop=["e "])
    np.testing.assert_array_equal(p.flat, flat)


# --------------------------------------------------------------------------- errors


def test_unknown_prompt_characters() -> None:
    p = make_params()
    with pytest.raises(UnknownCharactersError) as err:
        iter_sample(p, VOCAB, "the QUICK fox§", max_chars=5)  # raises before streaming
    assert err.value.chars == ["Q", "U", "I", "C", "K", "§"]
    assert "'§'" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"max_chars": -1}, "max_chars"),
        ({"seed": 1, "rng": np.random.default_rng(1)}, "seed or rng"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": ""}, "stop"),
    ],
)
def test_bad_sampling_arguments(kwargs: dict[str, object], match: str) -> None:
    p = make_params()
    args: dict[str, object] = {"max_chars": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(p, VOCAB, "the", **args)  # type: ignore[arg-type]


def test_bad_arrays() -> None:
    p = make_params()
    h = initial_state(p)
    with pytest.raises(ValueError, match="temperature"):
        next_distribution(p, h, -1.0)
    with pytest.raises(ValueError, match="shape"):
        advance(p, np.zeros(H + 1), [0])
    with pytest.raises(ValueError, match="shape"):
        next_distribution(p, np.zeros((H, 1)))
    for bad in ([V], [-1], [0, V + 3]):
        with pytest.raises(ValueError, match="must lie in"):
            advance(p, h, bad)
        with pytest.raises(ValueError, match="must lie in"):
            score(p, bad)
    with pytest.raises(ValueError, match="1-D"):
        score(p, np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        advance(p, h, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="vocabulary"):
        sample(p, Vocab.from_text("ab"), "a", max_chars=3)


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-6), ("float64", 1e-12)])
def test_advance_many_equals_advance_one_by_one(batch: int, dtype: str, tol: float) -> None:
    """The batched recurrence (one GEMM per step for the sequences still running) gives
    each sequence the state ``advance`` gives it alone, whatever the lengths (0 too)."""
    rng = np.random.default_rng(batch)
    p = init_params(32, 11, rng, dtype)
    states = [rng.standard_normal(32).astype(dtype) * 0.5 for _ in range(batch)]
    lengths = [0, 1, 200, *rng.integers(0, 120, size=batch).tolist()][:batch]
    seqs = [rng.integers(0, 11, size=n) for n in lengths]
    kept = [s.copy() for s in states]
    got = advance_many(p, states, seqs)
    assert len(got) == batch
    for h, ids, out, before in zip(states, seqs, got, kept, strict=True):
        assert out.dtype == np.dtype(dtype) and out is not h
        np.testing.assert_allclose(out, advance(p, h, ids), rtol=0, atol=tol)
        np.testing.assert_array_equal(h, before)  # the inputs are left alone
    assert advance_many(p, [], []) == []
    with pytest.raises(ValueError, match="2 states for 1 sequences"):
        advance_many(p, states[:1] * 2, seqs[:1])
    with pytest.raises(ValueError, match="hidden state must have shape"):
        advance_many(p, [np.zeros(3)], [[1]])
