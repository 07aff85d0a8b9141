"""Encoding events or predict instances into store keys and dense inputs (no torch:
the trainer's decode workers import this module). ``trainer.features`` re-exports it
beside the pooling code that needs torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter

import numpy as np
import numpy.typing as npt

from storage.base import Keys
from storage.keys import feature_keys, int_feature_keys
from streaming.events import FLOAT32_MAX
from streaming.spec import FeatureSpec


@dataclass(frozen=True)
class FieldBatch:
    """The ids of one sparse field for a batch, as bags: example ``i`` owns
    ``keys[offsets[i]:offsets[i+1]]`` (possibly empty)."""

    keys: Keys
    offsets: npt.NDArray[np.int64]


@dataclass(frozen=True)
class EncodedBatch:
    fields: dict[str, FieldBatch]
    dense: npt.NDArray[np.float32]  # (batch, len(spec.dense))

    @property
    def size(self) -> int:
        return int(self.dense.shape[0])


def encode(
    features: Sequence[Mapping[str, object]],
    dense: Sequence[Mapping[str, float]],
    spec: FeatureSpec,
) -> EncodedBatch:
    """Hash validated feature values into store keys, field by field."""
    fields: dict[str, FieldBatch] = {}
    size = len(features)
    ints = _int_columns(features, spec)
    for field in spec.sparse:
        name = field.name
        if name in ints:
            fields[name] = ints[name]
            continue
        raw = [example.get(name) for example in features]
        if field.kind == "categorical" and None not in raw:
            # The common case: one id per example, so bag i is simply element i.
            fields[name] = FieldBatch(
                feature_keys(name, raw),  # type: ignore[arg-type]
                np.arange(size, dtype=np.int64),
            )
            continue
        values: list[str | int] = []
        offsets = np.empty(size, dtype=np.int64)
        for i, value in enumerate(raw):
            offsets[i] = len(values)
            if isinstance(value, list):
                values.extend(value)
            elif value is not None:
                values.append(value)  # type: ignore[arg-type]
        fields[name] = FieldBatch(feature_keys(name, values), offsets)
    if spec.dense:
        columns = [[row.get(name, 0.0) for row in dense] for name in spec.dense]
        dense_matrix = np.ascontiguousarray(_float32(columns).T)
    else:
        dense_matrix = np.zeros((len(dense), 0), dtype=np.float32)
    return EncodedBatch(fields, dense_matrix)


def _float32(values: Sequence[Sequence[object]]) -> npt.NDArray[np.float32]:
    """Validated dense numbers as float32, each through float64 (so an int converts
    the same whether its column or row holds floats too: one rule for every path)."""
    return np.array(values, dtype=np.float64).astype(np.float32)


def _int_columns(
    features: Sequence[Mapping[str, object]], spec: FeatureSpec
) -> dict[str, FieldBatch]:
    """The categorical fields hashed in one pass when every example has an int64 id in
    each (the usual predict batch); empty otherwise, and ``encode`` goes field by field.
    Same keys as ``feature_keys`` per field: int64 values hash by value either way."""
    names = [f.name for f in spec.sparse if f.kind == "categorical"]
    if not names or not features:
        return {}
    try:
        # One C pass cuts the rows (KeyError: an example lacks a field).
        table = list(map(itemgetter(*names), features))
        values = np.array(table)
    except (KeyError, OverflowError, ValueError):  # missing, beyond 64 bits, ragged
        return {}
    # str, float or uint64-only ids make another dtype: those go field by field.
    if values.dtype != np.int64 or values.shape != (len(features), len(names)):
        return {}
    keys = int_feature_keys(names, values.T)
    return {
        name: FieldBatch(keys[i], np.arange(len(features), dtype=np.int64))
        for i, name in enumerate(names)
    }


@dataclass(frozen=True)
class FlatColumns:
    """A valid predict request as arrays: ``ids[i, j]`` is instance ``i``'s id of the
    spec's ``j``-th sparse field, ``dense[i, k]`` its ``k``-th dense value."""

    ids: npt.NDArray[np.int64]
    dense: npt.NDArray[np.float32]


def flat_columns(
    instances: Sequence[Mapping[str, object]], spec: FeatureSpec
) -> FlatColumns | None:
    """The usual predict request checked and cut into arrays in one pass (what
    ``check_instances`` and ``encode`` each do for it, together ~2x faster): every
    instance has exactly the spec's fields, every sparse field categorical with an int
    id that fits int64 (not a bool), every dense value an int or float within float32
    range. None for any other request, valid or not (string ids, fields left out,
    multi_hot lists, a bad value): ``check_instances`` and ``encode`` then take it."""
    if not instances or any(f.kind != "categorical" for f in spec.sparse):
        return None
    try:
        # Every spec name present (itemgetter) and no other (the count): the spec's.
        if set(map(len, instances)) != {len(spec.known_names)}:
            return None
        # A client sending string ids sends them from the first instance on: leave
        # before cutting the tables.
        if not all(type(instances[0].get(name)) is int for name in spec.sparse_names):
            return None
        ids = list(map(itemgetter(*spec.sparse_names), instances))
        dense = list(map(itemgetter(*spec.dense), instances)) if spec.dense else []
    except (KeyError, TypeError):  # a name missing, or not a mapping
        return None
    if len(spec.sparse) == 1:  # itemgetter of one name returns the value, not a 1-tuple
        ids = [(v,) for v in ids]
    if len(spec.dense) == 1:
        dense = [(v,) for v in dense]
    # type(), not isinstance: bool is an int subclass, and not an id or a number here.
    if set(map(type, chain.from_iterable(ids))) != {int}:
        return None
    if not set(map(type, chain.from_iterable(dense))) <= {int, float}:
        return None
    try:
        id_matrix = np.array(ids, dtype=np.int64)
        wide = np.array(dense, dtype=np.float64) if dense else np.zeros((len(ids), 0))
    except OverflowError:  # an id beyond int64 (hashed as a string) or an int beyond float
        return None
    if not (np.abs(wide) <= FLOAT32_MAX).all():  # NaN compares false too
        return None
    return FlatColumns(id_matrix, wide.astype(np.float32))


def column_keys(
    parts: Sequence[FlatColumns], spec: FeatureSpec
) -> tuple[Keys, npt.NDArray[np.float32]]:
    """The store keys of the requests ``flat_columns`` cut, one after another, as a
    (sparse fields, examples) matrix hashed in one vectorised pass, and their dense
    inputs: what ``encode`` makes of them, without a ``FieldBatch`` per field."""
    ids = parts[0].ids if len(parts) == 1 else np.concatenate([p.ids for p in parts])
    dense = parts[0].dense if len(parts) == 1 else np.concatenate([p.dense for p in parts])
    return int_feature_keys(spec.sparse_names, ids.T), dense


def encode_columns(parts: Sequence[FlatColumns], spec: FeatureSpec) -> EncodedBatch:
    """``encode`` of the requests ``flat_columns`` cut, one after another: the same keys
    and dense inputs."""
    keys, dense = column_keys(parts, spec)
    bags = np.arange(len(dense), dtype=np.int64)  # one id per example: bag i is element i
    return EncodedBatch(
        {name: FieldBatch(keys[j], bags) for j, name in enumerate(spec.sparse_names)}, dense
    )


def concat_batches(batches: Sequence[EncodedBatch]) -> EncodedBatch:
    """The batches one after another, as one batch (bag offsets shifted)."""
    if len(batches) == 1:
        return batches[0]
    fields: dict[str, FieldBatch] = {}
    for name in batches[0].fields:
        parts = [b.fields[name] for b in batches]
        starts = np.cumsum([0, *(len(p.keys) for p in parts[:-1])])
        fields[name] = FieldBatch(
            np.concatenate([p.keys for p in parts]),
            np.concatenate([p.offsets + start for p, start in zip(parts, starts, strict=True)]),
        )
    return EncodedBatch(fields, np.concatenate([b.dense for b in batches]))


def bag_lengths(field: FieldBatch) -> npt.NDArray[np.int64]:
    """How many ids each example has in ``field``."""
    return np.diff(field.offsets, append=np.int64(len(field.keys)))


def select_examples(batch: EncodedBatch, keep: npt.NDArray[np.bool_]) -> EncodedBatch:
    """The examples of ``batch`` where ``keep`` is True, in order."""
    fields: dict[str, FieldBatch] = {}
    for name, field in batch.fields.items():
        lengths = bag_lengths(field)[keep]
        fields[name] = FieldBatch(
            field.keys[np.repeat(keep, bag_lengths(field))],
            np.concatenate(([0], np.cumsum(lengths[:-1]))).astype(np.int64)
            if len(lengths)
            else np.empty(0, dtype=np.int64),
        )
    return EncodedBatch(fields, batch.dense[keep])
