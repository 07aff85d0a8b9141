"""The prediction service: FastAPI app factory, model hot-swap, KServe v1 routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from service import metrics
from service.schemas import (
    FeatureNames,
    Health,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
)
from storage.base import EmbeddingStore, StoreUnavailable
from streaming.events import check_fields, split_instance
from trainer.features import encode, gather
from trainer.model import DLRM
from trainer.versions import VersionMeta, latest_version, load_version

log = logging.getLogger(__name__)


class ServiceConfig(BaseModel):
    """The HTTP service."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str = Field("streamrec", description="The model this service serves.")
    max_instances: int = Field(1000, ge=1, description="Most instances in one predict request.")
    refresh_every_s: float = Field(1.0, gt=0, description="How often to look for a new version.")


class ModelHolder:
    """The served model version. A swap replaces one reference, so a request in
    flight finishes on the version it started with."""

    def __init__(self, store: EmbeddingStore, name: str) -> None:
        self._store = store
        self.name = name
        self.current: tuple[VersionMeta, DLRM] | None = None

    def refresh(self) -> bool:
        """Load the newest published version if it is not served yet."""
        version = latest_version(self._store, self.name)
        current = self.current
        if version is None or (current is not None and current[0].version == version):
            return False
        loaded = load_version(self._store, self.name, version)
        self.current = loaded
        metrics.MODEL_VERSION.set(version)
        metrics.PUBLISH_LAG.observe(max(time.time() - loaded[0].created_at, 0.0))
        log.info("serving %s version %d", self.name, version)
        return True


def _invalid(errors: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status_code=422, detail=errors)


def create_app(store: EmbeddingStore, config: ServiceConfig | None = None) -> FastAPI:
    """The app over a store the trainer writes; versions are picked up every
    ``config.refresh_every_s`` seconds."""
    config = config or ServiceConfig()
    holder = ModelHolder(store, config.model_name)

    def refresh_quietly() -> None:
        try:
            holder.refresh()
        except Exception:  # keep serving the old version; the next refresh retries
            log.exception("model refresh failed")
        current = holder.current
        if current is not None:
            metrics.MODEL_AGE.set(time.time() - current[0].created_at)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def refresher() -> None:
            while True:
                await asyncio.sleep(config.refresh_every_s)
                await asyncio.to_thread(refresh_quietly)

        await asyncio.to_thread(refresh_quietly)  # serve the latest version from the start
        task = asyncio.create_task(refresher())
        yield
        task.cancel()

    app = FastAPI(
        title="streamrec",
        summary="Click-probability predictions from a continually trained model.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.models = holder

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

    @app.get("/v1/models", response_model=ModelList)
    def list_models() -> ModelList:
        """Names of the served models."""
        return ModelList(models=[holder.name])

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses={404: {}})
    def model_info(name: str) -> ModelInfo:
        """The served version and its feature spec."""
        known(name)
        current = holder.current
        if current is None:
            return ModelInfo(
                name=name, version=None, ready=False, features=FeatureNames(sparse=[], dense=[])
            )
        meta = current[0]
        return ModelInfo(
            name=name,
            version=meta.version,
            ready=True,
            created_at=meta.created_at,
            events_trained=meta.events_trained,
            features=FeatureNames(sparse=meta.spec.sparse_names, dense=list(meta.spec.dense)),
        )

    @app.post(
        "/v1/models/{name}:predict",
        response_model=PredictResponse,
        responses={400: {}, 404: {}, 422: {}, 503: {}},
    )
    def predict(name: str, body: PredictRequest) -> PredictResponse:
        """Click probabilities for ``instances``."""
        started = time.perf_counter()
        known(name)
        current = holder.current
        if current is None:
            metrics.REQUESTS.labels(status="503").inc()
            raise HTTPException(
                503, detail="no model version published yet", headers={"Retry-After": "1"}
            )
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
        features: list[dict[str, Any]] = []
        dense: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, instance in enumerate(body.instances):
            sparse_part, dense_part = split_instance(instance, meta.spec)
            for problem in check_fields(sparse_part, dense_part, meta.spec):
                errors.append(
                    {
                        "loc": ["body", "instances", i, problem.field],
                        "msg": f"instance {i}: {problem.message}",
                        "type": problem.reason,
                    }
                )
            features.append(sparse_part)
            dense.append(dense_part)
        if errors:
            metrics.REQUESTS.labels(status="422").inc()
            raise _invalid(errors)
        batch = encode(features, dense, meta.spec)
        with torch.inference_mode():
            sparse, rows = gather(store, batch, meta.spec, train=False)
            probabilities = torch.sigmoid(model(torch.from_numpy(batch.dense), sparse))
        metrics.UNKNOWN_IDS.inc(rows.unknown)
        metrics.INSTANCES.inc(len(features))
        metrics.REQUESTS.labels(status="200").inc()
        metrics.LATENCY.observe(time.perf_counter() - started)
        return PredictResponse(predictions=probabilities.tolist(), model_version=meta.version)

    @app.get("/healthz", response_model=Health)
    def healthz() -> Health:
        """The process is up."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    def readyz() -> Response:
        """Ready when a model version is loaded and the store answers."""
        if holder.current is None:
            return JSONResponse(
                status_code=503,
                content=Health(status="not ready", detail="no model version yet").model_dump(),
            )
        try:
            latest_version(store, holder.name)
        except StoreUnavailable as exc:
            return JSONResponse(
                status_code=503, content=Health(status="not ready", detail=str(exc)).model_dump()
            )
        return JSONResponse(content=Health(status="ready").model_dump())

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
