"""Serving behaviour: versions (pin, rollback, hot swap, memory), POST /v1/events,
the near cache and the read time budget."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from test_service import SOURCE, instance, trained_store

from service.app import EventSink, ModelHolder, ServiceConfig, create_app
from service.embeddings import EmbeddingReader
from service.freshness import FreshnessTracker
from storage.base import Keys, LookupResult, Mask, Rows
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.rows import RowCodec
from storage.tiered import TieredStore
from streaming.events import decode_event
from streaming.log import InMemoryLog
from streamrec.config import Settings
from streamrec.wiring import table_configs
from trainer.model import DLRM, ModelConfig
from trainer.versions import latest_version, publish

SPEC = SOURCE.spec
PREDICT = "/v1/models/streamrec:predict"


def publish_random(store: TieredStore, seed: int) -> int:
    """A new version with other dense weights (the trainer's publish)."""
    torch.manual_seed(seed)
    model = DLRM(SPEC, ModelConfig())
    meta = publish(
        store,
        model,
        name="streamrec",
        spec=SPEC,
        config=ModelConfig(),
        events_trained=seed,
        position={},
        keep=10,
    )
    return meta.version


@pytest.fixture()
def store() -> TieredStore:
    return trained_store(SPEC)


@pytest.fixture()
def log() -> InMemoryLog:
    return InMemoryLog()


@pytest.fixture()
def client(store: TieredStore, log: InMemoryLog, tmp_path: Path) -> Iterator[TestClient]:
    # Tests compare predictions across calls: every row must be read, never defaulted
    # because a busy machine's store read overran the 25 ms default budget.
    config = ServiceConfig(pin_file=tmp_path / "pin", max_events=3, lookup_budget_ms=10_000)
    app = create_app(store, config, events=EventSink(log.producer(), "events", SPEC))
    with TestClient(app) as test_client:
        yield test_client


def predict(client: TestClient, **parameters: object) -> dict[str, object]:
    body: dict[str, object] = {"instances": [instance(), instance(c1=5)]}
    if parameters:
        body["parameters"] = parameters
    response = client.post(PREDICT, json=body)
    assert response.status_code == 200, response.text
    result: dict[str, object] = response.json()
    return result


# -- versions -------------------------------------------------------------------------


def test_versions_pin_by_request_api_and_rollback(client: TestClient, store: TieredStore) -> None:
    first = latest_version(store, "streamrec")
    assert first is not None
    newer = publish_random(store, 1)
    assert client.app.state.models.refresh()  # type: ignore[attr-defined]
    info = client.get("/v1/models/streamrec").json()
    assert info["version"] == newer and info["latest_version"] == newer
    assert info["versions"][-2:] == [first, newer] and info["pinned"] is False

    # One request can name a version; the served one stays.
    old = predict(client, version=first)
    assert old["model_version"] == first
    assert predict(client)["model_version"] == newer
    assert old["predictions"] != predict(client)["predictions"]
    missing = client.post(PREDICT, json={"instances": [instance()], "parameters": {"version": 999}})
    assert missing.status_code == 404 and "999" in missing.text

    # Rollback by API: every later request is served by the pinned version, a newer
    # publish does not move it, and unpinning follows the latest again.
    pinned = client.post("/v1/models/streamrec:pin", json={"version": first})
    assert pinned.status_code == 200 and pinned.json()["pinned"] is True
    assert predict(client) == old
    newest = publish_random(store, 2)
    client.app.state.models.refresh()  # type: ignore[attr-defined]
    assert predict(client)["model_version"] == first
    assert client.post("/v1/models/streamrec:pin", json={"version": 999}).status_code == 404
    assert client.post("/v1/models/streamrec:pin", json={"version": None}).json()["version"] == (
        newest
    )


def test_pin_by_config_and_pin_file(store: TieredStore, tmp_path: Path) -> None:
    first = latest_version(store, "streamrec")
    publish_random(store, 3)
    with TestClient(create_app(store, ServiceConfig(pinned_version=first))) as pinned:
        assert predict(pinned)["model_version"] == first
    # Another worker's API pin reaches this one through the shared file.
    pin_file = tmp_path / "pin"
    holder = ModelHolder(store, "streamrec", pin_file=pin_file)
    holder.refresh()
    assert holder.current is not None and holder.current[0].version == first + 1  # type: ignore[operator]
    ModelHolder(store, "streamrec", pin_file=pin_file).pin(first)
    assert holder.refresh() and holder.current[0].version == first


def test_hot_swaps_never_fail_in_flight_requests(client: TestClient, store: TieredStore) -> None:
    failures: list[str] = []
    versions: set[int] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            response = client.post(PREDICT, json={"instances": [instance()] * 4})
            if response.status_code != 200:
                failures.append(response.text)
            else:
                versions.add(response.json()["model_version"])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    holder: ModelHolder = client.app.state.models  # type: ignore[attr-defined]
    for seed in range(30):
        publish_random(store, 100 + seed)
        assert holder.refresh()
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert len(versions) > 5  # requests really ran across swaps


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_memory_does_not_grow_across_100_swaps(store: TieredStore) -> None:
    holder = ModelHolder(store, "streamrec", cache_size=2)
    alive: list[weakref.ref[DLRM]] = []

    def swap(seed: int) -> None:
        publish_random(store, seed)
        assert holder.refresh()
        assert holder.current is not None
        alive.append(weakref.ref(holder.current[1]))
        holder.load(holder.current[0].version - 1)  # exercise the pinned-version cache

    for seed in range(10):  # warm up allocator pools
        swap(seed)
    gc.collect()
    before = rss_bytes()
    for seed in range(10, 110):
        swap(seed)
    gc.collect()
    grown = rss_bytes() - before
    # Only the served model and the small LRU of loaded versions survive a swap.
    assert sum(ref() is not None for ref in alive) <= 3
    # 100 leaked versions would be ~100 x the dense weights (~0.3 MB each) and more.
    assert grown < 8 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB over 100 swaps"


# -- events ---------------------------------------------------------------------------


def event(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1",
        "ts": 1_700_000_000_000,
        "label": 1,
        "features": {"c1": "new-user", "c2": 7},
        "dense": {"i1": 0.5},
    }
    base.update(overrides)
    return base


def test_events_are_produced_to_the_log(client: TestClient, log: InMemoryLog) -> None:
    response = client.post("/v1/events", json={"events": [event(), event(event_id=2, label=0)]})
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 2, "topic": "events"}
    records = log.read("events", 0, 10, timeout_s=1)
    decoded = [decode_event(r.value, SPEC) for r in records]
    assert [(e.event_id, e.label) for e in decoded] == [("e1", 1), ("2", 0)]
    assert decoded[0].features == {"c1": "new-user", "c2": 7}
    # Their rows are watched for freshness.
    assert client.app.state.freshness.watched >= 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        (
            {"events": [event(), event(features={"c1": 1.5})]},
            ["body", "events", 1, "features", "c1"],
        ),
        ({"events": [event(dense={"i1": "x"})]}, ["body", "events", 0, "dense", "i1"]),
        ({"events": [event(colour="red")]}, ["body", "events", 0, "colour"]),
        ({"events": [event(features={"nope": 1})]}, ["body", "events", 0, "features", "nope"]),
        ({"events": [event(label=3)]}, ["body", "events", 0, "label"]),
        ({"events": [{"ts": 1, "label": 0, "features": {}}]}, ["body", "events", 0, "event_id"]),
        ({"events": [event()] * 4}, ["body", "events"]),
        ({"events": []}, ["body", "events"]),
        ({"events": [event()], "extra": 1}, ["body", "extra"]),
    ],
)
def test_bad_events_get_422_naming_event_and_field(
    client: TestClient, log: InMemoryLog, payload: dict[str, object], loc: list[object]
) -> None:
    response = client.post("/v1/events", json=payload)
    assert response.status_code == 422, response.text
    assert loc in [e["loc"] for e in response.json()["detail"]]
    assert log.read("events", 0, 10, timeout_s=0) == []  # nothing produced


def test_events_without_a_log_answer_503(store: TieredStore) -> None:
    with TestClient(create_app(store)) as plain:
        response = plain.post("/v1/events", json={"events": [event()]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "event log" in response.text


# -- near cache and budget ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys_of(table: str, *ids: object) -> Keys:
    return np.unique(feature_keys(table, list(ids)))  # type: ignore[arg-type]


def test_near_cache_serves_rows_at_most_ttl_old() -> None:
    store = TieredStore(table_configs(SPEC, Settings()), MemoryTier())
    keys = keys_of("c1", "a", "b")
    store.admit("c1", keys)
    clock = Clock()
    reader = EmbeddingReader(store, ttl_s=1.0, clock=clock)
    first = reader.lookup({"c1": keys})["c1"]
    assert first.found.all()
    store.update("c1", keys, np.ones((2, 16), dtype=np.float32))
    clock.now += 0.9
    assert np.array_equal(reader.lookup({"c1": keys})["c1"].rows, first.rows)  # cached
    assert not np.array_equal(reader.lookup({"c1": keys}, cached=False)["c1"].rows, first.rows)
    clock.now += 0.2  # past the TTL: the store's current row
    fresh = reader.lookup({"c1": keys})["c1"]
    assert not np.array_equal(fresh.rows, first.rows)
    # Unknown ids are cached as the default too.
    unknown = keys_of("c1", "never")
    assert not reader.lookup({"c1": unknown})["c1"].found.any()
    store.admit("c1", unknown)
    assert not reader.lookup({"c1": unknown})["c1"].found.any()
    reader.close()


def test_near_cache_keys_sharing_a_slot_never_read_each_others_rows() -> None:
    store = TieredStore(table_configs(SPEC, Settings()), MemoryTier())
    keys = keys_of("c1", *range(20))
    store.admit("c1", keys[::2])
    want = store.lookup("c1", keys)
    reader = EmbeddingReader(store, max_rows=3, clock=Clock())  # 20 keys, 3 slots
    for _ in range(3):
        got = reader.lookup({"c1": keys, "c2": keys_of("c2", 1)})["c1"]
        assert np.array_equal(got.rows, want.rows) and np.array_equal(got.found, want.found)
        for k in range(20):
            one = reader.lookup({"c1": keys[k : k + 1]})["c1"]
            assert np.array_equal(one.rows, want.rows[k : k + 1])
    reader.close()


class SlowTier(MemoryTier):
    """A hot tier whose reads take ``delay_s`` (a slow disk or a stalled server)."""

    delay_s = 0.0

    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        time.sleep(self.delay_s)
        return super().get_many(table, keys)

    def get_rows(self, table: str, keys: Keys, codec: RowCodec) -> tuple[Rows, Mask]:
        time.sleep(self.delay_s)
        return super().get_rows(table, keys, codec)


def test_a_slow_read_answers_the_default_within_budget_then_fills_the_cache() -> None:
    tier = SlowTier()
    store = TieredStore(table_configs(SPEC, Settings()), tier)
    keys = keys_of("c2", 1, 2, 3)
    store.admit("c2", keys)
    tier.delay_s = 0.3
    reader = EmbeddingReader(store, budget_s=0.02)
    started = time.perf_counter()
    late = reader.lookup({"c2": keys})["c2"]
    assert time.perf_counter() - started < 0.15
    assert not late.found.any() and not late.rows.any()  # the default embedding
    time.sleep(0.5)  # the read finished in the background and filled the near cache
    tier.delay_s = 0.0
    assert reader.lookup({"c2": keys})["c2"].found.all()
    reader.close()


def test_async_lookup_waits_without_blocking_the_loop_and_keeps_the_budget() -> None:
    tier = SlowTier()
    store = TieredStore(table_configs(SPEC, Settings()), tier)
    keys = keys_of("c2", 1, 2, 3)
    store.admit("c2", keys)
    want = store.lookup("c2", keys)
    reader = EmbeddingReader(store, budget_s=0.2)

    async def scenario() -> tuple[int, bool, bool]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        tier.delay_s = 0.1
        got = (await reader.lookup_async({"c2": keys}))["c2"]
        exact = np.array_equal(got.rows, want.rows) and bool(got.found.all())
        tier.delay_s = 1.0
        started = time.perf_counter()
        late = (await reader.lookup_async({"c2": keys_of("c2", 4)}))["c2"]
        defaulted = not late.found.any() and time.perf_counter() - started < 0.6
        task.cancel()
        return ticks, exact, defaulted

    ticks, exact, defaulted = asyncio.run(scenario())
    assert exact  # the store's rows, read on a reader thread
    assert defaulted  # a read past the budget answers the default
    assert ticks >= 10  # the loop kept running while both reads waited
    tier.delay_s = 0.0
    reader.close()


def test_reads_queued_while_the_reader_is_busy_coalesce_into_one_store_read() -> None:
    tier = SlowTier()
    store = TieredStore(table_configs(SPEC, Settings()), tier)
    ids = list(range(9))
    store.admit("c1", keys_of("c1", *ids))
    reads: list[int] = []
    reading = threading.Event()
    lookup_tables = store.lookup_tables

    def counted(keys: Mapping[str, Keys]) -> dict[str, LookupResult]:
        reads.append(sum(len(k) for k in keys.values()))
        reading.set()
        return lookup_tables(keys)

    store.lookup_tables = counted  # type: ignore[method-assign,assignment]
    reader = EmbeddingReader(store, budget_s=5.0, threads=1)

    async def scenario() -> list[dict[str, LookupResult]]:
        tier.delay_s = 0.3
        first = asyncio.create_task(reader.lookup_async({"c1": keys_of("c1", 0)}))
        while not reading.is_set():  # until the one reader thread is busy with it
            await asyncio.sleep(0.001)
        # The same key twice, and keys of several requests: one read, each key once.
        rest = [
            asyncio.create_task(reader.lookup_async({"c1": keys_of("c1", i, i + 1)}))
            for i in (1, 2, 4, 6)
        ]
        return [await first, *await asyncio.gather(*rest)]

    def served(le: str) -> float:
        name = "streamrec_service_store_read_requests_bucket"
        return REGISTRY.get_sample_value(name, {"le": le}) or 0.0

    before = served("1.0"), served("4.0")
    results = asyncio.run(scenario())
    tier.delay_s = 0.0
    assert reads == [1, 7]  # keys 1..7 once, in one store read
    # The metric says so too: one read served 1 request, the next 4.
    assert (served("1.0"), served("4.0")) == (before[0] + 1, before[1] + 2)
    assert all(r["c1"].found.all() for r in results)
    want = store.lookup("c1", keys_of("c1", 6, 7))
    assert np.array_equal(results[-1]["c1"].rows, want.rows)
    reader.close()
    assert reader.lookup({"c1": keys_of("c1", 8)}, cached=False)["c1"].found.all()  # reopened
    reader.close()


def observed() -> float:
    count = ("streamrec_service_event_to_visible_seconds_count", {"table": "c1"})
    return REGISTRY.get_sample_value(*count) or 0.0


def test_freshness_observes_the_first_served_change_of_a_posted_row() -> None:
    store = TieredStore(table_configs(SPEC, Settings()), MemoryTier())
    clock = Clock()
    reader = EmbeddingReader(store, ttl_s=1.0, clock=clock)
    tracker = FreshnessTracker(reader, timeout_s=10.0, clock=clock)
    keys = keys_of("c1", "posted")
    count = observed()
    tracker.watch(clock.now, {"c1": keys})
    assert tracker.watched == 1
    assert tracker.poll() == 0  # no row yet: nothing to see
    store.admit("c1", keys)  # the trainer's first update of the id
    clock.now += 0.5
    assert tracker.poll() == 0  # the near cache still serves the miss
    clock.now += 0.6
    assert tracker.poll() == 1 and tracker.watched == 0
    assert observed() == count + 1
    reader.close()
