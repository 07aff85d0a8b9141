"""Faults the trainer survives in-process: Redis losing its rows (restarted without
persistence) and a Kafka broker restart, against the real services. Each run is
compared with an uninterrupted one: nothing acknowledged is lost, nothing is trained
twice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from kafka import KafkaConsumer, KafkaProducer
from support import (
    LocalRedisCluster,
    LocalSentinel,
    cluster_masters,
    describe,
    migrate_slot,
    new_topic,
    redis_command,
    redis_redirects,
    restart_service,
    store_rows,
    train_in_process,
    wait_for_report,
)

from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streamrec.config import Settings, load_settings
from streamrec.runtime import TrainerRuntime
from streamrec.wiring import table_configs
from trainer import metrics
from trainer.trainer import StreamingTrainer, TrainerConfig

pytestmark = pytest.mark.integration

TOPIC = "events"
BATCH = 128
THIRD = 8 * BATCH


SMALL = SyntheticConfig(num_sparse=4, num_dense=2, universe=500)


def redis_rocksdb_store(
    redis_url: str, path: Path, prefix: str, *, discard_hot_rows: bool = False
) -> TieredStore:
    """A store of ``SMALL``'s tables: Redis (64 buckets a table) over RocksDB at ``path``,
    on a fixed clock (rows carry update times: runs compare bit for bit)."""
    return TieredStore(
        table_configs(SyntheticSource(SMALL).spec, Settings()),
        RedisTier(redis_url, prefix=prefix, buckets=64),
        RocksDBTier(path),
        clock=lambda: 1000.0,
        discard_hot_rows=discard_hot_rows,
    )


def rewinds(reason: str) -> float:
    value: float = metrics.REWINDS.labels(reason=reason)._value.get()
    return value


@pytest.mark.parametrize("redis_fixture", ["clean_redis", "clean_redis_cluster"])
def test_trainer_rewinds_when_redis_loses_unflushed_rows(
    redis_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Redis loses what it holds; on a Redis Cluster one master of three does."""
    clean_redis = request.getfixturevalue(redis_fixture)
    source = SyntheticSource(SMALL, 3 * THIRD)
    events = [event.to_json() for event in source]
    config = TrainerConfig(
        batch_size=BATCH, max_batch_wait_s=60, flush_every_s=3600, publish_every_s=3600
    )

    def open_store(name: str) -> TieredStore:
        return redis_rocksdb_store(clean_redis, tmp_path / name, name, discard_hot_rows=True)

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
    if redis_fixture == "clean_redis":
        redis.Redis.from_url(clean_redis).flushdb()
    else:
        masters = cluster_masters(clean_redis)
        masters[1].flushall()
        for master in masters:
            master.close()
    feed(log, 2 * THIRD, 3 * THIRD)
    thread.join(120)

    assert reports and reports[0].events == 3 * THIRD
    assert rewinds("HotTierLost") == before + 1
    assert store.position() == reference_store.position() == {f"{TOPIC}:0": 3 * THIRD}
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name
    expected, actual = store_rows(reference_store, metadata=True), store_rows(store, metadata=True)
    assert all(len(rows) > 100 for rows in expected.values())
    assert actual == expected  # packed rows: embedding, optimizer state, metadata
    assert np.isclose(trainer.evaluator.report().auc, reference.evaluator.report().auc)
    reference_store.close()
    store.close()


def all_rewinds() -> float:
    return sum(
        sample.value
        for metric in metrics.REWINDS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


def move_slots(
    masters: list[redis.Redis], pattern: bytes, stop: threading.Event, moved: list[int]
) -> None:
    """Move the slots of the keys matching ``pattern`` round the masters, one slot after
    another, until ``stop`` is set."""
    slots = sorted(
        {
            int(redis_command(m, "CLUSTER", "KEYSLOT", key))
            for m in masters
            for key in m.scan_iter(match=pattern)
        }
    )
    ports = [m.connection_pool.connection_kwargs["port"] for m in masters]
    while not stop.is_set():
        slot = slots[len(moved) % len(slots)]
        ranges = redis_command(masters[0], "CLUSTER", "SLOTS")
        port = next(int(r[2][1]) for r in ranges if int(r[0]) <= slot <= int(r[1]))
        owner = ports.index(port)
        migrate_slot(masters, slot, masters[owner], masters[(owner + 1) % len(masters)])
        moved.append(slot)
        time.sleep(0.002)


@pytest.mark.parametrize("reshard", ["slot_by_slot", "scale_out"])
def test_trainer_trains_on_through_a_reshard(reshard: str, services: None, tmp_path: Path) -> None:
    """Resharding a Redis Cluster under a running trainer: slot by slot, the slots of
    its rows, row counters and loss markers move round the masters; or a fourth master
    joins and ``redis-cli --cluster rebalance`` moves a quarter of all slots to it. Its
    reads and writes meet ASK and MOVED replies while it trains and flushes; it never
    rewinds, and its result is bit-exact with an uninterrupted run's."""
    cluster = LocalRedisCluster(tmp_path / "cluster")  # its own: slots move all over
    masters = cluster_masters(cluster.url)
    total, first = 48 * BATCH, 8 * BATCH
    source = SyntheticSource(SMALL, total)
    events = [event.to_json() for event in source]
    config = TrainerConfig(
        batch_size=BATCH, max_batch_wait_s=60, flush_every_s=0.1, publish_every_s=3600
    )

    def open_store(name: str) -> TieredStore:
        return redis_rocksdb_store(cluster.url, tmp_path / name, name)

    logs = [InMemoryLog(), InMemoryLog()]  # one each: a log drops what was committed
    for value in events:
        logs[0].append(TOPIC, value)
    for value in events[:first]:
        logs[1].append(TOPIC, value)
    stores: list[TieredStore] = []
    try:
        stores += [open_store("ref"), open_store("hit")]
        reference, trainer = (
            StreamingTrainer(source.spec, store, log.consumer(TOPIC), config)
            for store, log in zip(stores, logs, strict=True)
        )
        reference.run(threading.Event(), max_events=total)
        trainer.run(threading.Event(), max_events=first)  # its keys exist: slots to move
        if reshard == "scale_out":
            cluster.add_master()  # empty: nothing moves until the rebalance
        rewinds_before, redirects_before = all_rewinds(), redis_redirects("write")
        stop, moved = threading.Event(), list[int]()
        errors: list[BaseException] = []

        def move() -> None:
            try:
                if reshard == "scale_out":
                    cluster.rebalance()
                else:
                    move_slots(masters, b"*hit:*", stop, moved)
            except BaseException as e:
                errors.append(e)

        def feed() -> None:  # paced while the reshard lasts, so training overlaps it
            for start in range(first, total, BATCH):
                for value in events[start : start + BATCH]:
                    logs[1].append(TOPIC, value)
                if mover.is_alive():
                    time.sleep(0.1)

        mover, feeder = threading.Thread(target=move), threading.Thread(target=feed)
        mover.start()
        feeder.start()
        try:
            report = trainer.run(threading.Event(), max_events=total - first)
        finally:
            stop.set()
            mover.join(120)
            feeder.join(60)
        assert not errors, errors
        assert report.events == total
        assert all_rewinds() == rewinds_before
        assert redis_redirects("write") > redirects_before  # the reshard did meet its writes
        if reshard == "scale_out":
            added = cluster_masters(cluster.url)
            assert len(added) == 4
            assert all(any(m.scan_iter(match=b"hit:*")) for m in added)  # rows on each
            for master in added:
                master.close()
        assert stores[1].position() == stores[0].position() == {f"{TOPIC}:0": total}
        for name, tensor in reference.model.state_dict().items():
            assert torch.equal(tensor, trainer.model.state_dict()[name]), name
        expected = store_rows(stores[0], metadata=True)
        assert all(len(rows) > 100 for rows in expected.values())
        assert store_rows(stores[1], metadata=True) == expected
    finally:
        for store in stores:
            store.close()
        for master in masters:
            master.close()
        cluster.stop()


KAFKA_SOURCE = SyntheticSource(
    SyntheticConfig(num_sparse=8, num_dense=4, interaction_pairs=[(1, 2)]), 24 * 256
)


def write_config(
    path: Path, kafka: str, redis_url: str, topic: str, batch: int, store: str = ""
) -> Path:
    """Kafka ``topic`` into a Redis + RocksDB store (``store``: more of its settings);
    group and Redis prefix are named after ``path`` so runs never share them."""
    name = f"{path.name}-{topic}"
    path.mkdir(parents=True)
    config = path / "streamrec.toml"
    spec = KAFKA_SOURCE.spec
    sparse = ", ".join(f'{{name = "{f.name}", dim = {f.dim}}}' for f in spec.sparse)
    dense = ", ".join(f'"{name}"' for name in spec.dense)
    config.write_text(
        f"""
features = {{sparse = [{sparse}], dense = [{dense}]}}
[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
topic = "{topic}"
dead_letter_topic = "{name}-dead-letters"
group_id = "{name}"
[store]
hot = "redis"
redis_url = "{redis_url}"
redis_prefix = "{name}"
data_dir = "{path / "data"}"
{store}
[trainer]
batch_size = {batch}
max_batch_wait_s = 60
flush_every_s = 0.25
publish_every_s = 3600
"""
    )
    return config


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    for value in values:
        producer.send(topic, value)
    producer.flush()
    producer.close()


def recorded_position(config: Path) -> dict[str, int] | None:
    settings = load_settings(config)
    cold = RocksDBTier(settings.store.rocksdb_path)
    position = TieredStore(table_configs(KAFKA_SOURCE.spec, settings), cold).position()
    cold.close()
    return position


@pytest.mark.slow
def test_trainer_reconnects_after_a_kafka_broker_restart(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    batch, events = 256, KAFKA_SOURCE.total or 0
    topic = new_topic(kafka_bootstrap, "broker-restart", partitions=1)
    values = [event.to_json() for event in KAFKA_SOURCE]
    # Bad events in the backlog: dead-letter copies are sent around the restart too.
    bad = [f"not json {i}".encode() for i in range(3)]
    backlog = values[: 2 * events // 3]
    for i, value in enumerate(bad):
        backlog.insert((2 + i) * len(backlog) // 6, value)
    produce(kafka_bootstrap, topic, backlog)
    config = write_config(tmp_path / "trainer", kafka_bootstrap, redis_url, topic, batch)
    trainer = subprocess.Popen(
        [
            *(sys.executable, "-m", "streamrec.cli", "train"),
            *("--config", str(config), "--max-events", str(events)),
        ],
        env={
            **os.environ,
            "STREAMREC_METRICS_PORT": "0",
            "STREAMREC_TRAINER__PROGRESS_EVERY_S": "0.2",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert trainer.stdout is not None
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(trainer.stdout or []), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and trainer.poll() is None:
        trained = [int(line.split("events=")[1].split()[0]) for line in output if "events=" in line]
        if trained and trained[-1] >= events // 3:
            break
        time.sleep(0.05)
    assert trainer.poll() is None, "".join(output)

    # The broker goes away while the trainer is busy with the backlog, and comes back.
    assert "kafka: started" in restart_service("kafka")
    assert trainer.poll() is None, "the trainer must survive the broker restart"
    produce(kafka_bootstrap, topic, values[2 * events // 3 :])
    try:
        code = trainer.wait(180)
    finally:
        trainer.kill()
    reader.join(10)
    log = "".join(output)
    assert code == 0, log
    # Every event trained exactly once: a replay would reach max_events short of the
    # end of the topic, a skip would never reach max_events.
    assert f"stopped after {events} events" in log, log
    assert recorded_position(config) == {f"{topic}:0": events + len(bad)}
    dead = KafkaConsumer(
        f"trainer-{topic}-dead-letters",
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    stored = {record.value for record in dead}
    dead.close()
    assert stored == set(bad)


def train_through_a_fault(
    kafka: str, path: Path, redis_url: str, fault: Callable[[], object], store: str = ""
) -> None:
    """Train ``KAFKA_SOURCE`` from Kafka into Redis (``redis_url``; ``store``: more store
    settings) over RocksDB twice: uninterrupted, then in a ``TrainerRuntime`` with
    ``fault`` a third of the way in. The second run rewinds and ends bit-exact with the
    first: rows, dense weights and position."""
    batch, events = 256, KAFKA_SOURCE.total or 0
    topic = new_topic(kafka, path.name, partitions=1)
    produce(kafka, topic, [event.to_json() for event in KAFKA_SOURCE])

    config = write_config(path / "reference", kafka, redis_url, topic, batch, store)
    reference = train_in_process(config, events)
    expected_dense = {k: v.clone() for k, v in reference.trainer.model.state_dict().items()}
    expected_rows = store_rows(reference.store, metadata=False)
    assert reference.stop() == 0

    config = write_config(path / "fault", kafka, redis_url, topic, batch, store)
    before = sum(rewinds(r) for r in ("StoreUnavailable", "HotTierLost"))
    runtime = TrainerRuntime.start(load_settings(config), max_events=events)
    deadline = time.monotonic() + 120
    while (
        runtime.alive()
        and runtime.trainer.evaluator.events < events // 3
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert runtime.report is None, "the fault must land mid-stream"
    assert runtime.alive(), f"the trainer died before the fault\n{describe(runtime)}"
    fault()
    report = wait_for_report(runtime, 300)
    assert sum(rewinds(r) for r in ("StoreUnavailable", "HotTierLost")) > before

    assert report.events == events
    assert runtime.store.position() == {f"{topic}:0": events}
    for name, tensor in expected_dense.items():
        assert torch.equal(tensor, runtime.trainer.model.state_dict()[name]), name
    assert store_rows(runtime.store, metadata=False) == expected_rows
    assert runtime.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis_cluster"])
def test_trainer_survives_a_redis_restart_mid_stream(
    kafka_bootstrap: str, cluster: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The local Redis restarts without persistence; on a Redis Cluster, one master of
    three does (the trainer sees it unreachable, then the marker on it gone)."""
    redis_url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")

    def restart() -> None:
        if cluster:
            request.getfixturevalue("redis_cluster").restart_master(1)
        else:
            restart_service("redis")  # no persistence: every hot row and blob is gone

    train_through_a_fault(kafka_bootstrap, tmp_path / "redis-restart", redis_url, restart)


def test_trainer_trains_on_through_a_sentinel_failover(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Redis under Sentinel (a master, 2 replicas, 3 sentinels), every flush waiting
    for a replica to hold the rows it records (``store.redis_min_replicas = 1``): the
    master is killed mid-stream and the sentinels promote a replica. The trainer
    rewinds once the new master answers and trains on; its result is bit-exact with an
    uninterrupted run's."""
    group = LocalSentinel(tmp_path / "sentinel", replicas=2)
    try:
        train_through_a_fault(
            kafka_bootstrap,
            tmp_path / "failover",
            group.url,
            group.kill_master,
            "redis_min_replicas = 1",
        )
    finally:
        group.stop()
