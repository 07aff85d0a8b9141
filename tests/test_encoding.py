"""The predict fast path (``flat_columns`` + ``encode_columns``) against the reference
path it replaces (``check_instances`` + ``encode``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.events import check_instances
from streaming.spec import FeatureSpec, SparseFeature
from trainer.encoding import encode, encode_columns, flat_columns

SPEC = FeatureSpec(sparse=[SparseFeature(name="u"), SparseFeature(name="i")], dense=["x", "y"])

# Mostly what a client sends (int ids, finite floats), with every kind of value the
# fast path must leave to the reference one, and bounds exactly at their edges.
IDS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([2**63, -(2**63) - 1, 2**70, True, 0, "7", "", 1.5, None, [1]]),
)
NUMBERS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-(2**60), 2**60),
    st.sampled_from(
        [3.4028234663852886e38, 3.5e38, -1e39, float("nan"), float("inf"), 10**400, False, "1"]
    ),
)
INSTANCE = st.fixed_dictionaries(
    {"u": IDS, "i": IDS, "x": NUMBERS, "y": NUMBERS},
    optional={"extra": st.just(1)},
).flatmap(
    # Sometimes a field is left out.
    lambda d: st.sets(st.sampled_from(sorted(d)), max_size=1).map(
        lambda drop: {k: v for k, v in d.items() if k not in drop}
    )
)
COMMON = st.fixed_dictionaries(
    {
        "u": st.integers(-(2**63), 2**63 - 1),
        "i": st.integers(0, 10),
        "x": st.floats(-1e6, 1e6),
        "y": st.integers(-5, 5),
    }
)


def check_agrees(instances: list[dict[str, object]]) -> bool:
    """Asserts the fast path's answer is the reference path's; whether it took it."""
    columns = flat_columns(instances, SPEC)
    if columns is None:
        return False
    assert check_instances(instances, SPEC) == []
    fast = encode_columns([columns], SPEC)
    slow = encode(instances, instances, SPEC)  # type: ignore[arg-type]
    assert fast.dense.dtype == slow.dense.dtype == np.float32
    np.testing.assert_array_equal(fast.dense, slow.dense)
    for name in SPEC.sparse_names:
        np.testing.assert_array_equal(fast.fields[name].keys, slow.fields[name].keys)
        np.testing.assert_array_equal(fast.fields[name].offsets, slow.fields[name].offsets)
    return True


@settings(max_examples=300, deadline=None)
@given(st.lists(INSTANCE, min_size=1, max_size=4))
def test_the_fast_path_takes_only_valid_requests_and_encodes_them_alike(
    instances: list[dict[str, object]],
) -> None:
    check_agrees(instances)


@settings(max_examples=100, deadline=None)
@given(st.lists(COMMON, min_size=1, max_size=8))
def test_the_usual_request_takes_the_fast_path(instances: list[dict[str, object]]) -> None:
    assert check_agrees(instances)


def test_requests_concatenate_like_one_request() -> None:
    a = [{"u": 1, "i": 2, "x": 0.5, "y": 3}]
    b = [{"u": 4, "i": 5, "x": -1.0, "y": 0}, {"u": 6, "i": 7, "x": 2, "y": 1.25}]
    parts = [flat_columns(a, SPEC), flat_columns(b, SPEC)]
    assert all(p is not None for p in parts)
    joined = encode_columns(parts, SPEC)  # type: ignore[arg-type]
    whole = encode(a + b, a + b, SPEC)
    np.testing.assert_array_equal(joined.dense, whole.dense)
    for name in SPEC.sparse_names:
        np.testing.assert_array_equal(joined.fields[name].keys, whole.fields[name].keys)


def test_specs_it_does_not_cover_take_the_reference_path() -> None:
    multi = FeatureSpec(sparse=[SparseFeature(name="g", kind="multi_hot")])
    assert flat_columns([{"g": [1, 2]}], multi) is None
    no_dense = FeatureSpec(sparse=[SparseFeature(name="u")])
    columns = flat_columns([{"u": 3}], no_dense)
    assert columns is not None and columns.dense.shape == (1, 0)
    one_each = FeatureSpec(sparse=[SparseFeature(name="u")], dense=["x"])
    columns = flat_columns([{"u": 3, "x": 1.5}, {"u": 4, "x": 2}], one_each)
    assert columns is not None
    assert columns.ids.tolist() == [[3], [4]] and columns.dense.tolist() == [[1.5], [2.0]]
    assert flat_columns([], SPEC) is None
