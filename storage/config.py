"""Configuration of the embedding store (one section of the process settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.base import SparseOptimizerName


class TableOverride(BaseModel):
    """Per-table optimizer settings; unset fields fall back to the store defaults."""

    model_config = ConfigDict(extra="forbid")

    optimizer: SparseOptimizerName | None = None
    learning_rate: float | None = Field(None, gt=0)


class StoreConfig(BaseModel):
    """Where sparse rows live: a hot tier (memory or Redis) over RocksDB on disk."""

    model_config = ConfigDict(extra="forbid")

    hot: Literal["memory", "redis"] = Field(
        "memory", description="memory: in-process (embedded); redis: shared by every process."
    )
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_prefix: str = Field("sr", description="Key prefix, so several stores share one Redis.")
    data_dir: Path = Field(Path("streamrec-data"), description="RocksDB and local state.")
    optimizer: SparseOptimizerName = Field(
        "rowwise_adagrad", description="Default sparse optimizer of every table."
    )
    learning_rate: float = Field(0.05, gt=0, description="Default sparse learning rate.")
    tables: dict[str, TableOverride] = Field(
        default_factory=dict, description="Per-table overrides, by sparse feature name."
    )

    @property
    def rocksdb_path(self) -> Path:
        return self.data_dir / "rocksdb"
