"""Crash consistency: after `kill -9`, RocksDB holds exactly the rows of the events
before the position it recorded, bit for bit (optimizer state included)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import redis_command

from storage.base import HotTierLost, Mask, Rows, TableConfig
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier, key_slot
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import TieredStore, spill_table

TABLE = TableConfig(name="a", dim=4)
KEYS = feature_keys("a", list(range(97)))
BATCH = 50
FLUSH_EVERY = 3  # batches


def apply_events(store: TieredStore, start: int, stop: int) -> None:
    """Deterministic updates: the event at offset i touches key i % 97."""
    for first in range(start, stop, BATCH):
        offsets = np.arange(first, min(first + BATCH, stop))
        keys, inverse = np.unique(KEYS[offsets % len(KEYS)], return_inverse=True)
        rng = np.random.default_rng(first)
        per_event = rng.normal(0, 0.1, (len(offsets), TABLE.dim)).astype(np.float32)
        grads = np.zeros((len(keys), TABLE.dim), dtype=np.float32)
        np.add.at(grads, inverse, per_event)
        store.update("a", keys, grads)


WRITER = """
import sys
from pathlib import Path
from storage.memory_tier import MemoryTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore
sys.path.insert(0, "tests")
from test_store_durability import TABLE, BATCH, FLUSH_EVERY, apply_events

store = TieredStore([TABLE], MemoryTier(), RocksDBTier(Path(sys.argv[1])), clock=lambda: 1000.0)
offset = 0
while True:
    for _ in range(FLUSH_EVERY):
        apply_events(store, offset, offset + BATCH)
        offset += BATCH
    store.flush({"t:0": offset})
    print(offset, flush=True)
"""


def test_kill_9_leaves_rows_matching_the_recorded_position(tmp_path: Path) -> None:
    db = tmp_path / "db"
    root = Path(__file__).resolve().parents[1]
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)], cwd=root, stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    flushed = 0
    deadline = time.monotonic() + 60
    while flushed < 20 * BATCH * FLUSH_EVERY and time.monotonic() < deadline:
        flushed = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)

    crashed = TieredStore([TABLE], MemoryTier(), RocksDBTier(db), clock=lambda: 1000.0)
    position = crashed.position()
    assert position is not None
    recorded = position["t:0"]
    assert recorded >= flushed and recorded % (BATCH * FLUSH_EVERY) == 0

    replayed = TieredStore([TABLE], MemoryTier(), clock=lambda: 1000.0)
    apply_events(replayed, 0, recorded)
    assert crashed.cold is not None
    on_disk = crashed.cold.get_many("a", KEYS)
    expected = replayed.hot.get_many("a", KEYS)
    assert on_disk == expected  # packed rows: embedding, optimizer state, metadata


@pytest.mark.integration
def test_restarted_writer_drops_redis_rows_ahead_of_the_recorded_position(
    clean_redis: str, tmp_path: Path
) -> None:
    def open_store(discard: bool) -> TieredStore:
        return TieredStore(
            [TABLE],
            RedisTier(clean_redis, prefix="dur", buckets=8),
            RocksDBTier(tmp_path / "db"),
            clock=lambda: 1000.0,
            discard_hot_rows=discard,
        )

    store = open_store(discard=False)
    apply_events(store, 0, 300)
    store.flush({"t:0": 300})
    apply_events(store, 300, 450)  # reaches Redis, never recorded: lost with a crash
    store.cold.close()  # type: ignore[union-attr]

    restarted = open_store(discard=True)
    assert restarted.position() == {"t:0": 300}
    assert restarted.hot.count("a") == 0
    apply_events(restarted, 300, 450)  # the replay from the recorded position

    reference = TieredStore([TABLE], MemoryTier(), clock=lambda: 1000.0)
    apply_events(reference, 0, 450)
    replayed = restarted.lookup("a", KEYS)
    assert np.array_equal(replayed.rows, reference.lookup("a", KEYS).rows)
    assert restarted.hot.get_many("a", KEYS) == reference.hot.get_many("a", KEYS)


def cold_rows(store: TieredStore) -> list[bytes | None]:
    assert store.cold is not None
    return store.cold.get_many("a", KEYS)


def _lose_redis_data(url: str, hot: RedisTier, marker_blob: str) -> None:
    """What a restart without persistence leaves: an empty server; on a cluster, one
    empty master (not the one a single marker blob would be on: each master needs its
    own)."""
    import redis

    if not hot.cluster:
        redis.Redis.from_url(url).flushdb()
        return
    with redis.Redis.from_url(url) as seed:
        slots = redis_command(seed, "CLUSTER", "SLOTS")
    blob_slot = key_slot(f"{hot.prefix}:blob:{marker_blob}".encode())
    _, _, (host, port, *_), *_ = next(
        entry for entry in slots if not entry[0] <= blob_slot <= entry[1]
    )
    with redis.Redis(host=host.decode() or "127.0.0.1", port=port) as master:
        master.flushall()


@pytest.mark.integration
@pytest.mark.parametrize("redis_fixture", ["clean_redis", "clean_redis_cluster"])
def test_flush_commits_nothing_once_redis_lost_its_rows(
    redis_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue(redis_fixture)
    store = TieredStore(
        [TABLE],
        RedisTier(url, prefix="lost", buckets=8),
        RocksDBTier(tmp_path / "db"),
        clock=lambda: 1000.0,
    )
    apply_events(store, 0, 300)
    store.flush({"t:0": 300})
    flushed = cold_rows(store)
    apply_events(store, 300, 450)
    assert isinstance(store.hot, RedisTier)
    _lose_redis_data(url, store.hot, store._marker_blob)
    # Rows come back from the cold tier as of offset 300 and get updates on top of them:
    # present in hot, but wrong. Committing them would acknowledge a lost stretch.
    apply_events(store, 450, 600)
    with pytest.raises(HotTierLost):
        store.flush({"t:0": 600})
    assert store.position() == {"t:0": 300}
    assert cold_rows(store) == flushed

    store.discard_unflushed()
    assert store.hot.count("a") == 0
    apply_events(store, 300, 600)  # the replay from the recorded position
    store.flush({"t:0": 600})
    reference = TieredStore([TABLE], MemoryTier(), clock=lambda: 1000.0)
    apply_events(reference, 0, 600)
    assert cold_rows(store) == reference.hot.get_many("a", KEYS)


@pytest.mark.integration
def test_flush_commits_nothing_when_dirty_rows_vanished(clean_redis: str, tmp_path: Path) -> None:
    store = TieredStore(
        [TABLE],
        RedisTier(clean_redis, prefix="gone", buckets=8),
        RocksDBTier(tmp_path / "db"),
        clock=lambda: 1000.0,
    )
    apply_events(store, 0, 300)
    store.flush({"t:0": 300})
    apply_events(store, 300, 450)
    store.hot.delete_many("a", KEYS[:10])  # e.g. evicted by Redis under maxmemory
    with pytest.raises(HotTierLost, match="10 dirty rows"):
        store.flush({"t:0": 450})
    assert store.position() == {"t:0": 300}
    assert store.stats()["lost_dirty_rows"] == 10


def test_discard_unflushed_drops_spill_and_reads_as_of_the_position(tmp_path: Path) -> None:
    store = TieredStore(
        [TABLE],
        MemoryTier(),
        RocksDBTier(tmp_path / "db"),
        clock=lambda: 1000.0,
        hot_capacity_rows=40,
    )
    apply_events(store, 0, 300)
    store.flush({"t:0": 300})
    flushed = cold_rows(store)
    for step in range(20):  # one training step each; over capacity, dirty rows spill
        keys = KEYS[(np.arange(10) + 10 * step) % len(KEYS)]
        store.lookup("a", keys, create=True)
        store.update("a", np.sort(keys), np.full((10, TABLE.dim), 0.5, dtype=np.float32))
    assert store.cold is not None and store.cold.count(spill_table("a")) > 0
    store.discard_unflushed()
    assert store.stats()["dirty_rows"] == 0
    assert store.hot.count("a") == 0
    assert store.cold.count(spill_table("a")) == 0
    store.flush({"t:0": 300})
    assert cold_rows(store) == flushed
    reference = TieredStore([TABLE], MemoryTier(), clock=lambda: 1000.0)
    apply_events(reference, 0, 300)
    assert np.array_equal(store.lookup("a", KEYS).rows, reference.lookup("a", KEYS).rows)


@pytest.mark.parametrize("capacity", [None, 30], ids=["unbounded", "spilling"])
def test_cold_row_count_stays_exact_when_flushes_skip_reading_created_rows(
    tmp_path: Path, capacity: int | None
) -> None:
    """A flush commits the rows it created since the last one as new without reading
    the cold tier first; the count must still match what the tier holds, through
    re-updates, spills, removals and re-creation."""
    store = TieredStore(
        [TABLE],
        MemoryTier(),
        RocksDBTier(tmp_path / "db"),
        clock=lambda: 1000.0,
        hot_capacity_rows=capacity,
    )
    assert store.cold is not None

    def train(keys: np.ndarray, offset: int) -> None:
        store.lookup("a", keys, create=True)
        store.update("a", np.sort(keys), np.full((len(keys), TABLE.dim), 0.1, dtype=np.float32))
        store.flush({"t:0": offset})

    def stored() -> int:
        assert store.cold is not None
        return sum(len(keys) for keys, _ in store.cold.scan("a"))

    train(KEYS[:40], 1)
    assert store.cold.count("a") == stored() == 40
    train(KEYS[20:70], 2)  # 20 rows again, 30 new
    assert store.cold.count("a") == stored() == 70
    assert store.evict("a", KEYS[60:70]) == 10
    train(KEYS[65:80], 3)  # 5 removed rows created again, 10 new
    assert store.cold.count("a") == stored() == 75
    train(KEYS[:80], 4)  # the other 5 removed rows come back
    assert store.cold.count("a") == stored() == 80


class _CountingCold(RocksDBTier):
    """A real RocksDB cold tier that counts the keys its rows are read for."""

    read_keys = 0

    def get_rows(self, table: str, keys: np.ndarray, codec: RowCodec) -> tuple[Rows, Mask]:
        self.read_keys += len(keys)
        return super().get_rows(table, keys, codec)


def test_a_fresh_embedded_store_skips_cold_reads_until_cold_holds_rows_hot_lacks(
    tmp_path: Path,
) -> None:
    """Over a private hot tier without a capacity, a cold tier empty at open holds only
    copies of hot rows: new keys are not looked for there. Once it holds rows that hot
    lacks (after ``discard_unflushed``, or when reopened) they are read from it."""
    cold = _CountingCold(tmp_path / "db")
    store = TieredStore([TABLE], MemoryTier(), cold, clock=lambda: 1000.0)
    apply_events(store, 0, 300)
    store.flush({"t:0": 300})
    assert store.evict("a", KEYS[:7]) == 7
    flushed = store.lookup("a", KEYS).rows
    assert not flushed[:7].any() and flushed[7:].all(axis=1).any()
    assert cold.read_keys == 0

    apply_events(store, 300, 400)  # not flushed: dropped below
    store.discard_unflushed()
    assert np.array_equal(store.lookup("a", KEYS).rows, flushed)
    assert cold.read_keys == len(KEYS)
    store.close()

    reopened = _CountingCold(tmp_path / "db")
    store = TieredStore([TABLE], MemoryTier(), reopened, clock=lambda: 1000.0)
    assert np.array_equal(store.lookup("a", KEYS).rows, flushed)
    assert reopened.read_keys == len(KEYS)
    store.close()
