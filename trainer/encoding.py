"""Encoding events or predict instances into store keys and dense inputs (no torch:
the trainer's decode workers import this module). ``trainer.features`` re-exports it
beside the pooling code that needs torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import numpy.typing as npt

from storage.base import Keys
from storage.keys import feature_keys, int_feature_keys
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
    dense_matrix = np.zeros((len(dense), len(spec.dense)), dtype=np.float32)
    for j, name in enumerate(spec.dense):
        dense_matrix[:, j] = [row.get(name, 0.0) for row in dense]
    return EncodedBatch(fields, dense_matrix)


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
