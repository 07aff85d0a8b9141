"""Property tests: numpy sparse optimizers vs torch, feature key hashing, the row codec."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from storage.base import RowFormatError, SparseOptimizerName, TableConfig
from storage.keys import feature_keys
from storage.optim import apply_sparse, state_dim
from storage.rows import RowCodec

SETTINGS = settings(max_examples=60, deadline=None)

finite = st.floats(-4, 4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def sparse_problem(draw: st.DrawFn) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
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


def run_numpy(
    cfg: TableConfig, weights: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]
) -> np.ndarray:
    w = weights.copy()
    state = np.full((len(w), state_dim(cfg.optimizer, w.shape[1])), cfg.initial_accumulator)
    state = state.astype(np.float32)
    for idx, grads in steps:
        emb, st_ = w[idx], state[idx]
        assert apply_sparse(cfg, emb, st_, grads).all()
        w[idx], state[idx] = emb, st_
    return w


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
    ours = run_numpy(cfg, weights, steps)
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
    optimizer=optimizers,
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
    optimizer=optimizers,
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
    assert (rows["state"] == np.float32(0.25)).all() and (rows["updated_at"] == now).all()
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
