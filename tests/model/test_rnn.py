"""The BPTT gradients against centred finite differences, and float32 against float64."""

from __future__ import annotations

import numpy as np
import pytest

from model.params import PARAM_NAMES, Params, init_params
from model.rnn import Workspace, loss_and_grads, loss_only

V, H, B, T = 7, 5, 3, 6


def tiny_problem(seed: int = 0) -> tuple[Params, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = init_params(H, V, rng, "float64")
    # Spread the weights so every gradient element is far from zero.
    params.flat[...] = rng.standard_normal(params.flat.size) * 0.5
    X = rng.integers(0, V, (T, B))
    Y = rng.integers(0, V, (T, B))
    h0 = rng.standard_normal((B, H)) * 0.5
    return params, X, Y, h0


def reference_loss(params: Params, X: np.ndarray, Y: np.ndarray, h0: np.ndarray) -> float:
    """The seed's equations, one column vector and one one-hot character at a time."""
    eye = np.eye(V)
    total = 0.0
    for b in range(B):
        a = h0[b][:, None]  # (n_a, 1)
        for t in range(T):
            x = eye[X[t, b]][:, None]  # one-hot of the character, not of t
            a = np.tanh(params.Waa @ a + params.Wax @ x + params.ba)
            z = params.Wya @ a + params.by
            y_hat = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            total -= np.log(y_hat[Y[t, b], 0])
    return total / (T * B)


def test_loss_matches_the_equations_written_out() -> None:
    params, X, Y, h0 = tiny_problem()
    loss, _, h_last = loss_and_grads(params, X, Y, h0)
    assert loss == pytest.approx(reference_loss(params, X, Y, h0), rel=1e-12)
    assert loss_only(params, X, Y, h0)[0] == pytest.approx(loss, rel=1e-12)


def test_gradients_match_centred_finite_differences() -> None:
    params, X, Y, h0 = tiny_problem()
    _, grads, _ = loss_and_grads(params, X, Y, h0)
    analytic = grads.flat.copy()
    numeric = np.empty_like(analytic)
    eps = 1e-5
    for i in range(params.flat.size):
        saved = params.flat[i]
        params.flat[i] = saved + eps
        plus, _ = loss_only(params, X, Y, h0)
        params.flat[i] = saved - eps
        minus, _ = loss_only(params, X, Y, h0)
        params.flat[i] = saved
        numeric[i] = (plus - minus) / (2 * eps)
    rel = np.abs(analytic - numeric) / np.maximum(np.abs(analytic) + np.abs(numeric), 1e-12)
    # every element of all five parameters is covered
    sizes = [getattr(params, n).size for n in PARAM_NAMES]
    assert sum(sizes) == analytic.size
    assert rel.max() < 1e-6, f"max relative error {rel.max():.2e} at flat index {rel.argmax()}"


def test_gradients_do_not_depend_on_workspace_reuse() -> None:
    params, X, Y, h0 = tiny_problem()
    ws = Workspace.for_batch(params, T, B)
    _, g1, _ = loss_and_grads(params, X, Y, h0, ws)
    first = g1.flat.copy()
    other = tiny_problem(seed=1)
    loss_and_grads(params, other[1], other[2], other[3], ws)
    _, g2, _ = loss_and_grads(params, X, Y, h0, ws)
    np.testing.assert_array_equal(first, g2.flat)


def test_inputs_are_not_modified() -> None:
    params, X, Y, h0 = tiny_problem()
    before = (params.flat.copy(), X.copy(), Y.copy(), h0.copy())
    loss_and_grads(params, X, Y, h0)
    for a, b in zip(before, (params.flat, X, Y, h0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_float32_path_matches_float64() -> None:
    rng = np.random.default_rng(3)
    p64 = init_params(32, 20, rng, "float64")
    p32 = p64.copy("float32")
    X = rng.integers(0, 20, (16, 8))
    Y = rng.integers(0, 20, (16, 8))
    h0 = rng.standard_normal((8, 32)) * 0.3
    l64, g64, a64 = loss_and_grads(p64, X, Y, h0)
    l32, g32, a32 = loss_and_grads(p32, X, Y, h0.astype(np.float32))
    assert g32.flat.dtype == np.float32 and a32.dtype == np.float32
    assert l32 == pytest.approx(l64, rel=1e-5)
    np.testing.assert_allclose(a32, a64, atol=1e-5)
    scale = np.abs(g64.flat).max()
    np.testing.assert_allclose(g32.flat, g64.flat, atol=1e-5 * scale, rtol=1e-4)


def test_last_state_is_the_state_after_the_chunk() -> None:
    params, X, Y, h0 = tiny_problem()
    _, _, whole = loss_and_grads(params, X, Y, h0)
    whole = whole.copy()
    _, mid = loss_only(params, X[:3], Y[:3], h0)
    _, end = loss_only(params, X[3:], Y[3:], mid.copy())
    np.testing.assert_allclose(end, whole, rtol=1e-12)


def test_bad_shapes_are_rejected() -> None:
    params, X, Y, h0 = tiny_problem()
    with pytest.raises(ValueError, match="h0 must have shape"):
        loss_and_grads(params, X, Y, h0[:, :2])
    with pytest.raises(ValueError, match=r"\(T, B\)"):
        loss_and_grads(params, X[0], Y[0], h0)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_large_logits_take_the_shifted_softmax_and_stay_exact(scale: float) -> None:
    """Below a bound on the logits the softmax skips subtracting each row's maximum;
    above it (Wya scaled up: logits far past exp's float32 range) it must not, and both
    paths match the written-out equations, in float64 and float32."""
    from model.rnn import _needs_shift

    params, X, Y, h0 = tiny_problem(3)
    params.Wya[...] *= scale
    params.by[...] *= scale
    assert _needs_shift(params) == (scale > 1)
    expected = reference_loss(params, X, Y, h0)
    assert loss_and_grads(params, X, Y, h0)[0] == pytest.approx(expected, rel=1e-12)
    single = params.copy("float32")
    loss32, grads32, _ = loss_and_grads(single, X, Y, h0.astype(np.float32))
    assert loss32 == pytest.approx(expected, rel=1e-4)
    assert np.isfinite(grads32.flat).all()
