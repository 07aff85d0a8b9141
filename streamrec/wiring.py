"""The composition root: builds stores, logs, trainers and apps from Settings.

Nothing below this package reads settings or the environment; everything is
passed down from here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from storage.base import TableConfig
from storage.factory import open_store
from storage.tiered import TieredStore
from streaming.events import Event
from streaming.log import InMemoryLog
from streaming.sources import open_source
from streaming.sources.base import EventSource
from streaming.sources.synthetic import SyntheticConfig
from streaming.spec import FeatureSpec
from streamrec.config import ConfigError, Settings

log = logging.getLogger(__name__)


def table_configs(spec: FeatureSpec, settings: Settings) -> list[TableConfig]:
    """One table per sparse field: the store defaults, then per-table overrides."""
    cfg = settings.store
    unknown = sorted(set(cfg.tables) - set(spec.sparse_names))
    if unknown:
        raise ValueError(f"store.tables names fields the feature spec lacks: {unknown}")
    defaults = {
        "optimizer": cfg.optimizer,
        "learning_rate": cfg.learning_rate,
        "admission": cfg.admission,
        "ttl_s": cfg.ttl_s,
        "min_l2_norm": cfg.min_l2_norm,
    }
    return [
        TableConfig.model_validate(
            {**defaults, **cfg.tables.get(field.name, {}), "name": field.name, "dim": field.dim}
        )
        for field in spec.sparse
    ]


def build_store(settings: Settings, spec: FeatureSpec, *, read_only: bool = False) -> TieredStore:
    """The configured store with one table per sparse field of ``spec``
    (``storage.factory.open_store``; ``read_only``: a serving process's view)."""
    return open_store(settings.store, table_configs(spec, settings), read_only=read_only)


def check_experiment(settings: Settings, spec: FeatureSpec) -> None:
    """Raise ConfigError unless the experiment's unit is a categorical field of ``spec``."""
    experiment = settings.experiment
    if experiment is None:
        return
    field = spec.sparse_field(experiment.unit)
    if field is None or field.kind != "categorical":
        categorical = [f.name for f in spec.sparse if f.kind == "categorical"]
        raise ConfigError(
            f"experiment.unit {experiment.unit!r} must be a categorical sparse field of "
            f"the feature spec: one of {categorical}"
        )


def resolve_spec(settings: Settings) -> FeatureSpec:
    """The configured feature spec, expanding the name of a built-in source."""
    if isinstance(settings.features, FeatureSpec):
        return settings.features
    if settings.features == "synthetic":
        return SyntheticConfig(seed=settings.trainer.seed).feature_spec()
    from streaming.sources.movielens import movielens_spec

    return movielens_spec()


def embedded_source(settings: Settings, max_events: int | None = None) -> EventSource:
    """The source of the embedded mode: ``auto`` picks MovieLens-100k when fetched."""
    name = settings.source
    if name == "auto":
        fetched = (settings.store.data_dir / "ml-100k").is_dir()
        name = "movielens-100k" if fetched else "synthetic"
    return open_source(
        name, data_dir=settings.store.data_dir, seed=settings.trainer.seed, max_events=max_events
    )


def pace(events: Iterable[Event], rate: float | None) -> Iterable[Event]:
    """Yield events at most ``rate`` per second (unpaced when None or 0)."""
    if not rate:
        yield from events
        return
    started = time.monotonic()
    for i, event in enumerate(events):
        ahead = i / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
        yield event


def feed_log(
    source: Iterable[Event],
    log_: InMemoryLog,
    topic: str,
    stop: threading.Event,
    rate: float | None = None,
) -> threading.Thread:
    """Start a thread that appends the source's events to the in-process log."""

    def produce() -> None:
        for event in pace(source, rate):
            if stop.is_set():
                return
            log_.append(topic, event.to_json())
        log.info("source exhausted; the trainer waits for more events")

    thread = threading.Thread(target=produce, name="embedded-source", daemon=True)
    thread.start()
    return thread


def data_path(settings: Settings, name: str) -> Path:
    settings.store.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.store.data_dir / name
