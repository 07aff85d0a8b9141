from __future__ import annotations

import orjson
import pytest

from streaming.events import (
    BAD_EVENT_REASONS,
    BadEvent,
    Event,
    check_fields,
    check_instances,
    decode_event,
    decode_events,
    split_instance,
)
from streaming.spec import FeatureSpec, SparseFeature

SPEC = FeatureSpec(
    sparse=[
        SparseFeature(name="user"),
        SparseFeature(name="genres", kind="multi_hot"),
    ],
    dense=["age"],
)


def wire(**overrides: object) -> bytes:
    event: dict[str, object] = {
        "event_id": "e1",
        "ts": 1_700_000_000_000,
        "label": 1,
        "features": {"user": "u1", "genres": ["drama", 7]},
        "dense": {"age": 0.5},
    }
    event.update(overrides)
    return orjson.dumps(event)


def test_valid_event_round_trips() -> None:
    event = decode_event(wire(), SPEC)
    assert event == Event(
        "e1", 1_700_000_000_000, 1, {"user": "u1", "genres": ["drama", 7]}, {"age": 0.5}
    )
    assert decode_event(event.to_json(), SPEC) == event


def test_missing_features_and_dense_are_allowed() -> None:
    event = decode_event(orjson.dumps({"event_id": 3, "ts": 0, "label": 0, "features": {}}), SPEC)
    assert event.event_id == "3" and event.features == {} and event.dense == {}


BAD_EVENTS = [
    (b"not json", "invalid_json", ""),
    (b"[1, 2]", "invalid_json", "object"),
    (orjson.dumps({"ts": 1, "label": 0, "features": {}}), "missing_field", "event_id"),
    (wire(label=2), "wrong_type", "label"),
    (wire(label=True), "wrong_type", "label"),
    (wire(ts="yesterday"), "wrong_type", "ts"),
    (wire(ts=-5), "wrong_type", "ts"),
    (wire(features=[1]), "wrong_type", "features"),
    (wire(features={"user": 1.5}), "wrong_type", "'user'"),
    (wire(features={"user": True}), "wrong_type", "'user'"),
    (wire(features={"genres": "drama"}), "wrong_type", "multi_hot"),
    (wire(features={"colour": "red"}), "unknown_field", "colour"),
    (wire(dense={"age": "old"}), "wrong_type", "'age'"),
    (wire(dense={"height": 1.0}), "unknown_field", "height"),
    (wire(features={"user": ""}), "wrong_type", "'user'"),
    (wire(event_id=""), "wrong_type", "event_id"),
    # Finite in JSON, infinite as a float32 input: it would turn the dense weights NaN.
    (wire(dense={"age": 1e39}), "invalid_value", "float32 range"),
]


@pytest.mark.parametrize(("raw", "reason", "needle"), BAD_EVENTS)
def test_bad_events_name_the_problem(raw: bytes, reason: str, needle: str) -> None:
    with pytest.raises(BadEvent) as info:
        decode_event(raw, SPEC)
    assert info.value.reason == reason
    assert needle in str(info.value)


def test_every_reason_the_metric_is_set_up_with_is_one_a_bad_event_carries() -> None:
    seen = {reason for _, reason, _ in BAD_EVENTS}
    assert seen == set(BAD_EVENT_REASONS)


@pytest.mark.parametrize(
    "value", [float("nan"), float("-inf"), 3.5e38, -(10**400)], ids=["nan", "inf", "big", "int"]
)
def test_dense_values_beyond_float32_are_invalid(value: float) -> None:
    errors = check_fields({}, {"age": value}, SPEC)
    assert [(e.field, e.reason) for e in errors] == [("age", "invalid_value")]
    assert check_fields({}, {"age": 3.4e38}, SPEC) == []


def test_split_instance_keeps_unknown_names_on_the_sparse_side() -> None:
    features, dense = split_instance({"user": "u", "age": 3, "typo": 1}, SPEC)
    assert features == {"user": "u", "typo": 1} and dense == {"age": 3}
    assert [e.field for e in check_fields(features, dense, SPEC)] == ["typo"]


def test_spec_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="unique"):
        FeatureSpec(sparse=[SparseFeature(name="a")], dense=["a"])


@pytest.mark.parametrize(
    "instances",
    [
        [{"user": "u", "genres": ["a", 1], "age": 3}, {"user": 7}],
        [{"user": "u"}, {"user": ""}, {"user": True}, {"user": 1.5}],
        [{"genres": "drama"}, {"genres": [True]}, {"genres": []}],
        [{"age": "old"}, {"age": float("inf")}, {"age": False}, {"typo": 1}],
        [{"age": 3e38}, {"age": 3e38}],  # valid: their sum passes the range, not each
        [{"age": 10**400}, {"age": 1.0}, {"age": -1e39}, {"age": float("nan")}],
    ],
)
def test_check_instances_agrees_with_check_fields(instances: list[dict[str, object]]) -> None:
    expected = [
        (i, problem)
        for i, instance in enumerate(instances)
        for problem in check_fields(*split_instance(instance, SPEC), SPEC)
    ]
    assert check_instances(instances, SPEC) == expected


def _outcome(result: Event | BadEvent) -> object:
    return (result.reason, result.detail) if isinstance(result, BadEvent) else result


@pytest.mark.parametrize(("raw", "reason", "needle"), BAD_EVENTS)
def test_decode_events_agrees_with_decode_event(raw: bytes, reason: str, needle: str) -> None:
    good = [wire(), orjson.dumps({"event_id": 3, "ts": 0, "label": 0, "features": {}}), wire()]
    batch = [good[0], raw, good[1], good[2]]
    expected = []
    for one in batch:
        try:
            expected.append(_outcome(decode_event(one, SPEC)))
        except BadEvent as bad:
            expected.append(_outcome(bad))
    assert [_outcome(r) for r in decode_events(batch, SPEC)] == expected
    assert [_outcome(r) for r in decode_events(good, SPEC)] == [
        _outcome(decode_event(one, SPEC)) for one in good
    ]
    assert decode_events([], SPEC) == []
