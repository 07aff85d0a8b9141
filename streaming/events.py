"""The event schema and its validation, shared by the trainer (decoding Kafka
messages) and the service (predict instances and posted events).

Wire format, one JSON object per message::

    {"event_id": "e1", "ts": 1700000000000, "label": 1,
     "features": {"user": "u42", "item": 7, "genres": ["drama", "war"]},
     "dense": {"age": 0.3}}

Features missing from an event read as "no value" (a zero embedding); dense
values missing read as 0.0. A field the spec does not know is an error, so a
typo never trains silently. Dense values are float32 inputs of the model: a number
beyond float32's range (|x| > ~3.4e38, or an integer too large for any float) would
reach it as infinity and turn the dense weights into NaN, so it is invalid like NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson

from streaming.spec import FeatureSpec

SparseValue = str | int | list[str | int]


@dataclass(slots=True)
class Event:
    event_id: str
    ts: int
    label: int
    features: dict[str, SparseValue]
    dense: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "event_id": self.event_id,
                "ts": self.ts,
                "label": self.label,
                "features": self.features,
                "dense": self.dense,
            }
        )


BAD_EVENT_REASONS = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "unknown_field",
    "invalid_value",
)
"""Every ``BadEvent.reason`` (the label of the bad-events counter)."""


class BadEvent(ValueError):
    """An event that cannot be trained on; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    reason: str  # unknown_field | wrong_type | invalid_value


FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: dense values beyond +-this are invalid."""


def _dense_in_range(value: float) -> bool:
    # Exact for ints of any size too (no conversion), and false for NaN.
    return -FLOAT32_MAX <= value <= FLOAT32_MAX


EVENT_FIELDS = frozenset({"event_id", "ts", "label", "features", "dense"})
"""The top-level keys of the wire format (the trainer ignores any others)."""


def _is_id(value: object) -> bool:
    # bool is an int subclass, but True as a feature id is almost always a bug.
    return (isinstance(value, str) and value != "") or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def check_fields(
    features: Mapping[str, object], dense: Mapping[str, object], spec: FeatureSpec
) -> list[FieldError]:
    """Every problem with a set of sparse and dense values, one entry per field."""
    errors: list[FieldError] = []
    categorical = spec.categorical_names
    for name, value in features.items():
        # The trainer checks every event: valid ids pass on exact-type tests alone.
        kind = type(value)
        if name in categorical and ((kind is str and value) or kind is int):
            continue
        feature = spec.sparse_field(name)
        if feature is None:
            errors.append(FieldError(name, f"unknown sparse feature {name!r}", "unknown_field"))
        elif feature.kind == "categorical":
            if not _is_id(value):
                errors.append(
                    FieldError(
                        name,
                        f"{name!r} is categorical: expected a non-empty string or an integer, "
                        f"got {type(value).__name__}",
                        "wrong_type",
                    )
                )
        elif not isinstance(value, list) or not all(_is_id(v) for v in value):
            errors.append(
                FieldError(
                    name,
                    f"{name!r} is multi_hot: expected a list of strings or integers",
                    "wrong_type",
                )
            )
    dense_names = spec.dense_names
    for name, value in dense.items():
        kind = type(value)
        if (kind is float or kind is int) and name in dense_names and _dense_in_range(value):  # type: ignore[arg-type]
            continue
        if name not in dense_names:
            errors.append(FieldError(name, f"unknown dense feature {name!r}", "unknown_field"))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(
                FieldError(
                    name,
                    f"{name!r} is dense: expected a number, got {type(value).__name__}",
                    "wrong_type",
                )
            )
        elif not _dense_in_range(value):
            errors.append(
                FieldError(
                    name,
                    f"{name!r} must be a finite number within float32 range "
                    f"(|x| <= {FLOAT32_MAX:.7g})",
                    "invalid_value",
                )
            )
    return errors


def check_instances(
    instances: Sequence[Mapping[str, object]], spec: FeatureSpec
) -> list[tuple[int, FieldError]]:
    """Every problem of a batch of flat predict instances ``{field: value}``, with the
    index of its instance: exactly what ``check_fields`` finds in each one after
    ``split_instance``. A valid batch is checked column by column (one pass per field,
    no per-instance dicts); only a batch with a problem is walked instance by instance
    to name each one."""
    if not _columns_valid(instances, spec):
        return [
            (i, problem)
            for i, instance in enumerate(instances)
            for problem in check_fields(*split_instance(instance, spec), spec)
        ]
    return []


_ID_TYPES = frozenset({str, int})
_NUMBER_TYPES = frozenset({int, float})


def _columns(rows: Sequence[Mapping[str, object]], names: Sequence[str]) -> list[Sequence[object]]:
    """The values of each of ``names`` over ``rows``, column by column, skipping rows
    without the name. When every row has every name (the usual batch) the columns are
    cut in C with one ``itemgetter`` pass instead of a Python loop per field."""
    if not names:
        return []
    try:
        table = list(map(itemgetter(*names), rows))
    except KeyError:
        return [[x[name] for x in rows if name in x] for name in names]
    if len(names) == 1:  # itemgetter of one name returns the value, not a 1-tuple
        return [table]
    return list(zip(*table, strict=True)) if table else [() for _ in names]


def _columns_valid(instances: Sequence[Mapping[str, object]], spec: FeatureSpec) -> bool:
    if not all(map(spec.known_names.issuperset, instances)):
        return False
    return _sparse_columns_valid(instances, spec) and _dense_columns_valid(instances, spec)


def _sparse_columns_valid(rows: Sequence[Mapping[str, object]], spec: FeatureSpec) -> bool:
    for feature, column in zip(spec.sparse, _columns(rows, spec.sparse_names), strict=True):
        if feature.kind == "categorical":
            # type(), not isinstance: bool (an int subclass) is not an id.
            if not set(map(type, column)) <= _ID_TYPES or "" in column:
                return False
        elif not all(type(v) is list and all(map(_is_id, v)) for v in column):
            return False
    return True


def _dense_columns_valid(rows: Sequence[Mapping[str, object]], spec: FeatureSpec) -> bool:
    for column in _columns(rows, spec.dense):
        if not set(map(type, column)) <= _NUMBER_TYPES or not _column_in_range(column):
            return False
    return True


def _column_in_range(column: Sequence[object]) -> bool:
    """Whether every value (ints and floats) is within float32 range, by the sum of
    their magnitudes: NaN or infinity make it fail, an int too large for a float makes
    it raise. A false "no" (large values adding up past the range) only sends the
    batch the exact, per-value way."""
    try:
        return bool(sum(map(abs, column)) <= FLOAT32_MAX)  # type: ignore[arg-type]
    except OverflowError:
        return False


def _events_valid(objs: Sequence[Any], spec: FeatureSpec) -> bool:
    """Whether ``check_event`` would find no problem in any of ``objs``, checked column
    by column (the trainer's common case: a whole batch of good events)."""
    if not objs:
        return True
    if set(map(type, objs)) != {dict}:
        return False
    try:
        ids, stamps, labels, features = zip(*map(_REQUIRED_VALUES, objs), strict=True)
    except KeyError:
        return False
    if not set(map(type, ids)) <= _ID_TYPES or "" in ids:
        return False
    if set(map(type, stamps)) != {int} or min(stamps) < 0:
        return False
    if set(map(type, labels)) != {int} or not set(labels) <= {0, 1}:
        return False
    dense = [o.get("dense", _NO_DENSE) for o in objs]
    if set(map(type, features)) != {dict} or set(map(type, dense)) != {dict}:
        return False
    if not all(map(spec.sparse_name_set.issuperset, features)):
        return False
    if not all(map(spec.dense_names.issuperset, dense)):
        return False
    return _sparse_columns_valid(features, spec) and _dense_columns_valid(dense, spec)


_REQUIRED_VALUES = itemgetter("event_id", "ts", "label", "features")
_NO_DENSE: dict[str, object] = {}


def split_instance(
    instance: Mapping[str, object], spec: FeatureSpec
) -> tuple[dict[str, object], dict[str, object]]:
    """Split a flat predict instance ``{field: value}`` into sparse and dense parts.

    Names the spec does not know stay on the sparse side, where ``check_fields``
    reports them as unknown.
    """
    features = {k: v for k, v in instance.items() if k not in spec.dense_names}
    dense = {k: v for k, v in instance.items() if k in spec.dense_names}
    return features, dense


def check_event(obj: Mapping[str, Any], spec: FeatureSpec) -> list[FieldError]:
    """Every problem with a decoded event object, in the order ``decode_event`` reports
    them; field names of features and dense values are prefixed (``features.user``)."""
    missing = [k for k in ("event_id", "ts", "label", "features") if k not in obj]
    if missing:
        return [FieldError(k, f"missing {k}", "missing_field") for k in missing]
    errors: list[FieldError] = []
    ts, label = obj["ts"], obj["label"]
    features, dense = obj["features"], obj.get("dense", {})
    if not _is_id(obj["event_id"]):
        errors.append(
            FieldError(
                "event_id", "event_id must be a non-empty string or an integer", "wrong_type"
            )
        )
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        errors.append(
            FieldError("ts", "ts must be a non-negative integer (epoch milliseconds)", "wrong_type")
        )
    if isinstance(label, bool) or label not in (0, 1) or not isinstance(label, int):
        errors.append(FieldError("label", "label must be 0 or 1", "wrong_type"))
    if not isinstance(features, dict):
        errors.append(FieldError("features", "features must be an object", "wrong_type"))
    if not isinstance(dense, dict):
        errors.append(FieldError("dense", "dense must be an object", "wrong_type"))
    if errors:
        return errors
    for part, problems in (
        ("features", check_fields(features, {}, spec)),
        ("dense", check_fields({}, dense, spec)),
    ):
        errors.extend(FieldError(f"{part}.{e.field}", e.message, e.reason) for e in problems)
    return errors


def event_from(obj: Mapping[str, Any]) -> Event:
    """The ``Event`` of an object ``check_event`` found no problem with. Its dicts are
    taken as they are (dense values stay the ints or floats they were sent as)."""
    event_id = obj["event_id"]
    return Event(
        event_id if type(event_id) is str else str(event_id),
        obj["ts"],
        obj["label"],
        obj["features"],
        obj.get("dense") or {},
    )


def decode_event(raw: bytes, spec: FeatureSpec) -> Event:
    """Parse and validate one wire message. Raises ``BadEvent`` with a metric reason."""
    return _event_of(_parse(raw), spec)


def decode_events(raws: Sequence[bytes], spec: FeatureSpec) -> list[Event | BadEvent]:
    """``decode_event`` over a batch, one result per message in order: the ``Event``, or
    the ``BadEvent`` it would raise. A batch of good events is validated column by
    column; only a batch with a problem is checked event by event."""
    objs: list[Any] = []
    for raw in raws:
        try:
            objs.append(_parse(raw))
        except BadEvent as bad:
            objs.append(bad)
    if _events_valid(objs, spec):
        return [event_from(obj) for obj in objs]
    out: list[Event | BadEvent] = []
    for obj in objs:
        try:
            out.append(obj if isinstance(obj, BadEvent) else _event_of(obj, spec))
        except BadEvent as bad:
            out.append(bad)
    return out


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadEvent("invalid_json", str(exc)) from None
    if not isinstance(obj, dict):
        raise BadEvent("invalid_json", f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _event_of(obj: dict[str, Any], spec: FeatureSpec) -> Event:
    errors = check_event(obj, spec)
    if errors:
        raise BadEvent(errors[0].reason, "; ".join(e.message for e in errors))
    return event_from(obj)
