"""Serving against the real services: an event posted to /v1/events goes through Kafka
and the trainer into Redis, and the service serves the changed embedding within the
freshness bound; several uvicorn workers report one set of metrics."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from support import LocalRedisCluster, free_port, new_topic, redis_command, wait_ready

from storage.keys import feature_keys
from streaming.log import KafkaEventProducer
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streamrec.config import Settings, load_settings
from streamrec.runtime import TrainerRuntime
from streamrec.serving import build_serving

pytestmark = [pytest.mark.integration]

MAX_BATCH_WAIT_S = 0.2
NEAR_CACHE_TTL_S = 1.0
# Kafka delivery and the trainer's poll, its partial-batch wait, the Redis write and the
# near cache's staleness, with room for a loaded CI machine.
FRESHNESS_BOUND_S = MAX_BATCH_WAIT_S + NEAR_CACHE_TTL_S + 3.0


def write_config(
    path: Path, kafka: str, redis_url: str, topic: str, data_dir: Path, replica_reads: bool = False
) -> None:
    run_id = uuid.uuid4().hex[:8]
    path.write_text(
        f"""
features = "synthetic"
[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
topic = "{topic}"
dead_letter_topic = "{topic}-dlq"
group_id = "serve-{run_id}"
[store]
hot = "redis"
redis_url = "{redis_url}"
redis_prefix = "serve{run_id}"
redis_replica_reads = {str(replica_reads).lower()}
data_dir = "{data_dir}"
[trainer]
batch_size = 256
max_batch_wait_s = {MAX_BATCH_WAIT_S}
flush_every_s = 1.0
publish_every_s = 1.0
[service]
near_cache_ttl_s = {NEAR_CACHE_TTL_S}
"""
    )


def instances(n: int) -> list[dict[str, object]]:
    return [{**e.features, **e.dense} for e in SyntheticSource(SyntheticConfig(seed=5), n)]


def served_row(client: TestClient, table: str, value: str) -> tuple[bool, np.ndarray]:
    """The row of one id as a predict reads it (near cache included)."""
    result = client.app.state.reader.lookup({table: feature_keys(table, [value])})[table]  # type: ignore[attr-defined]
    return bool(result.found[0]), result.rows[0]


@contextmanager
def cluster_with_replicas(workdir: Path) -> Iterator[tuple[str, list[int]]]:
    """A Redis Cluster of its own with a replica per master: its URL, the replicas'
    ports (once every master's replica is announced)."""
    cluster = LocalRedisCluster(workdir)
    try:
        replicas = [cluster.add_replica(i) for i in range(len(cluster.ports))]
        with redis.Redis.from_url(cluster.url) as seed:
            deadline = time.monotonic() + 10
            while not all(len(r) > 3 for r in redis_command(seed, "CLUSTER", "SLOTS")):
                assert time.monotonic() < deadline, "replicas never announced"
                time.sleep(0.05)
        yield cluster.url, replicas
    finally:
        cluster.stop()


def row_reads(port: int) -> int:
    """HMGET and HGET calls the Redis server on ``port`` has answered."""
    with redis.Redis(port=port) as server:
        stats = server.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hmget", "hget"))


@pytest.mark.parametrize("redis_fixture", ["redis_url", "clean_redis_cluster", "replica_reads"])
def test_posted_event_changes_the_served_embedding_within_the_bound(
    kafka_bootstrap: str, redis_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Trainer, serving (its read process too) and the loop back through
    ``/v1/events``, over one Redis server, over a Redis Cluster, and over one with a
    replica per master that serving reads rows from (``store.redis_replica_reads``)."""
    with contextlib.ExitStack() as stack:
        replicas: list[int] = []
        if redis_fixture == "replica_reads":
            redis_url, replicas = stack.enter_context(cluster_with_replicas(tmp_path / "rc"))
        else:
            redis_url = request.getfixturevalue(redis_fixture)
        serve_and_post_an_event(kafka_bootstrap, redis_url, tmp_path, replicas)


def serve_and_post_an_event(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path, replicas: list[int]
) -> None:
    topic = new_topic(kafka_bootstrap, "serve", partitions=1)
    config = tmp_path / "streamrec.toml"
    write_config(
        config, kafka_bootstrap, redis_url, topic, tmp_path / "data", replica_reads=bool(replicas)
    )
    settings = load_settings(config)

    producer = KafkaEventProducer(kafka_bootstrap)
    for event in SyntheticSource(SyntheticConfig(), 3_000):
        producer.send(topic, event.to_json())
    producer.flush()
    producer.close()
    runtime = TrainerRuntime.start(settings)
    try:
        # Past the backlog, so the posted event is not queued behind it.
        deadline = time.monotonic() + 120
        while (
            runtime.trainer.version is None or runtime.trainer.evaluator.events < 3_000
        ) and time.monotonic() < deadline:
            assert runtime.alive(), "trainer died"
            time.sleep(0.2)
        assert runtime.trainer.version is not None, "no version published"

        app, close = build_serving(settings)
        try:
            with TestClient(app) as client:
                assert client.get("/readyz").status_code == 200
                new_id = f"fresh-{uuid.uuid4().hex[:8]}"
                body = {"instances": [{**instances(1)[0], "c1": new_id}]}
                before = client.post("/v1/models/streamrec:predict", json=body).json()
                found, row = served_row(client, "c1", new_id)
                assert not found and not row.any()  # a new id reads as the default

                feedback = {
                    "event_id": new_id,
                    "ts": int(time.time() * 1000),
                    "label": 1,
                    "features": {"c1": new_id, "c2": "x"},
                }
                posted = time.monotonic()
                response = client.post("/v1/events", json={"events": [feedback]})
                assert response.status_code == 202, response.text
                while True:
                    found, row = served_row(client, "c1", new_id)
                    if found:
                        break
                    assert time.monotonic() - posted < FRESHNESS_BOUND_S, "never visible"
                    time.sleep(0.02)
                visible_s = time.monotonic() - posted
                print(f"event -> embedding served in {visible_s:.2f} s")
                assert row.any()
                after = client.post("/v1/models/streamrec:predict", json=body).json()
                assert after["predictions"] != before["predictions"]

                # The freshness metric saw it too (the app's own poll of watched rows).
                deadline = time.monotonic() + FRESHNESS_BOUND_S
                count = 0.0
                while time.monotonic() < deadline and not count:
                    count = (
                        REGISTRY.get_sample_value(
                            "streamrec_service_event_to_visible_seconds_count", {"table": "c1"}
                        )
                        or 0.0
                    )
                    time.sleep(0.1)
                assert count >= 1
                metrics = client.get("/metrics").text
                assert 'streamrec_service_event_to_visible_quantile_seconds{quantile="0.95"}' in (
                    metrics
                )
                assert "streamrec_service_model_age_seconds" in metrics
                # Serving's rows came from the replicas (the read process's reads).
                assert all(row_reads(port) > 0 for port in replicas)
        finally:
            close()
    finally:
        assert runtime.stop() == 0


def test_workers_share_port_and_metrics(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    topic = new_topic(kafka_bootstrap, "workers", partitions=1)
    config = tmp_path / "streamrec.toml"
    write_config(config, kafka_bootstrap, redis_url, topic, tmp_path / "data")
    # A published version to serve: train briefly in process.
    producer = KafkaEventProducer(kafka_bootstrap)
    for event in SyntheticSource(SyntheticConfig(), 1_000):
        producer.send(topic, event.to_json())
    producer.flush()
    producer.close()
    runtime = TrainerRuntime.start(load_settings(config), max_events=1_000)
    while runtime.report is None and runtime.alive():
        time.sleep(0.2)
    assert runtime.stop() == 0

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    cli = [sys.executable, "-m", "streamrec.cli", "serve", "--config", str(config)]
    server = subprocess.Popen(
        [*cli, "--port", str(port), "--workers", "2"],
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base), "service never became ready"
        body = {"instances": instances(4)}
        for _ in range(30):  # a new connection each: both workers get some
            response = httpx.post(f"{base}/v1/models/streamrec:predict", json=body)
            assert response.status_code == 200
        # Any worker answers /metrics with the sum over both.
        text = httpx.get(f"{base}/metrics").text
        line = next(
            x
            for x in text.splitlines()
            if x.startswith('streamrec_service_predict_requests_total{status="200"}')
        )
        assert float(line.rsplit(" ", 1)[1]) == 30.0
        # A pin through the API reaches every worker (shared pin file).
        version = httpx.get(f"{base}/v1/models/streamrec").json()["version"]
        assert httpx.post(f"{base}/v1/models/streamrec:pin", json={"version": version}).json()[
            "pinned"
        ]
        time.sleep(Settings().service.refresh_every_s * 2.5)
        for _ in range(10):
            assert httpx.get(f"{base}/v1/models/streamrec").json()["pinned"] is True
    finally:
        server.terminate()
        assert server.wait(20) == 0
