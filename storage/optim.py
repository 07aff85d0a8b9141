"""Sparse optimizers on numpy arrays of the touched rows.

All math is float32, like the torch optimizers they mirror. ``g`` is a row's gradient,
``w`` its embedding; products and squares are per element:

* ``sgd``: ``w -= lr * g`` (``torch.optim.SGD`` without momentum or weight decay).
* ``adagrad``: ``acc += g * g``; ``w -= lr * g / (sqrt(acc) + eps)`` per element
  (``torch.optim.Adagrad`` with ``initial_accumulator_value`` and ``eps``, no lr decay).
* ``rowwise_adagrad``: one accumulator per row, ``acc += mean(g * g)`` over the row;
  ``w -= lr * g / (sqrt(acc) + eps)`` (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``).
* ``lazy_adam``: Adam on the touched rows only, each row with its own step count ``t``
  (incremented only when the row is updated)::

      m = beta1 * m + (1 - beta1) * g
      v = beta2 * v + (1 - beta2) * g * g
      t += 1
      w -= lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)

  This is ``torch.optim.SparseAdam``'s arithmetic (``eps`` is added to ``sqrt(v)``, not
  to the bias-corrected ``sqrt(v / (1 - beta2**t))`` as ``torch.optim.Adam`` does), but
  SparseAdam keeps one step count per parameter tensor, incremented on every
  ``step()`` that finds a gradient for the tensor, whichever rows it touches: there, a
  row first touched at the table's step 1000 is corrected with ``t = 1000`` (almost no
  bias correction), here with ``t = 1``. Both agree when every row is touched on every
  step.
* ``partial_rowwise_adam`` (FBGEMM's ``PARTIAL_ROWWISE_ADAM``, with a per-row ``t``):
  ``m`` per element, ``v`` one per row::

      m = beta1 * m + (1 - beta1) * g
      v = beta2 * v + (1 - beta2) * mean(g * g)
      t += 1
      w -= lr * (m / (1 - beta1**t)) / (sqrt(v / (1 - beta2**t)) + eps)

* ``ftrl``: per-coordinate FTRL-proximal (McMahan et al. 2013, Algorithm 1) with
  ``alpha = learning_rate``, ``beta = ftrl_beta``, ``l1 = ftrl_l1``, ``l2 = ftrl_l2``::

      sigma = (sqrt(n + g * g) - sqrt(n)) / alpha
      z += g - sigma * w
      n += g * g
      w = 0                                                  where |z| <= l1
      w = -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)  elsewhere

  The paper starts from ``w = 0``; a new row here starts from its random initial
  embedding (``init_scale = 0`` gives the paper's start), which the first update folds
  into ``z`` through ``- sigma * w``. The weights are recomputed from ``z`` and ``n``
  right after each update (the paper computes them lazily before the next prediction;
  the result is the same). Where the denominator is 0 (only with ``beta = l2 = 0`` while
  every gradient so far squared to 0 in float32) the weight is set to 0, not inf.

State floats per row, in this order inside the row's ``state`` field:

========================  ===============  ==============================================
optimizer                 state floats     layout
========================  ===============  ==============================================
``sgd``                   0
``adagrad``               dim              ``acc``
``rowwise_adagrad``       1                ``acc``
``lazy_adam``             2 * dim + 1      ``m[dim], v[dim], t``
``partial_rowwise_adam``  dim + 2          ``m[dim], v, t``
``ftrl``                  2 * dim          ``z[dim], n[dim]``
========================  ===============  ==============================================

New rows start with AdaGrad accumulators at ``initial_accumulator`` and every other
state float at 0 (``initial_state``).

The step count ``t`` is a float32 like the rest of the row: exact up to ``2**24``
(16,777,216) updates of that row. Beyond, ``t + 1`` rounds back to ``2**24``, so ``t``
saturates and the bias corrections freeze at ``1 - beta**(2**24)``, within 1e-7 of 1
for any ``beta <= 1 - 1e-6``. The bias corrections are computed in float64 from ``t``
and rounded once to float32 (as torch does with its Python-float step size):
``1 - beta2**t`` in float32 is off by ~1e-5 relatively at ``t = 1``, ``beta2 = 0.999``.

Rows whose gradient holds NaN or inf are rejected: neither their weights nor their state
change. So are rows whose update would leave a non-finite weight or state (a finite
gradient above ~1.8e19 overflows ``g * g``). ``apply_sparse`` returns which rows were
applied.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from storage.base import Floats, Mask, SparseOptimizerName, TableConfig
from storage.compiled import kernel


def state_dim(optimizer: SparseOptimizerName, dim: int) -> int:
    """Optimizer state floats per row (see the table in the module docstring)."""
    if optimizer == "sgd":
        return 0
    if optimizer == "adagrad":
        return dim
    if optimizer == "rowwise_adagrad":
        return 1
    if optimizer == "lazy_adam":
        return 2 * dim + 1
    if optimizer == "partial_rowwise_adam":
        return dim + 2
    if optimizer == "ftrl":
        return 2 * dim
    raise ValueError(f"unknown sparse optimizer {optimizer!r}")


def initial_state(cfg: TableConfig) -> float:
    """The value every state float of a new row starts at.

    AdaGrad accumulators start at ``initial_accumulator``; Adam moments and step counts
    and FTRL's ``z`` and ``n`` start at 0 (a nonzero step count or ``n`` would shrink
    the first updates).
    """
    if cfg.optimizer in ("adagrad", "rowwise_adagrad"):
        return cfg.initial_accumulator
    return 0.0


def finite_rows(a: Floats) -> Mask:
    """True for the rows of ``a`` (n, k) that are entirely finite."""
    finite = np.isfinite(a)
    if finite.all():  # the common case, ~8x cheaper than the per-row reduction
        return np.ones(len(a), dtype=np.bool_)
    ok: Mask = np.asarray(finite.all(axis=1), dtype=np.bool_)
    return ok


def sgd_step(w: Floats, g: Floats, lr: float) -> None:
    """In place on ``w`` (n, dim)."""
    w += np.float32(-lr) * g


def adagrad_step(w: Floats, acc: Floats, g: Floats, lr: float, eps: float) -> None:
    """In place on ``w`` and ``acc`` (both (n, dim))."""
    acc += g * g
    w += np.float32(-lr) * (g / (np.sqrt(acc) + np.float32(eps)))


@kernel
def _rowwise_adagrad_rows(
    w: Floats, acc: Floats, g: Floats, lr: np.float32, eps: np.float32, ok: Mask
) -> None:
    """Row-wise AdaGrad in place on ``w`` (n, dim) and ``acc`` (n, 1), both possibly
    strided (fields of packed rows), one pass a row: what ``apply_sparse`` does for the
    other optimizers in ~10 numpy passes and two copies (2x as long). A row whose
    gradient or result is not finite is left as it was and gets ``ok`` False."""
    n, dim = g.shape
    for i in range(n):
        sq = np.float32(0.0)
        for j in range(dim):
            sq += g[i, j] * g[i, j]
        a = acc[i, 0] + sq / np.float32(dim)
        if not np.isfinite(a):  # also a NaN or inf gradient: sq is not finite then
            ok[i] = False
            continue
        # FBGEMM's order: one multiplier per row, then scale the row's gradient.
        mult = lr / (np.sqrt(a) + eps)
        finite = True
        for j in range(dim):
            if not np.isfinite(w[i, j] - mult * g[i, j]):
                finite = False
                break
        if not finite:
            ok[i] = False
            continue
        acc[i, 0] = a
        for j in range(dim):
            w[i, j] -= mult * g[i, j]


def _one_minus_pow(beta: float, t: Floats) -> npt.NDArray[np.float64]:
    """``1 - beta**t`` per row, in float64 (float32 loses digits to cancellation)."""
    out: npt.NDArray[np.float64] = 1.0 - np.power(beta, t.astype(np.float64))
    return out


def lazy_adam_step(
    w: Floats, s: Floats, g: Floats, lr: float, beta1: float, beta2: float, eps: float
) -> None:
    """In place on ``w`` (n, dim) and ``s`` (n, 2 * dim + 1) = ``[m, v, t]``."""
    dim = w.shape[1]
    m, v, t = s[:, :dim], s[:, dim : 2 * dim], s[:, 2 * dim :]
    m *= np.float32(beta1)
    m += np.float32(1.0 - beta1) * g
    v *= np.float32(beta2)
    v += np.float32(1.0 - beta2) * (g * g)
    t += np.float32(1.0)
    # SparseAdam's step size: lr * sqrt(1 - beta2**t) / (1 - beta1**t), one per row.
    step = (lr * np.sqrt(_one_minus_pow(beta2, t)) / _one_minus_pow(beta1, t)).astype(np.float32)
    w -= step * (m / (np.sqrt(v) + np.float32(eps)))


def partial_rowwise_adam_step(
    w: Floats, s: Floats, g: Floats, lr: float, beta1: float, beta2: float, eps: float
) -> None:
    """In place on ``w`` (n, dim) and ``s`` (n, dim + 2) = ``[m, v, t]``."""
    dim = w.shape[1]
    m, v, t = s[:, :dim], s[:, dim : dim + 1], s[:, dim + 1 :]
    m *= np.float32(beta1)
    m += np.float32(1.0 - beta1) * g
    v *= np.float32(beta2)
    v += np.float32(1.0 - beta2) * np.mean(g * g, axis=1, dtype=np.float32, keepdims=True)
    t += np.float32(1.0)
    lr_t = (lr / _one_minus_pow(beta1, t)).astype(np.float32)
    inv_c2 = (1.0 / _one_minus_pow(beta2, t)).astype(np.float32)
    # FBGEMM's order: eps is added to the bias-corrected sqrt(v), one divisor per row.
    w -= (lr_t / (np.sqrt(v * inv_c2) + np.float32(eps))) * m


def ftrl_step(
    w: Floats, s: Floats, g: Floats, alpha: float, beta: float, l1: float, l2: float
) -> None:
    """In place on ``w`` (n, dim) and ``s`` (n, 2 * dim) = ``[z, n]``."""
    dim = w.shape[1]
    z, n = s[:, :dim], s[:, dim:]
    sqrt_old = np.sqrt(n)
    n += g * g
    sqrt_new = np.sqrt(n)
    sigma = (sqrt_new - sqrt_old) / np.float32(alpha)
    z += g - sigma * w
    denom = (np.float32(beta) + sqrt_new) / np.float32(alpha) + np.float32(l2)
    shrunk = z - np.sign(z) * np.float32(l1)
    # |z| <= l1 gives exactly 0 (the L1 sparsity); a 0 denominator gives 0, not inf.
    live = (np.abs(z) > np.float32(l1)) & (denom > 0)
    w[...] = 0
    np.divide(-shrunk, denom, out=w, where=live)


def apply_sparse(cfg: TableConfig, emb: Floats, state: Floats, grads: Floats) -> Mask:
    """Apply ``cfg``'s optimizer to rows with finite gradients; return that mask.

    ``emb`` (n, dim) and ``state`` (n, state_dim) are updated in place (they may be
    strided views, e.g. fields of a packed-row record array); other rows are untouched.
    A row whose update would leave a non-finite weight or state float is left untouched
    and reported False too.
    """
    g = np.asarray(grads, dtype=np.float32)
    if g.shape != emb.shape:
        raise ValueError(f"table {cfg.name!r}: gradient shape {g.shape} != rows shape {emb.shape}")
    if cfg.optimizer == "rowwise_adagrad":
        ok: Mask = np.ones(len(g), dtype=np.bool_)
        rate, eps = np.float32(cfg.learning_rate), np.float32(cfg.eps)
        _rowwise_adagrad_rows(emb, state, np.ascontiguousarray(g), rate, eps, ok)
        return ok
    ok = finite_rows(g)
    idx: npt.NDArray[np.intp] = np.flatnonzero(ok)
    if idx.size == 0:
        return ok
    all_rows = idx.size == len(ok)
    # Work on contiguous copies, then scatter back: the inputs may be strided views, and
    # a row that overflows must be dropped before it reaches them.
    w = np.array(emb if all_rows else emb[idx], dtype=np.float32)
    gi = g if all_rows else g[idx]
    s = np.array(state if all_rows else state[idx], dtype=np.float32)
    lr = cfg.learning_rate
    # Overflowing rows are found and dropped below; no warnings for them.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if cfg.optimizer == "sgd":
            sgd_step(w, gi, lr)
        elif cfg.optimizer == "adagrad":
            adagrad_step(w, s, gi, lr, cfg.eps)
        elif cfg.optimizer == "lazy_adam":
            lazy_adam_step(w, s, gi, lr, cfg.beta1, cfg.beta2, cfg.eps)
        elif cfg.optimizer == "partial_rowwise_adam":
            partial_rowwise_adam_step(w, s, gi, lr, cfg.beta1, cfg.beta2, cfg.eps)
        elif cfg.optimizer == "ftrl":
            ftrl_step(w, s, gi, lr, cfg.ftrl_beta, cfg.ftrl_l1, cfg.ftrl_l2)
        else:
            raise ValueError(f"unknown sparse optimizer {cfg.optimizer!r}")
    good = finite_rows(w) & finite_rows(s)
    if not good.all():
        ok[idx[~good]] = False
        idx, w, s = idx[good], w[good], s[good]
    emb[idx] = w
    if s.shape[1]:
        state[idx] = s
    return ok


def _load_kernels() -> None:
    """Run each kernel once (see ``storage.compiled``): on packed rows' fields, as the
    store calls it, and on plain arrays."""
    packed = np.zeros(2, dtype=[("emb", np.float32, (2,)), ("state", np.float32, (1,))])
    cfg = TableConfig(name="warm-up", dim=2, optimizer="rowwise_adagrad")
    grads = np.ones((2, 2), dtype=np.float32)
    apply_sparse(cfg, packed["emb"], packed["state"], grads)
    apply_sparse(cfg, np.zeros((2, 2), np.float32), np.zeros((2, 1), np.float32), grads)


_load_kernels()
