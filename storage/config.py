"""Configuration of the embedding store (one section of the process settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.base import AdmissionConfig, SparseOptimizerName
from storage.eviction import EvictionConfig


class StoreConfig(BaseModel):
    """Where sparse rows live, and the defaults of every table.

    A hot tier (memory or Redis) over RocksDB on disk. Table settings default to
    the fields below; ``tables.<field>`` overrides any ``TableConfig`` field for one
    table, e.g. ``[store.tables.user] optimizer = "ftrl"``.
    """

    model_config = ConfigDict(extra="forbid")

    hot: Literal["memory", "redis"] = Field(
        "memory", description="memory: in-process (embedded); redis: shared by every process."
    )
    redis_url: str = Field(
        "redis://127.0.0.1:16379/0",
        description="redis://, rediss:// (TLS), unix://, or behind Redis Sentinel "
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]; a Redis Cluster is found "
        "from any of its masters.",
    )
    redis_prefix: str = Field("sr", description="Key prefix, so several stores share one Redis.")
    redis_replica_reads: bool = Field(
        False,
        description="Serving only (read-only stores: `streamrec serve`): on a Redis Cluster "
        "or behind Sentinel, read rows from replicas of their masters, off the masters the "
        "trainer writes; adds the replication lag to what serving reads. Writers read "
        "masters.",
    )
    redis_min_replicas: int = Field(
        0,
        ge=0,
        description="Writers: before a flush records its position, wait until this many "
        "replicas of each Redis master hold the hot tier's writes (WAIT), so a failover "
        "cannot bring back older rows; 0: do not wait.",
    )
    redis_replica_timeout_s: float = Field(
        1.0,
        gt=0,
        description="How long a flush waits for store.redis_min_replicas; fewer in time: "
        "the flush fails, nothing is recorded, the trainer rewinds.",
    )
    redis_traffic_half_life_s: float = Field(
        300.0,
        gt=0,
        description="On a Redis Cluster: the half-life of the per-slot traffic each store "
        "reports for `streamrec rebalance` (shorter: plans follow drift sooner, and "
        "bursts more).",
    )
    expected_rows_per_table: int | None = Field(
        None,
        ge=1,
        description="Sizes the Redis layout (about 64 rows per hash). Default: the hot "
        "capacity shared evenly between tables, else 65,536 hashes per table. Fixed by "
        "the first writer of a table.",
    )
    data_dir: Path = Field(Path("streamrec-data"), description="RocksDB and local state.")
    optimizer: SparseOptimizerName = Field(
        "rowwise_adagrad", description="Default sparse optimizer of every table."
    )
    learning_rate: float = Field(0.05, gt=0, description="Default sparse learning rate.")
    admission: AdmissionConfig = Field(
        default_factory=AdmissionConfig, description="Default admission policy of every table."
    )
    ttl_s: float | None = Field(
        None, gt=0, description="Default: rows expire this long after their last update."
    )
    min_l2_norm: float | None = Field(
        None, gt=0, description="Default: rows whose embedding norm falls below this expire."
    )
    eviction: EvictionConfig | None = Field(
        None,
        description="Hot-tier capacity (max_rows and/or max_bytes) and policy; "
        "None: the hot tier holds every row.",
    )
    tables: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-table overrides of any TableConfig field, by sparse feature name.",
    )
    spill: Literal["mapped", "rocksdb"] = Field(
        "mapped",
        description="Where rows demoted from a full hot tier wait for the next flush: "
        "mapped: files under data_dir/spill mapped into memory (the OS pages them out); "
        "rocksdb: a scratch RocksDB there (slower; its index of the rows stays on disk).",
    )
    shared_hot: bool = Field(
        False,
        description="Several trainers share the Redis hot tier (scale-out): it holds every "
        "row (no eviction) and a restarting trainer keeps the rows the others wrote.",
    )

    @model_validator(mode="after")
    def _shared_needs_redis(self) -> StoreConfig:
        if self.shared_hot and self.hot != "redis":
            raise ValueError("store.shared_hot needs store.hot = 'redis'")
        if self.shared_hot and self.eviction is not None:
            raise ValueError(
                "store.shared_hot keeps every row in Redis: remove store.eviction (a row "
                "demoted to one trainer's RocksDB would be invisible to the others)"
            )
        return self

    @property
    def rocksdb_path(self) -> Path:
        return self.data_dir / "rocksdb"

    @property
    def spill_path(self) -> Path:
        """The writer's scratch space for demoted rows awaiting a flush (``spill``)."""
        return self.data_dir / "spill"
