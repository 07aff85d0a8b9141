from __future__ import annotations

import gc
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import orjson
import pytest
import torch
from prometheus_client import REGISTRY

from storage.base import EmbeddingStore
from storage.factory import open_store
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore
from streaming.log import InMemoryConsumer, InMemoryLog, JsonlFileProducer, LogUnavailable, Record
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streaming.spec import FeatureSpec
from streamrec.config import Settings
from streamrec.wiring import table_configs
from trainer import metrics
from trainer.decoding import decode_chunk
from trainer.encoding import EncodedBatch, FieldBatch
from trainer.model import DLRM, ModelConfig
from trainer.trainer import StreamingTrainer, TrainerConfig, _Lookahead, collector_threshold
from trainer.versions import latest_version, load_version, publish

TOPIC = "events"


def small_source(max_events: int) -> SyntheticSource:
    return SyntheticSource(SyntheticConfig(num_sparse=4, num_dense=2, universe=500), max_events)


def make_trainer(
    source: SyntheticSource, store: TieredStore, log: InMemoryLog, dlq: JsonlFileProducer
) -> StreamingTrainer:
    config = TrainerConfig(batch_size=256, flush_every_s=0.2, publish_every_s=0.2, eval_window=5000)
    return StreamingTrainer(
        source.spec, store, log.consumer(TOPIC, store.position()), config, dead_letters=dlq
    )


def test_trainer_learns_rejects_bad_events_and_records_position(tmp_path: Path) -> None:
    source = small_source(20_000)
    store = TieredStore(
        table_configs(source.spec, Settings()), MemoryTier(), RocksDBTier(tmp_path / "db")
    )
    log = InMemoryLog()
    producer = log.producer()
    for i, event in enumerate(source):
        producer.send(TOPIC, event.to_json())
        if i % 5000 == 0:
            producer.send(TOPIC, b"{broken")
            producer.send(
                TOPIC, orjson.dumps({"event_id": "x", "ts": 1, "label": 3, "features": {}})
            )
    dlq = JsonlFileProducer(tmp_path / "dlq.jsonl")
    trainer = make_trainer(source, store, log, dlq)
    report = trainer.run(threading.Event(), max_events=20_000)

    assert report.events == 20_000
    assert report.bad_events == 8
    reasons = [
        orjson.loads(line)["headers"]["reason"]
        for line in (tmp_path / "dlq.jsonl").read_bytes().splitlines()
    ]
    assert sorted(set(reasons)) == ["invalid_json", "wrong_type"] and len(reasons) == 8
    # Learning, not plumbing: the recent window beats chance by a wide margin.
    best = source.best_auc(15_000, 20_000)
    assert report.evaluation.window_auc > best - 0.08, (report.evaluation, best)
    # Every consumed record, bad ones included, is covered by the recorded position.
    assert store.position() == {f"{TOPIC}:0": 20_008}
    version = latest_version(store, "streamrec")
    assert version is not None and version == report.version
    meta, _ = load_version(store, "streamrec", version)
    assert meta.events_trained == 20_000 and meta.spec == source.spec


def test_restart_resumes_rows_dense_weights_and_position(tmp_path: Path) -> None:
    source = small_source(4_000)
    tables = table_configs(source.spec, Settings())
    events = [e.to_json() for e in source]
    dlq = JsonlFileProducer(tmp_path / "dlq.jsonl")

    store = TieredStore(tables, MemoryTier(), RocksDBTier(tmp_path / "db"))
    log = InMemoryLog()
    for raw in events[:2_000]:
        log.append(TOPIC, raw)
    first = make_trainer(source, store, log, dlq)
    first.run(threading.Event(), max_events=2_000)
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    store.close()

    reopened = TieredStore(tables, MemoryTier(), RocksDBTier(tmp_path / "db"))
    assert reopened.position() == {f"{TOPIC}:0": 2_000}
    log2 = InMemoryLog(start=reopened.position())
    for raw in events[2_000:]:
        log2.append(TOPIC, raw)
    second = make_trainer(source, reopened, log2, dlq)
    for name, tensor in second.model.state_dict().items():
        assert np.array_equal(tensor.numpy(), weights[name].numpy()), name
    report = second.run(threading.Event(), max_events=2_000)
    assert report.events == 2_000
    assert reopened.position() == {f"{TOPIC}:0": 4_000}


def test_publish_keeps_only_the_last_versions() -> None:
    source = small_source(10)
    store = TieredStore(table_configs(source.spec, Settings()), MemoryTier())
    model = DLRM(source.spec)
    for _ in range(5):
        meta = publish(
            store,
            model,
            name="m",
            spec=source.spec,
            config=ModelConfig(),
            events_trained=0,
            position={},
            keep=2,
        )
    assert meta.version == 5 and latest_version(store, "m") == 5
    assert load_version(store, "m", 4)[0].version == 4
    with pytest.raises(KeyError, match="no version 3"):
        load_version(store, "m", 3)


def test_crash_after_a_checkpoint_then_resume_is_bit_exact(tmp_path: Path) -> None:
    source = small_source(6 * 256)
    tables = table_configs(source.spec, Settings())
    events = [e.to_json() for e in source]
    config = TrainerConfig(batch_size=256, flush_every_s=3600, publish_every_s=3600)

    def store_at(path: Path) -> TieredStore:
        return TieredStore(tables, MemoryTier(), RocksDBTier(path), clock=lambda: 1000.0)

    def trainer_over(store: TieredStore, log: InMemoryLog) -> StreamingTrainer:
        return StreamingTrainer(source.spec, store, log.consumer(TOPIC, store.position()), config)

    def loaded_log(start: int) -> InMemoryLog:
        log = InMemoryLog(start={f"{TOPIC}:0": start})
        for raw in events[start:]:
            log.append(TOPIC, raw)
        return log

    # Uninterrupted run over all six batches.
    reference_store = store_at(tmp_path / "reference")
    reference = trainer_over(reference_store, loaded_log(0))
    reference.run(threading.Event(), max_events=len(events))

    # Crash: checkpoint after three batches, train one more, lose the process state.
    crashed_store = store_at(tmp_path / "crashed")
    crashed = trainer_over(crashed_store, loaded_log(0))
    crashed.run(threading.Event(), max_events=3 * 256)
    lost = decode_chunk(events[768:1024], source.spec)
    crashed.train_step(lost.labels, lost.encoded)
    assert crashed_store.cold is not None
    crashed_store.cold.close()  # the memory hot tier dies with the process

    resumed_store = store_at(tmp_path / "crashed")
    assert resumed_store.position() == {f"{TOPIC}:0": 768}
    resumed = trainer_over(resumed_store, loaded_log(768))
    resumed.run(threading.Event(), max_events=len(events) - 768)

    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    reference_adam = reference.optimizer.state_dict()["state"]
    resumed_adam = resumed.optimizer.state_dict()["state"]
    for index, state in reference_adam.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_adam[index][key]))
    for field in source.spec.sparse_names:
        ids = sorted({e.features[field] for e in source}, key=str)  # synthetic ids are ints
        keys = feature_keys(field, ids)  # type: ignore[arg-type]
        assert rows_of(reference_store, field, keys) == rows_of(resumed_store, field, keys)


class _FlakyConsumer(InMemoryConsumer):
    """Fails the polls numbered in ``failing`` after reading (and dropping) their
    records, as a client that raises halfway through a fetch would."""

    def __init__(self, log: InMemoryLog, failing: set[int]) -> None:
        super().__init__(log, TOPIC)
        self.failing, self.polls = failing, 0

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self.polls += 1
        records = super().poll(max_records, timeout_s)
        if self.polls in self.failing:
            raise LogUnavailable(f"poll {self.polls} failed after reading {len(records)}")
        return records


@pytest.mark.timeout(120)  # a skipped record leaves the trainer waiting for it
def test_a_failed_poll_is_retried_and_neither_skips_nor_repeats_a_record(
    tmp_path: Path,
) -> None:
    source = small_source(6 * 256)
    tables = table_configs(source.spec, Settings())
    config = TrainerConfig(batch_size=256, flush_every_s=3600, publish_every_s=3600)
    trainers = []
    for name, failing in (("reference", set()), ("flaky", {3, 4})):
        log = InMemoryLog()
        for event in source:
            log.append(TOPIC, event.to_json())
        store = TieredStore(tables, MemoryTier(), RocksDBTier(tmp_path / name))
        consumer = _FlakyConsumer(log, failing)
        trainer = StreamingTrainer(source.spec, store, consumer, config)
        before = metrics.LOG_ERRORS._value.get()
        report = trainer.run(threading.Event(), max_events=6 * 256)
        assert report.events == 6 * 256
        assert metrics.LOG_ERRORS._value.get() - before == len(failing)
        assert store.position() == {f"{TOPIC}:0": 6 * 256}
        trainers.append(trainer)
    reference, flaky = trainers
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, flaky.model.state_dict()[name]), name


class _KillingConsumer(InMemoryConsumer):
    """Kills the trainer's decode workers (SIGKILL) before the polls numbered in
    ``killing``, as the kernel's out-of-memory killer would. Polls return at most 100
    records, so a batch spans several polls."""

    def __init__(self, log: InMemoryLog, killing: set[int]) -> None:
        super().__init__(log, TOPIC)
        self.killing, self.polls = killing, 0
        self.trainer: StreamingTrainer | None = None

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self.polls += 1
        if self.polls in self.killing and self.trainer is not None:
            for pid in self.trainer._decoder.worker_pids():
                os.kill(pid, signal.SIGKILL)
        return super().poll(min(max_records, 100), timeout_s)


@pytest.mark.timeout(120)
def test_decode_workers_train_exactly_what_the_trainer_thread_would(tmp_path: Path) -> None:
    """Decoding in worker processes changes nothing but where it runs: the same dense
    weights, rows, dead letters and position as decoding in the trainer's thread, also
    when the workers are killed mid-stream (their polls are decoded again, here)."""
    source = small_source(8 * 256)
    payloads = [event.to_json() for event in source]
    # Two bad records in different polls of one batch, one in a later batch.
    payloads[50:50] = [b"{broken"]
    payloads[150:150] = [b"[1]"]
    payloads[700:700] = [orjson.dumps({"event_id": "x", "ts": 1, "label": 3, "features": {}})]
    tables = table_configs(source.spec, Settings())
    runs = {}
    for name, workers, killing in (("thread", 0, set()), ("two", 2, set()), ("killed", 1, {9, 17})):
        log = InMemoryLog()
        for raw in payloads:
            log.append(TOPIC, raw)
        cold = RocksDBTier(tmp_path / name)
        store = TieredStore(tables, MemoryTier(), cold, clock=lambda: 1000.0)
        consumer = _KillingConsumer(log, killing)
        config = TrainerConfig(
            batch_size=256,
            flush_every_s=3600,
            publish_every_s=3600,
            decode_workers=workers,
            torch_threads=1,
        )
        dlq = JsonlFileProducer(tmp_path / f"{name}.jsonl")
        trainer = StreamingTrainer(source.spec, store, consumer, config, dead_letters=dlq)
        consumer.trainer = trainer
        failures = metrics.DECODE_WORKER_FAILURES._value.get()
        report = trainer.run(threading.Event(), max_events=8 * 256)
        assert (report.events, report.bad_events) == (8 * 256, 3)
        assert store.position() == {f"{TOPIC}:0": 8 * 256 + 3}
        runs[name] = (trainer, store, metrics.DECODE_WORKER_FAILURES._value.get() - failures)
    assert runs["thread"][2] == runs["two"][2] == 0
    assert runs["killed"][2] >= 1
    thread, thread_store, _ = runs["thread"]
    for name in ("two", "killed"):
        other, other_store, _ = runs[name]
        for param, tensor in thread.model.state_dict().items():
            assert torch.equal(tensor, other.model.state_dict()[param]), (name, param)
        for field in source.spec.sparse_names:
            ids = sorted({e.features[field] for e in source}, key=str)
            keys = feature_keys(field, ids)  # type: ignore[arg-type]
            assert rows_of(thread_store, field, keys) == rows_of(other_store, field, keys)
        dead = (tmp_path / f"{name}.jsonl").read_text()
        assert dead == (tmp_path / "thread.jsonl").read_text() and dead.count("\n") == 3


def trainer_over_backlog(
    source: SyntheticSource, tmp_path: Path
) -> tuple[StreamingTrainer, TieredStore]:
    """A trainer (``make_trainer``) whose log already holds every event of ``source``."""
    store = TieredStore(
        table_configs(source.spec, Settings()), MemoryTier(), RocksDBTier(tmp_path / "db")
    )
    log = InMemoryLog()
    for event in source:
        log.append(TOPIC, event.to_json())
    return make_trainer(source, store, log, JsonlFileProducer(tmp_path / "dlq.jsonl")), store


def test_lag_is_the_records_in_the_log_not_trained_yet(tmp_path: Path) -> None:
    trainer, _ = trainer_over_backlog(small_source(2_000), tmp_path)
    trainer.run(threading.Event(), max_events=1_024)
    lag = metrics.LAG_EVENTS.labels(partition=f"{TOPIC}:0")._value.get()
    assert lag == 2_000 - 1_024
    trainer.run(threading.Event(), max_events=2_000 - 1_024)
    assert metrics.LAG_EVENTS.labels(partition=f"{TOPIC}:0")._value.get() == 0


def rows_of(store: TieredStore, table: str, keys: np.ndarray) -> list[bytes | None]:
    """Packed rows (embedding, optimizer state, metadata) wherever they live."""
    assert store.cold is not None
    hot, cold = store.hot.get_many(table, keys), store.cold.get_many(table, keys)
    return [h if h is not None else c for h, c in zip(hot, cold, strict=True)]


def test_a_revoke_records_dead_letters_read_before_the_first_dropped_event(
    tmp_path: Path,
) -> None:
    """Buffered events are dropped at a revoke; the bad events read before them are
    already dead-lettered, so the recorded position covers them (the next owner must
    not dead-letter them again), and stops at each partition's first dropped event."""
    source = small_source(8)
    store = TieredStore(
        table_configs(source.spec, Settings()), MemoryTier(), RocksDBTier(tmp_path / "db")
    )
    dlq = JsonlFileProducer(tmp_path / "dlq.jsonl")
    trainer = make_trainer(source, store, InMemoryLog(), dlq)
    good = [event.to_json() for event in source]
    records = [
        Record(TOPIC, 0, 0, b"{broken"),
        Record(TOPIC, 0, 1, good[0]),
        Record(TOPIC, 1, 0, b"{broken"),
        Record(TOPIC, 1, 1, b"{broken"),
        Record(TOPIC, 0, 2, good[1]),
    ]
    lookahead = _Lookahead(store, source.spec, 0)
    trainer._decoder.submit(records[:4])
    assert trainer._take_decoded(None, lookahead)
    trainer._decoder.submit(records[4:])
    assert trainer._take_decoded(None, lookahead)
    # Still being decoded, or not even sent to decode, at the revoke: not read yet.
    trainer._decoder.submit([Record(TOPIC, 1, 2, good[2])])
    trainer._raw.extend([Record(TOPIC, 1, 3, good[3]), Record(TOPIC, 2, 5, good[4])])
    assert len(trainer._ready) == 2
    # A partition only polled, not decoded yet, is recorded at its first polled record
    # (its fetch position must not be forgotten: the next owner starts there).
    handled = {f"{TOPIC}:0": 1, f"{TOPIC}:1": 2, f"{TOPIC}:2": 5}
    assert trainer._on_revoked() == handled
    assert store.position() == handled
    assert not trainer._raw and not trainer._ready and not len(trainer._decoder)
    trainer._decoder.close()
    assert trainer.read_position() == handled
    assert len((tmp_path / "dlq.jsonl").read_text().splitlines()) == 3


class _BlockingPrefetch:
    """A store whose prefetch blocks until released (the lookahead sees only
    ``prefetch_tables``)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.fetched: set[int] = set()

    def prefetch_tables(self, keys: Mapping[str, np.ndarray]) -> None:
        for table_keys in keys.values():
            self.fetched.update(table_keys.tolist())
        self.started.set()
        assert self.release.wait(10)


def _batch_of(spec: FeatureSpec, key: int) -> EncodedBatch:
    one = FieldBatch(np.array([key], dtype=np.uint64), np.zeros(1, dtype=np.int64))
    return EncodedBatch(
        {f.name: one for f in spec.sparse}, np.zeros((1, len(spec.dense)), np.float32)
    )


def test_training_waits_for_a_prefetch_under_way_and_drops_one_not_started() -> None:
    """No row is read twice when training catches up with the lookahead."""
    spec = small_source(1).spec
    store = _BlockingPrefetch()
    lookahead = _Lookahead(cast(EmbeddingStore, store), spec, 2)
    first, second = _batch_of(spec, 1), _batch_of(spec, 2)
    overtaken = metrics.PREFETCH_SKIPPED.labels(reason="overtaken")
    before = overtaken._value.get()
    try:
        lookahead.submit(first)
        lookahead.submit(second)
        assert store.started.wait(5)  # the first under way, the second queued behind it
        lookahead.claim(second)  # not started: dropped, its lookup reads the rows
        assert overtaken._value.get() == before + 1
        claimed = threading.Event()

        def train_first() -> None:
            lookahead.claim(first)
            claimed.set()

        waiter = threading.Thread(target=train_first)
        waiter.start()
        assert not claimed.wait(0.2)  # under way: training waits for it
        store.release.set()
        assert claimed.wait(5)
        waiter.join()
    finally:
        store.release.set()
        lookahead.close()
    assert store.fetched == {1}


def test_collector_threshold_is_raised_while_trainers_run_and_restored_after_the_last() -> None:
    original = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        with collector_threshold(0):
            assert gc.get_threshold() == (700, 10, 10)
        first = collector_threshold(50_000)
        second = collector_threshold(50_000)
        first.__enter__()
        assert gc.get_threshold() == (50_000, 10, 10)
        second.__enter__()
        first.__exit__(None, None, None)  # another trainer still runs
        assert gc.get_threshold() == (50_000, 10, 10)
        second.__exit__(None, None, None)
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.set_threshold(*original)


def test_training_runs_under_the_configured_collector_threshold() -> None:
    source = small_source(600)
    log = InMemoryLog()
    for event in source:
        log.append(TOPIC, event.to_json())
    store = TieredStore(table_configs(source.spec, Settings()), MemoryTier())
    seen: list[tuple[int, int, int]] = []
    consumer = log.consumer(TOPIC, store.position())
    poll = consumer.poll

    def watched_poll(max_records: int, timeout_s: float) -> list[Record]:
        seen.append(gc.get_threshold())
        return poll(max_records, timeout_s)

    consumer.poll = watched_poll  # type: ignore[method-assign]
    config = TrainerConfig(batch_size=256, gc_threshold=12_345)
    trainer = StreamingTrainer(source.spec, store, consumer, config)
    before = gc.get_threshold()
    trainer.run(threading.Event(), max_events=600)
    assert seen and all(t[0] == max(12_345, before[0]) for t in seen)
    assert gc.get_threshold() == before


def test_a_backlog_trains_each_batch_after_its_prefetch(tmp_path: Path) -> None:
    """Events already waiting (a backlog, a replay) are decoded ahead, and a batch
    trains only once the lookahead holds the batches after it: its prefetch has had
    their training time to run, so none is overtaken (they all were when a batch
    trained as soon as it was decoded)."""
    # 26 fields: decoding a batch takes about as long as training one (as in production).
    source = SyntheticSource(SyntheticConfig(num_sparse=26, num_dense=2, universe=500), 4_096)
    trainer, store = trainer_over_backlog(source, tmp_path)
    assert trainer.config.lookahead_batches == 2 and trainer.config.decode_workers == 1

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(f"streamrec_trainer_{name}", labels) or 0.0

    skipped = sample("prefetch_skipped_total", reason="overtaken")
    prefetched = sample("prefetch_seconds_count")
    try:
        trainer.run(threading.Event(), max_events=4_096)
    finally:
        store.close()
    batches = 4_096 // trainer.config.batch_size
    # The last ones may lose the race for the GIL to their claim on a loaded machine.
    assert sample("prefetch_skipped_total", reason="overtaken") - skipped <= 2
    assert sample("prefetch_seconds_count") - prefetched >= batches - 2


@pytest.mark.integration
def test_the_trainer_promotes_the_rows_serving_asked_for(clean_redis: str, tmp_path: Path) -> None:
    """Rows a serving process found only in RocksDB (its requests on Redis) are promoted
    into Redis by the training loop (``serving_reads_every_s``), not left for serving to read
    from disk again."""
    source = small_source(1024)
    settings = Settings.model_validate(
        {"store": {"hot": "redis", "redis_url": clean_redis, "data_dir": str(tmp_path)}}
    )
    tables = table_configs(source.spec, settings)
    store = open_store(settings.store, tables)
    log = InMemoryLog()
    for event in source:
        log.append(TOPIC, event.to_json())
    config = TrainerConfig(batch_size=256, flush_every_s=0.05, serving_reads_every_s=1e-6)
    trainer = StreamingTrainer(source.spec, store, log.consumer(TOPIC), config)
    try:
        trainer.run(threading.Event(), max_events=512)
        table = tables[0].name
        keys, _ = next(store.hot.scan(table))
        store.hot.delete_many(table, keys)  # in RocksDB only now (flushed)
        reader = open_store(settings.store, tables, read_only=True)
        try:
            assert reader.lookup(table, keys).found.all()  # from RocksDB: asks for them
        finally:
            reader.close()
        labels = {"table": table, "tier": "cold", "side": "taken"}
        taken = REGISTRY.get_sample_value("streamrec_store_serving_reads_total", labels)
        trainer.run(threading.Event(), max_events=512)
        assert REGISTRY.get_sample_value("streamrec_store_serving_reads_total", labels) == (
            taken or 0
        ) + len(keys)
        assert all(v is not None for v in store.hot.get_many(table, keys))
    finally:
        store.close()
