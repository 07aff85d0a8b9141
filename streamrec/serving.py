"""The service side of the composition root: stores, event sinks and apps for
``streamrec serve`` (one process, or several uvicorn workers)."""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable

import torch
from fastapi import FastAPI

from service.app import ArmBackend, EventSink, ServedExperiment, create_app
from storage.read_process import ReadProcess
from storage.tiered import TieredStore
from streaming.log import KafkaEventProducer
from streaming.spec import FeatureSpec
from streamrec.config import Settings
from streamrec.wiring import build_store, check_experiment, resolve_spec, table_configs

SETTINGS_ENV = "STREAMREC_WORKER_SETTINGS"
"""Environment variable carrying the resolved settings (JSON) to uvicorn workers."""

PRODUCE_BLOCK_MS = 2000
"""How long POST /v1/events may wait for Kafka metadata before it answers 503."""


def build_serving(settings: Settings) -> tuple[FastAPI, Callable[[], None]]:
    """The app over a read-only view of the trainer's store, and what closes it. With
    ``log.kind = kafka`` POST /v1/events produces to the trainer's topic. Embedding
    reads run in ``service.lookup_processes`` child processes, each with its own
    read-only view (started and stopped by the app's lifespan)."""
    # A predict is a small batch: intra-op threads cost more than they save, and
    # uvicorn workers already split the cores.
    torch.set_num_threads(1)
    spec = resolve_spec(settings)
    store = build_store(settings, spec, read_only=True)
    sink = None
    if settings.log.kind == "kafka":
        try:
            producer = KafkaEventProducer(
                settings.log.bootstrap_servers, max_block_ms=PRODUCE_BLOCK_MS
            )
        except Exception:
            store.close()
            raise
        sink = EventSink(producer, settings.log.topic, spec)

    arm_stores: dict[str, TieredStore] = {}

    def close() -> None:
        if sink is not None:
            sink.producer.close()
        for arm_store in arm_stores.values():
            arm_store.close()
        store.close()

    experiment = None
    if settings.experiment is not None and settings.arm is None:
        backends = {}
        try:
            check_experiment(settings, spec)
            for arm in settings.experiment.arms:
                arm_settings = settings.for_arm(arm)
                arm_stores[arm] = build_store(arm_settings, spec, read_only=True)
                backends[arm] = ArmBackend(arm_stores[arm], _read_processes(arm_settings, spec))
        except Exception:
            close()
            raise
        experiment = ServedExperiment(settings.experiment, backends)
    app = create_app(
        store,
        settings.service,
        events=sink,
        read_processes=_read_processes(settings, spec),
        experiment=experiment,
    )
    return app, close


def _read_processes(settings: Settings, spec: FeatureSpec) -> list[ReadProcess]:
    tables = table_configs(spec, settings)
    return [ReadProcess(settings.store, tables) for _ in range(settings.service.lookup_processes)]


def worker_app() -> FastAPI:
    """uvicorn's app factory in each worker of ``streamrec serve --workers N``."""
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    app, close = build_serving(settings)
    atexit.register(close)
    return app
