"""Dynamic batching of predict requests.

Much of scoring a 64-instance request is fixed cost: a Python step per feature table
in hashing, deduplicating, the near cache and pooling, and the model's per-layer
overhead, whatever the number of instances. So concurrent requests are scored together:
a request that finds no batch about to start starts one, which waits one turn of the
event loop and then takes every request waiting by then (up to ``max_instances``
instances, same model version) as one batch: one encode, one store read, one forward
pass, then each request gets its own slice of the predictions. A request at an idle
server is scored at once, alone; under load, requests that arrive while a batch is
computing or reading wait for the next one. Batches are tasks on the event loop: one
computes while others wait for their store reads. Requests for different versions
(``parameters.version``) never share a batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from service import metrics
from service.embeddings import EmbeddingReader
from storage.keyindex import distinct_rows
from streaming.spec import FeatureSpec
from trainer.encoding import FlatColumns, column_keys, concat_batches, encode_columns
from trainer.features import distinct_keys, encode, pool
from trainer.model import DLRM
from trainer.versions import VersionMeta


@dataclass(frozen=True)
class _Waiting:
    meta: VersionMeta
    model: DLRM
    instances: list[dict[str, Any]]
    columns: FlatColumns | None  # the instances as arrays, when ``flat_columns`` cut them
    answer: asyncio.Future[list[float]]


class PredictBatcher:
    """Scores the instances of concurrent predict requests in shared batches (see the
    module docstring)."""

    def __init__(self, reader: EmbeddingReader, *, max_instances: int = 256) -> None:
        self.reader = reader
        self.max_instances = max_instances
        self._waiting: deque[_Waiting] = deque()
        self._starting = False
        self._tasks: set[asyncio.Task[None]] = set()  # strong references while they run

    async def predict(
        self,
        meta: VersionMeta,
        model: DLRM,
        instances: list[dict[str, Any]],
        columns: FlatColumns | None = None,
    ) -> list[float]:
        """Click probabilities of validated ``instances`` under version ``meta``
        (``columns``: the same instances as ``flat_columns`` cut them)."""
        answer: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(meta, model, instances, columns, answer))
        if not self._starting:
            self._starting = True
            task = asyncio.create_task(self._score_waiting())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await answer

    async def _score_waiting(self) -> None:
        # One turn of the event loop first: requests parsed in the same turn as the one
        # that started this task join its batch (measured: +10-20% predicts at
        # saturation against none; more turns make batches that wait on each other).
        try:
            await asyncio.sleep(0)
        finally:  # cancelled too (shutdown): the next request must start a batch again
            self._starting = False
        while self._waiting:
            await self._score(self._take())

    def _take(self) -> list[_Waiting]:
        """The oldest waiting request and those after it for the same version, up to
        ``max_instances`` instances in all (the oldest is taken whatever its size)."""
        first = self._waiting.popleft()
        batch, kept = [first], deque[_Waiting]()
        size = len(first.instances)
        while self._waiting:
            item = self._waiting.popleft()
            if item.meta is first.meta and size + len(item.instances) <= self.max_instances:
                batch.append(item)
                size += len(item.instances)
            else:
                kept.append(item)
        self._waiting = kept
        return batch

    async def _score(self, batch: list[_Waiting]) -> None:
        try:
            predictions = await self._predict(batch)
        except Exception as exc:  # each request answers it (e.g. 503 for StoreUnavailable)
            for item in batch:
                if not item.answer.done():  # not cancelled by its client
                    item.answer.set_exception(exc)
            return
        except BaseException:  # cancelled (shutdown): so are the requests
            for item in batch:
                item.answer.cancel()
            raise
        start = 0
        for item in batch:
            end = start + len(item.instances)
            if not item.answer.done():
                item.answer.set_result(predictions[start:end])
            start = end

    async def _predict(self, batch: list[_Waiting]) -> list[float]:
        meta, model = batch[0].meta, batch[0].model
        columns = [item.columns for item in batch if item.columns is not None]
        if len(columns) == len(batch):
            dense, sparse, unknown = await self._gather_columns(columns, meta.spec)
        else:
            dense, sparse, unknown = await self._gather(batch, meta.spec)
        with torch.inference_mode():
            probabilities = torch.sigmoid(model(torch.from_numpy(dense), sparse))
        metrics.UNKNOWN_IDS.inc(unknown)
        metrics.BATCH_REQUESTS.observe(len(batch))
        predictions: list[float] = probabilities.tolist()
        return predictions

    async def _gather_columns(
        self, columns: list[FlatColumns], spec: FeatureSpec
    ) -> tuple[npt.NDArray[np.float32], torch.Tensor, int]:
        """The usual batch (every request cut by ``flat_columns``: one id per field and
        instance): keys hashed, deduplicated per field and looked up for all fields at
        once, and each instance's rows gathered in one step. The same inputs as
        ``_gather`` makes of it (a one-id bag pools to its row)."""
        keys, dense = column_keys(columns, spec)
        flat, starts, inverse = distinct_rows(keys)
        rows, found = await self.reader.lookup_spans_async(spec.sparse_names, flat, starts)
        sparse = torch.from_numpy(rows[inverse])  # (instances, fields, dim)
        return dense, sparse, len(found) - int(np.count_nonzero(found))

    async def _gather(
        self, batch: list[_Waiting], spec: FeatureSpec
    ) -> tuple[npt.NDArray[np.float32], torch.Tensor, int]:
        """Any batch, field by field (string ids, multi_hot lists, fields left out)."""
        # A flat instance serves as both parts: encode reads only the spec's names.
        encoded = concat_batches(
            [
                encode_columns([item.columns], spec)
                if item.columns is not None
                else encode(item.instances, item.instances, spec)
                for item in batch
            ]
        )
        distinct = distinct_keys(encoded, spec)
        rows = await self.reader.lookup_async(distinct.keys)
        with torch.inference_mode():
            sparse, gathered = pool(encoded, spec, distinct, rows, train=False)
        return encoded.dense, sparse, gathered.unknown
