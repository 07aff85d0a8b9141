"""Property tests: numpy sparse optimizers vs torch, feature key hashing, the row codec."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from storage.base import RowFormatError, SparseOptimizerName, TableConfig
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.optim import apply_sparse, initial_state, state_dim
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import TieredStore

SETTINGS = settings(max_examples=60, deadline=None)

finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)

Steps = list[tuple[np.ndarray, np.ndarray]]
"""Per step: the unique touched rows (sorted) and their gradients."""

ALL_OPTIMIZERS: tuple[SparseOptimizerName, ...] = get_args(SparseOptimizerName)


@st.composite
def sparse_problem(draw: st.DrawFn) -> tuple[np.ndarray, Steps]:
    """A (vocab, dim) weight matrix and 1-3 steps of (unique touched rows, their grads)."""
    vocab = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 6))
    weights = draw(hnp.arrays(np.float32, (vocab, dim), elements=finite))
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        touched = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=vocab, unique=True))
        idx = np.array(sorted(touched), dtype=np.intp)
        grads = draw(hnp.arrays(np.float32, (len(idx), dim), elements=finite))
        steps.append((idx, grads))
    return weights, steps


def run_numpy(cfg: TableConfig, weights: np.ndarray, steps: Steps) -> tuple[np.ndarray, np.ndarray]:
    """Our optimizer over the steps; returns the weights and the state. Rows with a
    non-finite gradient must come back rejected."""
    w = weights.copy()
    state = np.full((len(w), state_dim(cfg.optimizer, w.shape[1])), initial_state(cfg))
    state = state.astype(np.float32)
    for idx, grads in steps:
        emb, st_ = w[idx], state[idx]
        ok = apply_sparse(cfg, emb, st_, grads)
        assert np.array_equal(ok, np.isfinite(grads).all(axis=1))
        w[idx], state[idx] = emb, st_
    return w, state


def run_torch(
    cfg: TableConfig, weights: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    param = torch.nn.Parameter(torch.from_numpy(weights.copy()))
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD([param], lr=cfg.learning_rate)
    else:
        opt = torch.optim.Adagrad(
            [param],
            lr=cfg.learning_rate,
            initial_accumulator_value=cfg.initial_accumulator,
            eps=cfg.eps,
        )
    for idx, grads in steps:
        dense = torch.zeros_like(param)
        dense[torch.from_numpy(idx)] = torch.from_numpy(grads)
        param.grad = dense
        opt.step()
    return param.detach().numpy()


def run_torch_rowwise(
    cfg: TableConfig, weights: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    """FBGEMM's row-wise AdaGrad, written out in torch for the touched rows."""
    w = torch.from_numpy(weights.copy())
    acc = torch.full((len(w),), cfg.initial_accumulator, dtype=torch.float32)
    for idx_np, grads_np in steps:
        idx, g = torch.from_numpy(idx_np), torch.from_numpy(grads_np)
        acc[idx] += (g * g).mean(dim=1)
        w[idx] -= (cfg.learning_rate / (acc[idx].sqrt() + cfg.eps)).unsqueeze(1) * g
    return w.numpy()


optimizers = st.sampled_from(["sgd", "adagrad", "rowwise_adagrad"])


@SETTINGS
@given(
    problem=sparse_problem(),
    optimizer=optimizers,
    lr=st.floats(1e-3, 1.0),
    acc0=st.sampled_from([0.0, 0.1, 1.0]),
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
)
def test_optimizers_match_torch(
    problem: tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]],
    optimizer: SparseOptimizerName,
    lr: float,
    acc0: float,
    eps: float,
) -> None:
    weights, steps = problem
    cfg = TableConfig(
        name="t",
        dim=weights.shape[1],
        optimizer=optimizer,
        learning_rate=lr,
        initial_accumulator=acc0,
        eps=eps,
    )
    ours, _ = run_numpy(cfg, weights, steps)
    if optimizer == "rowwise_adagrad":
        ref = run_torch_rowwise(cfg, weights, steps)
    else:
        ref = run_torch(cfg, weights, steps)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    untouched = np.setdiff1d(np.arange(len(weights)), np.concatenate([i for i, _ in steps]))
    assert np.array_equal(ours[untouched], weights[untouched])


@SETTINGS
@given(
    problem=sparse_problem(),
    optimizer=st.sampled_from(ALL_OPTIMIZERS),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    data=st.data(),
)
def test_non_finite_rows_are_rejected(
    problem: tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]],
    optimizer: SparseOptimizerName,
    bad: float,
    data: st.DataObject,
) -> None:
    weights, steps = problem
    idx, grads = steps[0]
    cfg = TableConfig(name="t", dim=weights.shape[1], optimizer=optimizer, learning_rate=0.1)
    poisoned = data.draw(st.lists(st.integers(0, len(idx) - 1), min_size=1, unique=True))
    col = data.draw(st.integers(0, weights.shape[1] - 1))
    grads = grads.copy()
    grads[poisoned, col] = bad
    emb = weights[idx].copy()
    state = np.full((len(idx), state_dim(optimizer, weights.shape[1])), 0.5, np.float32)
    state_before = state.copy()
    ok = apply_sparse(cfg, emb, state, grads)
    assert np.flatnonzero(~ok).tolist() == sorted(poisoned)
    assert np.array_equal(emb[~ok], weights[idx][~ok])
    assert np.array_equal(state[~ok], state_before[~ok])
    assert np.isfinite(emb).all() and np.isfinite(state).all()


def test_apply_sparse_checks_shapes() -> None:
    cfg = TableConfig(name="t", dim=2, optimizer="sgd")
    with pytest.raises(ValueError, match="'t'"):
        apply_sparse(
            cfg,
            np.zeros((2, 2), np.float32),
            np.zeros((2, 0), np.float32),
            np.zeros((3, 2), np.float32),
        )


# -- lazy Adam, partial row-wise Adam, FTRL ---------------------------------------------

BETAS = st.sampled_from([(0.9, 0.999), (0.0, 0.5), (0.5, 0.9), (0.99, 0.9999)])
BAD = st.sampled_from([np.nan, np.inf, -np.inf])


def poison(data: st.DataObject, steps: Steps) -> tuple[Steps, Steps]:
    """``steps`` with a NaN or inf in some rows' gradients (maybe none), and the steps a
    reference sees: the same without those rows, since a rejected row is not touched."""
    poisoned: Steps = []
    clean: Steps = []
    for idx, grads in steps:
        bad_rows = data.draw(st.lists(st.integers(0, len(idx) - 1), unique=True))
        g = grads.copy()
        for r in bad_rows:
            g[r, data.draw(st.integers(0, g.shape[1] - 1))] = data.draw(BAD)
        keep = np.ones(len(idx), dtype=np.bool_)
        keep[bad_rows] = False
        poisoned.append((idx, g))
        if keep.any():
            clean.append((idx[keep], grads[keep]))
    return poisoned, clean


def assert_untouched(
    cfg: TableConfig, weights: np.ndarray, clean: Steps, ours: np.ndarray, state: np.ndarray
) -> None:
    """Rows no applied update reached keep their weights and initial state, bit-exact."""
    touched = np.concatenate([i for i, _ in clean]) if clean else np.zeros(0, np.intp)
    untouched = np.setdiff1d(np.arange(len(weights)), touched)
    assert ours[untouched].tobytes() == weights[untouched].tobytes()
    assert (state[untouched] == np.float32(initial_state(cfg))).all()


def run_torch_lazy_adam(
    cfg: TableConfig, weights: np.ndarray, steps: Steps
) -> tuple[np.ndarray, np.ndarray]:
    """Lazy Adam with a step count per row is ``torch.optim.SparseAdam`` over one
    parameter per row: SparseAdam keeps one step count per parameter, and a parameter
    without a gradient is skipped, its count included. Returns weights and state."""
    dim = weights.shape[1]
    rows = [
        torch.nn.Parameter(torch.from_numpy(weights[i : i + 1].copy())) for i in range(len(weights))
    ]
    opt: torch.optim.Optimizer = torch.optim.SparseAdam(
        rows, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    at_row0 = torch.zeros((1, 1), dtype=torch.long)
    for idx, grads in steps:
        for p in rows:
            p.grad = None
        for i, g in zip(idx.tolist(), grads, strict=True):
            values = torch.from_numpy(g[None].copy())
            rows[i].grad = torch.sparse_coo_tensor(at_row0, values, (1, dim), check_invariants=True)
        opt.step()
    state = np.zeros((len(rows), 2 * dim + 1), np.float32)
    for i, p in enumerate(rows):
        s = opt.state[p]
        if s:
            state[i, :dim] = s["exp_avg"][0].numpy()
            state[i, dim : 2 * dim] = s["exp_avg_sq"][0].numpy()
            state[i, 2 * dim] = s["step"]
    return torch.cat([p.detach() for p in rows]).numpy(), state


def run_torch_partial_rowwise_adam(
    cfg: TableConfig, weights: np.ndarray, steps: Steps
) -> tuple[np.ndarray, np.ndarray]:
    """FBGEMM's PARTIAL_ROWWISE_ADAM, one row at a time in torch, with a step count per
    row in place of FBGEMM's global ``iter``. Returns weights and state."""
    w = torch.from_numpy(weights.copy())
    n, dim = w.shape
    m, v, t = torch.zeros(n, dim), torch.zeros(n), [0] * n
    b1, b2 = cfg.beta1, cfg.beta2
    for idx, grads in steps:
        for i, g in zip(idx.tolist(), torch.from_numpy(grads), strict=True):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * (g * g).mean()
            t[i] += 1
            m_hat = m[i] / (1 - b1 ** t[i])
            v_hat = v[i] / (1 - b2 ** t[i])
            w[i] -= cfg.learning_rate * m_hat / (v_hat.sqrt() + cfg.eps)
    steps_col = torch.tensor(t, dtype=torch.float32)[:, None]
    return w.numpy(), torch.cat([m, v[:, None], steps_col], dim=1).numpy()


def run_ftrl_reference(
    cfg: TableConfig, weights: np.ndarray, steps: Steps
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-coordinate FTRL-proximal (McMahan et al. 2013, Algorithm 1), one coordinate at
    a time in float64, starting from ``weights``. Returns w, z, n and, per coordinate,
    the sum of the magnitudes added to z (the scale of z's rounding error)."""
    a, b, l1, l2 = cfg.learning_rate, cfg.ftrl_beta, cfg.ftrl_l1, cfg.ftrl_l2
    w = weights.astype(np.float64)
    z, n, z_scale = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    for idx, grads in steps:
        for r, row in zip(idx.tolist(), grads.astype(np.float64).tolist(), strict=True):
            for i, g in enumerate(row):
                sigma = (math.sqrt(n[r, i] + g * g) - math.sqrt(n[r, i])) / a
                z[r, i] += g - sigma * w[r, i]
                z_scale[r, i] += abs(g) + abs(sigma * w[r, i])
                n[r, i] += g * g
                if abs(z[r, i]) <= l1:
                    w[r, i] = 0.0
                else:
                    shrunk = z[r, i] - math.copysign(l1, z[r, i])
                    w[r, i] = -shrunk / ((b + math.sqrt(n[r, i])) / a + l2)
    return w, z, n, z_scale


@SETTINGS
@given(
    problem=sparse_problem(),
    lr=st.floats(1e-3, 1.0),
    betas=BETAS,
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    data=st.data(),
)
def test_lazy_adam_matches_sparse_adam_per_row(
    problem: tuple[np.ndarray, Steps],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    data: st.DataObject,
) -> None:
    weights, steps = problem
    poisoned, clean = poison(data, steps)
    cfg = TableConfig(
        name="t",
        dim=weights.shape[1],
        optimizer="lazy_adam",
        learning_rate=lr,
        beta1=betas[0],
        beta2=betas[1],
        eps=eps,
    )
    ours, state = run_numpy(cfg, weights, poisoned)
    ref, ref_state = run_torch_lazy_adam(cfg, weights, clean)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # SparseAdam forms m + (1 - beta1) * (g - m), which cancels where g << m; the error
    # is an ulp of the larger of |g| <= 4 and |m| (of g^2 <= 16 and v for v).
    np.testing.assert_allclose(state, ref_state, rtol=1e-5, atol=2e-6)
    assert_untouched(cfg, weights, clean, ours, state)


@SETTINGS
@given(
    vocab=st.integers(1, 8),
    dim=st.integers(1, 6),
    n_steps=st.integers(1, 4),
    lr=st.floats(1e-3, 1.0),
    betas=BETAS,
    data=st.data(),
)
def test_lazy_adam_touching_every_row_is_sparse_adam_and_adam(
    vocab: int,
    dim: int,
    n_steps: int,
    lr: float,
    betas: tuple[float, float],
    data: st.DataObject,
) -> None:
    """Every row on every step: per-row and global step counts agree, so lazy Adam is
    SparseAdam on the whole table, and (but for where eps goes) dense Adam."""
    weights = data.draw(hnp.arrays(np.float32, (vocab, dim), elements=finite))
    # |g| >= 0.5 keeps sqrt(v_hat) >= 0.5 for the comparison with Adam (see below).
    big = st.floats(0.5, 4, width=32)
    elements = st.one_of(big, big.map(lambda x: -x))
    grads = [
        data.draw(hnp.arrays(np.float32, (vocab, dim), elements=elements)) for _ in range(n_steps)
    ]
    cfg = TableConfig(
        name="t", dim=dim, optimizer="lazy_adam", learning_rate=lr, beta1=betas[0], beta2=betas[1]
    )
    every = np.arange(vocab, dtype=np.intp)
    ours, state = run_numpy(cfg, weights, [(every, g) for g in grads])
    assert (state[:, 2 * dim] == n_steps).all()

    sparse = torch.nn.Parameter(torch.from_numpy(weights.copy()))
    dense = torch.nn.Parameter(torch.from_numpy(weights.copy()))
    opts = [
        torch.optim.SparseAdam([sparse], lr=lr, betas=betas, eps=cfg.eps),
        torch.optim.Adam([dense], lr=lr, betas=betas, eps=cfg.eps),
    ]
    for g in grads:
        values = torch.from_numpy(g)
        sparse.grad = torch.sparse_coo_tensor(
            torch.from_numpy(every)[None], values, (vocab, dim), check_invariants=True
        )
        dense.grad = values.clone()
        for opt in opts:
            opt.step()
    np.testing.assert_allclose(ours, sparse.detach().numpy(), rtol=1e-5, atol=1e-6)
    # Adam adds eps to sqrt(v_hat), SparseAdam (and we) to sqrt(v) = sqrt(v_hat * c2) with
    # c2 = 1 - beta2**t >= 1e-4: the denominators differ by at most eps / sqrt(c2) = 1e-6,
    # relatively 2e-6 at sqrt(v_hat) >= 0.5, on updates of at most 8 * lr.
    np.testing.assert_allclose(ours, dense.detach().numpy(), rtol=1e-5, atol=1e-4)


@SETTINGS
@given(
    problem=sparse_problem(),
    lr=st.floats(1e-3, 1.0),
    betas=BETAS,
    eps=st.sampled_from([1e-8, 1e-6, 1e-3]),
    data=st.data(),
)
def test_partial_rowwise_adam_matches_torch(
    problem: tuple[np.ndarray, Steps],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    data: st.DataObject,
) -> None:
    weights, steps = problem
    poisoned, clean = poison(data, steps)
    cfg = TableConfig(
        name="t",
        dim=weights.shape[1],
        optimizer="partial_rowwise_adam",
        learning_rate=lr,
        beta1=betas[0],
        beta2=betas[1],
        eps=eps,
    )
    ours, state = run_numpy(cfg, weights, poisoned)
    ref, ref_state = run_torch_partial_rowwise_adam(cfg, weights, clean)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state, ref_state, rtol=1e-5, atol=1e-30)
    assert_untouched(cfg, weights, clean, ours, state)


@SETTINGS
@given(
    problem=sparse_problem(),
    alpha=st.floats(1e-2, 4.0),
    beta=st.sampled_from([0.0, 0.1, 1.0]),
    l1=st.sampled_from([0.0, 0.1, 1.0]),
    l2=st.sampled_from([0.0, 0.5]),
    data=st.data(),
)
def test_ftrl_matches_float64_reference(
    problem: tuple[np.ndarray, Steps],
    alpha: float,
    beta: float,
    l1: float,
    l2: float,
    data: st.DataObject,
) -> None:
    weights, steps = problem
    # Gradients below 1e-6 become 0: their squares are float32 subnormals (or 0), whose
    # few significant bits make sqrt(n) meaningless where it is the whole denominator
    # (beta = l2 = 0); test_ftrl_tiny_gradients_stay_finite covers them.
    steps = [(i, np.where(np.abs(g) < 1e-6, np.float32(0), g)) for i, g in steps]
    poisoned, clean = poison(data, steps)
    cfg = TableConfig(
        name="t",
        dim=weights.shape[1],
        optimizer="ftrl",
        learning_rate=alpha,
        ftrl_beta=beta,
        ftrl_l1=l1,
        ftrl_l2=l2,
    )
    ours, state = run_numpy(cfg, weights, poisoned)
    w, z, n, z_scale = run_ftrl_reference(cfg, weights, clean)
    dim = weights.shape[1]
    note(f"ours {ours!r}\nref {w!r}")
    np.testing.assert_allclose(ours, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[:, dim:], n, rtol=1e-6, atol=1e-30)
    # z sums terms of either sign (g and -sigma * w); its error scales with their size.
    assert (np.abs(state[:, :dim] - z) <= 1e-6 * z_scale + 1e-30).all()
    assert_untouched(cfg, weights, clean, ours, state)


def test_ftrl_l1_zeroes_small_weights() -> None:
    cfg = TableConfig(name="t", dim=3, optimizer="ftrl", learning_rate=0.5, ftrl_l1=1.0)
    emb = np.array([[0.3, -0.2, 0.0]], np.float32)
    state = np.zeros((1, 6), np.float32)
    g = np.array([[0.5, -3.0, 1.0]], np.float32)
    assert apply_sparse(cfg, emb, state, g).all()
    # A fresh row: n = g^2, sigma = |g| / alpha, z = g - sigma * w0 = [0.2, -1.8, 1.0].
    np.testing.assert_allclose(state[0], [0.2, -1.8, 1.0, 0.25, 9.0, 1.0], rtol=1e-6)
    assert emb[0, 0] == 0 and emb[0, 2] == 0  # |z| <= l1
    # w = -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha) = 0.8 / 8
    np.testing.assert_allclose(emb[0, 1], 0.1, rtol=1e-6)


def test_ftrl_tiny_gradients_stay_finite() -> None:
    """beta = l2 = 0 and gradients whose squares underflow to 0: n stays 0, the
    denominator is 0 and the weight reads 0 rather than inf."""
    cfg = TableConfig(name="t", dim=2, optimizer="ftrl", ftrl_beta=0.0, init_scale=0)
    emb = np.zeros((1, 2), np.float32)
    state = np.zeros((1, 4), np.float32)
    assert apply_sparse(cfg, emb, state, np.array([[1e-30, -1e-40]], np.float32)).all()
    assert (state[0, 2:] == 0).all() and state[0, 0] == np.float32(1e-30)
    assert (emb == 0).all()
    assert apply_sparse(cfg, emb, state, np.array([[1.0, 0.0]], np.float32)).all()
    assert np.isfinite(emb).all() and emb[0, 0] < 0


@pytest.mark.parametrize("optimizer", ["lazy_adam", "partial_rowwise_adam"])
def test_adam_step_count_saturates_at_2_to_the_24(optimizer: SparseOptimizerName) -> None:
    """The float32 step count is exact up to 2**24, then stays there (t + 1 rounds down)."""
    cfg = TableConfig(name="t", dim=2, optimizer=optimizer)
    emb = np.zeros((2, 2), np.float32)
    state = np.zeros((2, state_dim(optimizer, 2)), np.float32)
    state[:, -1] = [2**24 - 1, 2**24]
    assert apply_sparse(cfg, emb, state, np.ones((2, 2), np.float32)).all()
    assert state[:, -1].tolist() == [2**24, 2**24]
    # Bias corrections are 1 by then: m = (1 - beta1) * g, v = (1 - beta2) * g^2.
    np.testing.assert_allclose(emb, -cfg.learning_rate * 0.1 / np.sqrt(0.001), rtol=1e-5)


@pytest.mark.parametrize(
    "optimizer", ["adagrad", "rowwise_adagrad", "lazy_adam", "partial_rowwise_adam", "ftrl"]
)
def test_overflowing_rows_are_rejected(optimizer: SparseOptimizerName) -> None:
    """A finite gradient whose square overflows float32 must not store inf or NaN."""
    cfg = TableConfig(name="t", dim=2, optimizer=optimizer)
    emb = np.ones((2, 2), np.float32)
    state = np.full((2, state_dim(optimizer, 2)), initial_state(cfg), np.float32)
    before = emb.copy(), state.copy()
    ok = apply_sparse(cfg, emb, state, np.array([[3e38, 1.0], [1.0, 1.0]], np.float32))
    assert ok.tolist() == [False, True]
    assert emb[0].tobytes() == before[0][0].tobytes()
    assert state[0].tobytes() == before[1][0].tobytes()
    assert np.isfinite(emb).all() and np.isfinite(state).all()


# -- feature keys -----------------------------------------------------------------------

int64s = st.integers(-(2**63), 2**63 - 1)
tables = st.text(min_size=1, max_size=12)


@SETTINGS
@given(table=tables, values=st.lists(st.one_of(int64s, st.text(max_size=12)), max_size=30))
def test_keys_are_deterministic_uint64(table: str, values: list[int | str]) -> None:
    keys = feature_keys(table, values)
    assert keys.dtype == np.uint64 and keys.shape == (len(values),)
    assert np.array_equal(keys, feature_keys(table, list(values)))
    for i, v in enumerate(values):  # batch and single-value hashing agree
        assert feature_keys(table, [v])[0] == keys[i]


@SETTINGS
@given(table=tables, values=st.lists(st.one_of(int64s, st.integers()), min_size=1, max_size=30))
def test_ints_and_their_decimal_strings_share_keys(table: str, values: list[int]) -> None:
    as_int = feature_keys(table, values)
    assert np.array_equal(as_int, feature_keys(table, [str(v) for v in values]))
    mixed = [str(v) if i % 2 else v for i, v in enumerate(values)]
    assert np.array_equal(as_int, feature_keys(table, mixed))
    if all(-(2**63) <= v < 2**63 for v in values):
        assert np.array_equal(as_int, feature_keys(table, np.array(values, dtype=np.int64)))


@SETTINGS
@given(a=tables, b=tables, values=st.lists(st.one_of(int64s, st.text()), min_size=1, max_size=20))
def test_tables_separate_keys(a: str, b: str, values: list[int | str]) -> None:
    if a == b:
        return
    assert not np.intersect1d(feature_keys(a, values), feature_keys(b, values)).size


@SETTINGS
@given(table=tables, values=st.lists(int64s, min_size=2, max_size=50, unique=True))
def test_distinct_ints_get_distinct_keys(table: str, values: list[int]) -> None:
    assert len(np.unique(feature_keys(table, values))) == len(values)


def test_key_edge_cases() -> None:
    assert feature_keys("t", []).dtype == np.uint64 and feature_keys("t", []).shape == (0,)
    assert feature_keys("t", np.array([], dtype=np.int64)).shape == (0,)
    k = feature_keys("t", [42, "42", "042", "+42", " 42", "-0", 0, True, 1])
    assert k[0] == k[1] and len({int(x) for x in k[1:5]}) == 4
    assert k[5] != k[6] and k[7] == k[8]
    assert feature_keys("t", np.array([7], dtype=np.uint8))[0] == feature_keys("t", [7])[0]
    big = np.array([2**64 - 1], dtype=np.uint64)
    assert feature_keys("t", big)[0] == feature_keys("t", [str(2**64 - 1)])[0]
    with pytest.raises(TypeError, match=r"1\.5"):
        feature_keys("t", [1.5])  # type: ignore[list-item]


def test_keys_are_stable_across_processes() -> None:
    code = (
        "from storage.keys import feature_keys;"
        "print(feature_keys('user', [1, 'abc', -5, 2**70]).tolist())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert other.strip() == str(feature_keys("user", [1, "abc", -5, 2**70]).tolist())


# -- row codec --------------------------------------------------------------------------


@SETTINGS
@given(
    optimizer=st.sampled_from(ALL_OPTIMIZERS),
    dim=st.integers(1, 8),
    keys=st.lists(st.integers(0, 2**64 - 1), max_size=20),
    scale=st.sampled_from([0.0, 0.01, 1.0]),
    now=st.integers(0, 2**32 - 1),
)
def test_row_codec_roundtrip_and_init(
    optimizer: SparseOptimizerName, dim: int, keys: list[int], scale: float, now: int
) -> None:
    cfg = TableConfig(
        name="t", dim=dim, optimizer=optimizer, init_scale=scale, initial_accumulator=0.25
    )
    codec = RowCodec(cfg)
    k = np.array(keys, dtype=np.uint64)
    rows = codec.new_rows(k, now)
    assert np.array_equal(rows, codec.new_rows(k, now))  # a pure function of the key
    assert (np.abs(rows["emb"]) <= scale).all()
    adagrads = optimizer in ("adagrad", "rowwise_adagrad")
    assert (rows["state"] == np.float32(0.25 if adagrads else 0.0)).all()
    assert (rows["updated_at"] == now).all()
    packed = codec.pack(rows)
    assert all(len(v) == 4 * (dim + state_dim(optimizer, dim) + 2) for v in packed)
    back = codec.unpack(k, packed)
    assert back.tobytes() == rows.tobytes()


def test_unpack_wrong_size_names_table_and_key() -> None:
    codec = RowCodec(TableConfig(name="items", dim=4))
    keys = np.array([1, 99], dtype=np.uint64)
    good = codec.pack(codec.new_rows(keys[:1], 0))[0]
    with pytest.raises(RowFormatError, match=r"'items'.*key 99 .*3 bytes, expected 28"):
        codec.unpack(keys, [good, b"abc"])


def test_touch_saturates_count() -> None:
    codec = RowCodec(TableConfig(name="t", dim=1))
    rows = codec.zeros(2)
    rows["count"] = [5, 2**32 - 1]
    RowCodec.touch(rows, np.arange(2), 77)
    assert rows["count"].tolist() == [6, 2**32 - 1] and rows["updated_at"].tolist() == [77, 77]


@SETTINGS
@given(
    optimizer=st.sampled_from(ALL_OPTIMIZERS),
    dim=st.integers(1, 6),
    n=st.integers(1, 10),
    data=st.data(),
)
def test_optimizer_state_roundtrips_through_codec(
    optimizer: SparseOptimizerName, dim: int, n: int, data: st.DataObject
) -> None:
    """Updates written through the record array's field views equal the contiguous
    path, and the state survives pack/unpack bit-exact, whatever its bits."""
    cfg = TableConfig(name="t", dim=dim, optimizer=optimizer, initial_accumulator=0.1)
    codec = RowCodec(cfg)
    keys = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    rows = codec.new_rows(keys, 5)
    steps: Steps = []
    for _ in range(data.draw(st.integers(1, 3))):
        grads = data.draw(hnp.arrays(np.float32, (n, dim), elements=finite))
        steps.append((np.arange(n, dtype=np.intp), grads))
    w, s = run_numpy(cfg, rows["emb"].copy(), steps)
    for _, grads in steps:
        assert apply_sparse(cfg, rows["emb"], rows["state"], grads).all()
    assert rows["emb"].tobytes() == w.tobytes() and rows["state"].tobytes() == s.tobytes()
    assert codec.unpack(keys, codec.pack(rows)).tobytes() == rows.tobytes()
    bits = data.draw(hnp.arrays(np.uint32, (n, codec.state_dim)))  # NaN payloads included
    rows["state"] = bits.view(np.float32)
    back = codec.unpack(keys, codec.pack(rows))
    assert back.tobytes() == rows.tobytes()
    assert np.ascontiguousarray(back["state"]).view(np.uint32).tobytes() == bits.tobytes()


@pytest.mark.parametrize("optimizer", ["lazy_adam", "partial_rowwise_adam", "ftrl"])
def test_tiered_store_carries_optimizer_state(
    optimizer: SparseOptimizerName, tmp_path: Path
) -> None:
    """Through TieredStore (memory hot, RocksDB cold, a restart in between) rows end up
    bit-exact as the optimizer applied directly to freshly created rows."""
    cfg = TableConfig(name="t", dim=4, optimizer=optimizer, learning_rate=0.1, ftrl_l1=0.01)
    codec = RowCodec(cfg)
    rng = np.random.default_rng(7)
    keys = np.arange(1, 13, dtype=np.uint64)
    ref = codec.new_rows(keys, 0)
    applied = np.zeros(len(keys), np.int64)
    used = np.zeros(len(keys), np.bool_)

    def store() -> TieredStore:
        return TieredStore([cfg], MemoryTier(), RocksDBTier(tmp_path / "db"), clock=lambda: 9.0)

    s = store()
    for step in range(8):
        if step == 4:  # restart: the rows come back from RocksDB into an empty hot tier
            s.flush()
            s.close()
            s = store()
        sel = np.sort(rng.choice(len(keys), size=rng.integers(1, len(keys)), replace=False))
        grads = rng.normal(size=(len(sel), cfg.dim)).astype(np.float32)
        grads[rng.random(len(sel)) < 0.2, 0] = np.nan
        s.update("t", keys[sel], grads)
        sub = ref[sel]
        ok = apply_sparse(cfg, sub["emb"], sub["state"], grads)
        ref[sel] = sub
        applied[sel[ok]] += 1
        used[sel] = True
    s.flush()
    assert s.cold is not None
    values = s.cold.get_many("t", keys[used])
    present = [v for v in values if v is not None]
    assert len(present) == len(values)
    got = codec.unpack(keys[used], present)
    s.close()
    assert got["emb"].tobytes() == ref["emb"][used].tobytes()
    assert got["state"].tobytes() == ref["state"][used].tobytes()
    assert got["count"].tolist() == applied[used].tolist()
    if optimizer != "ftrl":  # the per-row Adam step count is the row's update count
        assert got["state"][:, -1].tolist() == applied[used].tolist()


@pytest.mark.parametrize("optimizer", ALL_OPTIMIZERS)
def test_packed_rows_update_as_plain_arrays(optimizer: SparseOptimizerName) -> None:
    """The store updates strided fields of packed rows in place: the same numbers, bit
    for bit, as contiguous arrays (row-wise AdaGrad has a compiled path of its own)."""
    rng = np.random.default_rng(3)
    cfg = TableConfig(name="t", dim=5, optimizer=optimizer, learning_rate=0.05)
    k = state_dim(optimizer, 5)
    packed = np.zeros(
        40, dtype=[("emb", np.float32, (5,)), ("state", np.float32, (k,)), ("n", np.uint32)]
    )
    packed["emb"] = rng.standard_normal((40, 5))
    packed["state"] = initial_state(cfg)
    emb, state = packed["emb"].copy(), packed["state"].copy()
    for _ in range(3):
        grads = rng.standard_normal((40, 5)).astype(np.float32)
        grads[7, 2] = np.nan
        ok_packed = apply_sparse(cfg, packed["emb"], packed["state"], grads)
        ok_plain = apply_sparse(cfg, emb, state, grads)
        assert ok_packed.tolist() == ok_plain.tolist() and not ok_plain[7]
    assert packed["emb"].tobytes() == emb.tobytes()
    assert packed["state"].tobytes() == state.tobytes()
