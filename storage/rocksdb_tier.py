"""A durable cold tier in RocksDB (via rocksdict, raw bytes mode).

Key layout, all tables in the default column family:

* row: ``b"r" + table_id + key`` where ``table_id`` is the 8-byte blake2b of the table
  name and ``key`` is 8 bytes big-endian (so a table's rows are one contiguous range).
* row count of a table: ``b"n" + table_id`` -> uint64 little-endian, written in the same
  WriteBatch as the rows it counts (put/delete first read which keys exist), so
  ``count`` is one point read and always exact.
* blob: ``b"b" + name`` (UTF-8).

Whole-key bloom filters and a block cache make reads of absent keys (first sightings of
ids, the most common cold read) cheap. ``exact_counts=False`` skips the existence reads
that keep counts exact (``count`` then scans); ``wal=False`` writes without the
write-ahead log. ``RocksDBTier.scratch`` is both, for spill that a crash discards anyway.

``put_many``, ``delete_many`` and ``commit`` each apply one WriteBatch, so a commit of
rows and blobs (the trainer's stream position) is atomic, including across a crash.
``commit`` writes with ``sync=True`` by default (survives power loss); other writes
rely on the WAL (survive a process crash).

Only one process may open a RocksDB path read-write. With ``read_only=True`` the tier
opens the path as a *secondary* instance (its own info-log/MANIFEST copy under
``secondary_path``, a fresh temporary directory by default, removed by ``close``), so
the service can read while the trainer holds the primary. A secondary sees the
primary's writes only after ``try_catch_up_with_primary``; reads call it at most every
``catch_up_interval`` seconds (100 ms by default), so reads lag the primary's writes by
up to that long. Writes through a secondary raise ``ReadOnlyStore``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from rocksdict import (
    AccessType,
    BlockBasedOptions,
    Cache,
    Options,
    Rdict,
    ReadOptions,
    WriteBatch,
    WriteOptions,
)

from storage.base import Keys, ReadOnlyStore, RowTier, StoreUnavailable
from storage.keyindex import occurs_in, sorted_distinct


def _table_id(table: str) -> bytes:
    return blake2b(table.encode(), digest_size=8).digest()


def _options(block_cache_bytes: int) -> Options:
    """Point-lookup tuning: most cold reads are of keys the tier does not hold (first
    sightings of ids), which whole-key bloom filters answer from memory."""
    opts = Options(raw_mode=True)
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    table.set_block_cache(Cache(block_cache_bytes))
    table.set_cache_index_and_filter_blocks(True)
    table.set_pin_l0_filter_and_index_blocks_in_cache(True)
    opts.set_block_based_table_factory(table)
    opts.set_memtable_whole_key_filtering(True)
    opts.set_memtable_prefix_bloom_ratio(0.1)
    return opts


def _own_options(opts: Options) -> dict[str, Options]:
    """The column families to open with ``opts``. Without them rocksdict reopens an
    existing database with the options in its OPTIONS file, where the block cache is
    not recorded: it became RocksDB's default 8 MB one, not ``block_cache_bytes``."""
    return {"default": opts}


def _key_order(keys: Keys) -> npt.NDArray[np.intp] | None:
    """The stable order that sorts ``keys``, or None if they are sorted already. Sorted
    batches are ~1.5x faster to write and read: the memtable's skiplist and the block
    cache are walked in order instead of at random."""
    if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()):
        return None
    order: npt.NDArray[np.intp] = np.argsort(keys, kind="stable")
    return order


def _after(prefix: bytes) -> bytes:
    """The first key past every key starting with ``prefix`` (no overflow: row prefixes
    start with b"r")."""
    return (int.from_bytes(prefix, "big") + 1).to_bytes(len(prefix), "big")


class RocksDBTier(RowTier):
    """Rows and blobs in one RocksDB database (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        read_only: bool = False,
        *,
        secondary_path: str | os.PathLike[str] | None = None,
        catch_up_interval: float = 0.1,
        sync_commits: bool = True,
        block_cache_bytes: int = 256 << 20,
        wal: bool = True,
        exact_counts: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.catch_up_interval = catch_up_interval
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._prefixes: dict[str, bytes] = {}
        self._last_catch_up = 0.0
        self._own_secondary: str | None = None
        self._closed = False
        self.exact_counts = exact_counts
        self._commit_opts = WriteOptions()
        self._commit_opts.sync = sync_commits
        self._write_opts = WriteOptions()
        # The stub declares disable_wal a method; at runtime it is a property.
        cast(Any, self._write_opts).disable_wal = not wal
        cast(Any, self._commit_opts).disable_wal = not wal and not sync_commits
        opts = _options(block_cache_bytes)
        try:
            if read_only:
                if secondary_path is None:
                    secondary_path = self._own_secondary = tempfile.mkdtemp(
                        prefix="streamrec-rocksdb-secondary-"
                    )
                opts.set_max_open_files(-1)  # required by secondary instances
                self._db = Rdict(
                    self.path,
                    opts,
                    column_families=_own_options(opts),
                    access_type=AccessType.secondary(os.fspath(secondary_path)),
                )
                self._last_catch_up = time.monotonic()
            else:
                os.makedirs(self.path, exist_ok=True)
                opts.create_if_missing(True)
                self._db = Rdict(self.path, opts, column_families=_own_options(opts))
        except Exception as e:
            self._remove_own_secondary()
            mode = "as a read-only secondary" if read_only else "read-write"
            raise StoreUnavailable(f"RocksDB at {self.path}: cannot open {mode}: {e}") from e

    @classmethod
    def scratch(cls, path: str | os.PathLike[str]) -> RocksDBTier:
        """A tier for rows that need not survive a crash (the tiered store's spill):
        emptied on open, no write-ahead log, ``count`` scans."""
        shutil.rmtree(path, ignore_errors=True)
        return cls(path, sync_commits=False, wal=False, exact_counts=False)

    # -- helpers ------------------------------------------------------------------------

    def _prefix(self, table: str) -> bytes:
        prefix = self._prefixes.get(table)
        if prefix is None:
            prefix = self._prefixes[table] = b"r" + _table_id(table)
        return prefix

    def _row_keys(self, table: str, keys: Keys) -> list[bytes]:
        return self._tables_row_keys([(table, keys)])

    def _tables_row_keys(self, asked: Sequence[tuple[str, Keys]]) -> list[bytes]:
        """The RocksDB keys (table prefix + big-endian key) of several tables' keys, laid
        end to end, built in one go (the prefixes all have one width)."""
        n = sum(len(k) for _, k in asked)
        width = len(self._prefix(asked[0][0])) + 8
        buf = np.empty((n, width), dtype=np.uint8)
        at = 0
        for table, keys in asked:
            buf[at : at + len(keys), : width - 8] = np.frombuffer(self._prefix(table), np.uint8)
            buf[at : at + len(keys), width - 8 :] = (
                keys.astype(">u8").view(np.uint8).reshape(len(keys), 8)
            )
            at += len(keys)
        row_keys: list[bytes] = buf.view(f"V{width}").ravel().tolist()
        return row_keys

    def _multi_get(self, keys: list[bytes]) -> list[bytes | None]:
        return cast(list[bytes | None], self._db.get(cast(list[Any], keys)))

    def _maybe_catch_up(self) -> None:
        if not self.read_only:
            return
        now = time.monotonic()
        if now - self._last_catch_up >= self.catch_up_interval:
            with self._lock:
                if now - self._last_catch_up >= self.catch_up_interval:
                    self._db.try_catch_up_with_primary()
                    self._last_catch_up = time.monotonic()

    def catch_up(self) -> None:
        """Secondary only: see the primary's writes now (no-op on a primary)."""
        if self.read_only:
            with self._lock:
                self._db.try_catch_up_with_primary()
                self._last_catch_up = time.monotonic()

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStore(f"RocksDB at {self.path} is open as a read-only secondary")

    def _stored_count(self, table: str) -> int:
        raw = self._db.get(b"n" + _table_id(table))
        return int.from_bytes(raw, "little") if raw is not None else 0

    def _count_locked(self, table: str) -> int:
        count = self._counts.get(table)
        if count is None:
            count = self._counts[table] = self._stored_count(table)
        return count

    def _batch_puts(
        self,
        wb: WriteBatch,
        table: str,
        keys: Keys,
        values: list[bytes],
        counts: dict[str, int],
        absent: Keys | None = None,
    ) -> None:
        if len(keys) != len(values):
            raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        if len(keys) == 0:
            return
        order = _key_order(keys)
        if order is not None:  # stable: of a repeated key, the last value still wins
            keys = keys[order]
            values = list(map(values.__getitem__, order.tolist()))
        row_keys = self._row_keys(table, keys)
        added = 0
        if self.exact_counts:
            distinct = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
            if absent is not None and len(absent):
                new = occurs_in(distinct, absent)
                added = int(new.sum())
                distinct = distinct[~new]
            if len(distinct):
                added += self._multi_get(self._row_keys(table, distinct)).count(None)
        deque(map(wb.put, row_keys, values), maxlen=0)  # the loop in C, not bytecode
        if added:
            counts[table] = counts.get(table, self._count_locked(table)) + added

    def _write(self, wb: WriteBatch, counts: dict[str, int], *, sync: bool) -> None:
        for table, count in counts.items():
            wb.put(b"n" + _table_id(table), count.to_bytes(8, "little"))
        self._db.write(wb, self._commit_opts if sync else self._write_opts)
        self._counts.update(counts)

    # -- RowTier ------------------------------------------------------------------------

    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        if len(keys) == 0:
            return []
        self._maybe_catch_up()
        order = _key_order(keys)
        if order is None:
            return self._multi_get(self._row_keys(table, keys))
        got = self._multi_get(self._row_keys(table, keys[order]))
        inverse = np.empty(len(keys), dtype=np.intp)
        inverse[order] = np.arange(len(keys))
        return list(map(got.__getitem__, inverse.tolist()))

    def get_tables(self, keys: Mapping[str, Keys]) -> dict[str, list[bytes | None]]:
        """One multi-get for the keys of every table (one call into RocksDB, which
        answers absent keys from its bloom filters)."""
        asked = [(table, table_keys) for table, table_keys in keys.items() if len(table_keys)]
        if not asked:
            return {t: [] for t in keys}
        self._maybe_catch_up()
        values = self._multi_get(self._tables_row_keys(asked))
        out: dict[str, list[bytes | None]] = {t: [] for t in keys}
        at = 0
        for table, table_keys in asked:
            out[table] = values[at : at + len(table_keys)]
            at += len(table_keys)
        return out

    def put_many(self, table: str, keys: Keys, values: list[bytes]) -> None:
        self._check_writable()
        with self._lock:
            wb = WriteBatch(raw_mode=True)
            counts: dict[str, int] = {}
            self._batch_puts(wb, table, keys, values, counts)
            self._write(wb, counts, sync=False)

    def delete_many(self, table: str, keys: Keys) -> None:
        self._check_writable()
        if len(keys) == 0:
            return
        with self._lock:
            row_keys = self._row_keys(table, sorted_distinct(keys))
            removed = 0
            if self.exact_counts:
                removed = len(row_keys) - self._multi_get(row_keys).count(None)
            wb = WriteBatch(raw_mode=True)
            deque(map(wb.delete, row_keys), maxlen=0)
            counts = {table: self._count_locked(table) - removed} if removed else {}
            self._write(wb, counts, sync=False)

    def clear(self, table: str) -> None:
        """One range deletion, however many rows."""
        self._check_writable()
        prefix = self._prefix(table)
        with self._lock:
            self._db.delete_range(prefix, _after(prefix), self._write_opts)
            if self.exact_counts:
                wb = WriteBatch(raw_mode=True)
                self._write(wb, {table: 0}, sync=False)

    def count(self, table: str) -> int:
        if not self.exact_counts:
            return sum(len(keys) for keys, _ in self.scan(table))
        if self.read_only:
            self._maybe_catch_up()
            return self._stored_count(table)
        with self._lock:
            return self._count_locked(table)

    def scan(self, table: str, batch: int = 4096) -> Iterator[tuple[Keys, list[bytes]]]:
        """The table's key range in key order, from an implicit snapshot taken when the
        scan starts (writes meanwhile are not seen); skips the block cache."""
        self._maybe_catch_up()
        prefix = self._prefix(table)
        opts = ReadOptions()
        opts.set_iterate_upper_bound(_after(prefix))
        cast(Any, opts).fill_cache(False)  # the stub wrongly takes no argument
        step = max(1, batch)
        raw: list[bytes] = []
        values: list[bytes] = []
        items = cast(Iterator[tuple[bytes, bytes]], self._db.items(from_key=prefix, read_opt=opts))
        for k, v in items:
            raw.append(k[len(prefix) :])
            values.append(v)
            if len(raw) >= step:
                yield np.frombuffer(b"".join(raw), dtype=">u8").astype(np.uint64), values
                raw, values = [], []
        if raw:
            yield np.frombuffer(b"".join(raw), dtype=">u8").astype(np.uint64), values

    def put_blob(self, name: str, data: bytes) -> None:
        self._check_writable()
        with self._lock:
            self._db.put(b"b" + name.encode(), bytes(data))

    def delete_blob(self, name: str) -> None:
        self._check_writable()
        with self._lock:
            self._db.delete(b"b" + name.encode())

    def get_blob(self, name: str) -> bytes | None:
        self._maybe_catch_up()
        value: bytes | None = self._db.get(b"b" + name.encode())
        return value

    def commit(
        self,
        rows: Mapping[str, tuple[Keys, list[bytes]]],
        blobs: Mapping[str, bytes],
        *,
        absent: Mapping[str, Keys] | None = None,
    ) -> None:
        """Rows of several tables and blobs in one atomic (synced) WriteBatch; rows of
        ``absent`` keys count as new without the existence read."""
        self._check_writable()
        absent = absent or {}
        with self._lock:
            wb = WriteBatch(raw_mode=True)
            counts: dict[str, int] = {}
            for table, (keys, values) in rows.items():
                self._batch_puts(wb, table, keys, values, counts, absent.get(table))
            for name, data in blobs.items():
                wb.put(b"b" + name.encode(), bytes(data))
            self._write(wb, counts, sync=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.close()
        self._remove_own_secondary()

    def _remove_own_secondary(self) -> None:
        if self._own_secondary is not None:
            shutil.rmtree(self._own_secondary, ignore_errors=True)
            self._own_secondary = None
