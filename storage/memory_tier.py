"""An in-process hot tier: per table, an arena of rows in numpy arrays.

A table's values live in one 2-D ``uint8`` array (a *slot* per row, as wide as its
longest value, with each slot's length beside it), found through a ``KeyIndex`` (a numpy
hash table: key -> slot). Reads gather and writes scatter whole batches by slot arrays,
so the array path (``get_rows``/``put_rows``, what ``TieredStore`` uses) does no Python
work per row; the ``bytes`` path makes one ``bytes`` object per value. Freed slots are
reused; the arena doubles when full and never shrinks.

``MemoryTier.scratch(path)`` keeps the arenas in files under ``path`` mapped into memory
instead (the keys stay indexed in memory): the operating system writes the rows out and
drops them from memory as it needs, like any file cache, and the calls are the same
array copies. The files are unlinked as soon as they are created and grow in place (a
larger arena maps more of the same file: no copy), so nothing outlives the process; it
is the tiered store's spill (demoted rows waiting for the next flush, which
a crash discards anyway), where it beats a scratch RocksDB, whose per-row writes and
reads cost more than the copies (``bench/store.py`` at 20% capacity: see BENCHMARKS.md).

Thread safety: every call, reads included, holds the tier's lock, because slots are
reused (a reader between finding a slot and gathering it could otherwise read another
key's row) and numpy copies rows without the GIL (a reader could see half a row).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from storage.base import Keys, Mask, Rows, RowTier
from storage.keyindex import SlotIndex, sorted_distinct

if TYPE_CHECKING:
    from storage.rows import RowCodec

_U8 = npt.NDArray[np.uint8]
_MIN_SLOTS = 1024


def _last_of_each(keys: Keys) -> npt.NDArray[np.intp]:
    """Indices of the last occurrence of each distinct key (a batch's last write wins)."""
    _, first_from_end = np.unique(keys[::-1], return_index=True)
    out: npt.NDArray[np.intp] = len(keys) - 1 - first_from_end
    return out


class _RowFile:
    """An unlinked file under ``directory`` that an arena's rows are mapped from: it
    grows in place, so a larger arena maps the same file again instead of copying its
    rows into a new one. Closed when the arena is dropped."""

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(dir=directory, suffix=".rows")
        os.unlink(name)  # nothing outlives the process; the disk space goes with the fd
        self.fd = fd
        weakref.finalize(self, os.close, fd)

    def map(self, shape: tuple[int, int]) -> _U8:
        """The file's first ``shape`` bytes, grown (zeros) to that size if shorter."""
        if shape[0] * shape[1] == 0:  # a file cannot map zero bytes
            return np.zeros(shape, dtype=np.uint8)
        # Blocks reserved now: a full disk raises OSError here, not SIGBUS on a later
        # write through the mapping.
        os.posix_fallocate(self.fd, 0, shape[0] * shape[1])
        with open(self.fd, "r+b", closefd=False) as f:
            data = np.memmap(f, dtype=np.uint8, mode="r+", shape=shape)
        return np.asarray(data)  # a plain view: memmap's own indexing costs per call


def _items(rows: _U8) -> npt.NDArray[np.void]:
    """A C-contiguous byte matrix as one opaque item per row (shares its memory)."""
    return rows.view(f"V{rows.shape[1]}").reshape(-1)


class _Arena:
    """One table's rows (see the module docstring). Callers hold the tier's lock."""

    def __init__(self, width: int, mapped: Path | None = None) -> None:
        self.index = SlotIndex()
        self._mapped = mapped
        self._file: _RowFile | None = None  # mapped arenas: the file of self.data
        self.data = self._zeros(_MIN_SLOTS, width)
        self.sizes = np.zeros(_MIN_SLOTS, dtype=np.int32)
        self.free = np.zeros(0, dtype=np.int64)  # freed slots, reused first
        self.top = 0  # slots ever handed out

    def slots(self, keys: Keys) -> tuple[npt.NDArray[np.int64], Mask]:
        """The slot of each key (-1 where absent) and which keys are present."""
        slots = self.index.slots_of(keys)
        found: Mask = slots >= 0
        return slots, found

    def _zeros(self, slots: int, width: int) -> _U8:
        if self._mapped is None:
            return np.zeros((slots, width), dtype=np.uint8)
        self._file = _RowFile(self._mapped)
        return self._file.map((slots, width))

    def _resize(self, slots: int, width: int) -> None:
        """Grow the slots or widen them, keeping every row."""
        if self._file is not None and width == self.width:
            # More slots of the same width: the rows stay where they are in the file.
            self.data = self._file.map((slots, width))
            return
        data = self._zeros(slots, width)
        data[: self.top, : self.width] = self.data[: self.top]
        self.data = data

    def _alloc(self, n: int) -> npt.NDArray[np.int64]:
        reused, self.free = self.free[:n], self.free[n:]
        fresh = n - len(reused)
        if self.top + fresh > len(self.data):
            grow = max(self.top + fresh, 2 * len(self.data)) - len(self.data)
            self._resize(len(self.data) + grow, self.width)
            self.sizes = np.concatenate([self.sizes, np.zeros(grow, np.int32)])
        out = np.concatenate([reused, np.arange(self.top, self.top + fresh, dtype=np.int64)])
        self.top += fresh
        return out

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    def put(self, keys: Keys, data: _U8, sizes: npt.NDArray[np.int32] | int) -> None:
        """Store ``data[i, :sizes[i]]`` under ``keys[i]`` (distinct keys)."""
        if data.shape[1] > self.width:  # a longer value than any so far: widen every slot
            self._resize(len(self.data), data.shape[1])
        pos, new = self.index.add(keys)
        if new.any():
            self.index.slot[pos[new]] = self._alloc(int(new.sum()))
        slots = self.index.slot[pos]
        if data.shape[1] == self.width > 0:
            # As one opaque item per row: numpy copies those twice as fast as 2-D rows.
            _items(self.data)[slots] = _items(np.ascontiguousarray(data))
        else:
            self.data[slots, : data.shape[1]] = data
        self.sizes[slots] = sizes

    def delete(self, keys: Keys) -> None:
        pos = self.index.find(keys)
        pos = sorted_distinct(pos[pos >= 0])
        if len(pos):
            self.free = np.concatenate([self.free, self.index.slot[pos]])
            self.index.discard_at(pos)

    def values(self, slots: npt.NDArray[np.int64]) -> list[bytes]:
        """The ``bytes`` values in ``slots``."""
        sizes = self.sizes[slots]
        w = self.width
        if w == 0:  # only empty values so far
            return [b""] * len(slots)
        if (sizes == w).all():
            values: list[bytes] = self.data[slots].view(f"V{w}").ravel().tolist()
            return values
        pairs = zip(slots.tolist(), sizes.tolist(), strict=True)
        return [self.data[s, :n].tobytes() for s, n in pairs]

    def keys(self) -> Keys:
        return self.index.keys[self.index.live_positions()]


class MemoryTier(RowTier):
    """Rows in numpy arenas (in memory, or mapped from files under ``mapped_dir``),
    blobs in a dict; lost when the process ends."""

    private = True

    def __init__(self, mapped_dir: str | os.PathLike[str] | None = None) -> None:
        self._tables: dict[str, _Arena] = {}
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._mapped = Path(mapped_dir) if mapped_dir is not None else None

    @classmethod
    def scratch(cls, path: str | os.PathLike[str]) -> MemoryTier:
        """A tier for rows that need not survive the process (the tiered store's spill),
        in files mapped from ``path`` (emptied first: a crashed process may have left
        files it had not unlinked yet)."""
        shutil.rmtree(path, ignore_errors=True)
        Path(path).mkdir(parents=True)
        return cls(mapped_dir=path)

    def _arena(self, table: str, width: int) -> _Arena:
        """Lock held: the table's arena, created at ``width`` if new."""
        arena = self._tables.get(table)
        if arena is None:
            arena = self._tables[table] = _Arena(width, self._mapped)
        return arena

    @staticmethod
    def _matrix(table: str, keys: Keys, values: list[bytes]) -> tuple[_U8, npt.NDArray[np.int32]]:
        """``values`` as rows of a byte matrix (zero-padded) and their lengths."""
        if len(keys) != len(values):
            raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        sizes = np.fromiter(map(len, values), dtype=np.int32, count=len(values))
        width = int(sizes.max()) if len(values) else 0
        if len(values) and (sizes == width).all():
            data = np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), width)
        else:
            data = np.zeros((len(values), width), dtype=np.uint8)
            for i, v in enumerate(values):
                data[i, : len(v)] = np.frombuffer(v, dtype=np.uint8)
        return data, sizes

    @staticmethod
    def _distinct(
        keys: Keys, data: _U8, sizes: npt.NDArray[np.int32]
    ) -> tuple[Keys, _U8, npt.NDArray[np.int32]]:
        keys = np.asarray(keys, dtype=np.uint64)
        last = _last_of_each(keys)
        if len(last) == len(keys):
            return keys, data, sizes
        return keys[last], data[last], sizes[last]

    # -- RowTier ------------------------------------------------------------------------

    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        with self._lock:
            arena = self._tables.get(table)
            if arena is None or len(keys) == 0:
                return out
            slots, found = arena.slots(np.asarray(keys, dtype=np.uint64))
            if found.all():  # a flush's dirty rows: no per-value placing
                return list(arena.values(slots))
            at = np.flatnonzero(found)
            values = arena.values(slots[at])
        for i, v in zip(at.tolist(), values, strict=True):
            out[i] = v
        return out

    def get_rows(self, table: str, keys: Keys, codec: RowCodec) -> tuple[Rows, Mask]:
        n = len(keys)
        with self._lock:
            arena = self._tables.get(table)
            if arena is None or n == 0:
                return codec.zeros(n), np.zeros(n, dtype=np.bool_)
            slots, found = arena.slots(keys)
            if not found.any():
                return codec.zeros(n), found
            at = slots if found.all() else slots[found]
            # take: 2.5x faster than fancy indexing of 2-D rows
            sizes, data = arena.sizes[at], np.take(arena.data, at, axis=0)
        if (sizes != codec.nbytes).any():
            codec.check_sizes(keys[found], sizes)
        if data.shape[1] != codec.nbytes:
            data = np.ascontiguousarray(data[:, : codec.nbytes])
        got = data.view(codec.dtype).reshape(-1)
        if len(got) == n:
            return got, found
        rows = codec.zeros(n)
        rows[found] = got
        return rows, found

    def put_many(self, table: str, keys: Keys, values: list[bytes]) -> None:
        data, sizes = self._matrix(table, keys, values)
        if len(keys) == 0:
            return
        keys, data, sizes = self._distinct(keys, data, sizes)
        with self._lock:
            self._arena(table, data.shape[1]).put(keys, data, sizes)

    def put_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        if len(keys) == 0:
            return
        data = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
        with self._lock:
            self._arena(table, data.shape[1]).put(keys, data, data.shape[1])

    def delete_many(self, table: str, keys: Keys) -> None:
        with self._lock:
            arena = self._tables.get(table)
            if arena is not None and len(keys):
                arena.delete(np.asarray(keys, dtype=np.uint64))

    def commit(
        self,
        rows: Mapping[str, tuple[Keys, list[bytes]]],
        blobs: Mapping[str, bytes],
        *,
        absent: Mapping[str, Keys] | None = None,
    ) -> None:
        """All or nothing on bad input; rows become visible before blobs."""
        prepared = []
        for table, (keys, values) in rows.items():
            data, sizes = self._matrix(table, keys, values)
            if len(keys):
                prepared.append((table, *self._distinct(keys, data, sizes)))
        with self._lock:
            for table, keys, data, sizes in prepared:
                self._arena(table, data.shape[1]).put(keys, data, sizes)
            self._blobs.update({name: bytes(data) for name, data in blobs.items()})

    def clear(self, table: str) -> None:
        with self._lock:
            self._tables.pop(table, None)

    def count(self, table: str) -> int:
        with self._lock:
            arena = self._tables.get(table)
            return arena.index.live if arena is not None else 0

    def scan(self, table: str, batch: int = 4096) -> Iterator[tuple[Keys, list[bytes]]]:
        """Chunks of a snapshot of the table's keys (so writes between chunks are safe);
        a key deleted after the snapshot is skipped."""
        with self._lock:
            arena = self._tables.get(table)
            if arena is None:
                return
            snapshot = arena.keys()
        step = max(1, batch)
        for i in range(0, len(snapshot), step):
            part = snapshot[i : i + step]
            got = self.get_many(table, part)
            values = [v for v in got if v is not None]
            if len(values) < len(part):  # deleted since the snapshot
                part = part[[v is not None for v in got]]
            if len(part):
                yield part, values

    def put_blob(self, name: str, data: bytes) -> None:
        self._blobs[name] = bytes(data)

    def get_blob(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def delete_blob(self, name: str) -> None:
        self._blobs.pop(name, None)
