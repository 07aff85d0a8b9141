"""``streamrec check``: the services and state a configuration names, checked before a
deploy, every problem at once (a process that starts stops at the first)."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from storage.base import StoreError, TableConfig
from storage.rebalance import ClusterAdmin, imbalance
from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import POSITION_BLOB
from streaming.spec import FeatureSpec
from streamrec.config import ConfigError, Settings
from streamrec.wiring import check_experiment, resolve_spec, table_configs

Status = Literal["ok", "warn", "fail"]
# Where the alert StreamrecRedisLoadImbalanced fires too.
LOAD_IMBALANCE_WARNING = 1.25


@dataclass(frozen=True)
class Finding:
    component: str  # features, kafka, redis, rocksdb, experiment, arm:<name>
    status: Status
    detail: str


def run_checks(settings: Settings, *, kafka_timeout_s: float = 10.0) -> list[Finding]:
    """Every check of ``settings``: the feature spec and tables, the event log, the hot
    tier and the cold tier."""
    try:
        spec = resolve_spec(settings)
        tables = table_configs(spec, settings)
    except (ValueError, OSError) as e:
        return [Finding("features", "fail", str(e))]
    found = [
        Finding(
            "features",
            "ok",
            f"{len(spec.sparse)} sparse fields (one table each), {len(spec.dense)} dense",
        )
    ]
    found += _check_log(settings, kafka_timeout_s)
    found += _check_redis(settings, tables)
    found += _check_rocksdb(settings, tables)
    found += _check_experiment(settings, spec)
    return found


def _check_log(settings: Settings, timeout_s: float) -> list[Finding]:
    cfg = settings.log
    if cfg.kind == "memory":
        return [Finding("kafka", "ok", "not used: the in-process log (embedded)")]
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=cfg.bootstrap_servers,
            group_id=cfg.group_id,
            enable_auto_commit=False,
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
        )
    except KafkaError as e:
        return [
            Finding("kafka", "fail", f"no Kafka broker reachable at {cfg.bootstrap_servers}: {e}")
        ]
    found = []
    try:
        for topic, role in ((cfg.topic, "events"), (cfg.dead_letter_topic, "dead-letter")):
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                found.append(Finding(
                    "kafka",
                    "warn",
                    f"{role} topic {topic!r} does not exist on {cfg.bootstrap_servers}: create "
                    "it, unless the broker creates topics at first use "
                    "(auto.create.topics.enable)",
                ))  # fmt: skip
                continue
            detail = f"{role} topic {topic!r}: {len(partitions)} partitions"
            if role == "events":
                assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
                ends = consumer.end_offsets(assigned)
                committed = {tp: consumer.committed(tp) for tp in assigned}
                lag = sum(ends[tp] - (committed[tp] or 0) for tp in assigned)
                detail += (
                    f", {sum(ends.values()):,} records; group {cfg.group_id!r} has "
                    f"committed offsets on {sum(c is not None for c in committed.values())} "
                    f"partitions, {lag:,} records behind (the trainer resumes from the "
                    "position its store recorded, not from these)"
                )
            found.append(Finding("kafka", "ok", detail))
    except KafkaError as e:
        found.append(Finding("kafka", "fail", f"Kafka at {cfg.bootstrap_servers}: {e}"))
    finally:
        consumer.close()
    return found


def _check_redis(settings: Settings, tables: Sequence[TableConfig]) -> list[Finding]:
    cfg = settings.store
    if cfg.hot != "redis":
        return [Finding("redis", "ok", "not used: the in-process hot tier (embedded)")]
    try:
        tier = RedisTier(
            cfg.redis_url,
            prefix=cfg.redis_prefix,
            min_replicas=cfg.redis_min_replicas,
            replica_timeout_s=cfg.redis_replica_timeout_s,
        )
    except StoreError as e:
        return [Finding("redis", "fail", str(e))]
    try:
        kind = "Redis"
        if tier.cluster:
            kind = f"a Redis Cluster of {tier.masters} masters"
        elif "+sentinel://" in cfg.redis_url:
            kind = "Redis under Sentinel, master"
        found = [Finding("redis", "ok", f"{kind} at {tier.address}")]
        warned: dict[tuple[str, str], list[str]] = {}
        row_bytes = {table.name: RowCodec(table).nbytes for table in tables}
        for kind_, address, message in tier.config_warnings(row_bytes):
            warned.setdefault((kind_, address), []).append(message)
        for messages in warned.values():  # the first table's message names them all
            more = f" (and {len(messages) - 1} more tables)" if len(messages) > 1 else ""
            found.append(Finding("redis", "warn", messages[0] + more))
        if tier.cluster:
            found += _check_cluster_load(settings)
        if cfg.redis_min_replicas:
            tier.wait_for_replicas()
            found.append(Finding(
                "redis",
                "ok",
                f"{cfg.redis_min_replicas} replicas of every master confirmed a write "
                f"within {cfg.redis_replica_timeout_s} s (store.redis_min_replicas)",
            ))  # fmt: skip
    except StoreError as e:
        found.append(Finding("redis", "fail", str(e)))
    finally:
        with contextlib.suppress(StoreError):  # what failed is a finding already
            tier.close()
    return found


def _check_cluster_load(settings: Settings) -> list[Finding]:
    """How evenly the cluster's masters carry what the stores report, and slots a
    failed move left half-migrated (``streamrec rebalance`` fixes both)."""
    admin = ClusterAdmin(settings.store.redis_url, settings.store.redis_prefix)
    try:
        found = [
            Finding(
                "redis",
                "warn",
                f"slot {slot} is left half-migrated from {source.address} to "
                f"{target.address}: `streamrec rebalance --apply` finishes it",
            )
            for slot, source, target in admin.open_migrations
        ]
        rates, reporters = admin.traffic()
        if reporters:
            masters = len(admin.masters)
            ratio = imbalance(np.bincount(admin.owner, rates.sum(axis=0), minlength=masters))
            uneven = ratio > LOAD_IMBALANCE_WARNING
            found.append(Finding(
                "redis",
                "warn" if uneven else "ok",
                f"the busiest master serves {ratio:.2f}x the mean load that {reporters} "
                "stores report" + (": run `streamrec rebalance`" if uneven else ""),
            ))  # fmt: skip
    finally:
        admin.close()
    return found


def _check_rocksdb(settings: Settings, tables: Sequence[TableConfig]) -> list[Finding]:
    path = settings.store.rocksdb_path
    if not (path / "CURRENT").exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path.parent):
                pass
        except OSError as e:
            return [Finding("rocksdb", "fail", f"{path.parent} is not writable: {e}")]
        return [Finding("rocksdb", "ok", f"none at {path} yet: the first trainer creates it")]
    with tempfile.TemporaryDirectory(prefix="streamrec-check-") as secondary:
        try:  # as a secondary, like `streamrec serve`: safe while a trainer holds it
            cold = RocksDBTier(path, read_only=True, secondary_path=secondary)
        except StoreError as e:
            return [Finding("rocksdb", "fail", str(e))]
        try:
            rows = sum(cold.count(table.name) for table in tables)
            raw = cold.get_blob(POSITION_BLOB)
        finally:
            cold.close()
    position = json.loads(raw) if raw is not None else None
    recorded = (
        f"a stream position over {len(position)} partitions (offsets summing to "
        f"{sum(position.values()):,})"
        if position
        else "no stream position yet"
    )
    return [Finding("rocksdb", "ok", f"{path}: {rows:,} rows of these tables, {recorded}")]


def _check_experiment(settings: Settings, spec: FeatureSpec) -> list[Finding]:
    """The experiment's unit field, and each arm's own cold tier (the deployment's
    settings only: an arm's view has no other arms to check)."""
    experiment = settings.experiment
    if experiment is None:
        return []
    try:
        check_experiment(settings, spec)
    except ConfigError as e:
        return [Finding("experiment", "fail", str(e))]
    shares = ", ".join(f"{name} {arm.share:.1%}" for name, arm in experiment.arms.items())
    learns = "every event" if experiment.default_trains_on == "all" else "the units in no arm"
    found = [
        Finding(
            "experiment",
            "ok",
            f"{experiment.name!r} on unit {experiment.unit!r}: {shares} of the units; the "
            f"default model learns from {learns}",
        )
    ]
    if settings.arm is None:
        for arm in experiment.arms:
            view = settings.for_arm(arm)
            found += [
                Finding(f"arm:{arm}", f.status, f.detail)
                for f in _check_rocksdb(view, table_configs(spec, view))
            ]
    return found


def render(findings: Sequence[Finding], *, as_json: bool = False) -> str:
    if as_json:
        return json.dumps([asdict(f) for f in findings])
    return "\n".join(f"{f.status:<5} {f.component:<9} {f.detail}" for f in findings)
