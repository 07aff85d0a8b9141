"""Scale-out: two trainers in one consumer group over four partitions share the Redis hot
tier. Members join and leave mid-stream; every event must be trained exactly once
(no loss, no double application), and the dense weights must agree at the end."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from support import new_topic

from storage.base import TableConfig
from storage.keys import feature_keys
from storage.redis_tier import RedisTier
from storage.rows import RowCodec

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 6000
PARTITIONS = 4


def event(i: int) -> bytes:
    item = i % 37
    rng = random.Random(i)
    label = int(rng.random() < (0.6 if item % 3 == 0 else 0.2))
    body = {"event_id": f"e{i}", "ts": 1_700_000_000_000 + i, "label": label}
    body["features"] = {"event": f"e{i}", "item": str(item)}
    body["dense"] = {"x": rng.random()}
    return json.dumps(body).encode()


def write_config(path: Path, kafka: str, redis_url: str, topic: str, run: str) -> Path:
    path.mkdir(parents=True)
    config = path / "streamrec.toml"
    config.write_text(
        f"""
features = {{sparse = [{{name = "event", dim = 4}}, {{name = "item", dim = 4}}], dense = ["x"]}}
[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
topic = "{topic}"
group_id = "group-{run}"
[store]
hot = "redis"
redis_url = "{redis_url}"
redis_prefix = "so-{run}"
shared_hot = true
data_dir = "{path / "data"}"
[trainer]
batch_size = 100
max_batch_wait_s = 0.2
flush_every_s = 0.5
publish_every_s = 2
dense_sync_every_s = 0.5
progress_every_s = 0.2
"""
    )
    return config


class Trainer:
    """A `streamrec train` process; follows its progress lines."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamrec.cli", "train", "--config", str(config)],
            env={**os.environ, "STREAMREC_METRICS_PORT": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.events = 0
        self.lines: list[str] = []
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if " events=" in line and " rate=" in line:
                self.events = int(line.split(" events=")[1].split()[0])

    def wait_for(self, events: int, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while self.events < events and time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines[-120:])
            time.sleep(0.1)
        assert self.events >= events, "".join(self.lines[-120:])

    def wait_for_line(self, text: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines) and time.monotonic() < deadline:
            assert self.proc.poll() is None, "".join(self.lines[-120:])
            time.sleep(0.1)
        assert any(text in line for line in self.lines), "".join(self.lines[-120:])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(60) == 0, "".join(self.lines[-120:])


def produce(bootstrap: str, topic: str, ids: range, per_s: float | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for i in ids:
        producer.send(topic, event(i), partition=i % PARTITIONS)
        if per_s is not None:
            time.sleep(1 / per_s)
    producer.flush()
    producer.close()


def wait_until_committed(bootstrap: str, topic: str, group: str, timeout_s: float = 240) -> None:
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    end = consumer.end_offsets(parts)
    consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    deadline = time.monotonic() + timeout_s
    committed: dict[TopicPartition, int] = {}
    while time.monotonic() < deadline:
        offsets = admin.list_group_offsets({group: parts}).get(group, {})
        committed = {tp: offsets[tp].offset for tp in parts if tp in offsets}
        if committed == end:
            break
        time.sleep(0.3)
    admin.close()
    assert committed == end, f"committed {committed}, end {end}"


@pytest.mark.parametrize("redis_fixture", ["redis_url", "redis_cluster_url"])
def test_two_trainers_rebalance_without_losing_or_repeating_events(
    kafka_bootstrap: str, redis_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Over one Redis server, and over a Redis Cluster (the rows and the dense-sync
    blobs spread over its masters)."""
    redis_url = request.getfixturevalue(redis_fixture)
    topic = new_topic(kafka_bootstrap, "scale", partitions=PARTITIONS)
    run = uuid.uuid4().hex[:6]
    config_a = write_config(tmp_path / "a", kafka_bootstrap, redis_url, topic, run)
    config_b = write_config(tmp_path / "b", kafka_bootstrap, redis_url, topic, run)
    produce(kafka_bootstrap, topic, range(0, 2000))

    a = Trainer(config_a)
    a.wait_for(300)
    b = Trainer(config_b)  # joins: the partitions are split between the two
    b.wait_for_line("assigned")
    feeder = threading.Thread(
        target=produce, args=(kafka_bootstrap, topic, range(2000, 3500), 300.0)
    )
    feeder.start()  # events keep coming through both rebalances below
    b.wait_for(100)
    a.stop()  # leaves: its partitions move to b
    a = Trainer(config_a)  # and rejoins from its own store
    a.wait_for_line("assigned")
    feeder.join()
    produce(kafka_bootstrap, topic, range(3500, EVENTS), 500.0)
    a.wait_for(100)
    wait_until_committed(kafka_bootstrap, topic, f"group-{run}")
    time.sleep(2)  # a few idle dense-sync rounds
    for trainer in (a, b):
        trainer.proc.send_signal(signal.SIGTERM)
    for trainer in (a, b):
        assert trainer.proc.wait(60) == 0, "".join(trainer.lines[-120:])
    assert any("rebalance: committed" in line for line in a.lines + b.lines)

    # Every event was applied exactly once: its own row in the `event` table was
    # created and updated exactly one time.
    hot = RedisTier(redis_url, prefix=f"so-{run}")
    table = TableConfig(name="event", dim=4)
    keys = feature_keys("event", [f"e{i}" for i in range(EVENTS)])
    values = hot.get_many("event", keys)
    missing = [i for i, v in enumerate(values) if v is None]
    assert not missing, f"{len(missing)} events never trained, e.g. {missing[:5]}"
    counts = RowCodec(table).unpack(keys, values)["count"]  # type: ignore[arg-type]
    repeated = np.flatnonzero(counts != 1)
    assert len(repeated) == 0, f"{len(repeated)} events applied {set(counts[repeated])} times"

    # Dense weights agree: the members' last copies are (nearly) the same average.
    prefix = "trainer/streamrec/dense-sync"
    members = json.loads(hot.get_blob(f"{prefix}/members") or b"{}")
    states = []
    for member in members:
        raw = hot.get_blob(f"{prefix}/{member}")
        if raw is not None:
            states.append(torch.load(io.BytesIO(raw), weights_only=True))
    hot.close()
    assert len(states) >= 2
    first, last = states[0], states[-1]
    distance = sum(float((first[k] - last[k]).norm() ** 2) for k in first) ** 0.5
    scale = sum(float(first[k].norm() ** 2) for k in first) ** 0.5
    assert distance / scale < 1e-2, distance / scale
