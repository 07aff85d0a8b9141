"""Thin-path benchmark: embedded training rate and in-process predict latency.

    python bench/thin_path.py [--quick]

Prints progress to stderr and one JSON object as the last line of stdout.
Keys: train_events_per_s (memory hot tier, batch 1024, synthetic 26 fields),
encode_events_per_s (feature hashing alone, the baseline share of a step),
predict_p50_ms / predict_p99_ms (64-instance predicts through the FastAPI app,
TestClient, no network), window_auc and best_auc over the last window.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from storage.memory_tier import MemoryTier
from storage.tiered import TieredStore
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticSource
from streamrec.config import Settings
from streamrec.wiring import table_configs
from trainer.features import encode
from trainer.trainer import StreamingTrainer, TrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer events (CI smoke run)")
    args = parser.parse_args()
    events_n = 40_000 if args.quick else 200_000
    window = min(50_000, events_n // 2)

    source = SyntheticSource(max_events=events_n)
    events = list(source)
    print(f"generated {events_n} events", file=sys.stderr)

    started = time.perf_counter()
    for i in range(0, events_n, 1024):
        chunk = events[i : i + 1024]
        encode([e.features for e in chunk], [e.dense for e in chunk], source.spec)
    encode_rate = events_n / (time.perf_counter() - started)

    store = TieredStore(table_configs(source.spec, Settings()), MemoryTier())
    log = InMemoryLog(capacity=events_n + 1)
    for event in events:
        log.append("bench", event.to_json())
    trainer = StreamingTrainer(
        source.spec, store, log.consumer("bench"), TrainerConfig(eval_window=window)
    )
    started = time.perf_counter()
    report = trainer.run(threading.Event(), max_events=events_n)
    train_rate = events_n / (time.perf_counter() - started)
    print(f"trained {report.events} events at {train_rate:.0f}/s", file=sys.stderr)

    latencies = []
    instances = [{**e.features, **e.dense} for e in events[:64]]
    with TestClient(create_app(store)) as client:
        for _ in range(20 if args.quick else 200):
            t0 = time.perf_counter()
            response = client.post("/v1/models/streamrec:predict", json={"instances": instances})
            latencies.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()

    print(
        json.dumps(
            {
                "events": events_n,
                "train_events_per_s": round(train_rate),
                "encode_events_per_s": round(encode_rate),
                "predict_p50_ms": round(float(np.percentile(latencies, 50)), 2),
                "predict_p99_ms": round(float(np.percentile(latencies, 99)), 2),
                "window_auc": round(report.evaluation.window_auc, 4),
                "best_auc": round(source.best_auc(events_n - window, events_n), 4),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            }
        )
    )


if __name__ == "__main__":
    main()
