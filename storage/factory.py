"""Opening the configured tiered store: hot tier (memory or Redis) over RocksDB."""

from __future__ import annotations

import os
from collections.abc import Sequence

from storage.base import RowTier, TableConfig
from storage.config import StoreConfig
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.tiered import TieredStore


def open_store(
    cfg: StoreConfig,
    tables: Sequence[TableConfig],
    *,
    read_only: bool = False,
    secondary_path: str | os.PathLike[str] | None = None,
) -> TieredStore:
    """The store of ``cfg`` with ``tables``, its RocksDB under ``cfg.data_dir``.

    ``read_only`` opens RocksDB as a secondary instance (in ``secondary_path``, a fresh
    temporary directory by default), so a serving process can read while the trainer
    holds the primary.
    """
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    hot: RowTier
    if cfg.hot == "redis":
        expected = cfg.expected_rows_per_table
        if expected is None and cfg.eviction is not None and cfg.eviction.max_rows:
            expected = max(cfg.eviction.max_rows // len(tables), 1)
        hot = RedisTier(
            cfg.redis_url,
            prefix=cfg.redis_prefix,
            expected_rows=expected,
            # A writer must read its own writes: masters only.
            replica_reads=cfg.redis_replica_reads and read_only,
            min_replicas=0 if read_only else cfg.redis_min_replicas,
            replica_timeout_s=cfg.redis_replica_timeout_s,
            traffic_half_life_s=cfg.redis_traffic_half_life_s,
        )
    else:
        hot = MemoryTier()
    cold = RocksDBTier(cfg.rocksdb_path, read_only=read_only, secondary_path=secondary_path)
    spill: RowTier | None = None
    if cfg.eviction is not None and not read_only:
        spill = (
            MemoryTier.scratch(cfg.spill_path)
            if cfg.spill == "mapped"
            else RocksDBTier.scratch(cfg.spill_path)
        )
    return TieredStore(
        list(tables),
        hot,
        cold,
        read_only=read_only,
        eviction=cfg.eviction,
        spill=spill,
        shared_hot=cfg.shared_hot,
        # Redis outlives a crashed trainer; its rows may be ahead of the recorded position.
        # Shared by several trainers, the rows are theirs too: kept.
        discard_hot_rows=cfg.hot == "redis" and not read_only and not cfg.shared_hot,
    )
