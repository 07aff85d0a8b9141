"""Exactly-once through a crash: `kill -9` a trainer reading Kafka mid-stream,
restart it, and compare with an uninterrupted run on the same events."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from kafka import KafkaProducer
from support import new_topic, train_in_process

from storage.keys import feature_keys
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import TieredStore
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streamrec.config import load_settings
from streamrec.wiring import table_configs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BATCH = 256
EVENTS = 120 * BATCH
SOURCE = SyntheticSource(
    SyntheticConfig(num_sparse=8, num_dense=4, interaction_pairs=[(1, 2)]), EVENTS
)


def write_config(
    path: Path, kafka: str, redis_url: str, topic: str, name: str, staleness: int = 0
) -> Path:
    path.mkdir(parents=True)
    config = path / "streamrec.toml"
    sparse = ", ".join(f'{{name = "{f.name}", dim = {f.dim}}}' for f in SOURCE.spec.sparse)
    dense = ", ".join(f'"{name}"' for name in SOURCE.spec.dense)
    config.write_text(
        f"""
features = {{sparse = [{sparse}], dense = [{dense}]}}
[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
topic = "{topic}"
group_id = "{name}"
[store]
hot = "redis"
redis_url = "{redis_url}"
redis_prefix = "{name}"
data_dir = "{path / "data"}"
[trainer]
batch_size = {BATCH}
max_batch_wait_s = 60
flush_every_s = 0.25
publish_every_s = 3600
[trainer.cache]
read_staleness = {staleness}
write_staleness = {staleness}
"""
    )
    return config


def stored_rows(store: TieredStore) -> dict[str, np.ndarray]:
    """Embedding and optimizer state of every row the events touch (metadata holds
    wall-clock times, so it is left out)."""
    out = {}
    assert store.cold is not None
    for table, cfg in store.tables().items():
        ids = sorted({e.features[table] for e in SOURCE}, key=str)
        keys = feature_keys(table, ids)  # type: ignore[arg-type]
        values = [
            h if h is not None else c
            for h, c in zip(
                store.hot.get_many(table, keys), store.cold.get_many(table, keys), strict=True
            )
        ]
        assert all(v is not None for v in values)
        rows = RowCodec(cfg).unpack(keys, values)  # type: ignore[arg-type]
        out[table] = np.concatenate([rows["emb"], rows["state"]], axis=1)
    return out


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    return [
        int(d.name)
        for d in Path("/proc").iterdir()
        if d.name.isdigit() and (fields := _stat(int(d.name))) and int(fields[1]) == pid
    ]


def running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie has exited


@pytest.mark.parametrize("staleness", [0, 8])
def test_kill_9_then_restart_matches_an_uninterrupted_run(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path, staleness: int
) -> None:
    """The crashed trainer runs with the trainer cache at s_r = s_w = ``staleness``; the
    reference is synchronous. A single writer's cache writes whole rows back, so both
    match it bit for bit."""
    topic = new_topic(kafka_bootstrap, "eo", partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=20)
    for event in SOURCE:
        producer.send(topic, event.to_json())
    producer.flush()
    producer.close()
    run = uuid.uuid4().hex[:6]

    reference_config = write_config(
        tmp_path / "reference", kafka_bootstrap, redis_url, topic, f"ref{run}"
    )
    reference = train_in_process(reference_config, EVENTS)
    expected_dense = {k: v.clone() for k, v in reference.trainer.model.state_dict().items()}
    expected_rows = stored_rows(reference.store)
    assert reference.stop() == 0

    crash_config = write_config(
        tmp_path / "crash", kafka_bootstrap, redis_url, topic, f"crash{run}", staleness
    )
    trainer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamrec.cli",
            "train",
            "--config",
            str(crash_config),
            "--max-events",
            str(EVENTS),
        ],
        env={
            **os.environ,
            "STREAMREC_METRICS_PORT": "0",
            "STREAMREC_TRAINER__PROGRESS_EVERY_S": "0.05",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert trainer.stdout is not None
    trained = 0
    deadline = time.monotonic() + 120
    while trained < EVENTS // 2 and time.monotonic() < deadline:
        line = trainer.stdout.readline()
        if "events=" in line:
            trained = int(line.split("events=")[1].split()[0])
    workers = children_of(trainer.pid)
    assert workers, "the trainer decodes in worker processes (trainer.decode_workers)"
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(10)
    assert EVENTS // 2 <= trained < EVENTS, "the crash must land mid-stream"
    deadline = time.monotonic() + 10
    while any(map(running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(running, workers)), "decode workers outlived their trainer"

    settings = load_settings(crash_config)
    recorded = RocksDBTier(settings.store.rocksdb_path)  # the primary is gone
    position = TieredStore(table_configs(SOURCE.spec, settings), recorded).position()
    recorded.close()
    assert position is not None
    done = position[f"{topic}:0"]
    assert 0 < done < EVENTS and done % BATCH == 0
    # Usually some batches trained after the last checkpoint are lost with the process
    # (and sit in Redis); test_store_durability covers that case deterministically.
    resumed = train_in_process(crash_config, EVENTS - done)

    for name, tensor in expected_dense.items():
        assert torch.equal(tensor, resumed.trainer.model.state_dict()[name]), name
    actual_rows = stored_rows(resumed.store)
    for table, rows in expected_rows.items():
        assert np.array_equal(rows, actual_rows[table]), table
    assert resumed.stop() == 0
