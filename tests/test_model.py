from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from storage.base import LookupResult
from streaming.spec import FeatureSpec, SparseFeature
from trainer.features import distinct_keys, encode, pool
from trainer.model import DLRM, dump_state, load_state


def spec(dense: list[str], dims: tuple[int, ...] = (8, 8, 8)) -> FeatureSpec:
    return FeatureSpec(
        sparse=[SparseFeature(name=f"f{i}", dim=d) for i, d in enumerate(dims)], dense=dense
    )


def test_forward_shapes_with_and_without_dense_inputs() -> None:
    for dense in (["x", "y"], []):
        model = DLRM(spec(dense))
        logits = model(torch.randn(5, len(dense)), torch.randn(5, 3, 8))
        assert logits.shape == (5,)
        assert torch.isfinite(logits).all()


def test_unequal_dims_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="one embedding dim"):
        DLRM(spec([], dims=(8, 16, 8)))


def test_interactions_are_the_pairwise_dots_of_bottom_output_and_fields() -> None:
    """The top MLP sees [bottom output, every dot product between two distinct vectors
    of (bottom output, field 1, ..., field n)] in row-major upper-triangle order, and
    gradients flow back through exactly those products."""
    model = DLRM(spec(["x", "y"]))
    seen: list[torch.Tensor] = []
    model.top.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    dense = torch.randn(4, 2)
    sparse = torch.randn(4, 3, 8, requires_grad=True)
    model(dense, sparse).sum().backward()
    x = model.bottom(torch.sign(dense) * torch.log1p(dense.abs()))
    vectors = [x, *sparse.unbind(1)]
    dots = [(vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4)]
    torch.testing.assert_close(seen[0], torch.cat([x, torch.stack(dots, 1)], 1))
    assert sparse.grad is not None and torch.isfinite(sparse.grad).all()
    assert sparse.grad.abs().sum() > 0


def test_state_round_trip() -> None:
    a, b = DLRM(spec(["x"])), DLRM(spec(["x"]))
    load_state(b, dump_state(a))
    dense, sparse = torch.randn(4, 1), torch.randn(4, 3, 8)
    assert torch.equal(a(dense, sparse), b(dense, sparse))


def test_serving_pool_matches_embedding_bag() -> None:
    """Serving gathers one-id fields in numpy; training pools with embedding_bag: same
    numbers."""
    spec = FeatureSpec(
        sparse=[SparseFeature(name="a"), SparseFeature(name="b", kind="multi_hot")],
        dense=["x"],
    )
    rows = [{"a": i % 3, "b": [1, i]} for i in range(6)] + [{"b": []}]
    batch = encode(rows, [{"x": 1.0}] * 7, spec)
    distinct = distinct_keys(batch, spec)
    rng = np.random.default_rng(0)
    found = {
        t: LookupResult(
            rng.standard_normal((len(k), 16)).astype(np.float32), np.ones(len(k), dtype=bool)
        )
        for t, k in distinct.keys.items()
    }
    served, _ = pool(batch, spec, distinct, found, train=False)
    trained, _ = pool(batch, spec, distinct, found, train=True)
    assert torch.equal(served, trained.detach())


def test_batch_hashing_and_dedupe_match_the_per_field_paths() -> None:
    """encode hashes all-int categorical fields in one pass and distinct_keys dedupes
    one-key-per-example fields together: same keys and inverses as field by field."""
    from storage.keys import feature_keys

    spec = FeatureSpec(
        sparse=[
            SparseFeature(name="a"),
            SparseFeature(name="b"),
            SparseFeature(name="m", kind="multi_hot"),
        ],
        dense=[],
    )
    rng = np.random.default_rng(3)
    batches: list[list[dict[str, Any]]] = [
        [{"a": int(v), "b": int(w), "m": [1, 2]} for v, w in rng.integers(-5, 5, (9, 2))],
        [{"a": True, "b": -(2**63), "m": []}, {"a": 1, "b": 2**63 - 1, "m": [3]}],
        [{"a": 2**63, "b": 1, "m": [1]}, {"a": "7", "b": 7, "m": [1]}],  # per-field path
        [{"a": 4, "m": [1]}, {"a": 4, "b": 4, "m": [1]}],  # a missing id
    ]
    for rows in batches:
        batch = encode(rows, [{}] * len(rows), spec)
        distinct = distinct_keys(batch, spec)
        for name in ("a", "b"):
            present = [r[name] for r in rows if name in r]
            assert np.array_equal(batch.fields[name].keys, feature_keys(name, present))
            unique, inverse = np.unique(batch.fields[name].keys, return_inverse=True)
            assert np.array_equal(distinct.keys[name], unique)
            assert np.array_equal(distinct.inverse[name], inverse)
            assert distinct.inverse[name].dtype == np.int64
