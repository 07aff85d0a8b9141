"""Session fixtures for the real local services.

Integration tests use a real Kafka broker and a real Redis server on loopback,
started once per session by ``deploy/local/services.sh`` (idempotent). When the
services cannot start, the tests fail with the service's log tail: a missing
service is never a silent skip.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import LocalRedisCluster, cluster_masters

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "deploy" / "local" / "services.sh"


def _ensure_services() -> None:
    proc = subprocess.run(
        ["bash", str(SERVICES), "start"], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(
            f"local services failed to start (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def services() -> None:
    _ensure_services()


@pytest.fixture(scope="session")
def redis_url(services: None) -> str:
    port = os.environ.get("STREAMREC_REDIS_PORT", "16379")
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="session")
def kafka_bootstrap(services: None) -> str:
    port = os.environ.get("STREAMREC_KAFKA_PORT", "19092")
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
def redis_cluster(
    services: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalRedisCluster]:
    """A 3-master Redis Cluster on loopback for the session (real ``redis-server``s,
    started by ``deploy/local/redis_cluster.py``)."""
    workdir = tmp_path_factory.mktemp("redis-cluster")
    try:
        cluster = LocalRedisCluster(workdir)
    except (RuntimeError, OSError) as e:
        pytest.fail(f"local Redis Cluster failed to start: {e}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """The URL of the session cluster's first master (all a store needs)."""
    return redis_cluster.url


@pytest.fixture()
def clean_redis_cluster(redis_cluster_url: str) -> Iterator[str]:
    """The cluster's URL, every master empty at the start of the test."""
    for master in cluster_masters(redis_cluster_url):
        with master:
            master.flushall()
    yield redis_cluster_url


@pytest.fixture()
def clean_redis(redis_url: str) -> Iterator[str]:
    """A Redis URL whose database is empty at the start of the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield redis_url
    client.close()
