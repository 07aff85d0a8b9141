"""Interfaces of the embedding store.

Two roles, one interface each:

* ``RowTier``: a dumb key/value home for packed rows (memory, Redis, RocksDB).
* ``EmbeddingStore``: what the trainer and the service talk to. It owns row
  initialisation, the sparse optimizer and the tiering policy.

Keys are 64-bit hashes of (table, raw value) (see ``storage.keys``); there is no
vocabulary and no fixed table size.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import is_not
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from storage.rows import RowCodec

Keys = npt.NDArray[np.uint64]
Floats = npt.NDArray[np.float32]
Mask = npt.NDArray[np.bool_]
Rows = npt.NDArray[np.void]
"""A batch of rows: a 1-d record array of one table's ``RowCodec.dtype``."""

SparseOptimizerName = Literal[
    "sgd", "adagrad", "rowwise_adagrad", "lazy_adam", "partial_rowwise_adam", "ftrl"
]


class AdmissionConfig(BaseModel):
    """When a new id of a table gets a row (Kraken-style feature admission).

    Until then it reads as the zero vector in training and serving alike, its
    gradient is dropped (and counted), and it does not grow the store.
    """

    model_config = ConfigDict(extra="forbid")

    policy: Literal["always", "count_min", "probabilistic"] = Field(
        "always",
        description="always: every id; count_min: once seen `threshold` times (count-min "
        "sketch); probabilistic: each sighting admits with `probability`.",
    )
    threshold: int = Field(2, ge=1, description="count_min: sightings before admission.")
    probability: float = Field(
        0.25, gt=0, le=1, description="probabilistic: chance that one sighting admits the id."
    )
    sketch_width: int = Field(1 << 20, ge=64, description="count_min: counters per row.")
    sketch_depth: int = Field(4, ge=1, le=16, description="count_min: hash rows.")


class TableConfig(BaseModel):
    """One embedding table: dimension, sparse optimizer, admission and expiry."""

    model_config = ConfigDict(extra="forbid")

    name: str
    dim: int = Field(16, ge=1)
    optimizer: SparseOptimizerName = "rowwise_adagrad"
    learning_rate: float = Field(0.05, gt=0)
    initial_accumulator: float = Field(0.0, ge=0, description="AdaGrad accumulator start value.")
    eps: float = Field(1e-8, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam variants: first-moment decay.")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam variants: second-moment decay.")
    ftrl_l1: float = Field(0.0, ge=0, description="FTRL-proximal: L1 strength.")
    ftrl_l2: float = Field(0.0, ge=0, description="FTRL-proximal: L2 strength.")
    ftrl_beta: float = Field(1.0, ge=0, description="FTRL-proximal: learning-rate smoothing.")
    init_scale: float = Field(
        0.01, ge=0, description="New rows start uniform in [-init_scale, init_scale]."
    )
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    ttl_s: float | None = Field(
        None, gt=0, description="Rows expire this long after their last update (None: never)."
    )
    min_l2_norm: float | None = Field(
        None, gt=0, description="Rows whose embedding norm falls below this expire."
    )


class StoreError(Exception):
    """Base class of the store's own errors."""


class StoreUnavailable(StoreError):
    """A tier's backend cannot be reached or opened; the message names its address or path."""


class RowFormatError(StoreError, ValueError):
    """A stored value does not have the size of its table's rows; names the table and key."""


class ReadOnlyStore(StoreError):
    """A write was attempted through a read-only store or tier."""


class HotTierLost(StoreError):
    """The hot tier lost rows that were not flushed yet (e.g. Redis restarted without
    persistence). Raised by ``flush`` before it commits anything: the recorded position
    still matches the cold tier. The writer discards what it has not flushed
    (``discard_unflushed``) and replays the stream from ``position()``."""


@dataclass(frozen=True)
class LookupResult:
    """``rows[i]`` is the embedding of ``keys[i]``; ``found[i]`` is False where the key
    has no row, so its embedding reads as the zero vector. In a training lookup
    (``create=True``) those are exactly the keys the admission policy has not
    admitted (yet)."""

    rows: Floats
    found: Mask


def present_mask(values: list[bytes | None]) -> Mask:
    """Which of ``get_many``'s values exist."""
    return np.fromiter(map(is_not, values, repeat(None)), dtype=np.bool_, count=len(values))


def row_values(rows: Rows) -> list[bytes]:
    """One ``bytes`` value per record of ``rows`` (its packed row)."""
    rows = np.ascontiguousarray(rows)
    values: list[bytes] = rows.view(f"V{rows.dtype.itemsize}").tolist()
    return values


class RowTier(ABC):
    """A key/value home for packed rows. Values are opaque bytes of a fixed size per table.

    Every batch call returns one result per key, in the order of ``keys``.

    Two ways in: values as ``bytes`` (``get_many``/``put_many``) and rows as record
    arrays (``get_rows``/``put_rows``, what ``TieredStore`` uses). A tier implements the
    first; one that can do better without a ``bytes`` object per row (the memory tier
    keeps rows in arrays, Redis builds its wire bytes from arrays) overrides the second.
    """

    #: Only the process that made the tier can change it (an in-process tier): what a
    #: store wrote there stays until that store removes it.
    private: bool = False

    @abstractmethod
    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        """Return the stored value of each key, or None where it has none."""

    def get_tables(self, keys: Mapping[str, Keys]) -> dict[str, list[bytes | None]]:
        """``get_many`` of several tables at once; tiers with round trips (Redis) or
        per-call costs (RocksDB) override it to read them all in one go."""
        return {table: self.get_many(table, table_keys) for table, table_keys in keys.items()}

    @abstractmethod
    def put_many(self, table: str, keys: Keys, values: list[bytes]) -> None:
        """Store ``values[i]`` under ``keys[i]``."""

    def get_rows(self, table: str, keys: Keys, codec: RowCodec) -> tuple[Rows, Mask]:
        """The rows of ``keys`` as records of ``codec.dtype`` (zeros where a key has
        none) and which keys have one. A value of the wrong size raises
        ``RowFormatError`` naming the table and key (``codec.unpack``)."""
        values = self.get_many(table, keys)
        found = present_mask(values)
        if found.all():
            return codec.unpack(keys, cast(list[bytes], values)), found
        rows = codec.zeros(len(keys))
        if found.any():
            rows[found] = codec.unpack(keys[found], [v for v in values if v is not None])
        return rows, found

    def get_rows_ahead(
        self, requests: Sequence[tuple[str, Keys, RowCodec]]
    ) -> Generator[tuple[Rows, Mask], None, None]:
        """``get_rows`` of each (table, keys, codec) in turn. A tier with round trips
        (Redis) sends the next request's read before handing out this one's rows, so the
        server works on it while the caller handles these; the caller must therefore not
        write a table of a later request before taking its rows."""
        for table, keys, codec in requests:
            yield self.get_rows(table, keys, codec)

    def put_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        """Store ``rows[i]`` (packed) under ``keys[i]``; ``keys`` are distinct."""
        self.put_many(table, keys, row_values(rows))

    @abstractmethod
    def delete_many(self, table: str, keys: Keys) -> None:
        """Remove the keys; missing keys are ignored."""

    @abstractmethod
    def count(self, table: str) -> int:
        """Number of rows this tier holds for ``table``."""

    def clear(self, table: str) -> None:
        """Remove every row of ``table``."""
        for keys, _ in self.scan(table):
            self.delete_many(table, keys)

    @abstractmethod
    def scan(self, table: str, batch: int = 4096) -> Iterator[tuple[Keys, list[bytes]]]:
        """Every row of ``table`` as chunks of (keys, values), about ``batch`` rows each.

        For expiry and start-up bookkeeping, not the hot path. Rows present for the whole
        scan are returned at least once (a key may repeat, e.g. across a Redis rehash);
        rows written or deleted meanwhile may or may not be. Writing or deleting rows
        between chunks is allowed.
        """

    @abstractmethod
    def put_blob(self, name: str, data: bytes) -> None:
        """Store a named blob (model versions, positions)."""

    @abstractmethod
    def get_blob(self, name: str) -> bytes | None:
        """Read a named blob, or None."""

    @abstractmethod
    def delete_blob(self, name: str) -> None:
        """Remove a named blob; a missing one is ignored."""

    def put_marker(self, name: str, value: bytes) -> None:
        """Leave a marker that ``has_marker`` finds for as long as this tier keeps what
        it holds (gone once a Redis restarts without persistence or is flushed): a blob;
        a tier spread over several servers leaves one on each."""
        self.put_blob(name, value)

    def has_marker(self, name: str, value: bytes) -> bool:
        """Whether the marker ``put_marker`` left is still there (on every server)."""
        return self.get_blob(name) == value

    def delete_marker(self, name: str) -> None:
        self.delete_blob(name)

    def commit(
        self,
        rows: Mapping[str, tuple[Keys, list[bytes]]],
        blobs: Mapping[str, bytes],
        *,
        absent: Mapping[str, Keys] | None = None,
    ) -> None:
        """Write rows of several tables and blobs together.

        Durable tiers (RocksDB) make this atomic, so a recorded stream position
        never runs ahead of the rows it covers. The default is not atomic.
        ``absent``: per table, keys of ``rows`` the caller knows this tier does not
        hold yet (it created them since its last commit), so a tier that keeps exact
        row counts need not read them first; a promise, not checked.
        """
        for table, (keys, values) in rows.items():
            self.put_many(table, keys, values)
        for name, data in blobs.items():
            self.put_blob(name, data)

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Wait until every write made so far is applied where other clients see it; a
        write that failed raises here at the latest. For tiers that send writes without
        waiting for them (Redis); a no-op for the others."""

    def report_reads(  # noqa: B027 - optional hook
        self, cold: Mapping[str, Keys], hot: Mapping[str, Keys]
    ) -> None:
        """A reader (another process) tells the writer what it read, keys by table:
        ``cold``, rows it found only in the cold tier (for the writer to promote into
        this one); ``hot``, rows it found here (uses, for the writer's eviction). For
        tiers shared between processes (Redis); a no-op for the others."""

    def take_read_reports(self, max_reports: int) -> tuple[dict[str, Keys], dict[str, Keys]]:
        """What readers reported (``report_reads``; at most ``max_reports`` of their
        reports, oldest first): the ``cold`` and the ``hot`` keys by table, each
        distinct, removed from the tier."""
        return {}, {}

    def wait_for_replicas(self) -> None:  # noqa: B027 - optional hook
        """Wait until every write so far is on the replicas this tier is configured to
        wait for, so that a failover cannot lose it; ``StoreUnavailable`` if too few
        confirm in time. A no-op for tiers without replicas."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files (after ``sync``)."""


class EmbeddingStore(ABC):
    """The sparse parameters of a model: rows, their optimizer state, stream position."""

    @abstractmethod
    def tables(self) -> Mapping[str, TableConfig]:
        """The configured tables, by name."""

    @abstractmethod
    def lookup(self, table: str, keys: Keys, *, create: bool = False) -> LookupResult:
        """One embedding per key, in order.

        With ``create=True`` (training) a missing key gets a freshly initialised row;
        with ``create=False`` (serving) it reads as zeros and ``found`` is False.
        """

    def lookup_tables(
        self, keys: Mapping[str, Keys], *, create: bool = False
    ) -> dict[str, LookupResult]:
        """``lookup`` of several tables at once (a training step's, with ``create``, or
        a serving read's); stores override it to batch the tables' reads into fewer
        round trips."""
        return {
            table: self.lookup(table, table_keys, create=create)
            for table, table_keys in keys.items()
        }

    @abstractmethod
    def update(self, table: str, keys: Keys, grads: Floats) -> Floats:
        """Apply the table's sparse optimizer to ``keys`` (unique) with ``grads`` (n, dim);
        returns their embeddings after the update (zeros where a key has no row)."""

    @abstractmethod
    def lookup_rows(self, table: str, keys: Keys, *, create: bool = False) -> tuple[Rows, Mask]:
        """Whole rows (embedding, optimizer state, metadata) of distinct ``keys``, in
        order, and which were found; ``create`` as in ``lookup``. For a single writer
        that applies the sparse optimizer itself and hands the rows back with
        ``write_rows`` (the trainer cache)."""

    def lookup_rows_tables(
        self, keys: Mapping[str, Keys], *, create: bool = False
    ) -> dict[str, tuple[Rows, Mask]]:
        """``lookup_rows`` of several tables at once (see ``lookup_tables``)."""
        return {
            table: self.lookup_rows(table, table_keys, create=create)
            for table, table_keys in keys.items()
        }

    @abstractmethod
    def write_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        """Store whole rows of distinct ``keys`` as they are, to be made durable with the
        next ``flush``. Only a single writer may do this: it overwrites whatever others
        wrote since its ``lookup_rows``."""

    def now(self) -> int:
        """The time, in epoch seconds, the store stamps on updated rows."""
        return int(time.time())

    def take_serving_reads(self) -> int:
        """A writer takes what read-only stores (serving processes) reported reading:
        it promotes into its hot tier the rows they found only in the cold tier, and
        counts the rows they found hot as used (eviction); returns the rows promoted.
        Stores without such reports return 0."""
        return 0

    def prefetch(self, table: str, keys: Keys) -> None:  # noqa: B027 - optional hook
        """A hint that ``keys`` are about to be looked up: stores with slow tiers move
        their rows closer. Changes no row and counts no sighting."""

    def prefetch_tables(self, keys: Mapping[str, Keys]) -> None:
        """``prefetch`` of several tables (a batch's lookahead); stores override it to
        read the tables together."""
        for table, table_keys in keys.items():
            self.prefetch(table, table_keys)

    @abstractmethod
    def admit(self, table: str, keys: Keys) -> None:
        """Give ``keys`` rows now, whatever the admission policy says."""

    @abstractmethod
    def evict(self, table: str, keys: Keys) -> int:
        """Remove ``keys`` from every tier (reason ``manual``); returns how many existed."""

    @abstractmethod
    def expire(self, now: float | None = None) -> dict[str, int]:
        """Remove rows past their table's ``ttl_s`` or below its ``min_l2_norm``;
        returns how many went, by reason."""

    @abstractmethod
    def flush(
        self,
        position: Mapping[str, int] | None = None,
        *,
        rows: Mapping[str, tuple[Keys, Rows]] | None = None,
    ) -> None:
        """Make every update so far durable, recording ``position`` atomically with it.
        ``rows``: whole rows of distinct keys per table to store first, as ``write_rows``
        does, in the same commit (a single writer's last versions: the store need not
        read them back to make them durable)."""

    @abstractmethod
    def position(self) -> dict[str, int] | None:
        """The stream position recorded by the last ``flush``, or None."""

    @abstractmethod
    def put_blob(self, name: str, data: bytes) -> None:
        """Publish a named blob where every reader of the store sees it."""

    @abstractmethod
    def get_blob(self, name: str) -> bytes | None:
        """Read a named blob, or None."""

    @abstractmethod
    def delete_blob(self, name: str) -> None:
        """Remove a named blob everywhere; a missing one is ignored."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Row counts and counters, for logs and tests."""

    def discard_unflushed(self) -> None:
        """Drop every update since the last ``flush``, so the store reads exactly as of
        ``position()`` again (after ``HotTierLost`` or a failed batch)."""
        raise NotImplementedError(f"{type(self).__name__} cannot discard unflushed updates")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush nothing, just release resources."""
