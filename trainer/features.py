"""Turning events or predict instances into model inputs.

The trainer and the service both call these functions, so hashing, pooling and
the defaults for unknown ids are the same code on both sides (no training/serving
skew).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from storage.base import EmbeddingStore, Keys, LookupResult
from storage.keyindex import unique_inverse
from streaming.spec import FeatureSpec
from trainer.encoding import EncodedBatch, FieldBatch, encode

__all__ = [
    "DistinctKeys",
    "EncodedBatch",
    "FieldBatch",
    "GatheredRows",
    "distinct_keys",
    "encode",
    "gather",
    "pool",
]


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
    """What ``np.unique(keys, return_inverse=True)`` gives per field (by a compiled hash
    pass: ``storage.keyindex.unique_inverse``)."""
    keys: dict[str, Keys] = {}
    inverse: dict[str, npt.NDArray[np.int64]] = {}
    for field in spec.sparse:
        keys[field.name], inverse[field.name] = unique_inverse(batch.fields[field.name].keys)
    return DistinctKeys(keys, inverse)


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
    found = store.lookup_tables(distinct.keys, create=train)
    return pool(batch, spec, distinct, found, train=train)
