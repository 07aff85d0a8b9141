"""Sparse optimizers on numpy arrays of the touched rows.

All math is float32, like the torch optimizers they mirror:

* ``sgd``: ``w -= lr * g`` (``torch.optim.SGD`` without momentum or weight decay).
* ``adagrad``: ``acc += g * g``; ``w -= lr * g / (sqrt(acc) + eps)`` per element
  (``torch.optim.Adagrad`` with ``initial_accumulator_value`` and ``eps``, no lr decay).
* ``rowwise_adagrad``: one accumulator per row, ``acc += mean(g * g)`` over the row;
  ``w -= lr * g / (sqrt(acc) + eps)`` (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``).

Rows whose gradient holds NaN or inf are rejected: neither their weights nor their state
change. ``apply_sparse`` returns which rows were applied.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from storage.base import Floats, Mask, SparseOptimizerName, TableConfig


def state_dim(optimizer: SparseOptimizerName, dim: int) -> int:
    """Optimizer state floats per row."""
    if optimizer == "sgd":
        return 0
    if optimizer == "adagrad":
        return dim
    if optimizer == "rowwise_adagrad":
        return 1
    raise ValueError(f"unknown sparse optimizer {optimizer!r}")


def finite_rows(grads: Floats) -> Mask:
    """True for the rows whose gradient is entirely finite."""
    ok: Mask = np.asarray(np.isfinite(grads).all(axis=1), dtype=np.bool_)
    return ok


def sgd_step(w: Floats, g: Floats, lr: float) -> None:
    """In place on ``w`` (n, dim)."""
    w += np.float32(-lr) * g


def adagrad_step(w: Floats, acc: Floats, g: Floats, lr: float, eps: float) -> None:
    """In place on ``w`` and ``acc`` (both (n, dim))."""
    acc += g * g
    w += np.float32(-lr) * (g / (np.sqrt(acc) + np.float32(eps)))


def rowwise_adagrad_step(w: Floats, acc: Floats, g: Floats, lr: float, eps: float) -> None:
    """In place on ``w`` (n, dim) and ``acc`` (n, 1)."""
    acc += np.mean(g * g, axis=1, dtype=np.float32, keepdims=True)
    # FBGEMM's order: one multiplier per row, then scale the row's gradient.
    w -= (np.float32(lr) / (np.sqrt(acc) + np.float32(eps))) * g


def apply_sparse(cfg: TableConfig, emb: Floats, state: Floats, grads: Floats) -> Mask:
    """Apply ``cfg``'s optimizer to rows with finite gradients; return that mask.

    ``emb`` (n, dim) and ``state`` (n, state_dim) are updated in place (they may be
    strided views, e.g. fields of a packed-row record array); other rows are untouched.
    """
    g = np.asarray(grads, dtype=np.float32)
    if g.shape != emb.shape:
        raise ValueError(f"table {cfg.name!r}: gradient shape {g.shape} != rows shape {emb.shape}")
    ok = finite_rows(g)
    idx: npt.NDArray[np.intp] = np.flatnonzero(ok)
    if idx.size == 0:
        return ok
    all_rows = idx.size == len(ok)
    # Work on contiguous copies, then scatter back: the inputs may be strided views.
    w = np.array(emb if all_rows else emb[idx], dtype=np.float32)
    gi = g if all_rows else g[idx]
    if cfg.optimizer == "sgd":
        sgd_step(w, gi, cfg.learning_rate)
    else:
        s = np.array(state if all_rows else state[idx], dtype=np.float32)
        if cfg.optimizer == "adagrad":
            adagrad_step(w, s, gi, cfg.learning_rate, cfg.eps)
        elif cfg.optimizer == "rowwise_adagrad":
            rowwise_adagrad_step(w, s, gi, cfg.learning_rate, cfg.eps)
        else:
            raise ValueError(f"unknown sparse optimizer {cfg.optimizer!r}")
        state[idx] = s
    emb[idx] = w
    return ok
