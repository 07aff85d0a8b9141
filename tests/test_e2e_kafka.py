"""End to end against the real services: events -> Kafka -> trainer -> Redis/RocksDB
-> `streamrec serve` over HTTP. Proves learning, not just plumbing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import REGISTRY
from support import free_port, new_topic, wait_for_report, wait_ready

from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streamrec.config import load_settings
from streamrec.runtime import TrainerRuntime

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 200_000
WINDOW = 50_000
# The model must come within this of the generator's best achievable AUC over
# the same final window of the stream (progressive validation: scored before training).
AUC_MARGIN = 0.05


def write_config(path: Path, kafka: str, redis_url: str, topic: str, data_dir: Path) -> None:
    run_id = uuid.uuid4().hex[:8]
    path.write_text(
        f"""
features = "synthetic"
[log]
kind = "kafka"
bootstrap_servers = "{kafka}"
topic = "{topic}"
dead_letter_topic = "{topic}-dlq"
group_id = "e2e-{run_id}"
[store]
hot = "redis"
redis_url = "{redis_url}"
redis_prefix = "e2e{run_id}"
data_dir = "{data_dir}"
[trainer]
batch_size = 1024
eval_window = {WINDOW}
flush_every_s = 2.0
publish_every_s = 2.0
"""
    )


def test_events_to_predictions_through_kafka_redis_rocksdb(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    topic = new_topic(kafka_bootstrap, "e2e", partitions=2)
    config = tmp_path / "streamrec.toml"
    write_config(config, kafka_bootstrap, redis_url, topic, tmp_path / "data")
    cli = [sys.executable, "-m", "streamrec.cli"]

    # 1. A few bad messages first, then the synthetic stream replayed with the CLI.
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    bad = [b"not json", b'{"event_id": "x", "ts": 1, "label": 1, "features": {"nope": 1}}']
    for raw in bad:
        producer.send(topic, raw)
    producer.flush()
    producer.close()
    subprocess.run(
        [
            *cli,
            "replay",
            "--config",
            str(config),
            "--source",
            "synthetic",
            "--max-events",
            str(EVENTS),
        ],
        check=True,
        timeout=300,
    )

    # 2. Train from Kafka into the Redis hot tier over RocksDB.
    settings = load_settings(config)
    bad_before = (
        REGISTRY.get_sample_value("streamrec_trainer_bad_events_total", {"reason": "invalid_json"})
        or 0.0
    )
    runtime = TrainerRuntime.start(settings, max_events=EVENTS)
    assert runtime.thread is not None
    wait_for_report(runtime, 400)
    # Lag: every record was in the topic before training started, so the partitions'
    # end offsets the trainer saw add up to all of them.
    recorded = runtime.store.position() or {}
    lags = [
        REGISTRY.get_sample_value("streamrec_trainer_lag_events", {"partition": slot})
        for slot in recorded
    ]
    assert len(recorded) == 2 and None not in lags, lags
    assert sum(lags) == EVENTS + len(bad) - sum(recorded.values())  # type: ignore[arg-type]
    assert runtime.stop() == 0
    report = runtime.report
    assert report is not None and report.events == EVENTS

    source = SyntheticSource(SyntheticConfig(seed=settings.trainer.seed), EVENTS)
    # Two partitions interleave the stream, so compare with the best AUC of the
    # generator over the same final stretch of events.
    best = source.best_auc(EVENTS - WINDOW, EVENTS)
    print(f"window AUC {report.evaluation.window_auc:.4f}, generator best {best:.4f}")
    assert report.evaluation.window_auc >= best - AUC_MARGIN

    # 3. Bad messages went to the dead-letter topic and the counter.
    dlq = KafkaConsumer(
        f"{topic}-dlq",
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5000,
    )
    dead = [(m.value, dict(m.headers)) for m in dlq]
    dlq.close()
    assert sorted(v for v, _ in dead) == sorted(bad)
    assert {h["reason"] for _, h in dead} == {b"invalid_json", b"unknown_field"}
    bad_after = REGISTRY.get_sample_value(
        "streamrec_trainer_bad_events_total", {"reason": "invalid_json"}
    )
    assert bad_after == bad_before + 1

    # 4. Serve from the same store in another process and predict over HTTP.
    port = free_port()
    server = subprocess.Popen(
        [*cli, "serve", "--config", str(config), "--port", str(port)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_ready(base), "service never became ready"
        info = httpx.get(f"{base}/v1/models/streamrec").json()
        assert info["version"] == report.version
        assert len(info["features"]["sparse"]) == 26
        events = list(SyntheticSource(SyntheticConfig(seed=99), 64))
        instances = [{**e.features, **e.dense} for e in events]
        response = httpx.post(f"{base}/v1/models/streamrec:predict", json={"instances": instances})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 64 and len(set(predictions)) > 1
        bad_request = httpx.post(
            f"{base}/v1/models/streamrec:predict", json={"instances": [{"c1": 1.5}]}
        )
        assert bad_request.status_code == 422 and "c1" in bad_request.text
        assert "streamrec_service_predict_requests_total" in httpx.get(f"{base}/metrics").text
    finally:
        server.terminate()
        assert server.wait(15) == 0
