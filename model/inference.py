"""Inference for the basic RNN: state updates, next-character distributions,
sampling and scoring.

    a_t = tanh(Waa a_{t-1} + Wax[:, x_t] + ba)      a_0 = 0
    y_t = softmax(Wya a_t + by)

Pure functions over arrays: no I/O, no globals, the caller's arrays are never
modified, randomness only through an explicit ``np.random.Generator``.

Speed comes from the same two tricks as ``rnn.py``: the input layer is a gather
of Wax columns done for all characters at once (``Wax @ one_hot(x)`` is column
x), and the serial part is a loop of in-place BLAS matrix-vector products into
preallocated rows, so a prompt costs no per-character allocation. Every function
takes either ``Params`` or :class:`InferenceWeights`, the same numbers laid out
for this loop (contiguous rows, ``a @ Waa.T`` rather than ``Waa @ a``: about
30 % faster here); a server builds the latter once per loaded model, anything
else may pass ``Params`` and pay the relayout per call. Anything
probabilistic (softmax, log-probabilities, entropy) is done in float64 whatever
the parameter dtype, because float32 log-probabilities summed over long texts
lose digits that perplexity and sampling thresholds care about.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .params import Params
from .vocab import Vocab

FinishReason = Literal["length", "stop"]
IdsLike = npt.NDArray[np.integer] | Sequence[int]
F64 = npt.NDArray[np.float64]

__all__ = [
    "FinishReason",
    "InferenceWeights",
    "SampleStream",
    "ScoreSummary",
    "Chooser",
    "advance",
    "advance_many",
    "advance_rows",
    "entropy_bits",
    "initial_state",
    "iter_sample",
    "log_softmax",
    "logprobs_of",
    "make_chooser",
    "next_distribution",
    "sample",
    "score",
    "score_from",
    "score_summary",
]


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, eq=False)
class InferenceWeights:
    """The parameters laid out for stepping one sequence: built once per loaded model.

    ``emb[x]`` is ``Wax[:, x] + ba`` as a contiguous row (a lookup, not an add,
    per character); ``WaaT``/``WyaT`` are contiguous transposes, because a
    row-vector product ``a @ Waa.T`` is the faster BLAS gemv here. Copies, so
    they never change under the caller (training mutates ``Params`` in place).
    """

    emb: np.ndarray  # (n_x, n_a)
    WaaT: np.ndarray  # (n_a, n_a)
    WyaT: np.ndarray  # (n_a, n_y)
    by: np.ndarray  # (n_y,)

    @classmethod
    def of(cls, params: Params | InferenceWeights) -> InferenceWeights:
        if isinstance(params, InferenceWeights):
            return params
        return cls(
            emb=np.ascontiguousarray(params.Wax.T + params.ba[:, 0]),
            WaaT=np.ascontiguousarray(params.Waa.T),
            WyaT=np.ascontiguousarray(params.Wya.T),
            by=params.by[:, 0].copy(),
        )

    @property
    def n_a(self) -> int:
        return int(self.WaaT.shape[0])

    @property
    def n_x(self) -> int:
        return int(self.emb.shape[0])

    @property
    def dtype(self) -> np.dtype[np.floating]:
        return self.emb.dtype


Weights = Params | InferenceWeights


def initial_state(params: Weights) -> np.ndarray:
    """a_0 = 0: the state before any character, in the parameter dtype."""
    return np.zeros(params.n_a, dtype=params.dtype)


def _check_state(params: Weights, h: np.ndarray) -> None:
    if h.shape != (params.n_a,):
        raise ValueError(f"hidden state must have shape ({params.n_a},), got {h.shape}")


def _check_ids(params: Weights, ids: IdsLike) -> npt.NDArray[np.intp]:
    """Validated 1-D indices; out-of-range ones would silently wrap in a gather."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D array of character indices, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=np.intp)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.size <= 16:  # two numpy reductions cost more than this for a few chars
        values = arr.tolist()
        lo, hi = min(values), max(values)
    else:
        lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= params.n_x:
        raise ValueError(f"ids must lie in [0, {params.n_x}), got values in [{lo}, {hi}]")
    return arr.astype(np.intp, copy=False)


def _recur_inplace(WaaT: np.ndarray, h: np.ndarray, z: np.ndarray) -> None:
    """Turn the input rows z[t] into the states a_t, starting from h.

    Rows of z double as the output, and one scratch vector holds a_{t-1} Waa^T,
    so the loop allocates nothing but the row views.
    """
    dot, add, tanh = np.dot, np.add, np.tanh  # local names: this loop is the hot path
    buf = np.empty_like(h)
    prev = h
    for row in z:
        dot(prev, WaaT, out=buf)
        add(row, buf, out=row)
        tanh(row, out=row)
        prev = row


def advance(params: Weights, h: np.ndarray, ids: IdsLike) -> np.ndarray:
    """State after feeding ``ids`` (1-D character indices) starting from state ``h``.

    Returns a new (n_a,) array in the parameter dtype; ``h`` is left untouched, so
    one prompt state can be branched into many continuations.
    """
    _check_state(params, h)
    idx = _check_ids(params, ids)
    w = InferenceWeights.of(params)
    if idx.size == 0:
        return h.astype(w.dtype, copy=True)  # copy: never alias the caller's array
    z = w.emb[idx]  # a new (T, n_a) array: the rows become the states
    _recur_inplace(w.WaaT, h.astype(w.dtype, copy=False), z)
    out: np.ndarray = z[-1].copy()  # copy: don't keep the whole (T, n_a) buffer alive
    return out


def advance_many(
    params: Weights, states: Sequence[np.ndarray], sequences: Sequence[IdsLike]
) -> list[np.ndarray]:
    """``advance`` for many sequences at once: one (B, n_a) x (n_a, n_a) product per time
    step for the B sequences still running, instead of B vector products.

    Sequences of any lengths: they are stepped longest first, so the ones still running
    are always the first rows and none is padded. Returns new (n_a,) states, in the
    order given; equal to ``advance`` one by one up to float32 rounding (a GEMM sums
    in another order than a GEMV).
    """
    if len(states) != len(sequences):
        raise ValueError(f"{len(states)} states for {len(sequences)} sequences")
    w = InferenceWeights.of(params)
    for h in states:
        _check_state(w, h)
    idx = [_check_ids(w, ids) for ids in sequences]
    order = sorted(range(len(idx)), key=lambda i: -idx[i].size)
    lengths = np.array([idx[i].size for i in order], dtype=np.intp)
    B, T = len(order), int(lengths[0]) if len(order) else 0
    H = np.empty((B, w.n_a), dtype=w.dtype)
    for row, i in enumerate(order):
        H[row] = states[i]
    out: list[np.ndarray] = [np.empty(0)] * B
    if T:
        padded = np.zeros((B, T), dtype=np.intp)
        for row, i in enumerate(order):
            padded[row, : idx[i].size] = idx[i]
        # running[t]: how many sequences are longer than t (lengths are descending)
        running = np.searchsorted(-lengths, -np.arange(1, T + 1), side="right")
        buf = np.empty_like(H)
        for t in range(T):
            b = int(running[t])
            np.dot(H[:b], w.WaaT, out=buf[:b])
            buf[:b] += w.emb[padded[:b, t]]
            np.tanh(buf[:b], out=H[:b])
    for row, i in enumerate(order):
        out[i] = H[row].copy()
    return out


def advance_rows(
    params: Weights,
    h0: np.ndarray,
    ids: np.ndarray,
    running: Sequence[int] | npt.NDArray[np.integer],
    out: np.ndarray,
    choose: Callable[[int, F64], Sequence[int]] | None = None,
    n_choose: int = 0,
) -> None:
    """Step B sequences T steps at once, one (b, n_a) x (n_a, n_a) product per step.

    ``h0`` (B, n_a) holds the states before; ``out[t, :running[t]]`` receives the states
    after step t of the rows still running (``running`` is non-increasing, so those are
    always the first rows and nothing is padded). Row r's input at step t is
    ``ids[r, t]``, except for the first ``n_choose`` rows (sampling streams, which run
    all T steps): ``choose(t, logits)`` gets their float64 logits from the state before
    step t, (n_choose, n_y), and returns their inputs. The server's batcher calls this
    with whatever requests are waiting; arrays are trusted (no checks: the hot path).
    """
    w = InferenceWeights.of(params)
    emb, WaaT = w.emb, w.WaaT
    buf = np.empty_like(h0)
    prev = h0
    for t in range(ids.shape[1]):
        b = int(running[t])
        if n_choose and choose is not None:
            logits = (np.dot(prev[:n_choose], w.WyaT) + w.by).astype(np.float64)
            ids[:n_choose, t] = choose(t, logits)
        np.dot(prev[:b], WaaT, out=buf[:b])
        buf[:b] += emb[ids[:b, t]]
        np.tanh(buf[:b], out=out[t, :b])
        prev = out[t]


def logprobs_of(params: Weights, before: np.ndarray, ids: IdsLike) -> F64:
    """log p(ids[t] | the state before[t]) for states (T, n_a): one output-layer GEMM."""
    w = InferenceWeights.of(params)
    idx = np.asarray(ids, dtype=np.intp)
    if idx.size == 0:
        return np.empty(0, dtype=np.float64)
    logits = before @ w.WyaT
    logits += w.by
    out: F64 = log_softmax(logits)[np.arange(idx.size), idx]
    return out


# --------------------------------------------------------------------------- distributions


def log_softmax(logits: npt.ArrayLike) -> F64:
    """log softmax along the last axis, in float64, shifted by the max for stability."""
    x = np.array(logits, dtype=np.float64)  # always a fresh float64 copy
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _logits(w: InferenceWeights, h: np.ndarray) -> F64:
    out: F64 = (np.dot(h, w.WyaT) + w.by).astype(np.float64)
    return out


def _check_temperature(temperature: float) -> None:
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")


def next_distribution(params: Weights, h: np.ndarray, temperature: float = 1.0) -> F64:
    """Probabilities (float64, summing to 1) of the next character given state ``h``.

    Logits are divided by ``temperature`` (> 1 flattens, < 1 sharpens);
    temperature 0 is the limit of that: a one-hot on the argmax (greedy).
    """
    _check_state(params, h)
    _check_temperature(temperature)
    return _softmax_t(_logits(InferenceWeights.of(params), h), temperature)


def _softmax_t(logits: F64, temperature: float) -> F64:
    """Softmax of logits / temperature in place on ``logits`` (ours, float64)."""
    if temperature == 0.0:
        probs = np.zeros_like(logits)
        probs[int(np.argmax(logits))] = 1.0
        return probs
    # Shift before dividing: a tiny temperature then gives -inf (p = 0), never inf - inf.
    logits -= logits.max()
    if temperature != 1.0:
        with np.errstate(over="ignore"):  # overflow to -inf is the intended limit
            logits /= temperature
    np.exp(logits, out=logits)
    logits /= logits.sum()
    return logits


def entropy_bits(probs: npt.ArrayLike) -> float:
    """Shannon entropy in bits of a distribution; zero-probability entries add 0."""
    p = np.asarray(probs, dtype=np.float64)
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


# --------------------------------------------------------------------------- sampling


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    _check_temperature(temperature)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _truncate(probs: F64, top_k: int | None, top_p: float | None) -> F64:
    """Zero all but the top-k / nucleus of ``probs`` (in place) and renormalise.

    A stable sort on -p breaks ties by index, exactly like argmax, so top_k=1 and
    a tiny top_p both reduce to greedy decoding.
    """
    if top_k is None and top_p is None:
        return probs
    order = np.argsort(-probs, kind="stable")
    keep = probs.size
    if top_k is not None:
        keep = min(keep, top_k)
    if top_p is not None:
        cum = np.cumsum(probs[order])
        # smallest n with cum[n-1] >= top_p; clamp for rounding when top_p == 1
        keep = min(keep, int(np.searchsorted(cum, top_p, side="left")) + 1)
    probs[order[keep:]] = 0.0
    probs /= probs.sum()
    return probs


def _draw(probs: F64, rng: np.random.Generator) -> int:
    """Inverse-CDF draw; never picks a zero-probability entry (side='right')."""
    cdf = np.cumsum(probs)
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if i >= probs.size:  # u * total rounded up to total
        i = int(np.flatnonzero(probs)[-1])
    return i


def _normalise_stop(stop: str | Sequence[str]) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not isinstance(s, str) or s == "" for s in stops):
        raise ValueError("stop strings must be non-empty strings")
    return stops


def _held_suffix(text: str, stops: tuple[str, ...], longest: int) -> int:
    """Length of the longest suffix of ``text`` that begins some stop string.

    Those characters can't be streamed yet: the next characters may complete a
    stop string, which must then be withheld from the output.
    """
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


class Chooser:
    """One sample stream's choices: the next character from each distribution, and what
    of the text may be released yet (characters that might begin a stop string are held
    back until the following ones rule that out, so a stop string is never released).

    Shared by :func:`iter_sample` (one stream) and a server stepping many streams in one
    GEMM: the same seed then draws the same characters in both.
    """

    def __init__(
        self,
        vocab: Vocab,
        max_chars: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        rng: np.random.Generator,
        stops: tuple[str, ...],
    ) -> None:
        self.chars = vocab.chars
        self.max_chars = max_chars
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng, self.stops = rng, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.chosen = 0
        self.pending = ""  # chosen but not yet released: may be the start of a stop string
        self.finish_reason: FinishReason | None = "length" if max_chars == 0 else None

    def choose(self, logits: F64) -> tuple[int, str]:
        """(index chosen, text released by it) from float64 logits, which are overwritten.
        Afterwards ``finish_reason`` is set if the stream is done: the index is then not
        to be stepped."""
        if self.temperature == 0.0:  # greedy: no softmax, no randomness consumed
            i = int(np.argmax(logits))
        else:
            probs = _softmax_t(logits, self.temperature)
            i = _draw(_truncate(probs, self.top_k, self.top_p), self.rng)
        self.chosen += 1
        out = self.chars[i]
        if self.stops:
            pending = self.pending + out
            hit = [s for s in self.stops if pending.endswith(s)]
            if hit:
                # several may end here: cut at the earliest start, i.e. the longest
                self.finish_reason, self.pending = "stop", ""
                return i, pending[: len(pending) - max(len(s) for s in hit)]
            k = _held_suffix(pending, self.stops, self.longest)
            out, self.pending = pending[: len(pending) - k], pending[len(pending) - k :]
        if self.chosen >= self.max_chars:
            self.finish_reason = "length"
            out, self.pending = out + self.pending, ""
        return i, out


def _generate(
    w: InferenceWeights, chooser: Chooser, h: np.ndarray
) -> Generator[str, None, FinishReason]:
    h = h.copy()  # updated in place below: never the caller's array
    emb, WaaT, buf = w.emb, w.WaaT, np.empty_like(h)
    while chooser.finish_reason is None:
        i, text = chooser.choose(_logits(w, h))
        yield from text
        if chooser.finish_reason is None:  # the last state would never be used
            np.dot(h, WaaT, out=buf)
            buf += emb[i]
            np.tanh(buf, out=h)
    return chooser.finish_reason


class SampleStream(Iterator[str]):
    """Iterator over generated characters; ``finish_reason`` is set once exhausted.

    Characters that might begin a stop string are held back until the following
    ones rule that out, so a stop string is never streamed to the caller.
    """

    def __init__(self, gen: Generator[str, None, FinishReason]) -> None:
        self._gen = gen
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> SampleStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as done:
            if self.finish_reason is None:  # later StopIterations of a spent generator hold None
                self.finish_reason = done.value
            raise


def _rng(seed: int | None, rng: np.random.Generator | None) -> np.random.Generator:
    if seed is not None and rng is not None:
        raise ValueError("pass either seed or rng, not both")
    return rng if rng is not None else np.random.default_rng(seed)


def iter_sample(
    params: Weights,
    vocab: Vocab,
    prompt: str = "",
    *,
    max_chars: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    stop: str | Sequence[str] = (),
    state: np.ndarray | None = None,
) -> SampleStream:
    """Stream a continuation of ``prompt`` (the prompt itself is not yielded).

    Arguments are validated and the prompt encoded here, eagerly, so bad input
    raises before a caller starts streaming a response. ``state``, when given, is
    the state after ``prompt`` (e.g. from a server's prefix cache): the prompt is
    then checked but not stepped again. See :func:`sample`.
    """
    chooser = make_chooser(
        params,
        vocab,
        max_chars=max_chars,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        rng=rng,
        stop=stop,
    )
    prompt_ids = _check_ids(params, vocab.encode(prompt))  # UnknownCharactersError
    w = InferenceWeights.of(params)
    if state is not None:
        _check_state(w, state)
    h = advance(w, initial_state(w), prompt_ids) if state is None else state
    return SampleStream(_generate(w, chooser, h))


def make_chooser(
    params: Weights,
    vocab: Vocab,
    *,
    max_chars: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    stop: str | Sequence[str] = (),
) -> Chooser:
    """A validated :class:`Chooser` (ValueError naming the argument) for the arguments
    of :func:`sample`."""
    if len(vocab) != params.n_x:
        raise ValueError(f"vocabulary has {len(vocab)} characters, model expects {params.n_x}")
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")
    _check_sampling(temperature, top_k, top_p)
    stops = _normalise_stop(stop)
    return Chooser(vocab, max_chars, temperature, top_k, top_p, _rng(seed, rng), stops)


def sample(
    params: Weights,
    vocab: Vocab,
    prompt: str = "",
    *,
    max_chars: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    rng: np.random.Generator | None = None,
    stop: str | Sequence[str] = (),
    state: np.ndarray | None = None,
) -> tuple[str, FinishReason]:
    """Generate up to ``max_chars`` characters after ``prompt``.

    Returns (text without the prompt, finish_reason). temperature 0 is greedy;
    top_k keeps the k likeliest characters, top_p the smallest set whose
    probability reaches p (both after temperature). The same ``seed`` gives the
    same text. Generation stops with reason "stop" as soon as the generated text
    (the prompt is not considered) ends with a stop string, which is left out of
    the result; otherwise the reason is "length".
    """
    stream = iter_sample(
        params,
        vocab,
        prompt,
        max_chars=max_chars,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        rng=rng,
        stop=stop,
        state=state,
    )
    text = "".join(stream)
    reason: FinishReason = stream.finish_reason or "length"  # always set once exhausted
    return text, reason


# --------------------------------------------------------------------------- scoring


def score(params: Weights, ids: IdsLike) -> F64:
    """Natural-log probability of each character given the ones before it.

    logprob[i] = log softmax(Wya a_i + by)[ids[i]], a_i the state after ids[:i]
    (a_0 = 0, so the first character is scored from the empty prefix). All states
    are kept, so the output layer is one (T, n_a) x (n_a, n_y) GEMM.
    """
    return score_from(params, initial_state(params), ids)[0]


def score_from(params: Weights, h: np.ndarray, ids: IdsLike) -> tuple[F64, np.ndarray]:
    """:func:`score` starting from state ``h`` instead of a_0, and the state after ``ids``.

    Scoring a long text piece by piece, each piece from the state the last one
    returned, gives the same numbers as scoring it whole.
    """
    _check_state(params, h)
    idx = _check_ids(params, ids)
    w = InferenceWeights.of(params)
    T = idx.size
    if T == 0:
        return np.empty(0, dtype=np.float64), h.astype(w.dtype, copy=True)
    states = np.empty((T + 1, w.n_a), dtype=w.dtype)  # states[t]: after ids[:t]
    states[0] = h
    np.take(w.emb, idx, axis=0, out=states[1:])
    _recur_inplace(w.WaaT, states[0], states[1:])
    return logprobs_of(w, states[:T], idx), states[T].copy()


@dataclass(frozen=True)
class ScoreSummary:
    """Aggregates of per-character log-probabilities (natural log)."""

    chars: int
    mean_nats: float  # mean negative log-probability per character
    bits_per_char: float
    perplexity: float


def score_summary(logprobs: npt.ArrayLike) -> ScoreSummary:
    """Summarise :func:`score` output; an empty text has no mean, so it is an error."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1:
        raise ValueError(f"logprobs must be 1-D, got shape {lp.shape}")
    if lp.size == 0:
        raise ValueError("text is empty")
    mean_nats = float(-lp.mean())
    return ScoreSummary(
        chars=int(lp.size),
        mean_nats=mean_nats,
        bits_per_char=mean_nats / math.log(2.0),
        perplexity=math.exp(mean_nats),
    )
