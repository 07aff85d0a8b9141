"""``TieredStore``: the embedding store over a hot tier and an optional durable cold tier.

Policy (thin path: no admission, no eviction yet):

* ``lookup``: hot, then cold for hot misses (found rows are promoted into hot unless the
  store is read-only), then for keys still missing either a new row (``create=True``,
  written to hot, dirty, ``found`` True) or zeros with ``found`` False (nothing written).
  Duplicate keys are fine: each distinct key is fetched once.
* ``update``: fetches like ``lookup(create=True)``, applies the table's sparse optimizer,
  stamps time and update count, writes hot, marks the rows dirty. Rows whose gradient
  holds NaN/inf are left unchanged and counted.
* ``flush``: dirty rows (read back from hot) and the stream position go to the cold tier
  in one ``commit`` (atomic in RocksDB); without a cold tier the position is recorded in
  hot. Dirty rows stay dirty if the commit fails.
* ``position``: cold first (durable), else hot. Blobs: written to both, read hot first.

Threads (the embedded mode: one trainer thread, many HTTP reader threads): every
mutation (``update``, ``lookup(create=True)``, ``flush``, promotion, dirty set) runs under
one re-entrant lock. Readers with ``create=False`` read hot without it and take it only
to handle hot misses when there is a cold tier, re-reading hot under the lock so an
older cold row never overwrites a newer hot one. Tiers replace a row's value whole, so
a reader never sees a half-written row.

``read_only=True`` is for a separate serving process: lookups never write, create or
promote; ``update``/``flush``/``put_blob`` and ``lookup(create=True)`` raise
``ReadOnlyStore``.

The store owns its tiers: ``close`` closes them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from storage import metrics
from storage.base import (
    EmbeddingStore,
    Floats,
    Keys,
    LookupResult,
    Mask,
    ReadOnlyStore,
    RowTier,
    TableConfig,
)
from storage.optim import apply_sparse
from storage.rows import RowCodec, Rows

POSITION_BLOB = "streamrec.store.position"
"""Blob name under which ``flush`` records the stream position (JSON object)."""

_DIRTY_COMPACT = 1 << 20  # dedupe a table's dirty key list beyond this many entries
_U32_MAX = 0xFFFFFFFF


class TieredStore(EmbeddingStore):
    """Embedding rows in ``hot`` (always) and ``cold`` (durable, optional)."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        hot: RowTier,
        cold: RowTier | None = None,
        *,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tables: dict[str, TableConfig] = {}
        for cfg in tables:
            if cfg.name in self._tables:
                raise ValueError(f"table {cfg.name!r} is configured twice")
            self._tables[cfg.name] = cfg
        self._codecs = {name: RowCodec(cfg) for name, cfg in self._tables.items()}
        self.hot = hot
        self.cold = cold
        self.read_only = read_only
        self._clock = clock
        self._lock = threading.RLock()
        self._dirty: dict[str, list[Keys]] = {}
        self._dirty_len: dict[str, int] = {}
        self._tally: Tally[str] = Tally()
        self._tally_lock = threading.Lock()
        self._created = {name: metrics.ROWS_CREATED.labels(table=name) for name in self._tables}
        self._rejected = {
            name: metrics.REJECTED_GRADIENTS.labels(table=name) for name in self._tables
        }

    # -- helpers ------------------------------------------------------------------------

    def _codec(self, table: str) -> RowCodec:
        codec = self._codecs.get(table)
        if codec is None:
            raise KeyError(f"unknown table {table!r}; configured: {sorted(self._codecs)}")
        return codec

    def _now(self) -> int:
        return min(max(int(self._clock()), 0), _U32_MAX)

    def _count(self, **deltas: int) -> None:
        with self._tally_lock:
            self._tally.update(deltas)

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStore(f"{what} through a read-only store")

    def _mark_dirty(self, table: str, keys: Keys) -> None:
        if self.cold is None or len(keys) == 0:
            return  # nothing to flush rows to
        parts = self._dirty.setdefault(table, [])
        parts.append(keys.copy())
        size = self._dirty_len.get(table, 0) + len(keys)
        # Dedupe when the list doubles past its last deduped size: amortised O(1) per key.
        if size > max(_DIRTY_COMPACT, 2 * len(parts[0])) and len(parts) > 1:
            merged = np.unique(np.concatenate(parts))
            parts[:] = [merged]
            size = len(merged)
        self._dirty_len[table] = size

    def _from_hot(
        self, codec: RowCodec, keys: Keys, rows: Rows, found: Mask, idx: npt.NDArray[np.intp]
    ) -> npt.NDArray[np.intp]:
        """Fill ``rows[idx]`` from hot where present; return the positions still missing."""
        values = self.hot.get_many(codec.table, keys[idx])
        hit = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
        if hit.any():
            at = idx[hit]
            rows[at] = codec.unpack(keys[at], [v for v in values if v is not None])
            found[at] = True
        missing: npt.NDArray[np.intp] = idx[~hit]
        return missing

    def _from_cold(
        self,
        codec: RowCodec,
        keys: Keys,
        rows: Rows,
        found: Mask,
        idx: npt.NDArray[np.intp],
        *,
        promote: bool,
    ) -> npt.NDArray[np.intp]:
        """Fill ``rows[idx]`` from cold where present (promoting those values into hot);
        return the positions still missing."""
        assert self.cold is not None
        values = self.cold.get_many(codec.table, keys[idx])
        hit = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
        if hit.any():
            at = idx[hit]
            present = [v for v in values if v is not None]
            rows[at] = codec.unpack(keys[at], present)
            found[at] = True
            if promote:
                self.hot.put_many(codec.table, keys[at], present)
        missing: npt.NDArray[np.intp] = idx[~hit]
        return missing

    def _fetch(
        self, codec: RowCodec, keys: Keys, *, create: bool, record: bool
    ) -> tuple[Rows, Mask]:
        """Rows of distinct ``keys`` and which of them exist(ed).

        With ``create`` the caller holds the lock and missing rows are created, written
        to hot and marked dirty; without it the lock is taken here only for promotion.
        """
        n = len(keys)
        rows = codec.zeros(n)
        found = np.zeros(n, dtype=np.bool_)
        missing = self._from_hot(codec, keys, rows, found, np.arange(n, dtype=np.intp))
        hot_misses = len(missing)
        if hot_misses and self.cold is not None:
            if self.read_only:
                missing = self._from_cold(codec, keys, rows, found, missing, promote=False)
            elif create:
                missing = self._from_cold(codec, keys, rows, found, missing, promote=True)
            else:
                with self._lock:
                    # Re-read hot under the lock: the writer may have stored the row since,
                    # and promoting the older cold value would overwrite it.
                    missing = self._from_hot(codec, keys, rows, found, missing)
                    hot_misses = len(missing)
                    missing = self._from_cold(codec, keys, rows, found, missing, promote=True)
        cold_hits = hot_misses - len(missing)
        if create and len(missing):
            new = codec.new_rows(keys[missing], self._now())
            rows[missing] = new
            self.hot.put_many(codec.table, keys[missing], codec.pack(new))
            self._mark_dirty(codec.table, keys[missing])
            self._created[codec.table].inc(len(missing))
            self._count(created_rows=len(missing))
            found[missing] = True
        if record:
            metrics.HOT_HIT.inc(n - hot_misses)
            metrics.HOT_MISS.inc(hot_misses)
            if hot_misses and self.cold is not None:
                metrics.COLD_HIT.inc(cold_hits)
                metrics.COLD_MISS.inc(len(missing))
            self._count(hot_hits=n - hot_misses, cold_hits=cold_hits, misses=len(missing))
        return rows, found

    # -- EmbeddingStore -----------------------------------------------------------------

    def tables(self) -> Mapping[str, TableConfig]:
        return dict(self._tables)

    def lookup(self, table: str, keys: Keys, *, create: bool = False) -> LookupResult:
        """See ``EmbeddingStore.lookup``; with ``create=True`` created rows are ``found``."""
        start = time.perf_counter()
        codec = self._codec(table)
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        if create:
            self._check_writable("lookup(create=True)")
        unique, inverse = np.unique(keys, return_inverse=True)
        if create:
            with self._lock:
                rows, found = self._fetch(codec, unique, create=True, record=True)
        else:
            rows, found = self._fetch(codec, unique, create=False, record=True)
        emb: Floats = np.ascontiguousarray(rows["emb"][inverse], dtype=np.float32)
        result = LookupResult(rows=emb, found=found[inverse])
        metrics.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return result

    def update(self, table: str, keys: Keys, grads: Floats) -> None:
        start = time.perf_counter()
        self._check_writable("update")
        codec = self._codec(table)
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        grads = np.asarray(grads, dtype=np.float32)
        if grads.shape != (len(keys), codec.dim):
            raise ValueError(
                f"table {table!r}: gradient shape {grads.shape} != ({len(keys)}, {codec.dim})"
            )
        if len(keys) == 0:
            return
        if len(np.unique(keys)) != len(keys):
            raise ValueError(f"table {table!r}: update keys must be unique")
        with self._lock:
            rows, _ = self._fetch(codec, keys, create=True, record=False)
            ok = apply_sparse(codec.cfg, rows["emb"], rows["state"], grads)
            applied = np.flatnonzero(ok)
            rejected = len(keys) - len(applied)
            if len(applied):
                RowCodec.touch(rows, applied, self._now())
                if rejected:
                    self.hot.put_many(table, keys[applied], codec.pack(rows[applied]))
                else:
                    self.hot.put_many(table, keys, codec.pack(rows))
                self._mark_dirty(table, keys[applied])
        if rejected:
            self._rejected[table].inc(rejected)
            self._count(rejected_gradients=rejected)
        metrics.UPDATE_SECONDS.observe(time.perf_counter() - start)

    def admit(self, table: str, keys: Keys) -> None:
        self._check_writable("admit")
        codec = self._codec(table)
        unique = np.unique(np.asarray(keys, dtype=np.uint64).reshape(-1))
        with self._lock:
            self._fetch(codec, unique, create=True, record=False)

    def evict(self, table: str, keys: Keys) -> int:
        self._check_writable("evict")
        self._codec(table)
        unique = np.unique(np.asarray(keys, dtype=np.uint64).reshape(-1))
        with self._lock:
            present = np.fromiter(
                (v is not None for v in self.hot.get_many(table, unique)), np.bool_, len(unique)
            )
            self.hot.delete_many(table, unique)
            if self.cold is not None:
                in_cold = self.cold.get_many(table, unique)
                present |= np.fromiter((v is not None for v in in_cold), np.bool_, len(unique))
                self.cold.delete_many(table, unique)
        return int(present.sum())

    def flush(self, position: Mapping[str, int] | None = None) -> None:
        self._check_writable("flush")
        blob = None
        if position is not None:
            blob = json.dumps({str(k): int(v) for k, v in position.items()}, sort_keys=True)
        start = time.perf_counter()
        with self._lock:
            if self.cold is None:
                if blob is not None:
                    self.hot.put_blob(POSITION_BLOB, blob.encode())
            else:
                rows: dict[str, tuple[Keys, list[bytes]]] = {}
                lost = 0
                for table, parts in self._dirty.items():
                    keys = np.unique(np.concatenate(parts))
                    values = self.hot.get_many(table, keys)
                    keep = np.fromiter((v is not None for v in values), np.bool_, len(values))
                    # A row gone from hot (e.g. Redis flushed) cannot be written back.
                    lost += len(keys) - int(keep.sum())
                    rows[table] = (keys[keep], [v for v in values if v is not None])
                blobs = {POSITION_BLOB: blob.encode()} if blob is not None else {}
                if rows or blobs:
                    self.cold.commit(rows, blobs)
                self._dirty.clear()
                self._dirty_len.clear()
                if lost:
                    self._count(lost_dirty_rows=lost)
        elapsed = time.perf_counter() - start
        metrics.FLUSH_SECONDS.observe(elapsed)
        metrics.FLUSH_OP_SECONDS.observe(elapsed)

    def position(self) -> dict[str, int] | None:
        raw = self.cold.get_blob(POSITION_BLOB) if self.cold is not None else None
        if raw is None:
            raw = self.hot.get_blob(POSITION_BLOB)
        if raw is None:
            return None
        data = json.loads(raw)
        return {str(k): int(v) for k, v in data.items()}

    def put_blob(self, name: str, data: bytes) -> None:
        self._check_writable("put_blob")
        with self._lock:
            self.hot.put_blob(name, data)
            if self.cold is not None:
                self.cold.put_blob(name, data)

    def delete_blob(self, name: str) -> None:
        self._check_writable("delete_blob")
        with self._lock:
            self.hot.delete_blob(name)
            if self.cold is not None:
                self.cold.delete_blob(name)

    def get_blob(self, name: str) -> bytes | None:
        data = self.hot.get_blob(name)
        if data is None and self.cold is not None:
            data = self.cold.get_blob(name)
        return data

    def stats(self) -> dict[str, int]:
        """``hot_rows.<table>``, ``cold_rows.<table>``, ``dirty_rows`` (upper bound) and
        the counters ``hot_hits``, ``cold_hits``, ``misses`` (distinct keys of lookups),
        ``created_rows``, ``rejected_gradients``, ``lost_dirty_rows``."""
        out: dict[str, int] = {}
        for table in self._tables:
            out[f"hot_rows.{table}"] = self.hot.count(table)
            if self.cold is not None:
                out[f"cold_rows.{table}"] = self.cold.count(table)
        with self._tally_lock:
            for name in (
                "hot_hits",
                "cold_hits",
                "misses",
                "created_rows",
                "rejected_gradients",
                "lost_dirty_rows",
            ):
                out[name] = self._tally[name]
        out["dirty_rows"] = sum(self._dirty_len.copy().values())  # copy: atomic vs writer
        return out

    def close(self) -> None:
        """Close both tiers (unflushed dirty rows stay only in hot)."""
        self.hot.close()
        if self.cold is not None:
            self.cold.close()
