"""Admission, capacity eviction, expiry and their counters, for ``TieredStore`` over a
memory hot tier and over a real Redis hot tier (``integration``), RocksDB cold.

Steps: a training lookup of a table already looked up in the current step starts a new
step, so with one table every ``lookup(create=True)`` is a step of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from storage.admission import (
    AlwaysAdmit,
    CountMinAdmission,
    ProbabilisticAdmission,
    make_policy,
)
from storage.base import AdmissionConfig, Keys, RowTier, TableConfig
from storage.eviction import EvictionConfig, HotIndex, _first_k, choose_victims
from storage.keyfilter import KeyFilter
from storage.keyindex import (
    KeyIndex,
    distinct_rows,
    distinct_segments,
    occurs_in,
    sorted_distinct,
    unique_inverse,
)
from storage.keys import splitmix64
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import SPILL_BLOB, TieredStore, spill_table

T0 = 1_700_000_000.0


def u64(*values: int) -> Keys:
    return np.array(values, dtype=np.uint64)


def ids(start: int, stop: int) -> Keys:
    """Distinct, well-spread keys for ids in [start, stop)."""
    return splitmix64(np.arange(start, stop, dtype=np.uint64))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def train(store: TieredStore, table: str, keys: Keys, value: float = 0.1) -> None:
    """One trainer step on one table: training lookup, then an update of its rows."""
    store.lookup(table, keys, create=True)
    u = np.unique(keys)
    dim = store.tables()[table].dim
    store.update(table, u, np.full((len(u), dim), value, dtype=np.float32))


def packed(tier: RowTier | None, table: str, keys: Keys) -> list[bytes | None]:
    assert tier is not None
    return tier.get_many(table, keys)


# -- policies on their own --------------------------------------------------------------


def test_always_admits_everything() -> None:
    assert AlwaysAdmit().admit(u64(1, 2, 3)).all()
    assert isinstance(make_policy(AdmissionConfig()), AlwaysAdmit)


def test_count_min_admits_at_exactly_the_threshold() -> None:
    policy = CountMinAdmission(threshold=3, width=1 << 16, depth=4, seed=1)
    keys = ids(0, 2000)
    assert not policy.admit(keys).any()
    assert not policy.admit(keys).any()
    assert policy.admit(keys).all()
    # Sightings in one call count too; the count saturates at the threshold.
    fresh = ids(10_000, 10_010)
    got = policy.admit(fresh, np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5]))
    assert got.tolist() == [False, False, True, True, True] * 2
    assert policy.estimate(fresh).max() == 3


def test_count_min_conservative_update() -> None:
    policy = CountMinAdmission(threshold=200, width=64, depth=2, seed=3)
    heavy = u64(42)
    policy.admit(heavy, np.array([150]))
    light = ids(0, 40)  # 40 keys in 64 cells: some share a cell with the heavy key
    policy.admit(light)
    # Conservative update: one sighting raises a light key's counters only up to its
    # own estimate + 1, so sharing one cell with the heavy key does not inflate it.
    assert np.median(policy.estimate(light)) <= 2
    assert policy.estimate(heavy)[0] == 150


def test_count_min_halves_its_counters() -> None:
    policy = CountMinAdmission(threshold=100, width=1 << 12, depth=4, seed=3, halve_every=100)
    heavy = u64(42)
    policy.admit(heavy, np.array([50]))
    policy.admit(ids(0, 49))
    assert policy.estimate(heavy)[0] == 50
    policy.admit(ids(100, 101))  # the 100th sighting: every counter halves
    assert policy.estimate(heavy)[0] == 25


def test_count_min_from_config_is_per_table() -> None:
    cfg = AdmissionConfig(policy="count_min", threshold=2, sketch_width=256, sketch_depth=2)
    a, b = make_policy(cfg, "a"), make_policy(cfg, "b")
    assert isinstance(a, CountMinAdmission) and isinstance(b, CountMinAdmission)
    keys = ids(0, 50)
    a.admit(keys)
    assert not b.admit(keys).any()  # b has not seen them
    assert a.admit(keys).all()


def test_probabilistic_admission_rate_and_determinism() -> None:
    keys = ids(0, 20_000)
    got = ProbabilisticAdmission(0.25, seed=7).admit(keys)
    assert abs(got.mean() - 0.25) < 0.015
    again = ProbabilisticAdmission(0.25, seed=7).admit(keys)
    assert np.array_equal(got, again)
    # k sightings at once: 1 - (1 - p)^k.
    three = ProbabilisticAdmission(0.25, seed=8).admit(keys, np.full(len(keys), 3))
    assert abs(three.mean() - (1 - 0.75**3)) < 0.015
    assert ProbabilisticAdmission(1.0).admit(keys).all()


def test_hot_index_matches_a_dict() -> None:
    rng = np.random.default_rng(1)
    index = HotIndex()
    model: dict[int, tuple[int, int]] = {}
    for step in range(1, 300):
        keys = np.unique(rng.integers(0, 4000, rng.integers(1, 600)).astype(np.uint64) << 10)
        if rng.random() < 0.6:
            pos = index.touch(keys, step)
            assert (index.keys[pos] == keys).all()
            for k in keys.tolist():
                model[k] = (step, model.get(k, (0, 0))[1] + 1)
        else:
            assert index.discard(keys) == sum(k in model for k in keys.tolist())
            for k in keys.tolist():
                model.pop(k, None)
        assert index.live == len(model)
    probe: Keys = np.arange(0, 4000, dtype=np.uint64) << np.uint64(10)
    pos = index.find(probe)
    for k, p in zip(probe.tolist(), pos.tolist(), strict=True):
        assert (p >= 0) == (k in model)
        if p >= 0:
            assert (int(index.step[p]), int(index.freq[p])) == model[k]


def test_key_index_probes_across_clusters_and_the_wrap_around() -> None:
    index = KeyIndex()
    rng = np.random.default_rng(2)
    cand = rng.integers(0, 2**64 - 1, 400_000, dtype=np.uint64, endpoint=True)
    last = cand[index._home(cand) == index.size - 1]  # all probe from the last slot on
    assert len(last) >= 60
    index.add(last[:40])  # one cluster of 40, wrapping round to the first slots
    pos = index.find(last)
    assert (index.keys[pos[:40]] == last[:40]).all() and (pos[40:] == -1).all()
    index.discard(last[:20:2])  # tombstones inside the cluster are probed past
    pos = index.find(last[:40])
    assert (pos[:20:2] == -1).all() and (index.keys[pos[1:40:2]] == last[1:40:2]).all()
    assert (index.keys[pos[20:]] == last[20:40]).all()


@pytest.mark.parametrize("seed", range(5))
def test_first_k_is_a_stable_sort_prefix(seed: int) -> None:
    """Victim order: the k lowest scores, ties in index order, whether the scores span
    few values (LRU steps: counting sort) or many (LFU scores: argpartition)."""
    rng = np.random.default_rng(seed)
    for n, span in ((1, 1), (50, 3), (5000, 40), (300, 10**6), (2000, 1 << 50)):
        score = rng.integers(7, 7 + span, n, dtype=np.int64)
        for k in sorted({1, max(1, n // 3), n}):
            got = _first_k(score, k)
            expected = np.argsort(score, kind="stable")[:k]
            if span <= 4 * n + 1024:  # the counting sort keeps index order among ties
                assert np.array_equal(got, expected)
            else:  # argpartition: the same scores, each index once
                assert np.array_equal(score[got], score[expected])
                assert len(set(got.tolist())) == k


@pytest.mark.parametrize("seed", range(4))
def test_lru_victims_are_the_oldest_unprotected_rows_of_all_tables(seed: int) -> None:
    """Against a reference: every (table, key) with its last step, sorted by step (ties
    in table then position order), cut after the rows needed down to low water."""
    rng = np.random.default_rng(seed)
    indexes = [HotIndex() for _ in range(int(rng.integers(1, 6)))]
    for step in range(1, 30):
        for ix in indexes:
            if rng.random() < 0.7:
                ix.touch(np.unique(rng.integers(0, 500, 40).astype(np.uint64)), step)
            if rng.random() < 0.2:  # tombstones among the live slots
                ix.discard(np.unique(rng.integers(0, 500, 10).astype(np.uint64)))
    live = sum(ix.live for ix in indexes)
    cfg = EvictionConfig(max_rows=max(1, live // 2), protect_steps=3, low_water=0.8)
    victims = choose_victims(indexes, [16] * len(indexes), cfg, 29)
    rows = [
        (int(ix.step[p]), t, int(p))
        for t, ix in enumerate(indexes)
        for p in ix.candidates(27).tolist()
    ]
    assert all(ix.state[p] == 1 and ix.step[p] < 27 for _, t, p in rows for ix in [indexes[t]])
    need = live - int(cfg.max_rows * cfg.low_water)  # type: ignore[operator]
    expected = sorted(rows)[: min(need, len(rows))]
    got = sorted(
        (int(indexes[t].step[p]), t, int(p))
        for t, pos in victims.positions.items()
        for p in pos.tolist()
    )
    assert victims.rows == len(got) == len(expected)
    # Same steps chosen; within the cut-off step any rows of that step may be taken.
    assert [r[0] for r in got] == [r[0] for r in expected]
    assert {r for r in got if r[0] < expected[-1][0]} == {
        r for r in expected if r[0] < expected[-1][0]
    }
    assert len({(t, p) for _, t, p in got}) == len(got)


@pytest.mark.parametrize("seed", range(5))
def test_unique_inverse_is_numpys_unique(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n, high in ((0, 2), (1, 2), (300, 5), (5000, 3000), (2000, 2**63)):
        keys = rng.integers(0, high, n, dtype=np.int64).astype(np.uint64)
        distinct, inverse = unique_inverse(keys)
        expected, expected_inverse = np.unique(keys, return_inverse=True)
        assert np.array_equal(distinct, expected) and distinct.dtype == np.uint64
        assert np.array_equal(inverse, expected_inverse.reshape(-1))


@pytest.mark.parametrize("seed", range(5))
def test_distinct_rows_dedupes_each_row_apart(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for rows, n, high in ((1, 1, 2), (3, 0, 2), (26, 64, 40), (4, 3000, 2**63)):
        keys = rng.integers(0, high, (rows, n), dtype=np.int64).astype(np.uint64)
        keys[-1] = keys[0]  # the same keys in two rows stay apart
        flat, starts, inverse = distinct_rows(keys)
        assert starts[0] == 0 and starts[-1] == len(flat) and inverse.shape == (n, rows)
        for r in range(rows):
            mine = flat[starts[r] : starts[r + 1]]
            assert len(set(mine.tolist())) == len(mine)  # distinct within the row
            assert set(mine.tolist()) == set(keys[r].tolist())
            assert np.array_equal(flat[inverse[:, r]], keys[r])


@pytest.mark.parametrize("seed", range(5))
def test_distinct_segments_dedupes_each_segment_apart(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for high in (2, 40, 2**63):
        lengths = rng.integers(0, 300, int(rng.integers(1, 30)))
        bounds = np.concatenate(([0], np.cumsum(lengths))).astype(np.intp)
        keys = rng.integers(0, high, int(bounds[-1]), dtype=np.int64).astype(np.uint64)
        if len(lengths) > 1:  # the same keys in two segments stay apart
            n = min(lengths[0], lengths[-1])
            keys[bounds[-2] : bounds[-2] + n] = keys[:n]
        flat, starts, inverse = distinct_segments(keys, bounds)
        assert starts[0] == 0 and starts[-1] == len(flat)
        full = np.arange(len(keys)) if inverse is None else inverse
        assert np.array_equal(flat[full], keys)
        for s in range(len(lengths)):
            mine = flat[starts[s] : starts[s + 1]].tolist()
            segment = keys[bounds[s] : bounds[s + 1]].tolist()
            assert mine == list(dict.fromkeys(segment))  # distinct, in order of first sight
            assert ((full[bounds[s] : bounds[s + 1]] >= starts[s]).all()
                    and (full[bounds[s] : bounds[s + 1]] < starts[s + 1]).all())  # fmt: skip
    distinct_keys = np.arange(10, dtype=np.uint64)[::-1].copy()
    flat, starts, inverse = distinct_segments(distinct_keys, np.array([0, 4, 10]))
    assert inverse is None and flat is not None and list(starts) == [0, 4, 10]


@pytest.mark.parametrize("seed", range(5))
def test_occurs_in_is_isin_for_sorted_distinct_keys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = sorted_distinct(rng.integers(0, 300, int(rng.integers(0, 200)), dtype=np.uint64))
    others = rng.integers(
        0, 400, int(rng.integers(0, 300)), dtype=np.uint64
    )  # repeats, past the end
    assert (occurs_in(keys, others) == np.isin(keys, others)).all()
    assert occurs_in(keys, others).shape == keys.shape


@pytest.mark.parametrize("seed", range(3))
def test_key_filter_never_forgets_a_key_as_it_grows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f = KeyFilter(first_layer_keys=100)
    added: list[Keys] = []
    for n in (1, 99, 0, 250, 3000, 7):  # crosses layers, within and between calls
        keys = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        f.add(keys)
        added.append(keys)
        assert f.may_contain(np.concatenate(added)).all()
    assert len(f._layers) >= 3
    assert 3000 <= len(f) <= 3357  # distinct as far as the filter could tell
    others = rng.integers(0, 2**64 - 1, 20_000, dtype=np.uint64, endpoint=True)
    assert f.may_contain(others).mean() < 0.03  # ~0.8% a full layer
    small = KeyFilter()
    small.add(np.arange(1000, dtype=np.uint64))  # patterned keys spread too
    assert small.may_contain(np.arange(1000, 100_000, dtype=np.uint64)).mean() < 0.01


def test_key_filter_stops_at_its_byte_cap() -> None:
    f = KeyFilter(first_layer_keys=16, max_bytes=100)  # 32 bytes, then 128: past the cap
    assert f.add(ids(0, 16)) and f.nbytes == 32
    assert not f.add(ids(16, 20))
    assert f.nbytes == 32 and len(f._layers) == 1


def test_key_filter_does_not_grow_on_keys_it_holds() -> None:
    f = KeyFilter(first_layer_keys=64)
    keys = ids(0, 60)
    for _ in range(5):  # a flush writes the same hot rows again and again
        f.add(keys)
    assert len(f) <= 60 and len(f._layers) == 1
    assert not KeyFilter().may_contain(keys).any()


def test_eviction_config_needs_a_capacity() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        EvictionConfig()


def test_hot_capacity_rows_is_shorthand_for_max_rows() -> None:
    store = TieredStore([TableConfig(name="t")], MemoryTier(), hot_capacity_rows=50)
    assert store.eviction == EvictionConfig(max_rows=50)
    tuned = TieredStore(
        [TableConfig(name="t")],
        MemoryTier(),
        eviction=EvictionConfig(max_bytes=10_000, policy="lfu"),
        hot_capacity_rows=50,
    )
    assert tuned.eviction == EvictionConfig(max_rows=50, max_bytes=10_000, policy="lfu")


# -- the store --------------------------------------------------------------------------

STORE_KINDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("redis_cluster", marks=pytest.mark.integration),
]
REDIS_FIXTURES = {"redis": "clean_redis", "redis_cluster": "clean_redis_cluster"}

Factory = Callable[..., TieredStore]


@pytest.fixture(params=STORE_KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """``make_store(tables, cold=True, hot_name="main", cold_name="db", **store_kwargs)``: a
    TieredStore over a hot tier of the parametrised kind (same ``hot_name``: the same hot
    rows) and RocksDB at ``tmp_path / cold_name``, with spill in mapped scratch files as
    ``build_store`` wires it (``spill=None`` keeps it in the cold tier); ``clock``
    defaults to a fixed ``Clock``."""
    fixture = REDIS_FIXTURES.get(request.param)
    redis_url = request.getfixturevalue(fixture) if fixture else None
    memory_hots: dict[str, MemoryTier] = {}
    opened: list[TieredStore] = []

    def factory(
        tables: list[TableConfig],
        *,
        cold: bool = True,
        hot_name: str = "main",
        cold_name: str = "db",
        **kwargs: Any,
    ) -> TieredStore:
        hot: RowTier
        if redis_url is not None:
            hot = RedisTier(redis_url, prefix=f"pol-{hot_name}", buckets=16)
        else:
            hot = memory_hots.setdefault(hot_name, MemoryTier())
        cold_tier = RocksDBTier(tmp_path / cold_name) if cold else None
        if cold_tier is not None and "spill" not in kwargs:
            kwargs["spill"] = MemoryTier.scratch(tmp_path / f"{cold_name}-spill")
        kwargs.setdefault("clock", Clock())
        store = TieredStore(tables, hot, cold_tier, **kwargs)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def lru(max_rows: int, **kw: Any) -> EvictionConfig:
    """A row capacity; unless told otherwise, no per-step budget (tests of the budget say
    so) and only the current step protected."""
    kw.setdefault("max_evict_fraction", 1.0)
    kw.setdefault("protect_steps", 1)
    return EvictionConfig(max_rows=max_rows, **kw)


# -- admission through the store --------------------------------------------------------

GATED = TableConfig(
    name="gated",
    dim=4,
    admission=AdmissionConfig(policy="count_min", threshold=2, sketch_width=1 << 12),
)
OPEN = TableConfig(name="open", dim=4)


def test_unadmitted_ids_read_zero_grow_nothing_and_drop_gradients(
    make_store: Factory,
) -> None:
    store = make_store([GATED, OPEN])
    before = {
        "rejected": metric("streamrec_store_admissions_total", table="gated", result="rejected"),
        "admitted": metric("streamrec_store_admissions_total", table="gated", result="admitted"),
        "dropped": metric("streamrec_store_dropped_gradients_total", table="gated"),
    }
    keys = ids(0, 20)
    first = store.lookup("gated", keys, create=True)
    assert not first.found.any() and not first.rows.any()
    store.update("gated", keys, np.ones((20, 4), dtype=np.float32))
    store.flush({"p": 1})
    stats = store.stats()
    assert stats["hot_rows.gated"] == 0 and stats["cold_rows.gated"] == 0
    assert stats["admission_rejections"] == 20 and stats["admissions"] == 0
    assert stats["dropped_gradients"] == 20 and stats["created_rows"] == 0
    assert store.hot.get_many("gated", keys) == [None] * 20
    # Serving lookups neither admit nor count as sightings.
    for _ in range(3):
        assert not store.lookup("gated", keys).found.any()
    second = store.lookup("gated", keys, create=True)  # the second sighting admits
    assert second.found.all() and second.rows.any()
    stats = store.stats()
    assert stats["hot_rows.gated"] == 20 and stats["admissions"] == 20
    assert (
        metric("streamrec_store_admissions_total", table="gated", result="rejected")
        - before["rejected"]
        == 20
    )
    assert (
        metric("streamrec_store_admissions_total", table="gated", result="admitted")
        - before["admitted"]
        == 20
    )
    assert (
        metric("streamrec_store_dropped_gradients_total", table="gated") - before["dropped"] == 20
    )
    # The ungated table is unaffected.
    assert store.lookup("open", keys, create=True).found.all()


def test_duplicates_in_a_batch_are_sightings(make_store: Factory) -> None:
    store = make_store([GATED])
    once, twice = ids(0, 5), ids(100, 105)
    got = store.lookup("gated", np.concatenate([once, twice, twice]), create=True)
    assert got.found.tolist() == [False] * 5 + [True] * 10


def test_admit_forces_rows_and_evict_removes_them(make_store: Factory) -> None:
    store = make_store([GATED])
    keys = ids(0, 8)
    store.admit("gated", keys)
    assert store.lookup("gated", keys).found.all()
    assert store.stats()["forced_admissions"] == 8
    assert store.evict("gated", keys[:3]) == 3
    assert store.lookup("gated", keys).found.tolist() == [False] * 3 + [True] * 5


def test_probabilistic_admission_rate_in_store(make_store: Factory) -> None:
    table = TableConfig(
        name="p", dim=2, admission=AdmissionConfig(policy="probabilistic", probability=0.2)
    )
    store = make_store([table], admission_seed=11)
    found = store.lookup("p", ids(0, 5000), create=True).found
    assert abs(found.mean() - 0.2) < 0.025
    assert store.stats()["hot_rows.p"] == int(found.sum())


# -- capacity eviction ------------------------------------------------------------------

T4 = TableConfig(name="t4", dim=4, optimizer="adagrad", initial_accumulator=0.1)
T8 = TableConfig(name="t8", dim=8, optimizer="lazy_adam")


@pytest.mark.parametrize("flush_first", [False, True])
@pytest.mark.parametrize("spill_in_cold", [False, True])
def test_demoted_then_promoted_row_is_bit_identical(
    make_store: Factory, flush_first: bool, spill_in_cold: bool
) -> None:
    clock = Clock()
    extra: dict[str, Any] = {"spill": None} if spill_in_cold else {}
    store = make_store([T4, T8], eviction=lru(40), clock=clock, **extra)
    assert (store.spill is store.cold) == spill_in_cold
    victims = {"t4": ids(0, 10), "t8": ids(50, 60)}
    for step in range(3):
        clock.now += 7
        for name, keys in victims.items():
            train(store, name, keys, value=0.3 + step)
    before = {name: packed(store.hot, name, keys) for name, keys in victims.items()}
    if flush_first:
        store.flush({"p": 1})
    # Newer keys push the victims out (they are the least recently used).
    for step in range(6):
        train(store, "t4", ids(1000 + 10 * step, 1010 + 10 * step))
        train(store, "t8", ids(2000 + 10 * step, 2010 + 10 * step))
    stats = store.stats()
    assert stats["demotions"] >= 20 and stats["evictions.capacity"] == stats["demotions"]
    assert stats["hot_rows.t4"] + stats["hot_rows.t8"] <= 40
    for name, keys in victims.items():
        assert packed(store.hot, name, keys) == [None] * len(keys)
        if flush_first:  # clean rows: their flushed copy is the row
            assert packed(store.cold, name, keys) == before[name]
        else:  # dirty rows wait in spill; the cold table only changes at flush
            assert packed(store.cold, name, keys) == [None] * len(keys)
            assert packed(store.spill, spill_table(name), keys) == before[name]
    # A serving lookup promotes; the promoted rows are the demoted ones, bit for bit.
    for name, keys in victims.items():
        result = store.lookup(name, keys)
        assert result.found.all()
        assert packed(store.hot, name, keys) == before[name]
        codec = RowCodec(store.tables()[name])
        rows = codec.unpack(keys, [v for v in before[name] if v is not None])
        assert result.rows.tobytes() == rows["emb"].tobytes()
    assert store.stats()["promotions"] >= 20
    # After a flush the cold tier holds them, optimizer state and metadata included.
    store.flush({"p": 2})
    for name, keys in victims.items():
        assert packed(store.cold, name, keys) == before[name]
        assert packed(store.spill, spill_table(name), keys) == [None] * len(keys)
    assert store.stats()["spill_rows.t4"] == 0


def test_training_lookup_of_many_tables_matches_table_by_table(make_store: Factory) -> None:
    """``lookup_tables(create=True)`` reads each table from hot while the one before is
    loaded and runs one eviction pass after the last: through evictions and promotions in
    every step it returns, trains and stores exactly what a lookup per table does."""
    tables = [T4, T8, TableConfig(name="t2", dim=2, optimizer="sgd")]
    together = make_store(tables, eviction=lru(120), hot_name="a", cold_name="a")
    apart = make_store(tables, eviction=lru(120), hot_name="b", cold_name="b")
    rng = np.random.default_rng(11)
    weights = 1.0 / np.arange(1, 1001) ** 1.1
    weights /= weights.sum()
    for step in range(25):
        batch = {t.name: ids(0, 1000)[rng.choice(1000, 64, p=weights)] for t in tables}
        batch["t2"] = u64() if step == 3 else batch["t2"]  # a table with nothing to read
        got = together.lookup_tables(batch, create=True)
        assert list(got) == list(batch)
        for t in tables:
            expected = apart.lookup(t.name, batch[t.name], create=True)
            assert got[t.name].rows.tobytes() == expected.rows.tobytes()
            assert np.array_equal(got[t.name].found, expected.found)
            u = np.unique(batch[t.name])
            grads = rng.standard_normal((len(u), t.dim)).astype(np.float32)
            assert (
                together.update(t.name, u, grads).tobytes()
                == apart.update(t.name, u, grads).tobytes()
            )
    stats = together.stats()
    assert stats["demotions"] > 100 and stats["promotions"] > 20
    assert sum(stats[f"hot_rows.{t.name}"] for t in tables) <= 120 + 3 * 64
    together.flush({"p": 1})
    apart.flush({"p": 1})
    for t in tables:
        keys = ids(0, 1000)
        assert packed(together.cold, t.name, keys) == packed(apart.cold, t.name, keys)
        assert together.lookup(t.name, keys).rows.tobytes() == (
            apart.lookup(t.name, keys).rows.tobytes()
        )


def test_training_on_a_demoted_row_continues_from_its_state(make_store: Factory) -> None:
    sgd = TableConfig(name="s", dim=2, optimizer="rowwise_adagrad", learning_rate=0.5)
    reference = make_store([sgd], cold=False, hot_name="ref")
    store = make_store([sgd], eviction=lru(8))
    keys = ids(0, 4)
    for k in range(4):
        train(reference, "s", keys, value=1.0 + k)
        train(store, "s", keys, value=1.0 + k)
        for other in (reference, store):  # push the keys out of the small store
            train(other, "s", ids(100 + 20 * k, 120 + 20 * k))
    assert store.stats()["demotions"] > 0
    assert store.lookup("s", keys).found.all()  # promotes them again
    assert packed(store.hot, "s", keys) == packed(reference.hot, "s", keys)


def test_spill_is_never_ahead_of_the_position_after_a_crash(
    make_store: Factory, tmp_path: Path
) -> None:
    store = make_store([T4], eviction=lru(10))
    train(store, "t4", ids(0, 10))
    store.flush({"p": 1})
    flushed = packed(store.cold, "t4", ids(0, 10))
    train(store, "t4", ids(0, 10), value=5.0)  # dirty again
    for step in range(3):
        train(store, "t4", ids(100 + 10 * step, 110 + 10 * step))
    assert store.stats()["spill_rows.t4"] > 0
    assert store.spill is not None and store.spill.get_blob(SPILL_BLOB) is not None
    # "Crash": no flush. The cold table still matches position 1.
    assert packed(store.cold, "t4", ids(0, 10)) == flushed
    store.close()
    reopened = make_store([T4], hot_name="after-crash", eviction=lru(10))
    assert reopened.position() == {"p": 1}
    assert reopened.spill is not None and reopened.spill.get_blob(SPILL_BLOB) is None
    assert packed(reopened.spill, spill_table("t4"), ids(0, 10)) == [None] * 10
    assert reopened.lookup("t4", ids(0, 10)).found.all()
    assert packed(reopened.hot, "t4", ids(0, 10)) == flushed


def test_direct_write_back_skips_spill(make_store: Factory) -> None:
    store = make_store([T4], eviction=lru(10, write_back="direct"))
    keys = ids(0, 10)
    train(store, "t4", keys, value=3.0)
    before = packed(store.hot, "t4", keys)
    train(store, "t4", ids(100, 110))
    assert packed(store.hot, "t4", keys) == [None] * 10
    assert packed(store.cold, "t4", keys) == before  # at once, ahead of any position
    stats = store.stats()
    assert stats["spill_rows.t4"] == 0 and stats["demotions"] == 10
    assert store.cold is not None and store.cold.get_blob(SPILL_BLOB) is None
    assert store.lookup("t4", keys).found.all()
    assert packed(store.hot, "t4", keys) == before


def test_new_ids_skip_the_cold_read_and_cold_rows_are_still_found(make_store: Factory) -> None:
    """A cold table empty at open: the store knows every key it wrote there, so a hot
    miss it never wrote is new and not read from cold; flushed rows evicted from hot
    (clean), rows written back directly and imported rows are read and found."""
    store = make_store([T4, T8], eviction=lru(20))
    flushed = ids(0, 10)
    train(store, "t4", flushed, value=2.0)
    store.flush({"p": 1})
    before = packed(store.cold, "t4", flushed)
    train(store, "t4", ids(100, 120))  # pushes the flushed rows out of hot (clean)
    assert packed(store.hot, "t4", flushed) == [None] * 10
    codec8 = RowCodec(T8)
    store.import_cold("t8", ids(500, 505), codec8.pack(codec8.new_rows(ids(500, 505), 1)))
    skipped = store.stats()["cold_reads_skipped"]
    new = ids(1000, 1200)
    got = store.lookup_tables({"t4": np.concatenate([flushed, new]), "t8": ids(500, 505)})
    assert got["t4"].found[:10].all() and not got["t4"].found[10:].any()
    assert got["t8"].found.all()
    stats = store.stats()
    assert stats["cold_hits"] >= 15  # the evicted flushed rows and the imported ones
    assert stats["cold_reads_skipped"] - skipped >= 190  # the new ids, false positives aside
    assert packed(store.hot, "t4", flushed) == before  # promoted whole
    # Reopened over a cold tier that holds rows: no filter for that table, so its rows
    # are read from cold even with an empty hot tier.
    store.close()
    again = make_store([T4, T8], hot_name="other", eviction=lru(20))
    assert again.lookup_tables({"t4": flushed}, create=True)["t4"].found.all()
    assert packed(again.hot, "t4", flushed) == before


def test_an_unbounded_private_hot_tier_keeps_no_cold_key_filter(tmp_path: Path) -> None:
    """Its new ids skip the cold read without one (every cold row has a hot copy), so
    flushes need not feed filters it would never consult."""
    store = TieredStore([T4], MemoryTier(), RocksDBTier(tmp_path / "db"))
    try:
        train(store, "t4", ids(0, 50))
        store.flush({"p": 1})
        assert store._cold_keys == {} and store._cold_within_hot == {"t4"}
        assert store.lookup("t4", ids(0, 50)).found.all()
    finally:
        store.close()


def test_a_full_cold_key_filter_is_dropped_and_cold_rows_still_found(
    make_store: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store([T4], eviction=lru(20))
    store._cold_keys["t4"] = KeyFilter(first_layer_keys=16, max_bytes=100)  # full at 16
    flushed = ids(0, 18)
    train(store, "t4", flushed, value=2.0)
    with caplog.at_level("INFO", logger="storage.tiered"):
        store.flush({"p": 1})
    assert "t4" not in store._cold_keys and "read from the cold tier again" in caplog.text
    train(store, "t4", ids(100, 120))  # pushes the flushed rows out of hot
    skipped = store.stats()["cold_reads_skipped"]
    assert store.lookup("t4", flushed).found.all()
    assert not store.lookup("t4", ids(500, 600)).found.any()
    assert store.stats()["cold_reads_skipped"] == skipped  # read, not ruled out


def test_without_cold_tier_capacity_eviction_deletes(make_store: Factory) -> None:
    store = make_store([T4], cold=False, eviction=lru(10))
    before = metric("streamrec_store_evictions_total", table="t4", reason="capacity")
    train(store, "t4", ids(0, 10), value=2.0)
    for step in range(3):
        train(store, "t4", ids(100 + 10 * step, 110 + 10 * step))
    stats = store.stats()
    assert stats["evictions.capacity"] >= 10 and stats["demotions"] == 0
    assert metric("streamrec_store_evictions_total", table="t4", reason="capacity") - before >= 10
    assert not store.lookup("t4", ids(0, 10)).found.any()
    # A new training lookup starts the row afresh (never half reset).
    again = store.lookup("t4", ids(0, 10), create=True).rows
    assert np.array_equal(again, RowCodec(T4).new_rows(ids(0, 10), 0)["emb"])


def test_floor_a_burst_never_demotes_rows_of_the_current_step(make_store: Factory) -> None:
    store = make_store([T4, T8], eviction=lru(100))
    for step in range(10):  # fill up with older rows
        train(store, "t4", ids(10 * step, 10 * step + 10))
    current = ids(5000, 5040)
    store.lookup("t4", current, create=True)  # step 11 starts
    burst = ids(9000, 9500)
    store.lookup("t8", burst, create=True)  # same step: none of its rows may go
    store.update("t8", burst, np.ones((500, 8), dtype=np.float32))
    assert store.hot.get_many("t4", current).count(None) == 0
    assert store.hot.get_many("t8", burst).count(None) == 0
    stats = store.stats()
    assert stats["evictions.capacity"] == 100  # every older row, nothing of this step
    assert stats["hot_rows.t4"] + stats["hot_rows.t8"] == 540  # capacity is soft
    assert stats["eviction_floor_hits"] == 1


def test_floor_spreads_a_burst_over_steps(make_store: Factory) -> None:
    cfg = lru(100, max_evict_fraction=0.25, overshoot=0.5, low_water=0.9)
    store = make_store([T4], eviction=cfg)
    for step in range(10):
        train(store, "t4", ids(10 * step, 10 * step + 10))
    train(store, "t4", ids(5000, 5045))  # 145 rows: within the overshoot ceiling of 150
    stats = store.stats()
    assert stats["evictions.capacity"] == 25  # this step's budget, not 55 at once
    assert stats["hot_rows.t4"] == 120 and stats["eviction_floor_hits"] == 1
    train(store, "t4", ids(6000, 6001))  # the next step takes up to 25 more
    stats = store.stats()
    assert stats["evictions.capacity"] == 50 and stats["hot_rows.t4"] == 96
    # Past the ceiling the budget is lifted: a sustained overload cannot grow hot forever.
    train(store, "t4", ids(7000, 7080))  # 176 rows > 150
    stats = store.stats()
    assert stats["hot_rows.t4"] <= 150
    assert store.hot.get_many("t4", ids(7000, 7080)).count(None) == 0


def test_eviction_goes_down_to_the_low_water_mark(make_store: Factory) -> None:
    store = make_store([T4], eviction=lru(100, low_water=0.8))
    for step in range(10):
        train(store, "t4", ids(10 * step, 10 * step + 10))
    assert store.stats()["hot_rows.t4"] == 100
    train(store, "t4", ids(500, 510))
    stats = store.stats()
    assert stats["hot_rows.t4"] == 80 and stats["eviction_passes"] == 1
    for step in range(9):  # no pass until capacity is passed again
        train(store, "t4", ids(600 + step, 601 + step))
    assert store.stats()["eviction_passes"] == 1


def test_lru_keeps_a_zipf_head_hot(make_store: Factory) -> None:
    store = make_store([T4], eviction=lru(1000))
    rng = np.random.default_rng(5)
    universe = 20_000
    weights = 1.0 / np.arange(1, universe + 1) ** 1.1
    weights /= weights.sum()
    keys_of = ids(0, universe)
    for _ in range(150):
        train(store, "t4", keys_of[rng.choice(universe, 256, p=weights)])
    assert store.hot.get_many("t4", keys_of[:20]).count(None) == 0
    stats = store.stats()
    assert stats["hot_rows.t4"] <= 1000 and stats["demotions"] > 3000
    assert stats["hot_hits"] > 2 * stats["cold_hits"]


def test_lfu_keeps_frequent_rows_over_recent_ones(make_store: Factory) -> None:
    popular = ids(0, 5)
    for policy, survives in (("lfu", True), ("lru", False)):
        store = make_store([T4], hot_name=policy, eviction=lru(30, policy=policy))
        for _ in range(20):
            train(store, "t4", popular)
        for step in range(6):  # one-off ids, then the popular rows go unused for a while
            train(store, "t4", ids(1000 + 10 * step, 1010 + 10 * step))
        in_hot = store.hot.get_many("t4", popular).count(None) == 0
        assert in_hot is survives, policy
        store.close()


def test_serving_reads_keep_rows_hot(make_store: Factory) -> None:
    store = make_store([T4], eviction=lru(30))
    served = ids(0, 5)
    train(store, "t4", served)
    for step in range(10):
        assert store.lookup("t4", served).found.all()  # recency from serving
        train(store, "t4", ids(1000 + 10 * step, 1010 + 10 * step))
    assert store.hot.get_many("t4", served).count(None) == 0
    assert store.stats()["demotions"] > 0


def test_readers_see_whole_rows_while_rows_move_between_tiers(make_store: Factory) -> None:
    """Embedded mode: serving threads read while the trainer demotes and promotes."""
    flat = TableConfig(name="flat", dim=8, optimizer="sgd", learning_rate=1.0, init_scale=0)
    store = make_store([flat], eviction=lru(60))
    keys = ids(0, 200)
    store.admit("flat", keys)  # over capacity: the older ones start moving out
    stop = threading.Event()
    problems: list[str] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            # A few keys at a time: reading all would keep all of them recently used.
            got = store.lookup("flat", rng.choice(keys, 10))
            if not got.found.all():
                problems.append("a row went missing")
                return
            # Every update adds 1 to a whole row: a row with unequal entries is torn.
            if not (got.rows == got.rows[:, :1]).all():
                problems.append("torn row")
                return

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(2)]
    for t in threads:
        t.start()
    try:
        rng = np.random.default_rng(9)
        for step in range(40):
            touched = np.unique(rng.choice(keys, 40))
            train(store, "flat", touched, value=-1.0)
            if step % 15 == 0:
                store.flush({"p": step})
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
    assert store.stats()["demotions"] > 100 and store.stats()["promotions"] > 0
    assert store.lookup("flat", keys).found.all()


def test_update_after_rows_left_between_lookup_and_update(make_store: Factory) -> None:
    """The update reuses its lookup's index positions only while they still hold."""
    store = make_store([T4], eviction=lru(1000))
    keys = ids(0, 6)
    store.lookup("t4", keys, create=True)
    store.evict("t4", keys[:2])  # between the step's lookup and its update
    store.update("t4", keys, np.ones((6, 4), dtype=np.float32))  # always: rows again
    store.flush({"p": 1})
    assert packed(store.cold, "t4", keys) == packed(store.hot, "t4", keys)
    assert packed(store.cold, "t4", keys).count(None) == 0
    assert store.stats()["dirty_rows"] == 0


def test_byte_capacity_counts_row_sizes(make_store: Factory) -> None:
    small, big = RowCodec(T4).nbytes, RowCodec(T8).nbytes
    budget = 20 * small + 20 * big
    store = make_store(
        [T4, T8],
        eviction=EvictionConfig(max_bytes=budget, protect_steps=1, max_evict_fraction=1.0),
    )
    for step in range(8):
        train(store, "t4", ids(10 * step, 10 * step + 10))
        train(store, "t8", ids(500 + 10 * step, 510 + 10 * step))
    stats = store.stats()
    assert stats["hot_bytes"] <= budget
    assert stats["hot_bytes"] == stats["hot_rows.t4"] * small + stats["hot_rows.t8"] * big
    assert stats["demotions"] > 0


def test_rows_already_in_hot_are_indexed_and_flushed(make_store: Factory) -> None:
    plain = make_store([T4], cold=False)
    train(plain, "t4", ids(0, 30))  # e.g. left in Redis by an earlier trainer
    plain.flush()
    store = make_store([T4], eviction=lru(20))
    stats = store.stats()
    assert stats["dirty_rows"] == 30 and stats["hot_rows.t4"] == 30
    train(store, "t4", ids(100, 105))  # over capacity: the old rows go first
    assert store.hot.get_many("t4", ids(100, 105)).count(None) == 0
    assert store.stats()["hot_rows.t4"] <= 20
    store.flush()
    assert packed(store.cold, "t4", ids(0, 30)).count(None) == 0


# -- expiry and manual eviction ---------------------------------------------------------


def test_ttl_expires_rows_in_both_tiers(make_store: Factory) -> None:
    table = TableConfig(name="ttl", dim=4, ttl_s=100)
    clock = Clock()
    store = make_store([table], eviction=lru(10), clock=clock)
    old, fresh, cold_only = ids(0, 5), ids(10, 15), ids(20, 25)
    train(store, "ttl", cold_only)
    train(store, "ttl", old)
    store.flush({"p": 1})
    for step in range(2):  # push cold_only out of hot (clean: only in the cold tier)
        train(store, "ttl", ids(100 + 5 * step, 105 + 5 * step))
    assert store.hot.get_many("ttl", cold_only) == [None] * 5
    clock.now += 80
    train(store, "ttl", fresh)
    before = metric("streamrec_store_evictions_total", table="ttl", reason="ttl")
    removed = store.expire(now=T0 + 150)
    # Updated at T0 (old, cold_only and the pushers) are expired; fresh (T0 + 80) is not.
    assert removed == {"ttl": 20, "l2_norm": 0}
    for keys in (old, cold_only):
        assert store.hot.get_many("ttl", keys) == [None] * 5
        assert packed(store.cold, "ttl", keys) == [None] * 5
        result = store.lookup("ttl", keys)
        assert not result.found.any() and not result.rows.any()
    assert store.lookup("ttl", fresh).found.all()
    stats = store.stats()
    assert stats["evictions.ttl"] == 20
    assert metric("streamrec_store_evictions_total", table="ttl", reason="ttl") - before == 20
    store.flush({"p": 2})  # expired rows are not written back
    assert packed(store.cold, "ttl", old) == [None] * 5


def test_expiry_judges_the_newest_copy(make_store: Factory) -> None:
    table = TableConfig(name="ttl", dim=4, ttl_s=100)
    clock = Clock()
    store = make_store([table], clock=clock)
    keys = ids(0, 5)
    train(store, "ttl", keys)
    store.flush({"p": 1})  # cold copy stamped T0
    clock.now += 90
    train(store, "ttl", keys)  # hot copy stamped T0 + 90
    assert store.expire(now=T0 + 150) == {"ttl": 0, "l2_norm": 0}
    assert packed(store.cold, "ttl", keys).count(None) == 0


def test_l2_norm_expiry(make_store: Factory) -> None:
    table = TableConfig(
        name="l2", dim=4, optimizer="sgd", learning_rate=1.0, init_scale=0.001, min_l2_norm=0.01
    )
    store = make_store([table])
    small, grown = ids(0, 6), ids(10, 16)
    store.lookup("l2", small, create=True)
    train(store, "l2", grown, value=-1.0)  # weights near 1: kept
    store.flush({"p": 1})
    before = metric("streamrec_store_evictions_total", table="l2", reason="l2_norm")
    assert store.expire() == {"ttl": 0, "l2_norm": 6}
    assert not store.lookup("l2", small).found.any()
    assert store.lookup("l2", grown).found.all()
    assert packed(store.cold, "l2", small) == [None] * 6
    assert store.stats()["evictions.l2_norm"] == 6
    assert metric("streamrec_store_evictions_total", table="l2", reason="l2_norm") - before == 6


def test_manual_evict_drops_dirty_rows_and_counts(make_store: Factory) -> None:
    store = make_store([T4])
    keys = ids(0, 6)
    train(store, "t4", keys)
    store.flush({"p": 1})
    new = ids(10, 14)
    store.lookup("t4", new, create=True)  # dirty, never flushed
    before = metric("streamrec_store_evictions_total", table="t4", reason="manual")
    assert store.evict("t4", np.concatenate([keys[:2], new, u64(12345)])) == 6
    store.flush({"p": 2})
    assert packed(store.cold, "t4", new) == [None] * 4
    assert packed(store.cold, "t4", keys[:2]) == [None] * 2
    assert store.stats()["evictions.manual"] == 6
    assert metric("streamrec_store_evictions_total", table="t4", reason="manual") - before == 6


def test_manual_evict_of_demoted_rows_clears_spill(make_store: Factory) -> None:
    store = make_store([T4], eviction=lru(10))
    keys = ids(0, 10)
    train(store, "t4", keys)
    train(store, "t4", ids(100, 110))
    assert store.stats()["spill_rows.t4"] == 10
    assert store.evict("t4", keys) == 10
    store.flush({"p": 1})
    assert packed(store.cold, "t4", keys) == [None] * 10
    assert not store.lookup("t4", keys).found.any()


def test_counters_by_reason_and_gauges(make_store: Factory) -> None:
    table = TableConfig(name="all", dim=2, ttl_s=10)
    clock = Clock()
    store = make_store([table], eviction=lru(10), clock=clock)
    train(store, "all", ids(0, 10))
    train(store, "all", ids(10, 20))  # 10 demoted (capacity)
    store.evict("all", ids(10, 12))  # 2 manual
    clock.now += 100
    store.expire()  # the other 18 rows: ttl
    store.flush({"p": 1})
    stats = store.stats()
    assert (
        stats["evictions.capacity"],
        stats["evictions.manual"],
        stats["evictions.ttl"],
        stats["evictions.l2_norm"],
    ) == (10, 2, 18, 0)
    assert stats["demotions"] == 10
    assert metric("streamrec_store_rows", tier="hot", table="all") == 0
    assert metric("streamrec_store_rows", tier="cold", table="all") == 0
    assert metric("streamrec_store_op_seconds_count", op="expire") > 0
    assert metric("streamrec_store_op_seconds_count", op="demote") > 0


def test_prefetch_promotes_demoted_rows_and_creates_nothing(make_store: Factory) -> None:
    store = make_store([T4], eviction=lru(10))
    keys = ids(0, 10)
    train(store, "t4", keys, value=2.0)
    before = packed(store.hot, "t4", keys)
    train(store, "t4", ids(100, 110))  # pushes the first rows out (dirty: to spill)
    assert packed(store.hot, "t4", keys) == [None] * 10
    created = store.stats()["created_rows"]
    store.prefetch("t4", np.concatenate([keys, ids(500, 505)]))  # 5 ids never seen
    assert packed(store.hot, "t4", keys) == before
    stats = store.stats()
    assert stats["created_rows"] == created and stats["promotions"] >= 10
    assert packed(store.hot, "t4", ids(500, 505)) == [None] * 5
    store.flush({"p": 1})  # promoted from spill: still dirty, so the flush writes them
    assert packed(store.cold, "t4", keys) == before
