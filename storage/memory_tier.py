"""An in-process hot tier: one dict per table, int key -> packed row bytes.

Thread safety: writers serialise on a lock; readers take no lock. Values are immutable
``bytes`` replaced whole by single dict operations (atomic under the GIL), so a reader
sees either the old or the new row, never a mix. A reader of a batch may see some rows
of a concurrent write batch and not others.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import numpy as np

from storage.base import Keys, RowTier


class MemoryTier(RowTier):
    """Rows and blobs in Python dicts; lost when the process ends."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[int, bytes]] = {}
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _table(self, table: str) -> dict[int, bytes]:
        rows = self._tables.get(table)
        if rows is None:
            with self._lock:
                rows = self._tables.setdefault(table, {})
        return rows

    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        rows = self._tables.get(table)
        if rows is None:
            return [None] * len(keys)
        return list(map(rows.get, keys.tolist()))

    def put_many(self, table: str, keys: Keys, values: list[bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        rows = self._table(table)
        with self._lock:
            rows.update(zip(keys.tolist(), values, strict=True))

    def delete_many(self, table: str, keys: Keys) -> None:
        rows = self._tables.get(table)
        if rows is None:
            return
        with self._lock:
            for key in keys.tolist():
                rows.pop(key, None)

    def commit(
        self,
        rows: Mapping[str, tuple[Keys, list[bytes]]],
        blobs: Mapping[str, bytes],
    ) -> None:
        """All or nothing on bad input; rows become visible before blobs."""
        for table, (keys, values) in rows.items():
            if len(keys) != len(values):
                raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        targets = {table: self._table(table) for table in rows}
        with self._lock:
            for table, (keys, values) in rows.items():
                targets[table].update(zip(keys.tolist(), values, strict=True))
            self._blobs.update({name: bytes(data) for name, data in blobs.items()})

    def clear(self, table: str) -> None:
        with self._lock:
            self._tables.pop(table, None)

    def count(self, table: str) -> int:
        return len(self._tables.get(table, ()))

    def scan(self, table: str, batch: int = 4096) -> Iterator[tuple[Keys, list[bytes]]]:
        """Chunks of a snapshot of the table's keys (so writes between chunks are safe);
        a key deleted after the snapshot is skipped."""
        rows = self._tables.get(table)
        if rows is None:
            return
        with self._lock:
            snapshot = list(rows)
        step = max(1, batch)
        for i in range(0, len(snapshot), step):
            part = snapshot[i : i + step]
            got = list(map(rows.get, part))
            values = [v for v in got if v is not None]
            if len(values) < len(part):  # deleted since the snapshot
                part = [k for k, v in zip(part, got, strict=True) if v is not None]
            if part:
                yield np.array(part, dtype=np.uint64), values

    def put_blob(self, name: str, data: bytes) -> None:
        self._blobs[name] = bytes(data)

    def get_blob(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    def delete_blob(self, name: str) -> None:
        self._blobs.pop(name, None)
