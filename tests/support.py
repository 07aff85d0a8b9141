"""Helpers shared by the tests that start streamrec processes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import redis

from storage.rebalance import ClusterAdmin

if TYPE_CHECKING:
    from storage.base import EmbeddingStore
    from streamrec.runtime import TrainerRuntime
    from trainer.trainer import TrainerReport


def redis_command(client: redis.Redis, *args: object) -> Any:
    """``client.execute_command`` (which redis-py leaves untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class LocalRedisCluster:
    """A Redis Cluster of real ``redis-server`` masters on free loopback ports, started
    by ``deploy/local/redis_cluster.py`` (state in ``workdir``)."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self._launcher = _launcher("redis_cluster")
        self.workdir = workdir
        self.ports: list[int] = self._launcher.free_ports(masters)
        try:
            self.url: str = self._launcher.start(workdir, self.ports)
        except BaseException:
            self.stop()  # the masters that did start
            raise

    def restart_master(self, index: int) -> None:
        """Restart master ``index`` (in port order) empty, as after a crash without
        persistence; returns once the cluster is ok again."""
        self._launcher.restart(self.workdir, self.ports[index])

    def add_replica(self, index: int) -> int:
        """A replica of master ``index``, synced; its port."""
        port: int = self._launcher.free_ports(1, first=max(self.ports) + 7)[0]
        self._launcher.add_replica(self.workdir, self.ports[index], port)
        return port

    def add_master(self) -> int:
        """One more master, empty, on a free port (its port)."""
        port: int = self._launcher.free_ports(1, first=max(self.ports) + 7)[0]
        self._launcher.add_master(self.workdir, port)
        self.ports.append(port)
        return port

    def rebalance(self) -> None:
        """``redis-cli --cluster rebalance --cluster-use-empty-masters``."""
        self._launcher.rebalance(self.workdir)

    def kill(self, port: int) -> None:
        """The node on ``port`` dies for good (the cluster is not told)."""
        self._launcher.kill(self.workdir, port)

    def fail_over(self, index: int, replica_port: int) -> None:
        """Master ``index`` dies for good and the replica on ``replica_port`` takes its
        slots over."""
        self._launcher.kill(self.workdir, self.ports[index])
        self._launcher.take_over(self.workdir, replica_port)
        self.ports[index] = replica_port

    def stop(self) -> None:
        self._launcher.stop(self.workdir)


class LocalSentinel:
    """A ``redis-server`` master with ``replicas`` and ``sentinels`` Redis Sentinels
    watching them, on free loopback ports, started by ``deploy/local/redis_sentinel.py``
    (state in ``workdir``; ``tls``: a certificate and key, all of them then speak only
    TLS); ``url`` is the ``redis[s]+sentinel://`` URL of the master."""

    def __init__(
        self,
        workdir: Path,
        replicas: int = 1,
        sentinels: int = 3,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self._launcher = _launcher("redis_sentinel")
        self.workdir = workdir
        try:
            self.url: str = self._launcher.start(workdir, replicas, sentinels, tls=tls)
        except BaseException:
            self.stop()
            raise

    def master(self) -> redis.Redis:
        """A client of the master the sentinels name now."""
        return redis.Redis(host="127.0.0.1", port=self._launcher.master_port(self.workdir))

    def sentinel(self) -> redis.Redis:
        """A client of the first sentinel."""
        return redis.Redis(host="127.0.0.1", port=self._launcher.sentinel_ports(self.workdir)[0])

    def replica_ports(self) -> list[int]:
        """The ports of the master's replicas."""
        with self.master() as master:
            return [r["port"] for k, r in master.info("replication").items() if k[:5] == "slave"]

    def replica_pids(self) -> list[int]:
        """The process ids of the master's replicas."""
        ports = self.replica_ports()
        return [int((self.workdir / str(port) / "redis.pid").read_text()) for port in ports]

    def kill_master(self) -> int:
        """``SIGKILL`` the master; returns the promoted replica's port once it serves."""
        port: int = self._launcher.kill_master(self.workdir)
        return port

    def stop(self) -> None:
        self._launcher.stop(self.workdir)


def _launcher(name: str) -> Any:
    """The script ``deploy/local/<name>.py`` as a module."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "local" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cluster_masters(url: str) -> list[redis.Redis]:
    """A client of each master of the Redis Cluster at ``url``, in the order of their
    first slots (once each, however many slot ranges a reshard left it)."""
    with redis.Redis.from_url(url) as seed:
        slots = redis_command(seed, "CLUSTER", "SLOTS")
    addresses = {(entry[2][0].decode() or "127.0.0.1", int(entry[2][1])): None for entry in slots}
    return [redis.Redis(host=host, port=port) for host, port in addresses]


def redis_redirects(op: str, *kinds: str) -> float:
    """``streamrec_store_redis_redirects_total`` of ``op`` summed over ``kinds``
    (default: moved and ask) in this process."""
    from prometheus_client import REGISTRY

    return sum(
        REGISTRY.get_sample_value("streamrec_store_redis_redirects_total", {"kind": kind, "op": op})
        or 0.0
        for kind in kinds or ("moved", "ask")
    )


def migrate_slot(
    masters: list[redis.Redis],
    slot: int,
    source: redis.Redis,
    target: redis.Redis | None = None,
    *,
    finish: bool = True,
) -> redis.Redis:
    """Move ``slot`` and its keys from ``source`` to ``target`` (default: another
    master) with ``ClusterAdmin.migrate`` (what ``streamrec rebalance`` does); the new
    owner. ``finish=False`` stops with the keys moved but the slot still the source's
    (mid-migration: ``ASK``)."""
    target = target or next(m for m in masters if m is not source)

    def port(client: redis.Redis) -> int:
        return int(client.connection_pool.connection_kwargs["port"])

    admin = ClusterAdmin(f"redis://127.0.0.1:{port(source)}")
    try:
        by_port = {master.port: master for master in admin.masters}
        admin.migrate(slot, by_port[port(source)], by_port[port(target)], finish=finish)
    finally:
        admin.close()
    return target


def quick_bench(script: str, *args: str, timeout_s: float) -> dict[str, Any]:
    """Run ``bench/<script> --quick *args`` to its end (exit 0 asserted); the JSON object
    of its last output line."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / script), "--quick", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def assert_positive(result: dict[str, Any], keys: list[str]) -> None:
    """Each of ``keys`` is a number (not a bool) above 0 in ``result``."""
    for key in keys:
        value = result.get(key)
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base_url: str, timeout_s: float = 60.0) -> bool:
    """Poll ``/readyz`` until it answers 200 or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/readyz").status_code == 200:
                return True
        time.sleep(0.5)
    return False


def new_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """Create a topic with a unique name on the test broker."""
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    admin.close()
    return topic


def restart_service(name: str) -> str:
    """Restart the local Kafka or Redis (``deploy/local/services.sh restart-NAME``, with
    this process's environment: the same ports as the test fixtures); returns its output."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "deploy" / "local" / "services.sh"
    proc = subprocess.run(
        ["bash", str(script), f"restart-{name}"],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"restart-{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def train_in_process(config: Path, max_events: int) -> TrainerRuntime:
    """Train ``max_events`` events with the settings in ``config``; the runtime is left
    for the caller to inspect and stop."""
    from streamrec.config import load_settings
    from streamrec.runtime import TrainerRuntime

    runtime = TrainerRuntime.start(load_settings(config), max_events=max_events)
    wait_for_report(runtime, 300)
    return runtime


def wait_for_report(runtime: TrainerRuntime, timeout_s: float) -> TrainerReport:
    """Wait until the runtime's trainer reports (or dies); a trainer that is still
    running at the deadline fails the test with its state and every thread's stack."""
    deadline = time.monotonic() + timeout_s
    while runtime.report is None and runtime.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    report = runtime.report
    assert report is not None, f"trainer did not finish\n{describe(runtime)}"
    return report


def describe(runtime: TrainerRuntime) -> str:
    """Where a trainer stands, for the failure message of a test it did not finish."""
    import sys
    import traceback

    trainer = runtime.trainer
    lines = [
        f"alive={runtime.alive()} failed={runtime.failed} events={trainer.evaluator.events}",
        f"assignment={sorted(trainer.consumer.assignment())}",
        f"trained={dict(trainer.position)} read={trainer.read_position()}",
        f"recorded={runtime.store.position()}",
    ]
    if runtime.error is not None:
        lines.append("--- the error that ended the trainer")
        lines.extend(traceback.format_exception(runtime.error))
    for ident, frame in sys._current_frames().items():
        lines.append(f"--- thread {ident}")
        lines.extend(line.rstrip() for line in traceback.format_stack(frame))
    return "\n".join(lines)


def store_rows(store: EmbeddingStore, *, metadata: bool) -> dict[str, dict[int, bytes]]:
    """Every row of every table in a ``TieredStore``'s cold tier (all of them after a
    flush); without ``metadata`` just embedding and optimizer state (metadata holds
    wall-clock update times)."""
    from storage.rows import RowCodec
    from storage.tiered import TieredStore
    from trainer.cache import CachedStore

    if isinstance(store, CachedStore):  # a trainer's store, behind its cache
        store = store.store
    assert isinstance(store, TieredStore) and store.cold is not None
    out: dict[str, dict[int, bytes]] = {}
    for table, cfg in store.tables().items():
        rows: dict[int, bytes] = {}
        for keys, values in store.cold.scan(table):
            if metadata:
                rows.update(zip(keys.tolist(), values, strict=True))
                continue
            unpacked = RowCodec(cfg).unpack(keys, values)
            both = np.concatenate([unpacked["emb"], unpacked["state"]], axis=1)
            rows.update(zip(keys.tolist(), map(bytes, both), strict=True))
        out[table] = rows
    return out


def kafka_redis_toml(kafka: str, redis_url: str, topic: str, name: str, data_dir: Path) -> str:
    """The ``features``, ``[log]`` and ``[store]`` of a synthetic-spec deployment on the
    test Kafka and Redis: group ``name``, Redis prefix ``name`` (unique per test run)."""
    return f"""
features = "synthetic"
[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
topic = "{topic}"
dead_letter_topic = "{topic}-dlq"
group_id = "{name}"
[store]
hot = "redis"
redis_url = "{redis_url}"
redis_prefix = "{name}"
data_dir = "{data_dir}"
"""


def produce(kafka: str, topic: str, events: Any) -> None:
    """Send ``events`` (``streaming.events.Event``) to ``topic`` and wait for them."""
    from streaming.log import KafkaEventProducer

    producer = KafkaEventProducer(kafka)
    for event in events:
        producer.send(topic, event.to_json())
    producer.flush()
    producer.close()
