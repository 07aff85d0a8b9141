"""Turning events or predict instances into model inputs.

The trainer and the service both call these functions, so hashing, pooling and
the defaults for unknown ids are the same code on both sides (no training/serving
skew).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from storage.base import EmbeddingStore, Keys, LookupResult
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


@dataclass
class GatheredRows:
    """The unique rows a batch touched, per table, as leaf tensors for autograd."""

    keys: dict[str, Keys]
    weights: dict[str, torch.Tensor]
    unknown: int  # lookups that found no row (read as zeros)


@dataclass(frozen=True)
class DistinctKeys:
    """Per table, the distinct keys of a batch and where each bag entry points in them:
    every key is looked up once per batch however many examples carry it."""

    keys: dict[str, Keys]
    inverse: dict[str, npt.NDArray[np.int64]]


def distinct_keys(batch: EncodedBatch, spec: FeatureSpec) -> DistinctKeys:
    """What ``np.unique(keys, return_inverse=True)`` gives per field. The fields with
    one key per example (most, in a predict batch) are done together: one sort of a
    (fields, batch) matrix instead of a ``np.unique`` per field."""
    names = [f.name for f in spec.sparse]
    rows = [n for n in names if len(batch.fields[n].keys) == batch.size > 0]
    keys: dict[str, Keys] = {}
    inverse: dict[str, npt.NDArray[np.int64]] = {}
    if len(rows) > 1:
        matrix = np.stack([batch.fields[n].keys for n in rows])
        order = np.argsort(matrix, axis=1)
        ordered = np.take_along_axis(matrix, order, axis=1)
        first = np.ones(matrix.shape, dtype=np.bool_)  # first of its run in sorted order
        np.not_equal(ordered[:, 1:], ordered[:, :-1], out=first[:, 1:])
        rank = np.cumsum(first, axis=1, dtype=np.int64) - 1
        inv = np.empty_like(rank)
        np.put_along_axis(inv, order, rank, axis=1)
        for i, name in enumerate(rows):
            keys[name] = ordered[i][first[i]]
            inverse[name] = inv[i]
    for name in names:
        if name not in keys:
            unique, field_inv = np.unique(batch.fields[name].keys, return_inverse=True)
            keys[name] = unique
            inverse[name] = field_inv.astype(np.int64).reshape(-1)
    return DistinctKeys({n: keys[n] for n in names}, {n: inverse[n] for n in names})


def pool(
    batch: EncodedBatch,
    spec: FeatureSpec,
    distinct: DistinctKeys,
    found: Mapping[str, LookupResult],
    *,
    train: bool,
) -> tuple[torch.Tensor, GatheredRows]:
    """Pooled embeddings ``(batch, fields, dim)`` from the rows of ``distinct`` keys.

    A field with exactly one id per example pools to that id's row, which is a plain
    gather (in numpy without gradients, for serving): the same numbers as
    ``embedding_bag`` (mean or sum of one row). Only training (``train=True``) returns
    the rows as weights (leaf tensors tracking gradients)."""
    pooled: list[torch.Tensor | npt.NDArray[np.float32]] = []
    rows = GatheredRows({}, {}, 0)
    for field in spec.sparse:
        result = found[field.name]
        rows.unknown += len(result.found) - int(np.count_nonzero(result.found))
        fb = batch.fields[field.name]
        one_each = len(fb.keys) == batch.size == len(fb.offsets) and field.kind == "categorical"
        if one_each and not train:
            pooled.append(result.rows[distinct.inverse[field.name]])
            continue
        weight = torch.from_numpy(np.ascontiguousarray(result.rows, dtype=np.float32))
        if train:
            weight.requires_grad_(True)
            rows.keys[field.name] = distinct.keys[field.name]
            rows.weights[field.name] = weight
        if len(distinct.keys[field.name]) == 0:
            pooled.append(torch.zeros(batch.size, field.dim))
            continue
        if one_each:  # with gradients: a plain gather is ~2x faster than embedding_bag
            pooled.append(F.embedding(torch.from_numpy(distinct.inverse[field.name]), weight))
            continue
        pooled.append(
            F.embedding_bag(
                torch.from_numpy(distinct.inverse[field.name]),
                weight,
                torch.from_numpy(batch.fields[field.name].offsets),
                mode=field.pooling,
            )
        )
    if pooled and all(isinstance(p, np.ndarray) for p in pooled):  # serving: one copy
        return torch.from_numpy(np.stack(pooled, axis=1)), rows
    tensors = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in pooled]
    return torch.stack(tensors, dim=1), rows


def gather(
    store: EmbeddingStore,
    batch: EncodedBatch,
    spec: FeatureSpec,
    *,
    train: bool,
) -> tuple[torch.Tensor, GatheredRows]:
    """Pooled embeddings ``(batch, fields, dim)``.

    In training (``train=True``) new ids get rows and the returned weights track
    gradients; in serving unknown ids read as zero vectors.
    """
    distinct = distinct_keys(batch, spec)
    found = {
        table: store.lookup(table, keys, create=train) for table, keys in distinct.keys.items()
    }
    return pool(batch, spec, distinct, found, train=train)
