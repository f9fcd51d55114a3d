"""Upper estimates of the memory a model and its training take, from the hyperparameters alone.

The service bounds jobs *before* accepting them: a job whose training would not
fit must be refused with a clear error at ``POST /jobs``, not killed by the
kernel an hour later. So these are pure functions of the shapes (no I/O, no
allocation), each an upper estimate of the arrays the code in model/ allocates
at its peak, within a small factor of what it really allocates (measured with
tracemalloc in tests/model/test_memory.py: 1.05-1.5 times the real peak).

Counted (``training_bytes``), at the worst moment of a run:

- the weights, their gradient, the optimizer's state vectors and its two
  scratch vectors (model/optim.py), the best-validation copy (and the new copy
  while it replaces the old one), the carried hidden state (B, n_a);
- the two shards' training workspaces (model/rnn.py ``Workspace``: hs, pre, dh,
  probs and one_hot of (T*B/2, V), gradients, ...) and what one step allocates
  on top (the chunk's index arrays, the shard copies of X, Y and h0, float64
  loss terms); for the process back-end (model/shards.py) the shared-memory
  block, and the child's workspace (its half of the batch, counted like the
  thread back-end's);
- the validation pass (model/train.py ``evaluate``: T = 128 and up to 128
  streams, split between two threads, each with its own Workspace, and a
  second, shorter one for the last chunk: their probs and one_hot of
  (128*64, V) dominate when V is large), or a resume checkpoint being written,
  whichever is bigger;
- the start: initialisation in float64 (with a QR of (n_a, n_a)) and the
  optimizer built twice, or reading a resume checkpoint.

Not counted: the corpus. The caller adds it: the text itself, and about 25
bytes per character while it is encoded (UTF-32 copy, search indices), of
which 4 stay (the int32 ids; validation and training are views of them).
Nor the Python interpreters (the process back-end's child is a second one),
thread stacks, or BLAS's own buffers: fixed costs, not proportional to the job.
"""

from __future__ import annotations

import numpy as np

from .optim import init_state
from .params import flat_size
from .shards import _layout, _Shared, shard_slices

EVAL_T = 128  # model/train.py evaluate's defaults
EVAL_B = 128
# Python objects a run creates (thread pool, generators, events, small arrays).
_FIXED = 256 * 1024


def model_bytes(n_a: int, n_x: int, dtype: str) -> int:
    """The five parameters (model/params.py: one flat vector)."""
    return flat_size(n_a, n_x) * np.dtype(dtype).itemsize


def training_bytes(
    n_a: int,
    n_x: int,
    seq_length: int,
    batch_size: int,
    dtype: str,
    optimizer: str,
    *,
    train_chars: int | None = None,
    val_chars: int | None = None,
) -> int:
    """Upper estimate of the peak bytes a training run allocates, the corpus excluded.

    train_chars, val_chars: the sizes of the split (model/data.py ``split_lengths``), when
    known. A short training part shrinks B, a short validation part the validation pass;
    without them the estimate assumes the configured B and the largest validation pass.
    """
    s = np.dtype(dtype).itemsize
    H, V, T, B = n_a, n_x, seq_length, batch_size
    if train_chars is not None:
        B = max(1, min(B, (train_chars - 1) // T))  # data.Streams.fit
    weights = model_bytes(H, V, dtype)
    k = len(init_state(optimizer, 0, np.dtype(dtype)))  # state vectors: adam 2, adagrad 1
    hidden = B * H * s
    state_file = (k + 2) * weights + hidden + 64 * 1024  # weights, best, optimizer, meta

    shards = [sl.stop - sl.start for sl in shard_slices(B)]
    run = (
        weights  # the weights
        + (k + 2) * weights  # optimizer state and scratch
        + weights  # best-validation copy
        + weights + hidden  # the combined gradient and last hidden state
        + hidden  # TrainState.hidden
        + sum(_workspace(T, b, H, V, s) for b in shards)
        + (_Shared.size(_layout(H, V, T, B, dtype)) if len(shards) == 2 else 0)
    )  # fmt: skip
    step = (
        24 * T * B  # positions, positions + 1, X, Y (model/data.py Streams.chunk)
        + 8 * T * B + hidden  # each shard's contiguous copy of X, Y and h0
        + sum(_pass(T, b, H, V, s) for b in shards)
        + weights  # w * g while combining
    )  # fmt: skip
    checkpoint = 3 * state_file // 2  # save_state: validated copies and the bytes
    peak_run = run + max(step, _evaluation(H, V, s, val_chars), weights, checkpoint)

    start_fresh = (
        weights
        + hidden
        + max(
            8 * flat_size(H, V) + 48 * H * H + 16 * H * V,  # float64 init_params with its QR
            2 * (k + 2) * weights,  # the optimizer is built twice
        )
    )
    start_resume = 3 * state_file + (k + 2) * weights  # bytes, arrays, copies; the optimizer
    return max(peak_run, start_fresh, start_resume) + _FIXED


def _evaluation(H: int, V: int, s: int, val_chars: int | None) -> int:
    """model/train.py evaluate: its streams in two halves, each with its own workspaces."""
    if val_chars is None:
        B, last = EVAL_B, EVAL_T  # the largest pass, a second workspace as big
    elif val_chars < 2:
        return 0  # no validation
    else:
        B = max(1, min(EVAL_B, (val_chars - 1) // EVAL_T))
        L = (val_chars - 1) // B  # stream length: chunks of EVAL_T, then the rest
        last = L if L < EVAL_T else L % EVAL_T  # a second workspace for a shorter chunk
    halves = [b for b in (B - B // 2, B // 2) if b]
    return sum(
        _workspace(EVAL_T, b, H, V, s)
        + (_workspace(last, b, H, V, s) if last else 0)
        + b * H * s  # the carried state
        + 24 * EVAL_T * b  # positions and indices
        + _pass(EVAL_T, b, H, V, s)
        for b in halves
    )


def _workspace(T: int, B: int, H: int, V: int, s: int) -> int:
    """model/rnn.py Workspace: hs, pre, dh, carry; probs, one_hot; grads; the two
    transposed weights; rows (int64)."""
    return s * ((3 * T + 2) * B * H + 2 * T * B * V + flat_size(H, V) + H * H + H * V) + 8 * T * B


def _pass(T: int, B: int, H: int, V: int, s: int) -> int:
    """What one loss_and_grads/loss_only call allocates beyond its workspace.

    int32 indices converted to intp for the fancy indexing; row maxima and sums; the
    float64 picked logits, sums and logs of the loss (the transposed weights are the
    workspace's, and np.take writes in place: mode="clip").
    """
    N = T * B
    return s * 2 * N + 40 * N
