"""Freshness: how long an event posted to ``/v1/events`` takes to show in serving.

When the service produces an event it notes, for each of the event's sparse ids, the
produce time and the row the store holds right then (read past the near cache). A
background poll reads those rows again the way a predict would (through the near
cache) and, at the first difference (a new row, or an updated embedding; a read that
fell back to the default embedding is no difference), observes
``now - produced`` in ``streamrec_service_event_to_visible_seconds{table}``; p50 and p95 over
the last 1024 rows go to ``..._quantile_seconds``. The figure is per row, and includes
the log, the trainer's batching, the store write and the near cache's staleness. An id
already watched keeps its earliest produce time; rows unchanged after ``timeout_s``
(e.g. not admitted yet) are dropped and counted.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from service import metrics
from service.embeddings import EmbeddingReader
from storage.base import Floats, Keys


@dataclass(frozen=True, slots=True)
class _Watch:
    produced: float
    row: Floats
    found: bool


class FreshnessTracker:
    def __init__(
        self,
        reader: EmbeddingReader,
        *,
        timeout_s: float = 60.0,
        max_rows: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reader = reader
        self._timeout_s = timeout_s
        self._max_rows = max_rows
        self._clock = clock
        self._lock = threading.Lock()
        self._watched: dict[tuple[str, int], _Watch] = {}
        self._recent: deque[float] = deque(maxlen=1024)

    @property
    def watched(self) -> int:
        return len(self._watched)

    def watch(self, produced: float, keys: Mapping[str, Keys]) -> None:
        """Start watching the rows of ``keys`` (distinct per table), produced at
        ``produced`` (this tracker's clock)."""
        with self._lock:
            room = self._max_rows - len(self._watched)
        wanted: dict[str, Keys] = {}
        for table, table_keys in keys.items():
            fresh = [k for k in table_keys.tolist() if (table, k) not in self._watched]
            if fresh and room > 0:
                wanted[table] = np.asarray(fresh[:room], dtype=np.uint64)
                room -= len(wanted[table])
        if not wanted:
            return
        # Straight from the store, no time budget: a defaulted read is no baseline.
        baseline = {t: self._reader.store.lookup(t, k) for t, k in wanted.items()}
        with self._lock:
            for table, table_keys in wanted.items():
                result = baseline[table]
                for i, key in enumerate(table_keys.tolist()):
                    self._watched.setdefault(
                        (table, key), _Watch(produced, result.rows[i].copy(), bool(result.found[i]))
                    )

    def poll(self) -> int:
        """Read the watched rows as served; returns how many were seen changed."""
        with self._lock:
            watched = dict(self._watched)
        if not watched:
            return 0
        by_table: dict[str, list[int]] = {}
        for table, key in watched:
            by_table.setdefault(table, []).append(key)
        keys = {t: np.asarray(k, dtype=np.uint64) for t, k in by_table.items()}
        served = self._reader.lookup(keys)
        now = self._clock()
        seen: list[float] = []
        done: list[tuple[str, int]] = []
        for table, table_keys in keys.items():
            expired = 0
            result = served[table]
            for i, key in enumerate(table_keys.tolist()):
                w = watched[table, key]
                # Only a row that is there counts: a read answered with the default
                # (time budget, overload) says nothing.
                if result.found[i] and (not w.found or not np.array_equal(result.rows[i], w.row)):
                    seen.append(now - w.produced)
                    metrics.FRESHNESS.labels(table=table).observe(now - w.produced)
                    done.append((table, key))
                elif now - w.produced > self._timeout_s:
                    expired += 1
                    done.append((table, key))
            if expired:
                metrics.FRESHNESS_UNOBSERVED.labels(table=table).inc(expired)
        with self._lock:
            for name in done:
                self._watched.pop(name, None)
        if seen:
            self._recent.extend(seen)
            p50, p95 = np.quantile(np.fromiter(self._recent, dtype=np.float64), [0.5, 0.95])
            metrics.FRESHNESS_QUANTILE.labels(quantile="0.5").set(float(p50))
            metrics.FRESHNESS_QUANTILE.labels(quantile="0.95").set(float(p95))
        return len(seen)
