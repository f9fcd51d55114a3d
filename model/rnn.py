"""Forward pass, loss and backpropagation through time for the basic RNN.

    a_t = tanh(Waa a_{t-1} + Wax x_t + ba)      x_t = one_hot(char_t)
    y_t = softmax(Wya a_t + by)
    loss = mean over all (t, b) of -log y_t[target_t]

Pure functions over arrays: no I/O, no globals, the caller's arrays are never
modified. Internally batch-major: hidden states are (T, B, n_a) so that every
per-time-step product is one (B, n_a) x (n_a, n_a) GEMM and everything that does
not depend on the recurrence (input gather, output layer, softmax, weight
gradients) is one whole-sequence operation over all T*B positions.

``Wax @ one_hot(x)`` is column ``x`` of Wax, so the input layer is a gather,
never a multiplication by one-hot vectors.

A :class:`Workspace` holds preallocated buffers; passing the same one to every
call keeps the hot path free of large temporaries. The arrays a call returns
(gradients, hidden states) live in the workspace and are overwritten by the
next call that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .params import Params


@dataclass
class Workspace:
    """Scratch buffers for one (T, B, n_a, n_x, dtype) shape; grown on demand."""

    T: int
    B: int
    n_a: int
    n_x: int
    dtype: np.dtype[np.floating]
    hs: np.ndarray = field(init=False)  # (T+1, B, n_a)  hs[0] = a_0, hs[t+1] = a_t
    pre: np.ndarray = field(init=False)  # (T, B, n_a)  input part of pre-activation, then dz
    dh: np.ndarray = field(init=False)  # (T, B, n_a)  dloss/da_t from the output layer
    probs: np.ndarray = field(init=False)  # (T*B, n_x)  logits, then softmax, then dlogits
    one_hot: np.ndarray = field(init=False)  # (T*B, n_x)  only for the Wax gradient
    grads: Params = field(init=False)
    rows: np.ndarray = field(init=False)  # (T*B,)  0..T*B-1
    carry: np.ndarray = field(init=False)  # (B, n_a)
    WaaT: np.ndarray = field(init=False)  # (n_a, n_a)  Waa transposed, contiguous
    WaxT: np.ndarray = field(init=False)  # (n_x, n_a)  Wax transposed, contiguous

    def __post_init__(self) -> None:
        T, B, H, V, dt = self.T, self.B, self.n_a, self.n_x, self.dtype
        self.hs = np.empty((T + 1, B, H), dt)
        self.pre = np.empty((T, B, H), dt)
        self.dh = np.empty((T, B, H), dt)
        self.probs = np.empty((T * B, V), dt)
        self.one_hot = np.zeros((T * B, V), dt)
        self.grads = Params.zeros(H, V, dt)
        self.rows = np.arange(T * B)
        self.carry = np.empty((B, H), dt)
        self.WaaT = np.empty((H, H), dt)
        self.WaxT = np.empty((V, H), dt)

    @classmethod
    def for_batch(cls, params: Params, T: int, B: int) -> Workspace:
        return cls(T, B, params.n_a, params.n_x, params.dtype)

    def fits(self, params: Params, T: int, B: int) -> bool:
        return (self.T, self.B, self.n_a, self.n_x) == (
            T,
            B,
            params.n_a,
            params.n_x,
        ) and self.dtype == params.dtype


def _workspace(ws: Workspace | None, params: Params, T: int, B: int) -> Workspace:
    if ws is not None and ws.fits(params, T, B):
        return ws
    return Workspace.for_batch(params, T, B)


def _check_batch(params: Params, X: np.ndarray, h0: np.ndarray) -> tuple[int, int]:
    if X.ndim != 2:
        raise ValueError(f"inputs must be (T, B) character indices, got shape {X.shape}")
    T, B = X.shape
    if h0.shape != (B, params.n_a):
        raise ValueError(f"h0 must have shape {(B, params.n_a)}, got {h0.shape}")
    return T, B


def recur(
    params: Params, X: np.ndarray, h0: np.ndarray, ws: Workspace, *, keep_slope: bool = False
) -> np.ndarray:
    """Run the recurrence; returns ws.hs (T+1, B, n_a) with hs[0] = h0.

    ``keep_slope``: leave tanh's slope ``1 - a_t**2`` in ``ws.pre[t]`` (BPTT needs it),
    computed while a_t is still in cache instead of in two more passes over (T, B, n_a).
    """
    T, B = X.shape
    hs, pre = ws.hs, ws.pre
    hs[0] = h0
    # Input layer: Wax @ one_hot(x) + ba is a row gather from Wax^T, for all T*B at once.
    # mode="clip": with the default "raise" and ``out``, numpy gathers into a temporary
    # and copies (4x slower here); the indices are a vocabulary's, in range.
    np.copyto(ws.WaxT, params.Wax.T)
    np.take(ws.WaxT, X.reshape(-1), axis=0, out=pre.reshape(T * B, -1), mode="clip")
    pre += params.ba[:, 0]
    # A contiguous copy, not the transposed view: on Skylake-SP OpenBLAS runs the
    # (B, n_a) x (n_a, n_a) step ~1.5x faster on it (docs/benchmarks.md); H^2 to copy.
    WaaT = ws.WaaT
    np.copyto(WaaT, params.Waa.T)
    for t in range(T):
        a, p = hs[t + 1], pre[t]
        np.dot(hs[t], WaaT, out=a)  # (B, n_a)
        a += p
        np.tanh(a, out=a)
        if keep_slope:  # p is spent: it becomes 1 - a^2
            np.multiply(a, a, out=p)
            np.subtract(1.0, p, out=p)
    return hs


def _logits(params: Params, hs_flat: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.dot(hs_flat, params.Wya.T, out=out)  # (T*B, n_x)
    out += params.by[:, 0]
    return out


# exp() of a float32 logit stays finite and normal for |logit| < 80. Every hidden value
# is a tanh, in [-1, 1], so no logit exceeds its row's L1 norm of Wya plus |by|: below
# this bound the per-row maximum need not be found and subtracted (two passes saved).
SAFE_LOGIT = 60.0


def _needs_shift(params: Params) -> bool:
    bound = np.abs(params.Wya).sum(axis=1).max() + np.abs(params.by).max()
    return not bool(bound < SAFE_LOGIT)  # NaN weights: take the careful path


def _log_softmax_loss(
    logits: np.ndarray, targets: np.ndarray, rows: np.ndarray, shift: bool, scale: float = 1.0
) -> tuple[float, np.ndarray]:
    """Mean cross-entropy; turns ``logits`` into ``scale`` * softmax probabilities in place.

    ``shift``: subtract each row's maximum first (needed only when a logit could be
    large: ``_needs_shift``)."""
    if shift:
        logits -= logits.max(axis=1, keepdims=True)
    picked = logits[rows, targets].astype(np.float64)
    np.exp(logits, out=logits)
    sums = logits.sum(axis=1, keepdims=True)
    loss = float(np.log(sums[:, 0].astype(np.float64)).sum() - picked.sum()) / len(rows)
    np.divide(scale, sums, out=sums)
    logits *= sums
    return loss, logits


def loss_and_grads(
    params: Params,
    X: np.ndarray,
    Y: np.ndarray,
    h0: np.ndarray,
    ws: Workspace | None = None,
) -> tuple[float, Params, np.ndarray]:
    """Mean loss in nats per character, its gradients, and the last hidden state.

    X, Y: (T, B) integer character indices (Y is X shifted by one character).
    h0: (B, n_a) hidden state carried in from the previous chunk; treated as a
    constant (truncated BPTT). Returns (loss, grads, a_T); grads and a_T live in
    the workspace.
    """
    T, B = _check_batch(params, X, h0)
    ws = _workspace(ws, params, T, B)
    N = T * B
    hs = recur(params, X, h0, ws, keep_slope=True)
    h_flat = hs[1:].reshape(N, -1)  # (T*B, n_a)  a_1..a_T
    rows = ws.rows[:N]
    targets = Y.reshape(-1)
    # dloss/dlogits = (softmax - one_hot(target)) / N, the 1/N folded into the softmax
    logits = _logits(params, h_flat, ws.probs)
    loss, probs = _log_softmax_loss(logits, targets, rows, _needs_shift(params), 1.0 / N)
    probs[rows, targets] -= 1.0 / N

    g = ws.grads
    np.dot(probs.T, h_flat, out=g.Wya)  # (n_y, n_a)
    np.sum(probs, axis=0, out=g.by[:, 0])
    dh = ws.dh
    np.dot(probs, params.Wya, out=dh.reshape(N, -1))  # (T*B, n_a) from the output layer

    # dz_t = (dh_t + dz_{t+1} Waa) * (1 - a_t^2); `pre` holds (1 - a^2), then dz.
    dz = ws.pre
    carry = ws.carry
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            np.dot(dz[t + 1], params.Waa, out=carry)  # (B, n_a)
            dh[t] += carry
        dz[t] *= dh[t]
    dz_flat = dz.reshape(N, -1)
    np.dot(dz_flat.T, hs[:-1].reshape(N, -1), out=g.Waa)  # sum_t dz_t^T a_{t-1}
    # Wax gradient: column x accumulates dz at every position whose input is x.
    one_hot = ws.one_hot
    one_hot[rows, X.reshape(-1)] = 1.0
    np.dot(dz_flat.T, one_hot, out=g.Wax)  # (n_a, n_x)
    one_hot[rows, X.reshape(-1)] = 0.0
    # Every position has exactly one input, so the sum of dz over positions is the sum
    # of dWax's columns: (n_a, n_x) to add instead of another pass over (T*B, n_a).
    np.sum(g.Wax, axis=1, out=g.ba[:, 0])
    return loss, g, hs[T]


def loss_only(
    params: Params,
    X: np.ndarray,
    Y: np.ndarray,
    h0: np.ndarray,
    ws: Workspace | None = None,
) -> tuple[float, np.ndarray]:
    """Mean loss in nats per character and the last hidden state (no gradients)."""
    T, B = _check_batch(params, X, h0)
    ws = _workspace(ws, params, T, B)
    N = T * B
    hs = recur(params, X, h0, ws)
    logits = _logits(params, hs[1:].reshape(N, -1), ws.probs)
    loss, _ = _log_softmax_loss(logits, Y.reshape(-1), ws.rows[:N], _needs_shift(params))
    return loss, hs[T]
