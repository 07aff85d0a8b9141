"""Trainer benchmark: events per second of the streaming trainer against its baselines.

    python bench/train.py [--quick] [--events N] [--bootstrap HOST:PORT] [--redis-url URL]

Prints progress to stderr and one JSON object as the last line of stdout.

Workload: the synthetic Criteo-like stream (26 sparse fields, 13 dense, dim 16, ids
Zipf(1.1) over ``--universe`` live ids per field, 10M by default), ``--events`` events
produced once to a fresh one-partition Kafka topic, batch 4096, row-wise AdaGrad for
rows and Adam for dense weights. Each configuration below trains on every event with
its own consumer group and a fresh store; its rate is events over the time from its
first polled record to the end of its run (final flush and publish included, Kafka's
group join excluded). Configurations, measured one after another in the same run:

* ``streamrec_redis``: Redis hot tier over RocksDB, trainer cache at s_r = s_w = 8,
  lookahead 2 batches.
* ``streamrec_redis_sync``: the same at s = 0 (exact, bit-identical training).
* ``naive_redis``: every lookup and update straight to Redis: no cache, no lookahead,
  no cold tier (MLKV's baseline).
* ``streamrec_embedded``: the embedded default (in-process log, memory hot tier,
  RocksDB), s = 0, lookahead 2.
* ``torchrec``: ``bench/torchrec_baseline.py`` on the same event count, if TorchRec is
  installed (``bash bench/install_torchrec.sh``); null otherwise, with the reason.

``store_traffic_reduction``: 1 - (rows read from + rows pushed to the store) / (rows
the trainer looked up + rows it updated), in the ``streamrec_redis`` run (s = 8).
``gc_share``: per configuration, the share of its wall time spent in Python's garbage
collector (``gc.callbacks``); ``--gc-threshold 0`` runs the trainers under Python's
default collector thresholds instead of ``trainer.gc_threshold``'s.

Without ``--bootstrap`` the local Kafka of ``deploy/local/services.sh`` is started
(idempotent); without ``--redis-url`` a private ``redis-server`` is started.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from common import private_redis
from prometheus_client import REGISTRY

from storage.allocator import tune_malloc
from storage.base import RowTier, TableConfig
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore
from streaming.log import EventConsumer, InMemoryLog, KafkaEventConsumer, KafkaEventProducer, Record
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streaming.spec import FeatureSpec
from trainer.cache import CacheConfig
from trainer.trainer import StreamingTrainer, TrainerConfig

ROOT = Path(__file__).resolve().parents[1]
BATCH = 4096


def log(msg: str) -> None:
    print(f"[bench/train] {msg}", file=sys.stderr, flush=True)


class _Timed(EventConsumer):
    """Notes when the first record arrives, so group joins are not timed."""

    def __init__(self, inner: EventConsumer) -> None:
        self.inner = inner
        self.first: float | None = None

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        records = self.inner.poll(max_records, timeout_s)
        if records and self.first is None:
            self.first = time.perf_counter()
        return records

    def commit(self, position: Mapping[str, int]) -> None:
        self.inner.commit(position)

    def seek(self, position: Mapping[str, int]) -> None:
        self.inner.seek(position)

    def end_offsets(self) -> dict[str, int]:
        return self.inner.end_offsets()

    def close(self) -> None:
        self.inner.close()


class _CollectorClock:
    """Wall time spent in Python's garbage collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


def traffic() -> dict[str, float]:
    return {
        op: REGISTRY.get_sample_value("streamrec_trainer_store_rows_total", {"op": op}) or 0.0
        for op in ("read", "write", "demand_read", "demand_write")
    }


def train(
    label: str,
    spec: FeatureSpec,
    store: TieredStore,
    consumer: EventConsumer,
    events: int,
    config: TrainerConfig,
) -> dict[str, Any]:
    timed = _Timed(consumer)
    before = traffic()
    trainer = StreamingTrainer(spec, store, timed, config)
    collector = _CollectorClock()
    gc.callbacks.append(collector)
    started = time.perf_counter()
    try:
        report = trainer.run(threading.Event(), max_events=events)
    finally:
        gc.callbacks.remove(collector)
        timed.close()
        store.close()
    ended = time.perf_counter()
    after = traffic()
    moved = {k: after[k] - before[k] for k in after}
    rate = report.events / (ended - (timed.first or started))
    log(
        f"{label}: {rate:,.0f} events/s ({report.events:,} events, window AUC "
        f"{report.evaluation.window_auc:.4f})"
    )
    demand = moved["demand_read"] + moved["demand_write"]
    return {
        "events_per_s": rate,
        "gc_share": round(collector.seconds / (ended - started), 4),
        "events": report.events,
        "window_auc": report.evaluation.window_auc,
        "store_rows": moved,
        "traffic_reduction": 1.0 - (moved["read"] + moved["write"]) / demand if demand else None,
    }


def tables_of(spec: FeatureSpec) -> list[TableConfig]:
    return [TableConfig(name=f.name, dim=f.dim, optimizer="rowwise_adagrad") for f in spec.sparse]


def kafka_topic(bootstrap: str, payloads: list[bytes]) -> str:
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"bench-train-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    producer = KafkaEventProducer(bootstrap)
    started = time.perf_counter()
    for i, payload in enumerate(payloads):
        producer.send(topic, payload)
        if i % 50_000 == 49_999:
            log(f"produced {i + 1:,}/{len(payloads):,}")
    producer.flush(120)
    producer.close()
    log(f"produced {len(payloads):,} events to {topic} in {time.perf_counter() - started:.1f}s")
    return topic


def start_local_kafka() -> str:
    env = {**os.environ, "STREAMREC_SERVICES": "kafka"}
    script = ROOT / "deploy" / "local" / "services.sh"
    proc = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"local Kafka did not start:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return f"127.0.0.1:{os.environ.get('STREAMREC_KAFKA_PORT', '19092')}"


def torchrec_run(events: int, universe: int) -> dict[str, Any]:
    try:
        from torchrec_baseline import torchrec_events_per_s
    except ImportError as e:
        return {"events_per_s": None, "note": f"bench/torchrec_baseline.py unavailable: {e}"}
    try:
        result: dict[str, Any] = torchrec_events_per_s(events, batch_size=BATCH, universe=universe)
    except RuntimeError as e:  # TorchRecUnavailable: not installed
        return {"events_per_s": None, "note": str(e)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small run (CI smoke)")
    parser.add_argument("--events", type=int, help="events per configuration")
    parser.add_argument("--universe", type=int, help="live ids per field")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: local Kafka)")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--no-torchrec", action="store_true", help="skip the TorchRec baseline")
    parser.add_argument(
        "--torch-threads", type=int, help="trainer.torch_threads for every streamrec run"
    )
    parser.add_argument(
        "--decode-workers",
        type=int,
        default=TrainerConfig.model_fields["decode_workers"].default,
        help="trainer.decode_workers for every streamrec run (0: decode in the trainer)",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=TrainerConfig.model_fields["gc_threshold"].default,
        help="trainer.gc_threshold for every streamrec run (0: Python's default)",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc malloc as it is (streamrec processes tune it: malloc_tuning)",
    )
    args = parser.parse_args()
    # As a streamrec process does at start (Settings.malloc_tuning); through the
    # environment the decode workers and the TorchRec baseline's process get it too.
    malloc_tuned = not args.no_malloc_tuning and tune_malloc()
    logging.basicConfig(
        level=logging.INFO,
        format="[bench/train] %(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)
    events = args.events or (12_288 if args.quick else 204_800)
    universe = args.universe or (1_000_000 if args.quick else 10_000_000)
    started = time.perf_counter()

    log(f"generating {events:,} events (universe {universe:,} ids per field)")
    source = SyntheticSource(SyntheticConfig(universe=universe), max_events=events)
    spec = source.spec
    payloads: list[bytes] = []
    ids: dict[str, set[object]] = {f.name: set() for f in spec.sparse}
    for event in source:
        payloads.append(event.to_json())
        for name, value in event.features.items():
            ids[name].add(value)  # the synthetic stream is one id per field
    distinct_rows = sum(map(len, ids.values()))
    bootstrap = args.bootstrap or start_local_kafka()
    topic = kafka_topic(bootstrap, payloads)

    def kafka(group: str) -> Callable[[TieredStore], EventConsumer]:
        def make(store: TieredStore) -> EventConsumer:
            return KafkaEventConsumer(
                bootstrap,
                topic,
                f"{group}-{uuid.uuid4().hex[:6]}",
                resume_from=store.position,
                max_poll_records=BATCH,
            )

        return make

    def cfg(s: int, lookahead: int) -> TrainerConfig:
        return TrainerConfig(
            batch_size=BATCH,
            lookahead_batches=lookahead,
            cache=CacheConfig(read_staleness=s, write_staleness=s),
            progress_every_s=10,
            torch_threads=args.torch_threads,
            gc_threshold=args.gc_threshold,
            decode_workers=args.decode_workers,
        )

    runs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        url = args.redis_url or stack.enter_context(private_redis(log))

        def redis_hot() -> RowTier:
            return RedisTier(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")

        plans: list[
            tuple[
                str,
                Callable[[], TieredStore],
                Callable[[TieredStore], EventConsumer],
                TrainerConfig,
            ]
        ] = [
            (
                "streamrec_redis",
                lambda: TieredStore(
                    tables_of(spec), redis_hot(), RocksDBTier(Path(tmp) / "r8", sync_commits=False)
                ),
                kafka("r8"),
                cfg(8, 2),
            ),
            (
                "streamrec_redis_sync",
                lambda: TieredStore(
                    tables_of(spec), redis_hot(), RocksDBTier(Path(tmp) / "r0", sync_commits=False)
                ),
                kafka("r0"),
                cfg(0, 2),
            ),
            (
                "naive_redis",
                lambda: TieredStore(tables_of(spec), redis_hot(), None),
                kafka("naive"),
                cfg(0, 0),
            ),
        ]
        for label, make_store, make_consumer, config in plans:
            store = make_store()
            runs[label] = train(label, spec, store, make_consumer(store), events, config)

        embedded_log = InMemoryLog(capacity=events + 1)
        for payload in payloads:
            embedded_log.append("events", payload)
        store = TieredStore(
            tables_of(spec), MemoryTier(), RocksDBTier(Path(tmp) / "e", sync_commits=False)
        )
        runs["streamrec_embedded"] = train(
            "streamrec_embedded", spec, store, embedded_log.consumer("events"), events, cfg(0, 2)
        )
    runs["torchrec"] = {} if args.no_torchrec else torchrec_run(events, universe)
    torchrec_rate = runs["torchrec"].get("events_per_s") if not args.no_torchrec else None
    if torchrec_rate is not None:
        log(f"torchrec: {torchrec_rate:,.0f} events/s")

    rate = {k: v.get("events_per_s") for k, v in runs.items()}
    redis_rate, naive, embedded = (
        rate["streamrec_redis"],
        rate["naive_redis"],
        rate["streamrec_embedded"],
    )
    assert redis_rate is not None and naive is not None and embedded is not None
    r8_rows = runs["streamrec_redis"]["store_rows"]
    r8_demand = r8_rows["demand_read"] + r8_rows["demand_write"]
    result: dict[str, Any] = {
        "streamrec_redis_events_per_s": round(redis_rate),
        "streamrec_embedded_events_per_s": round(embedded),
        "naive_redis_events_per_s": round(naive),
        "torchrec_events_per_s": None if torchrec_rate is None else round(torchrec_rate),
        "store_traffic_reduction": round(runs["streamrec_redis"]["traffic_reduction"], 4),
        # Any cache must read each distinct row from the store once (it may be there) and
        # push it once: the best reduction this stream allows.
        "store_traffic_reduction_bound": round(1.0 - 2 * distinct_rows / r8_demand, 4)
        if r8_demand
        else None,
        "distinct_rows": distinct_rows,
        "streamrec_redis_sync_events_per_s": round(rate["streamrec_redis_sync"] or 0),
        "streamrec_redis_over_naive": round(redis_rate / naive, 3),
        "streamrec_redis_over_torchrec": None
        if torchrec_rate is None
        else round(redis_rate / torchrec_rate, 3),
        "streamrec_embedded_over_torchrec": None
        if torchrec_rate is None
        else round(embedded / torchrec_rate, 3),
        "store_rows": {k: v.get("store_rows") for k, v in runs.items() if "store_rows" in v},
        "window_auc": {k: round(v["window_auc"], 4) for k, v in runs.items() if "window_auc" in v},
        # Share of each run's wall time in Python's garbage collector.
        "gc_share": {k: v["gc_share"] for k, v in runs.items() if "gc_share" in v},
        "gc_threshold": args.gc_threshold,
        "decode_workers": args.decode_workers,
        "torchrec": runs["torchrec"],
        "events": events,
        "universe": universe,
        "batch_size": BATCH,
        "sparse_fields": len(spec.sparse),
        "dim": spec.sparse[0].dim,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "malloc_tuning": malloc_tuned,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result["targets"] = {
        "redis_ge_5x_naive": redis_rate >= 5 * naive,
        "redis_ge_0.5x_torchrec": None
        if torchrec_rate is None
        else redis_rate >= 0.5 * torchrec_rate,
        "embedded_ge_1x_torchrec": None if torchrec_rate is None else embedded >= torchrec_rate,
        "traffic_reduction_ge_0.80": result["store_traffic_reduction"] >= 0.80,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
