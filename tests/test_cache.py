"""The trainer's bounded-staleness cache (HET) over a real tiered store."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
from prometheus_client import REGISTRY

from storage.base import AdmissionConfig, Keys, SparseOptimizerName, TableConfig
from storage.memory_tier import MemoryTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore
from trainer.cache import CacheConfig, CachedStore

T = TableConfig(name="t", dim=4, optimizer="rowwise_adagrad", learning_rate=0.1)
SGD = TableConfig(name="s", dim=4, optimizer="sgd", learning_rate=0.5)


def ids(*values: int) -> Keys:
    return np.array(values, dtype=np.uint64)


def store_of(*tables: TableConfig) -> TieredStore:
    return TieredStore(list(tables), MemoryTier())


def step(store: TieredStore | CachedStore, table: str, keys: Keys, grad: float) -> np.ndarray:
    """One training step on ``keys``: lookup with create, then update; returns the rows
    the lookup served."""
    rows = store.lookup(table, keys, create=True).rows
    dim = store.tables()[table].dim
    store.update(table, keys, np.full((len(keys), dim), grad, dtype=np.float32))
    return rows


def metric(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def train_side_by_side(
    plain: TieredStore, cached: CachedStore, *, steps: int, ids_below: int, seed: int
) -> None:
    """The same random training steps on both stores; every lookup and update must
    give them the same rows, bit for bit."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        keys = np.unique(rng.integers(0, ids_below, 30).astype(np.uint64))
        grads = rng.standard_normal((len(keys), 4)).astype(np.float32)
        a = plain.lookup("t", keys, create=True).rows
        b = cached.lookup("t", keys, create=True).rows
        assert a.tobytes() == b.tobytes()  # the rows trained on are never stale
        assert plain.update("t", keys, grads).tobytes() == cached.update("t", keys, grads).tobytes()


def test_synchronous_cache_trains_bit_identically() -> None:
    plain, inner = store_of(T), store_of(T)
    cached = CachedStore(inner, CacheConfig())
    train_side_by_side(plain, cached, steps=20, ids_below=50, seed=0)
    everything = ids(*range(50))
    assert (
        plain.lookup("t", everything).rows.tobytes() == inner.lookup("t", everything).rows.tobytes()
    )


def test_shared_write_bound_accumulates_then_pushes_the_sum() -> None:
    inner = store_of(SGD)
    cached = CachedStore(inner, CacheConfig(read_staleness=10, write_staleness=2), shared=True)
    key = ids(7)
    start = step(cached, "s", key, 1.0)
    for _ in range(2):  # two pending updates: nothing reaches the store yet
        assert inner.lookup("s", key).rows.tobytes() == start.tobytes()
        step(cached, "s", key, 1.0)
    # The third pending update exceeds s_w = 2: one push of the summed gradient.
    assert np.allclose(inner.lookup("s", key).rows, start - 0.5 * 3.0)
    assert cached.stats()["cache_pending_rows"] == 0


@pytest.mark.parametrize("shared", [False, True])
def test_flush_pushes_every_pending_update_before_recording_the_position(shared: bool) -> None:
    inner = store_of(SGD)
    cached = CachedStore(inner, CacheConfig(read_staleness=8, write_staleness=8), shared=shared)
    keys = ids(1, 2, 3)
    start = step(cached, "s", keys, 2.0)
    assert cached.stats()["cache_pending_rows"] == 3
    cached.flush({"log:0": 5})
    assert inner.position() == {"log:0": 5}
    assert np.allclose(inner.lookup("s", keys).rows, start - 1.0)
    assert cached.stats()["cache_pending_rows"] == 0


def test_shared_read_bound_sees_another_writer_after_s_r_lookups() -> None:
    shared = store_of(SGD)
    mine = CachedStore(shared, CacheConfig(read_staleness=2, write_staleness=0), shared=True)
    key = ids(9)
    first = mine.lookup("s", key, create=True).rows
    shared.update("s", key, np.ones((1, 4), dtype=np.float32))  # another trainer
    # Two lookups may still serve the cached copy; the third reads the store again.
    assert mine.lookup("s", key, create=True).rows.tobytes() == first.tobytes()
    assert mine.lookup("s", key, create=True).rows.tobytes() == first.tobytes()
    assert np.allclose(mine.lookup("s", key, create=True).rows, first - 0.5)


def test_a_shared_read_after_pending_updates_includes_them() -> None:
    inner = store_of(SGD)
    cached = CachedStore(inner, CacheConfig(read_staleness=1, write_staleness=5), shared=True)
    key = ids(4)
    start = step(cached, "s", key, 1.0)  # pending 1, age 0
    cached.lookup("s", key, create=True)  # served from the cache (age 0 < 1)
    # Due for a read: the pending update is pushed first, so the read includes it.
    assert np.allclose(cached.lookup("s", key, create=True).rows, start - 0.5)


@pytest.mark.parametrize("shared", [False, True])
def test_unadmitted_ids_are_never_served_from_the_cache(shared: bool) -> None:
    gated = TableConfig(
        name="g",
        dim=4,
        admission=AdmissionConfig(policy="count_min", threshold=3, sketch_width=1 << 10),
    )
    inner = store_of(gated)
    cached = CachedStore(inner, CacheConfig(read_staleness=8, write_staleness=8), shared=shared)
    key = ids(42)
    for _ in range(2):  # every sighting reaches the store's admission policy
        assert not cached.lookup("g", key, create=True).found.any()
        cached.update("g", key, np.ones((1, 4), dtype=np.float32))
    assert cached.lookup("g", key, create=True).found.all()  # third sighting admits
    assert inner.stats()["dropped_gradients"] == 2


@pytest.mark.parametrize("shared", [False, True])
def test_nan_gradients_are_rejected_by_the_store_and_never_accumulated(shared: bool) -> None:
    inner = store_of(SGD)
    cached = CachedStore(inner, CacheConfig(read_staleness=4, write_staleness=4), shared=shared)
    keys = ids(1, 2)
    start = step(cached, "s", keys, 1.0)
    cached.lookup("s", keys, create=True)
    cached.update("s", keys, np.array([[np.nan] * 4, [1.0] * 4], dtype=np.float32))
    cached.flush()
    assert inner.stats()["rejected_gradients"] == 1
    rows = inner.lookup("s", keys).rows
    assert np.allclose(rows[0], start[0] - 0.5)  # only the finite first update
    assert np.allclose(rows[1], start[1] - 1.0)


@pytest.mark.parametrize("shared", [False, True])
def test_capacity_drops_rows_but_never_their_updates(shared: bool) -> None:
    plain, inner = store_of(SGD), store_of(SGD)
    cached = CachedStore(
        inner, CacheConfig(read_staleness=3, write_staleness=3, capacity_rows=40), shared=shared
    )
    rng = np.random.default_rng(3)
    for _ in range(30):
        keys = np.unique(rng.integers(0, 200, 25).astype(np.uint64))
        for s in (plain, cached):
            step(s, "s", keys, 1.0)  # SGD: the sum of pushes equals the sequence
        assert cached.cached_rows() <= 40 + 25
    cached.flush()
    everything = ids(*range(200))
    assert np.allclose(plain.lookup("s", everything).rows, inner.lookup("s", everything).rows)


def test_a_step_over_many_tables_keeps_every_row_until_its_update() -> None:
    """``lookup_tables``: one store read for the misses of every table, and making room
    never drops a row of the step (all its tables count as used now), so every update of
    the step finds its rows cached (none goes to the store's ``update``); the rows
    trained on match the plain store's."""
    tables = [T, TableConfig(name="u", dim=4, optimizer="rowwise_adagrad")]
    plain, inner = store_of(*tables), store_of(*tables)
    cached = CachedStore(inner, CacheConfig(read_staleness=4, write_staleness=4, capacity_rows=30))
    reads: list[list[str]] = []
    lookup_rows_tables, update = inner.lookup_rows_tables, inner.update
    direct: list[str] = []

    def counted_reads(keys: dict[str, Keys], *, create: bool = False) -> object:
        reads.append(sorted(keys))
        return lookup_rows_tables(keys, create=create)

    def counted_updates(table: str, keys: Keys, grads: np.ndarray) -> np.ndarray:
        direct.append(table)
        return update(table, keys, grads)

    inner.lookup_rows_tables = counted_reads  # type: ignore[method-assign,assignment]
    inner.update = counted_updates  # type: ignore[method-assign]
    rng = np.random.default_rng(4)
    for i in range(20):
        batch = {t.name: np.unique(rng.integers(0, 60, 20).astype(np.uint64)) for t in tables}
        before = len(reads)
        got = cached.lookup_tables(batch, create=True)
        want = plain.lookup_tables(batch, create=True)
        assert len(reads) - before <= 1
        if i == 0:
            assert reads == [["t", "u"]]
        assert cached.cached_rows() >= len(batch["t"]) + len(batch["u"]) > 30
        for name, keys in batch.items():
            assert got[name].rows.tobytes() == want[name].rows.tobytes()
            grads = rng.standard_normal((len(keys), 4)).astype(np.float32)
            assert cached.update(name, keys, grads).tobytes() == (
                plain.update(name, keys, grads).tobytes()
            )
    assert direct == []


@pytest.mark.parametrize("shared", [False, True])
def test_prefetch_fills_the_cache_and_cuts_store_reads(shared: bool) -> None:
    inner = store_of(T)
    cached = CachedStore(inner, CacheConfig(read_staleness=4, write_staleness=4), shared=shared)
    keys = ids(*range(100))
    inner.lookup("t", keys, create=True)  # rows exist in the store
    cached.prefetch("t", keys)
    before = metric("streamrec_trainer_cache_lookups_total", result="hit")
    result = cached.lookup("t", keys, create=True)
    assert result.found.all()
    assert metric("streamrec_trainer_cache_lookups_total", result="hit") - before == 100
    assert result.rows.tobytes() == inner.lookup("t", keys).rows.tobytes()


def test_prefetch_of_a_batch_reads_the_open_tables_together_and_creates_no_gated_rows() -> None:
    gated = TableConfig(
        name="g",
        dim=4,
        admission=AdmissionConfig(policy="count_min", threshold=3, sketch_width=1 << 10),
    )
    inner = store_of(T, SGD, gated)
    cached = CachedStore(inner, CacheConfig(read_staleness=4, write_staleness=4))
    calls: list[tuple[list[str], bool]] = []
    lookup_rows_tables = inner.lookup_rows_tables

    def counted(keys: dict[str, Keys], *, create: bool = False) -> object:
        calls.append((sorted(keys), create))
        return lookup_rows_tables(keys, create=create)

    inner.lookup_rows_tables = counted  # type: ignore[method-assign,assignment]
    keys = ids(*range(50))
    cached.prefetch_tables({"t": keys, "s": keys, "g": keys})
    assert calls == [(["s", "t"], True), (["g"], False)]
    assert cached.cached_rows() == 100  # the open tables' new rows; no gated row exists
    assert inner.stats()["hot_rows.g"] == 0
    before = metric("streamrec_trainer_cache_lookups_total", result="hit")
    assert cached.lookup_tables({"t": keys, "s": keys}, create=True)["t"].found.all()
    assert metric("streamrec_trainer_cache_lookups_total", result="hit") - before == 100


@pytest.mark.parametrize(("s", "shared"), [(0, False), (8, False), (8, True)])
def test_traffic_counters(s: int, shared: bool) -> None:
    inner = store_of(T)
    cached = CachedStore(inner, CacheConfig(read_staleness=s, write_staleness=s), shared=shared)
    names = ("read", "write", "demand_read", "demand_write")
    before = {n: metric("streamrec_trainer_store_rows_total", op=n) for n in names}
    keys = ids(*range(10))
    for _ in range(18):
        step(cached, "t", keys, 0.1)
    cached.flush()
    d = {n: metric("streamrec_trainer_store_rows_total", op=n) - before[n] for n in names}
    assert d["demand_read"] == d["demand_write"] == 180
    if s == 0:
        assert d["read"] == 180 and d["write"] == 180
    elif shared:
        # Per row: reads at lookups 1 and 18 (age 8 = s_r); pushes at update 9 (9 pending
        # > s_w), before the read at lookup 18, and of update 18 at the flush.
        assert d["read"] == 20 and d["write"] == 30
    else:
        # Per row: one read (the only writer never re-reads) and a write-back at updates
        # 9 and 18 (9 pending > s_w); nothing left for the flush.
        assert d["read"] == 10 and d["write"] == 20


@pytest.mark.parametrize("optimizer", sorted(get_args(SparseOptimizerName)))
def test_write_back_trains_bit_identically_at_any_staleness(optimizer: str) -> None:
    cfg = TableConfig(name="t", dim=4, optimizer=optimizer, learning_rate=0.05)
    plain, inner = store_of(cfg), store_of(cfg)
    cached = CachedStore(inner, CacheConfig(read_staleness=8, write_staleness=8))
    train_side_by_side(plain, cached, steps=40, ids_below=60, seed=1)
    cached.flush()
    everything = ids(*range(60))
    want, _ = plain.lookup_rows("t", everything)
    got, _ = inner.lookup_rows("t", everything)
    # Embedding and optimizer state; the update times may differ by the test's seconds.
    assert want["emb"].tobytes() == got["emb"].tobytes()
    assert want["state"].tobytes() == got["state"].tobytes()
    assert (want["count"] == got["count"]).all()


def test_write_back_store_lags_by_at_most_s_w_updates() -> None:
    plain, inner = store_of(T), store_of(T)
    cached = CachedStore(inner, CacheConfig(read_staleness=0, write_staleness=3))
    key = ids(5)
    step(plain, "t", key, 0.2)
    start = step(cached, "t", key, 0.2)
    for _ in range(2):  # pending 1..3: the store still has the created row
        assert inner.lookup("t", key).rows.tobytes() != plain.lookup("t", key).rows.tobytes()
        step(plain, "t", key, 0.2)
        step(cached, "t", key, 0.2)
    assert inner.lookup("t", key).rows.tobytes() == start.tobytes()
    step(plain, "t", key, 0.2)
    step(cached, "t", key, 0.2)  # the 4th pending update (> s_w = 3): written back
    assert inner.lookup("t", key).rows.tobytes() == plain.lookup("t", key).rows.tobytes()
    assert cached.stats()["cache_pending_rows"] == 0


def test_write_back_through_a_capacity_bounded_store_with_a_cold_tier(tmp_path: Path) -> None:
    """Rows the store demotes to RocksDB while the cache holds them come back right."""

    def bounded(path: Path) -> TieredStore:
        return TieredStore([T], MemoryTier(), RocksDBTier(path), hot_capacity_rows=30)

    plain, inner = bounded(tmp_path / "plain"), bounded(tmp_path / "cached")
    cached = CachedStore(inner, CacheConfig(read_staleness=4, write_staleness=4, capacity_rows=50))
    rng = np.random.default_rng(7)
    for i in range(60):
        keys = np.unique(rng.zipf(1.3, 40).astype(np.uint64) % 300)
        grads = rng.standard_normal((len(keys), 4)).astype(np.float32)
        for s in (plain, cached):
            s.lookup("t", keys, create=True)
            s.update("t", keys, grads)
        if i % 10 == 9:
            plain.flush({"log:0": i})
            cached.flush({"log:0": i})
    assert inner.position() == {"log:0": 59}
    everything = ids(*range(300))
    want, found = plain.lookup_rows("t", everything)
    got, got_found = inner.lookup_rows("t", everything)
    assert (found == got_found).all()
    assert want["emb"].tobytes() == got["emb"].tobytes()
    assert want["state"].tobytes() == got["state"].tobytes()
    for s in (plain, inner):
        s.close()


def test_evicting_repeated_keys_drops_each_cached_row_once() -> None:
    cached = CachedStore(store_of(T), CacheConfig(read_staleness=4, write_staleness=4))
    step(cached, "t", ids(1, 2, 3, 4), 0.5)
    assert cached.cached_rows() == 4
    assert cached.evict("t", ids(2, 2, 3, 9)) == 2
    assert cached.cached_rows() == 2
    # The evicted ids come back as new rows; the others are still served from the cache.
    before = metric("streamrec_trainer_cache_lookups_total", result="hit")
    step(cached, "t", ids(1, 2, 3, 4), 0.5)
    assert metric("streamrec_trainer_cache_lookups_total", result="hit") - before == 2
    assert cached.cached_rows() == 4
