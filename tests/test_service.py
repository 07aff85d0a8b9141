from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.app import ServiceConfig, create_app
from storage.memory_tier import MemoryTier
from storage.tiered import TieredStore
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streaming.spec import FeatureSpec
from streamrec.config import Settings
from streamrec.wiring import table_configs
from trainer.trainer import StreamingTrainer, TrainerConfig

SOURCE = SyntheticSource(
    SyntheticConfig(num_sparse=3, num_dense=2, universe=200, interaction_pairs=[(1, 2)]), 3_000
)


def trained_store(spec: FeatureSpec) -> TieredStore:
    store = TieredStore(table_configs(spec, Settings()), MemoryTier())
    log = InMemoryLog()
    for event in SOURCE:
        log.append("t", event.to_json())
    trainer = StreamingTrainer(spec, store, log.consumer("t"), TrainerConfig(batch_size=500))
    trainer.run(threading.Event(), max_events=3_000)
    return store


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    # A generous budget: a store read that is late on a loaded machine would answer
    # default rows, and these tests compare predictions.
    config = ServiceConfig(max_instances=5, lookup_budget_ms=10_000)
    app = create_app(trained_store(SOURCE.spec), config)
    with TestClient(app) as test_client:  # runs the lifespan: loads the latest version
        yield test_client


def instance(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"c1": 1, "c2": "7", "c3": 99, "i1": 0.5, "i2": 2.0}
    base.update(overrides)
    return base


def test_models_and_model_info(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {"models": ["streamrec"]}
    info = client.get("/v1/models/streamrec").json()
    assert info["name"] == "streamrec" and info["ready"] is True and info["version"] >= 1
    assert info["features"] == {"sparse": ["c1", "c2", "c3"], "dense": ["i1", "i2"]}
    assert client.get("/v1/models/other").status_code == 404


def test_predict_returns_one_probability_per_instance(client: TestClient) -> None:
    response = client.post(
        "/v1/models/streamrec:predict",
        json={"instances": [instance(), instance(c1="never-seen"), {"c1": 1}]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 3
    assert all(0.0 < p < 1.0 for p in body["predictions"])
    assert body["model_version"] >= 1
    # Same features, same answer: "1" and 1 are the same id.
    again = client.post("/v1/models/streamrec:predict", json={"instances": [instance(c1="1")]})
    assert again.json()["predictions"][0] == pytest.approx(body["predictions"][0], abs=1e-6)


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"instances": []}, "instances"),
        ({}, "instances"),
        ({"instances": [instance(colour="red")]}, "colour"),
        ({"instances": [instance(), instance(c1=1.5)]}, "instance 1"),
        ({"instances": [instance(i1="high")]}, "i1"),
        ({"instances": [instance()] * 6}, "at most 5"),
        ({"instances": [5]}, "instances"),
        # Finite in JSON but infinite as the model's float32 input.
        ({"instances": [instance(), instance(i2=-1e39)]}, "instance 1"),
    ],
)
def test_bad_instances_get_422_naming_the_problem(
    client: TestClient, payload: dict[str, object], needle: str
) -> None:
    response = client.post("/v1/models/streamrec:predict", json=payload)
    assert response.status_code == 422, response.text
    assert needle in response.text


def test_non_json_body_is_400_and_unknown_model_404(client: TestClient) -> None:
    response = client.post(
        "/v1/models/streamrec:predict",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert client.post("/v1/models/x:predict", json={"instances": [instance()]}).status_code == 404


@pytest.mark.parametrize("value", [b"1" + b"0" * 400, b"1e400", b"NaN"], ids=["int", "inf", "nan"])
def test_dense_values_no_float32_holds_get_422_not_500(client: TestClient, value: bytes) -> None:
    # What orjson refuses the json fallback parses: an int of 400 digits, infinity, NaN.
    body = b'{"instances": [{"c1": 1, "c2": "7", "c3": 99, "i1": %s, "i2": 2.0}]}' % value
    response = client.post(
        "/v1/models/streamrec:predict",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert "float32 range" in response.text and "i1" in response.text


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert "streamrec_service_predict_requests_total" in metrics


def test_startup_objects_are_frozen_out_of_the_collector_and_passes_timed() -> None:
    """While an app runs, what was alive at its startup is frozen (``gc_freeze``) and every
    collector pass lands in ``streamrec_service_gc_pause_seconds``, once however many
    apps run; the last app to stop unfreezes."""
    full = 'streamrec_service_gc_pause_seconds_count{generation="2"}'

    def full_passes(client: TestClient) -> float:
        line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(full))
        return float(line.rsplit(" ", 1)[1])

    store = TieredStore(table_configs(SOURCE.spec, Settings()), MemoryTier())
    with TestClient(create_app(store)) as running:
        assert gc.get_freeze_count() > 1000
        before = full_passes(running)
        gc.collect()
        assert full_passes(running) == before + 1
    unfrozen = ServiceConfig(gc_freeze=False)
    with TestClient(create_app(store, unfrozen)) as running:
        before = full_passes(running)
        gc.collect()
        assert full_passes(running) == before + 1


def test_not_ready_before_the_first_version() -> None:
    store = TieredStore(table_configs(SOURCE.spec, Settings()), MemoryTier())
    with TestClient(create_app(store)) as fresh:
        assert fresh.get("/readyz").status_code == 503
        response = fresh.post("/v1/models/streamrec:predict", json={"instances": [instance()]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert fresh.get("/v1/models/streamrec").json()["version"] is None
