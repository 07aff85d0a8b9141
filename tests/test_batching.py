"""Dynamic batching of predict requests (``service.batching``): concurrent requests
share batches and each still gets exactly its own predictions."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from test_service import SOURCE, instance, trained_store

from service.batching import PredictBatcher
from service.embeddings import EmbeddingReader
from storage.base import StoreUnavailable
from storage.tiered import TieredStore
from trainer.encoding import flat_columns
from trainer.model import DLRM
from trainer.versions import VersionMeta, latest_version, load_version


@pytest.fixture(scope="module")
def store() -> TieredStore:
    return trained_store(SOURCE.spec)


def latest(store: TieredStore) -> tuple[VersionMeta, DLRM]:
    """The store's newest version, loaded afresh (each call: a distinct model object)."""
    version = latest_version(store, "streamrec")
    assert version is not None
    return load_version(store, "streamrec", version)


def requests(n: int) -> list[list[dict[str, Any]]]:
    """``n`` requests of 1 to 5 instances, every one different."""
    return [
        [instance(c1=i * 7 + k, c2=str(k), c3=i, i1=i / 3, i2=-k) for k in range(1 + i % 5)]
        for i in range(n)
    ]


def batches_scored() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("streamrec_service_predict_batch_requests_count") or 0.0
    total = REGISTRY.get_sample_value("streamrec_service_predict_batch_requests_sum") or 0.0
    return count, total


def test_concurrent_requests_share_batches_and_get_their_own_predictions(
    store: TieredStore,
) -> None:
    meta, model = latest(store)
    reader = EmbeddingReader(store, budget_s=30.0)  # never a late read answering defaults
    asked = requests(24)

    async def alone() -> list[list[float]]:
        batcher = PredictBatcher(reader, max_instances=1)
        return [await batcher.predict(meta, model, r) for r in asked]

    async def together() -> list[list[float]]:
        batcher = PredictBatcher(reader, max_instances=20)
        return await asyncio.gather(*(batcher.predict(meta, model, r) for r in asked))

    try:
        expected = asyncio.run(alone())
        count, total = batches_scored()
        got = asyncio.run(together())
        count, total = batches_scored()[0] - count, batches_scored()[1] - total
    finally:
        reader.close()
    assert [len(g) for g in got] == [len(r) for r in asked]
    for mine, reference in zip(got, expected, strict=True):
        # Same rows and weights; a larger matrix product may round differently.
        np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-7)
    assert total == len(asked)
    assert count < len(asked) / 3  # shared: 72 instances in batches of at most 20


def test_the_one_pass_path_of_usual_requests_predicts_what_the_per_field_path_does(
    store: TieredStore,
) -> None:
    meta, model = latest(store)
    asked = [  # int ids only: requests flat_columns cuts (unknown ids and repeats too)
        [instance(c1=i * 7 + k, c2=k % 3, c3=i, i1=i / 3, i2=-k) for k in range(1 + i % 5)]
        for i in range(12)
    ] + [[instance(c1=10**6 + k, c2=5, c3=5) for k in range(4)]]
    columns = [flat_columns(r, meta.spec) for r in asked]
    assert all(c is not None for c in columns)

    def unknown() -> float:
        return REGISTRY.get_sample_value("streamrec_service_unknown_ids_total") or 0.0

    def score(ttl_s: float, fast: bool) -> tuple[list[list[float]], float]:
        """Predictions of every request, batched alike, and the unknown ids counted."""
        reader = EmbeddingReader(store, ttl_s=ttl_s, budget_s=30.0)
        batcher = PredictBatcher(reader, max_instances=20)
        before = unknown()

        async def scored() -> list[list[float]]:
            pairs = zip(asked, columns, strict=True)
            return await asyncio.gather(
                *(batcher.predict(meta, model, r, c if fast else None) for r, c in pairs)
            )

        try:
            return asyncio.run(scored()), unknown() - before
        finally:
            reader.close()

    per_field, unknown_ids = score(1.0, fast=False)
    assert unknown_ids > 0
    # The same inputs, batched the same way: the very same numbers and counts, with the
    # near cache (one pass) and without it (the per-table fallback).
    assert score(1.0, fast=True) == (per_field, unknown_ids)
    assert score(0.0, fast=True) == (per_field, unknown_ids)


def test_versions_never_share_a_batch_and_errors_reach_every_request(
    store: TieredStore,
) -> None:
    meta, model = latest(store)
    other_meta, other_model = latest(store)  # a separate load: another batch key
    seen: list[int] = []

    class CountingReader(EmbeddingReader):
        async def lookup_async(self, keys: Any) -> Any:
            seen.append(len(keys["c1"]))
            if len(seen) == 3:
                raise StoreUnavailable("redis://nowhere: down")
            return await super().lookup_async(keys)

    reader = CountingReader(store, budget_s=30.0)

    async def run() -> list[Any]:
        batcher = PredictBatcher(reader)
        calls = [
            batcher.predict(meta, model, [instance(c1=1)]),
            batcher.predict(other_meta, other_model, [instance(c1=2)]),
            batcher.predict(meta, model, [instance(c1=3)]),
        ]
        first = await asyncio.gather(*calls)
        failing = [batcher.predict(meta, model, [instance(c1=k)]) for k in (4, 5)]
        return [*first, *await asyncio.gather(*failing, return_exceptions=True)]

    try:
        results = asyncio.run(run())
    finally:
        reader.close()
    assert seen == [2, 1, 2]  # version 1's two requests together, the other alone, then both
    assert all(len(r) == 1 for r in results[:3])
    assert all(isinstance(r, StoreUnavailable) for r in results[3:])
