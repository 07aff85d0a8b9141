"""The prediction service: FastAPI app factory, model hot-swap, KServe v1 routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from service import metrics
from service.batching import PredictBatcher
from service.collector import CollectorWatch
from service.embeddings import EmbeddingReader
from service.freshness import FreshnessTracker
from service.schemas import (
    ArmInfo,
    EventsAccepted,
    EventsRequest,
    ExperimentInfo,
    FeatureNames,
    Health,
    ModelInfo,
    ModelList,
    PinRequest,
    PredictRequest,
    PredictResponse,
)
from storage.base import EmbeddingStore, StoreUnavailable
from storage.keys import feature_keys
from storage.read_process import ReadProcess
from streaming.events import (
    EVENT_FIELDS,
    FieldError,
    check_event,
    check_instances,
    event_from,
)
from streaming.log import EventProducer, LogUnavailable
from streaming.spec import FeatureSpec
from trainer.encoding import FlatColumns, flat_columns
from trainer.experiment import DEFAULT_ARM, ArmSplit, ExperimentConfig, arms_of_values
from trainer.features import distinct_keys, encode
from trainer.model import DLRM
from trainer.versions import VersionMeta, latest_version, load_version, stored_versions

log = logging.getLogger(__name__)

Loaded = tuple[VersionMeta, DLRM]


class ServiceConfig(BaseModel):
    """The HTTP service."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(
        1, ge=1, description="`streamrec serve`: uvicorn worker processes (metrics summed)."
    )
    model_name: str = Field("streamrec", description="The model this service serves.")
    max_instances: int = Field(1000, ge=1, description="Most instances in one predict request.")
    max_batch_instances: int = Field(
        256,
        ge=1,
        description="Dynamic batching: predict requests that arrive while others are "
        "scored are scored together, up to this many instances in one batch (a larger "
        "request is scored alone). Larger batches cost less CPU per request but make "
        "larger store reads, which overrun `lookup_budget_ms` sooner. 1: every request "
        "alone.",
    )
    max_events: int = Field(1000, ge=1, description="Most events in one POST /v1/events.")
    refresh_every_s: float = Field(1.0, gt=0, description="How often to look for a new version.")
    pinned_version: int | None = Field(
        None, ge=1, description="Serve this version instead of the latest (rollback by config)."
    )
    pin_file: Path | None = Field(
        None,
        description="Where a pin set through the API is kept, so every worker follows it "
        "(within refresh_every_s) and it survives a restart. None: in process only.",
    )
    version_cache: int = Field(
        4, ge=1, description="Versions kept loaded for predicts that name a version."
    )
    near_cache_ttl_s: float = Field(
        1.0, ge=0, description="Staleness bound of the in-process row cache (0: off)."
    )
    near_cache_rows: int = Field(100_000, ge=1, description="Near-cache rows per table.")
    lookup_budget_ms: float = Field(
        25.0,
        gt=0,
        description="A request waits at most this long for store reads; later rows answer "
        "with the default embedding and are cached when they arrive.",
    )
    lookup_processes: int = Field(
        1,
        ge=0,
        description="`streamrec serve`: store reads run in this many child processes, "
        "each with its own read-only view of the store, so their Python work runs beside "
        "the server's event loop instead of under its GIL (one reader thread each). 0: "
        "reads run in the server's own `lookup_threads`. `streamrec run` always reads in "
        "its own threads (its hot tier may live in the trainer's memory).",
    )
    lookup_threads: int = Field(
        1,
        ge=1,
        description="With `lookup_processes = 0`: reader threads, so store reads in flight "
        "at once; each reads every table of the requests queued meanwhile. More help when "
        "the store is far (network round trips dominate); on a 2-core machine next to "
        "Redis one thread served ~15% more predicts than two (more coalescing, less "
        "contention for the GIL).",
    )
    freshness_timeout_s: float = Field(
        60.0, gt=0, description="How long a posted event's rows are watched for a change."
    )
    gc_freeze: bool = Field(
        True,
        description="Freeze the objects alive after startup out of Python's garbage "
        "collector (gc.freeze), so a full collection walks only later ones: ~3 ms instead "
        "of 100-170 ms, during which no request moves.",
    )


@dataclass(frozen=True)
class EventSink:
    """Where ``POST /v1/events`` produces to: the trainer's log and topic, and the spec
    the trainer validates against."""

    producer: EventProducer
    topic: str
    spec: FeatureSpec


@dataclass(frozen=True)
class ArmBackend:
    """An experiment arm's own store (read-only view) and its reader processes."""

    store: EmbeddingStore
    read_processes: Sequence[ReadProcess] = ()


@dataclass(frozen=True)
class ServedExperiment:
    """An experiment the service routes predicts by: each instance goes to its unit's
    arm's model (``trainer.experiment``), the rest to the default model."""

    config: ExperimentConfig
    arms: Mapping[str, ArmBackend]


class UnknownVersion(KeyError):
    pass


class ModelHolder:
    """The served model version. A swap replaces one reference, so a request in
    flight finishes on the version it started with. Follows the latest version, or
    a pinned one (rollback) set by config, by ``pin`` or in the shared pin file."""

    def __init__(
        self,
        store: EmbeddingStore,
        name: str,
        *,
        pinned: int | None = None,
        pin_file: Path | None = None,
        cache_size: int = 4,
        arm: str | None = None,
    ) -> None:
        """``arm``: the experiment arm this model serves (its version is then a label of
        ``streamrec_service_experiment_model_version``, not the service's gauges)."""
        self._store = store
        self.name = name
        self.arm = arm
        self.current: Loaded | None = None
        self.pinned = pinned
        self._pin_file = pin_file
        self._cache: OrderedDict[int, Loaded] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _read_pin_file(self) -> None:
        if self._pin_file is None:
            return
        try:
            text = self._pin_file.read_text().strip()
        except FileNotFoundError:
            return
        self.pinned = int(text) if text else None

    def load(self, version: int) -> Loaded:
        """A stored version, loaded once and kept in a small LRU. Raises UnknownVersion."""
        with self._lock:
            current = self.current
            if current is not None and current[0].version == version:
                return current
            if version in self._cache:
                self._cache.move_to_end(version)
                return self._cache[version]
        try:
            loaded = load_version(self._store, self.name, version)
        except KeyError:
            raise UnknownVersion(
                f"model {self.name!r} has no stored version {version}; "
                f"stored: {stored_versions(self._store, self.name)}"
            ) from None
        with self._lock:
            self._cache[version] = loaded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return loaded

    def _swap(self, loaded: Loaded) -> None:
        self.current = loaded
        if self.arm is None:
            metrics.MODEL_VERSION.set(loaded[0].version)
        else:
            metrics.EXPERIMENT_MODEL_VERSION.labels(arm=self.arm).set(loaded[0].version)
        metrics.SWAPS.inc()
        log.info(
            "serving %s%s version %d%s",
            self.name,
            "" if self.arm is None else f" arm {self.arm!r}",
            loaded[0].version,
            " (pinned)" * bool(self.pinned),
        )

    def refresh(self) -> bool:
        """Serve the pinned version, else the newest published one, if not served yet."""
        self._read_pin_file()
        target = self.pinned or latest_version(self._store, self.name)
        current = self.current
        if target is None or (current is not None and current[0].version == target):
            return False
        loaded = self.load(target)
        self._swap(loaded)
        if self.pinned is None and self.arm is None:
            metrics.PUBLISH_LAG.observe(max(time.time() - loaded[0].created_at, 0.0))
        return True

    def pin(self, version: int | None) -> None:
        """Serve ``version`` from now on (None: the latest); shared through the pin file."""
        loaded = self.load(version) if version is not None else None
        self.pinned = version
        if self._pin_file is not None:
            tmp = self._pin_file.with_name(f".{self._pin_file.name}.{os.getpid()}")
            tmp.write_text("" if version is None else str(version))
            tmp.replace(self._pin_file)
        if loaded is not None:
            self._swap(loaded)
        else:
            self.refresh()


@dataclass(frozen=True)
class _Served:
    """One model the app serves: its versions, its embedding reads, its batching."""

    store: EmbeddingStore
    holder: ModelHolder
    reader: EmbeddingReader
    batcher: PredictBatcher


def _served(
    store: EmbeddingStore,
    config: ServiceConfig,
    read_processes: Sequence[ReadProcess],
    arm: str | None,
) -> _Served:
    reader = EmbeddingReader(
        store,
        ttl_s=config.near_cache_ttl_s,
        max_rows=config.near_cache_rows,
        budget_s=config.lookup_budget_ms / 1000,
        threads=config.lookup_threads,
        processes=read_processes,
    )
    holder = ModelHolder(
        store,
        config.model_name,
        # A pin (rollback) is the default model's; arms follow their trainers.
        pinned=config.pinned_version if arm is None else None,
        pin_file=config.pin_file if arm is None else None,
        cache_size=config.version_cache,
        arm=arm,
    )
    batcher = PredictBatcher(reader, max_instances=config.max_batch_instances)
    return _Served(store, holder, reader, batcher)


class _FastJSONRequest(Request):
    """Bodies parsed by orjson (a 64-instance predict body: ~5x faster than ``json``);
    what orjson refuses and ``json`` takes (NaN, integers beyond 64 bits, lone
    surrogates) falls back to ``json``, so exactly the same bodies parse, to the same
    values, and invalid JSON still raises ``json.JSONDecodeError`` (400)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                self._json = json.loads(body)
        return self._json


class _FastJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_FastJSONRequest(request.scope, request.receive))

        return route


def _invalid(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status_code=422, detail=errors)


def _unavailable(detail: str) -> HTTPException:
    return HTTPException(503, detail=detail, headers={"Retry-After": "1"})


def create_app(
    store: EmbeddingStore,
    config: ServiceConfig | None = None,
    *,
    events: EventSink | None = None,
    read_processes: Sequence[ReadProcess] = (),
    experiment: ServedExperiment | None = None,
) -> FastAPI:
    """The app over a store the trainer writes; versions are picked up every
    ``config.refresh_every_s`` seconds. ``events``: where ``POST /v1/events`` produces
    (None: it answers 503). ``read_processes``: children with their own read-only view
    of ``store`` that do the embedding reads (see ``EmbeddingReader``); the app starts
    and stops them with its lifespan. ``experiment``: route each predict instance to
    its unit's arm's model, each read from the arm's own store."""
    config = config or ServiceConfig()
    main = _served(store, config, read_processes, None)
    holder, reader, batcher = main.holder, main.reader, main.batcher
    arms: dict[str, _Served] = {}
    split: ArmSplit | None = None
    if experiment is not None:
        split = experiment.config.split()
        arms = {
            name: _served(backend.store, config, backend.read_processes, name)
            for name, backend in experiment.arms.items()
        }
    served = [main, *arms.values()]
    if split is not None:
        for arm in (DEFAULT_ARM, *arms):  # every arm's series from the start, at 0
            metrics.EXPERIMENT_INSTANCES.labels(arm=arm)
            if arm != DEFAULT_ARM:
                metrics.EXPERIMENT_FALLBACKS.labels(arm=arm)
            for label in ("0", "1"):
                metrics.EXPERIMENT_EVENTS.labels(arm=arm, label=label)
    tracker = FreshnessTracker(reader, timeout_s=config.freshness_timeout_s)
    collector = CollectorWatch(freeze=config.gc_freeze)

    def refresh_quietly() -> None:
        for model in served:
            try:
                model.holder.refresh()
            except Exception:  # keep serving the old version; the next refresh retries
                whose = "" if model.holder.arm is None else f" (arm {model.holder.arm!r})"
                log.exception("model refresh failed%s", whose)
        current = holder.current
        if current is not None:
            metrics.MODEL_AGE.set(time.time() - current[0].created_at)

    def poll_quietly() -> None:
        try:
            tracker.poll()
        except Exception:
            log.exception("freshness poll failed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def refresher() -> None:
            while True:
                await asyncio.sleep(config.refresh_every_s)
                await asyncio.to_thread(refresh_quietly)

        async def freshness() -> None:
            while True:
                await asyncio.sleep(0.05)
                if tracker.watched:
                    await asyncio.to_thread(poll_quietly)

        for model in served:
            await asyncio.to_thread(model.reader.start)
        await asyncio.to_thread(refresh_quietly)  # serve the latest version from the start
        collector.start()  # after startup: what is alive now stays, so it is frozen
        tasks = [asyncio.create_task(refresher()), asyncio.create_task(freshness())]
        yield
        for task in tasks:
            task.cancel()
        collector.stop()
        for model in served:
            model.reader.close()

    app = FastAPI(
        title="streamrec",
        summary="Click-probability predictions from a continually trained model.",
        version="0.1.0",
        lifespan=lifespan,
    )
    # Every route parses JSON bodies with orjson, routes added later too.
    app.router.route_class = _FastJSONRoute
    app.state.models = holder
    app.state.reader = reader
    app.state.freshness = tracker

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(
                status_code=400, content={"detail": "request body is not valid JSON"}
            )
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse(
            status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "1"}
        )

    def known(name: str) -> None:
        if name != holder.name:
            raise HTTPException(404, detail=f"unknown model {name!r}; serving {holder.name!r}")

    def model_info_of(name: str) -> ModelInfo:
        current = holder.current
        latest = latest_version(store, name)
        if current is None:
            return ModelInfo(
                name=name,
                version=None,
                ready=False,
                latest_version=latest,
                features=FeatureNames(sparse=[], dense=[]),
            )
        meta = current[0]
        return ModelInfo(
            name=name,
            version=meta.version,
            ready=True,
            pinned=holder.pinned is not None,
            latest_version=latest,
            versions=stored_versions(store, name),
            created_at=meta.created_at,
            events_trained=meta.events_trained,
            features=FeatureNames(sparse=meta.spec.sparse_names, dense=list(meta.spec.dense)),
            experiment=experiment_info(),
        )

    def experiment_info() -> ExperimentInfo | None:
        if experiment is None:
            return None
        cfg = experiment.config
        arm_infos = []
        for name, model in arms.items():
            current = model.holder.current
            arm_infos.append(
                ArmInfo(
                    name=name,
                    share=cfg.arms[name].share,
                    version=None if current is None else current[0].version,
                    ready=current is not None,
                    latest_version=latest_version(model.store, model.holder.name),
                    created_at=None if current is None else current[0].created_at,
                    events_trained=None if current is None else current[0].events_trained,
                )
            )
        return ExperimentInfo(
            name=cfg.name,
            unit=cfg.unit,
            default_trains_on=cfg.default_trains_on,
            arms=arm_infos,
        )

    @app.get("/v1/models", response_model=ModelList)
    def list_models() -> ModelList:
        """Names of the served models."""
        return ModelList(models=[holder.name])

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses={404: {}, 503: {}})
    def model_info(name: str) -> ModelInfo:
        """The served version, the stored versions and the feature spec."""
        known(name)
        return model_info_of(name)

    @app.post(
        "/v1/models/{name}:pin",
        response_model=ModelInfo,
        responses={400: {}, 404: {}, 422: {}, 503: {}},
    )
    def pin(name: str, body: PinRequest) -> ModelInfo:
        """Serve a stored version from now on (rollback), or the latest again (null)."""
        known(name)
        try:
            holder.pin(body.version)
        except UnknownVersion as exc:
            raise HTTPException(404, detail=exc.args[0]) from None
        return model_info_of(name)

    @app.post(
        "/v1/models/{name}:predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses={400: {}, 404: {}, 422: {}, 503: {}},
    )
    async def predict(name: str, body: PredictRequest) -> PredictResponse:
        """Click probabilities for ``instances``; ``parameters.version`` pins a version.
        Async: the work is CPU on the loop, shared with concurrent requests
        (``PredictBatcher``), and only the store read waits on another thread or process
        (``EmbeddingReader.lookup_async``)."""
        started = time.perf_counter()
        known(name)
        version = body.parameters.version if body.parameters is not None else None
        if version is None:
            current = holder.current
            if current is None:
                metrics.REQUESTS.labels(status="503").inc()
                raise _unavailable("no model version published yet")
        else:
            try:
                current = await asyncio.to_thread(holder.load, version)  # may read the store
            except UnknownVersion as exc:
                metrics.REQUESTS.labels(status="404").inc()
                raise HTTPException(404, detail=exc.args[0]) from None
        meta, model = current
        if len(body.instances) > config.max_instances:
            metrics.REQUESTS.labels(status="422").inc()
            raise _invalid(
                [
                    {
                        "loc": ["body", "instances"],
                        "msg": f"{len(body.instances)} instances; at most "
                        f"{config.max_instances} per request",
                        "type": "too_long",
                    }
                ]
            )
        spec = meta.spec
        # The usual request is checked and cut into arrays in one pass; any other is
        # checked field by field (and encoded so in its batch).
        columns = flat_columns(body.instances, spec)
        problems = check_instances(body.instances, spec) if columns is None else []
        if problems:
            metrics.REQUESTS.labels(status="422").inc()
            raise _invalid(
                [
                    {
                        "loc": ["body", "instances", i, problem.field],
                        "msg": f"instance {i}: {problem.message}",
                        "type": problem.reason,
                    }
                    for i, problem in problems
                ]
            )
        if split is None or version is not None:
            # A request naming a version asks for the default model's.
            predictions = await batcher.predict(meta, model, body.instances, columns)
            response = PredictResponse(predictions=predictions, model_version=meta.version)
        else:
            response = await predict_by_arm(split, meta, body.instances, columns)
        metrics.INSTANCES.inc(len(body.instances))
        metrics.REQUESTS.labels(status="200").inc()
        metrics.LATENCY.observe(time.perf_counter() - started)
        return response

    async def predict_by_arm(
        split: ArmSplit,
        meta: VersionMeta,
        instances: list[dict[str, Any]],
        columns: FlatColumns | None,
    ) -> PredictResponse:
        """Each instance scored by its unit's arm's model (an arm with no version yet:
        the default model's, counted), the groups concurrently."""
        spec = meta.spec
        if columns is not None and split.unit in spec.sparse_names:
            unit_keys = feature_keys(
                split.unit, columns.ids[:, spec.sparse_names.index(split.unit)]
            )
            of = split.of_keys(unit_keys)
        else:
            of = arms_of_values(split, [instance.get(split.unit) for instance in instances])
        groups: list[tuple[str, npt.NDArray[np.intp] | None, _Served, Loaded]] = []
        present = np.unique(of)
        for index in present.tolist():
            arm = split.name(index)
            model = main if index < 0 else arms[arm]
            rows = None if len(present) == 1 else np.flatnonzero(of == index)
            current = model.holder.current
            if current is None:
                metrics.EXPERIMENT_FALLBACKS.labels(arm=arm).inc(
                    len(instances) if rows is None else len(rows)
                )
                model, current = main, main.holder.current
                if current is None:
                    raise _unavailable("no model version published yet")
            metrics.EXPERIMENT_INSTANCES.labels(arm=arm).inc(
                len(instances) if rows is None else len(rows)
            )
            groups.append((arm, rows, model, current))

        async def score(
            rows: npt.NDArray[np.intp] | None, model: _Served, current: Loaded
        ) -> list[float]:
            if rows is None:
                return await model.batcher.predict(current[0], current[1], instances, columns)
            part = [instances[i] for i in rows.tolist()]
            part_columns = (
                None if columns is None else FlatColumns(columns.ids[rows], columns.dense[rows])
            )
            return await model.batcher.predict(current[0], current[1], part, part_columns)

        scored = await asyncio.gather(
            *(score(rows, model, current) for _, rows, model, current in groups)
        )
        versions = {arm: current[0].version for arm, _, _, current in groups}
        if len(groups) == 1:
            arm = groups[0][0]
            return PredictResponse(
                predictions=scored[0],
                model_version=versions[arm],
                arms=[arm] * len(instances),
                model_versions=versions,
            )
        predictions = [0.0] * len(instances)
        names = [DEFAULT_ARM] * len(instances)
        for (arm, rows, _, _), values in zip(groups, scored, strict=True):
            assert rows is not None
            for i, value in zip(rows.tolist(), values, strict=True):
                predictions[i] = value
                names[i] = arm
        return PredictResponse(
            predictions=predictions,
            model_version=versions.get(DEFAULT_ARM, meta.version),
            arms=names,
            model_versions=versions,
        )

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=EventsAccepted,
        responses={400: {}, 422: {}, 503: {}},
    )
    def post_events(body: EventsRequest) -> EventsAccepted:
        """Produce impression or feedback events to the trainer's log (closes the loop)."""
        if events is None:
            metrics.EVENTS.labels(status="503").inc()
            raise _unavailable("this service has no event log to produce to")
        if len(body.events) > config.max_events:
            metrics.EVENTS.labels(status="422").inc()
            raise _invalid(
                [
                    {
                        "loc": ["body", "events"],
                        "msg": f"{len(body.events)} events; at most {config.max_events} "
                        "per request",
                        "type": "too_long",
                    }
                ]
            )
        errors: list[dict[str, Any]] = []
        for i, obj in enumerate(body.events):
            # The trainer ignores extra top-level keys; a client's typo should not pass.
            problems = check_event(obj, events.spec) + [
                FieldError(k, f"unknown event field {k!r}", "unknown_field")
                for k in obj
                if k not in EVENT_FIELDS
            ]
            for problem in problems:
                errors.append(
                    {
                        "loc": ["body", "events", i, *problem.field.split(".", 1)],
                        "msg": f"event {i}: {problem.message}",
                        "type": problem.reason,
                    }
                )
        if errors:
            metrics.EVENTS.labels(status="422").inc()
            raise _invalid(errors)
        parsed = [event_from(obj) for obj in body.events]
        produced = time.monotonic()
        try:
            for event in parsed:
                events.producer.send(events.topic, event.to_json(), key=event.event_id.encode())
            events.producer.flush(timeout_s=5.0)
        except LogUnavailable as exc:
            metrics.EVENTS.labels(status="503").inc()
            raise _unavailable(str(exc)) from None
        metrics.EVENTS.labels(status="202").inc(len(parsed))
        if split is not None:
            of = arms_of_values(split, [e.features.get(split.unit) for e in parsed])
            counts = Counter(zip(of.tolist(), (e.label for e in parsed), strict=True))
            for (index, label), count in counts.items():  # one increment per series
                metrics.EXPERIMENT_EVENTS.labels(arm=split.name(index), label=str(label)).inc(count)
        batch = encode([e.features for e in parsed], [e.dense for e in parsed], events.spec)
        tracker.watch(produced, distinct_keys(batch, events.spec).keys)
        return EventsAccepted(accepted=len(parsed), topic=events.topic)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    def readyz() -> Response:
        """Ready when a model version is loaded and the store answers (with an
        experiment: every arm's too)."""
        for model in served:
            if model.holder.current is None:
                whose = "" if model.holder.arm is None else f" of arm {model.holder.arm!r}"
                return JSONResponse(
                    status_code=503,
                    content=Health(
                        status="not ready", detail=f"no model version{whose} yet"
                    ).model_dump(),
                )
        try:
            for model in served:
                latest_version(model.store, model.holder.name)
        except StoreUnavailable as exc:
            return JSONResponse(
                status_code=503, content=Health(status="not ready", detail=str(exc)).model_dump()
            )
        return JSONResponse(content=Health(status="ready").model_dump())

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(_exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def _exposition() -> bytes:
    """The default registry, or with several workers (prometheus-client multiprocess
    mode, ``PROMETHEUS_MULTIPROC_DIR``) the sum over every worker's files."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest()
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
