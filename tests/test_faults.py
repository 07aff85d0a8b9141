"""Faults the trainer survives in-process: Redis losing its rows (restarted without
persistence) and a Kafka broker restart, against the real services. Each run is
compared with an uninterrupted one: nothing acknowledged is lost, nothing is trained
twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streamrec.config import Settings
from streamrec.wiring import table_configs
from trainer import metrics
from trainer.trainer import StreamingTrainer, TrainerConfig

pytestmark = pytest.mark.integration

TOPIC = "events"
BATCH = 128
THIRD = 8 * BATCH


def rewinds(reason: str) -> float:
    value: float = metrics.REWINDS.labels(reason=reason)._value.get()
    return value


def cold_rows(store: TieredStore) -> dict[str, dict[int, bytes]]:
    """Every row of every table in the cold tier (complete after a flush)."""
    assert store.cold is not None
    out: dict[str, dict[int, bytes]] = {}
    for table in store.tables():
        rows: dict[int, bytes] = {}
        for keys, values in store.cold.scan(table):
            rows.update(zip(keys.tolist(), values, strict=True))
        out[table] = rows
    return out


def test_trainer_rewinds_when_redis_loses_unflushed_rows(clean_redis: str, tmp_path: Path) -> None:
    source = SyntheticSource(SyntheticConfig(num_sparse=4, num_dense=2, universe=500), 3 * THIRD)
    events = [event.to_json() for event in source]
    config = TrainerConfig(
        batch_size=BATCH, max_batch_wait_s=60, flush_every_s=3600, publish_every_s=3600
    )

    def open_store(name: str) -> TieredStore:
        return TieredStore(
            table_configs(source.spec, Settings()),
            RedisTier(clean_redis, prefix=name, buckets=64),
            RocksDBTier(tmp_path / name),
            clock=lambda: 1000.0,  # rows carry update times: make them comparable
            discard_hot_rows=True,
        )

    def feed(log: InMemoryLog, start: int, stop: int) -> None:
        for value in events[start:stop]:
            log.append(TOPIC, value)

    reference_store, reference_log = open_store("ref"), InMemoryLog()
    feed(reference_log, 0, 3 * THIRD)
    reference = StreamingTrainer(
        source.spec, reference_store, reference_log.consumer(TOPIC), config
    )
    reference.run(threading.Event(), max_events=3 * THIRD)

    store, log = open_store("hit"), InMemoryLog()
    trainer = StreamingTrainer(source.spec, store, log.consumer(TOPIC), config)
    feed(log, 0, THIRD)
    trainer.run(threading.Event(), max_events=THIRD)  # records position THIRD
    feed(log, THIRD, 2 * THIRD)
    before = rewinds("HotTierLost")
    reports = []
    thread = threading.Thread(
        target=lambda: reports.append(trainer.run(threading.Event(), max_events=2 * THIRD))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while trainer.evaluator.events < 2 * THIRD and time.monotonic() < deadline:
        time.sleep(0.01)
    # The second third is trained but not flushed (flush_every_s is an hour): Redis
    # losing it must not let the final flush record the position after it.
    redis.Redis.from_url(clean_redis).flushdb()
    feed(log, 2 * THIRD, 3 * THIRD)
    thread.join(120)

    assert reports and reports[0].events == 3 * THIRD
    assert rewinds("HotTierLost") == before + 1
    assert store.position() == reference_store.position() == {f"{TOPIC}:0": 3 * THIRD}
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name
    expected, actual = cold_rows(reference_store), cold_rows(store)
    assert all(len(rows) > 100 for rows in expected.values())
    assert actual == expected  # packed rows: embedding, optimizer state, metadata
    assert np.isclose(trainer.evaluator.report().auc, reference.evaluator.report().auc)
    reference_store.close()
    store.close()
