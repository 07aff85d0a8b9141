"""Embedding reads for serving: a near cache, coalescing and a time budget.

* **Near cache.** Rows read from the store are kept in process for ``ttl_s`` (default
  1 s), so a hot key costs one store read per second however many requests carry it;
  a served row is never older than ``ttl_s`` plus the store's own lag. Keys without a
  row are cached too (as the default embedding), which keeps unknown ids from reaching
  the cold tier on every request. Each table holds at most ``max_rows`` rows in a
  direct-mapped array (a key's slot is a hash of it; a newer key in its slot displaces
  it), so a batch's reads and fills are whole-array numpy operations.
* **Coalescing.** A request's keys arrive distinct per table (``distinct_keys``), and
  only the ones missing from the cache go to the store, all tables in one
  ``lookup_tables`` (for a read-only tiered store: one Redis pipeline and one RocksDB
  multi-get). A dispatcher thread merges the misses of every request queued meanwhile
  into one such read (a key wanted by several requests is read once) and runs it on a
  pool, at most ``threads`` reads in flight; while they are all busy, new misses queue
  and coalesce into the next read. Under load this turns per-request store round trips
  into per-batch ones.
* **Time budget.** A request waits at most ``budget_s`` for its store read; if it is not
  back by then (a slow cold-tier read, a stalled Redis) its missing keys answer with the
  default embedding, the zero vector that unknown and unadmitted ids read as in
  training too, and the read carries on in the background: its rows land in the near
  cache for the next request, and a writable store (``streamrec run``) promotes the
  cold rows it read into the hot tier as part of that same lookup. Queued reads are capped
  (``max_pending``): beyond it misses answer the default at once.

A store that cannot be reached raises ``StoreUnavailable`` from ``lookup`` when the
request is still waiting for it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from service import metrics
from storage.base import EmbeddingStore, Floats, Keys, LookupResult

log = logging.getLogger(__name__)


_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying spreads any key's bits upwards


class _Segments:
    """The near cache of the tables of one embedding dim, direct-mapped: table ``t``
    owns slots ``[t * max_rows, (t + 1) * max_rows)`` and a key's slot in them is a hash
    of the key. Reading or filling every table of a batch is a few numpy operations on
    the concatenated keys, with no Python loop per key (nor per table beyond slicing).
    A key whose slot another key took since reads as a miss (and is read again)."""

    def __init__(self, tables: list[str], dim: int, max_rows: int) -> None:
        n = len(tables) * max_rows
        self.base = {table: t * max_rows for t, table in enumerate(tables)}
        self.keys = np.zeros(n, dtype=np.uint64)
        self.rows = np.zeros((n, dim), dtype=np.float32)
        self.found = np.zeros(n, dtype=np.bool_)
        self.expires = np.full(n, -np.inf)  # never-filled slots: always expired
        self.max_rows = np.uint64(max_rows)
        self.lock = threading.Lock()

    def slots(self, keys: Mapping[str, Keys]) -> tuple[Keys, npt.NDArray[np.intp], list[int]]:
        """The keys of every table in one array, their slots, and where each table's
        keys start in it (and the end)."""
        counts = [len(k) for k in keys.values()]
        flat = np.concatenate(list(keys.values())) if keys else np.zeros(0, dtype=np.uint64)
        base = np.repeat(np.array([self.base[t] for t in keys], dtype=np.uint64), counts)
        slots = ((flat * _MIX >> np.uint64(32)) % self.max_rows + base).astype(np.intp)
        return flat, slots, [0, *np.cumsum(counts).tolist()]

    def get(
        self, keys: Mapping[str, Keys], now: float
    ) -> dict[str, tuple[Floats, npt.NDArray[np.bool_], npt.NDArray[np.intp]]]:
        """Per table: rows and found flags of its keys (zeros where not cached) and the
        positions of its keys that are missing or expired."""
        flat, slots, at = self.slots(keys)
        with self.lock:
            have = (self.keys[slots] == flat) & (self.expires[slots] > now)
            rows = self.rows[slots]
            found = self.found[slots] & have
        rows[~have] = 0.0
        return {
            table: (rows[a:b], found[a:b], np.flatnonzero(~have[a:b]))
            for table, a, b in zip(keys, at, at[1:], strict=False)
        }

    def put(
        self, keys: Mapping[str, Keys], results: Mapping[str, LookupResult], expires: float
    ) -> None:
        flat, slots, _ = self.slots(keys)
        rows = np.concatenate([results[t].rows for t in keys])
        found = np.concatenate([results[t].found for t in keys])
        # Keys of one batch that share a slot: the last takes it, explicitly (numpy leaves
        # the order of repeated fancy-index writes unspecified, and the four arrays must
        # agree on whose row a slot holds).
        taken, last = np.unique(slots[::-1], return_index=True)
        last = len(slots) - 1 - last
        with self.lock:
            self.keys[taken] = flat[last]
            self.rows[taken] = rows[last]
            self.found[taken] = found[last]
            self.expires[taken] = expires


class _Read:
    """One request's store read: its keys per table, and the rows once they arrive."""

    __slots__ = ("done", "error", "results", "wanted")

    def __init__(self, wanted: Mapping[str, Keys]) -> None:
        self.wanted = wanted
        self.results: dict[str, LookupResult] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()

    def deliver(self, results: dict[str, LookupResult], error: BaseException | None) -> None:
        # Set before done: a waiter that sees done reads them, one that timed out ignores
        # them (nothing else reads them).
        self.results = results
        self.error = error
        self.done.set()


class EmbeddingReader:
    """Serving-side reads of a store's rows; see the module docstring."""

    def __init__(
        self,
        store: EmbeddingStore,
        *,
        ttl_s: float = 1.0,
        max_rows: int = 100_000,
        budget_s: float = 0.025,
        threads: int = 2,
        max_pending: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.budget_s = budget_s
        self.max_pending = max_pending
        self._clock = clock
        self._dims = {name: cfg.dim for name, cfg in store.tables().items()}
        by_dim: dict[int, list[str]] = {}
        for name, dim in self._dims.items():
            by_dim.setdefault(dim, []).append(name)
        self._caches = (
            [_Segments(tables, dim, max_rows) for dim, tables in by_dim.items()]
            if ttl_s > 0
            else []
        )
        self._threads = threads
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    def close(self) -> None:
        """Stop the reader threads (a later lookup starts new ones: an app's lifespan
        may run more than once, e.g. under test clients)."""
        with self._lock:
            pool, self._pool = self._pool, None
            dispatcher, self._dispatcher = self._dispatcher, None
        if dispatcher is not None:
            self._queue.put(None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _by_cache(self, keys: Mapping[str, Keys]) -> list[tuple[_Segments, dict[str, Keys]]]:
        return [
            (cache, part)
            for cache in self._caches
            if (part := {t: k for t, k in keys.items() if t in cache.base})
        ]

    def lookup(self, keys: Mapping[str, Keys], *, cached: bool = True) -> dict[str, LookupResult]:
        """One row per key of each table (keys distinct per table), within the budget.
        ``cached=False`` skips the near cache (reads the store's current rows)."""
        now = self._clock()
        for table in keys:
            if table not in self._dims:
                raise KeyError(f"unknown table {table!r}; configured: {sorted(self._dims)}")
        out: dict[str, LookupResult] = {}
        partial: dict[str, tuple[Floats, npt.NDArray[np.bool_], npt.NDArray[np.intp]]] = {}
        if cached:
            for cache, part in self._by_cache(keys):
                partial.update(cache.get(part, now))
        wanted: dict[str, Keys] = {}
        for table, table_keys in keys.items():
            if table not in partial:  # not cached: read every key
                partial[table] = (
                    np.zeros((len(table_keys), self._dims[table]), dtype=np.float32),
                    np.zeros(len(table_keys), dtype=np.bool_),
                    np.arange(len(table_keys), dtype=np.intp),
                )
            rows, found, missing = partial[table]
            out[table] = LookupResult(rows, found)
            if len(missing):
                wanted[table] = table_keys[missing]
        misses = sum(len(k) for k in wanted.values())
        metrics.NEAR_CACHE.labels(result="hit").inc(sum(len(k) for k in keys.values()) - misses)
        metrics.NEAR_CACHE.labels(result="miss").inc(misses)
        fetched = self._read_within_budget(wanted, now) if wanted else {}
        # Rows not fetched in time stay the default: zeros, not found.
        for table, result in fetched.items():
            rows, found, missing = partial[table]
            rows[missing] = result.rows
            found[missing] = result.found
        return out

    def _read_within_budget(
        self, wanted: Mapping[str, Keys], started: float
    ) -> dict[str, LookupResult]:
        """Queue the read for the dispatcher and wait for it at most what is left of the
        budget; if it is not back by then the caller defaults every table."""
        with self._lock:
            if self._queued >= self.max_pending:
                metrics.LOOKUP_DEFAULTED.labels(reason="overloaded").inc(
                    sum(len(k) for k in wanted.values())
                )
                return {}
            self._queued += 1
            if self._dispatcher is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, "embedding-read")
                self._dispatcher = threading.Thread(
                    target=self._dispatch,
                    args=(self._pool,),
                    name="embedding-dispatch",
                    daemon=True,
                )
                self._dispatcher.start()
        read = _Read(wanted)
        self._queue.put(read)
        if not read.done.wait(max(self.budget_s - (self._clock() - started), 0.0)):
            metrics.LOOKUP_DEFAULTED.labels(reason="budget").inc(
                sum(len(k) for k in wanted.values())
            )
            return {}
        if read.error is not None:
            raise read.error  # e.g. StoreUnavailable: the request answers 503
        return read.results

    def _dispatch(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        """Coalesce the reads queued meanwhile into one store read of every table they
        want (each key once, however many requests want it) and run it on the pool, at
        most ``threads`` reads in flight: while they are busy, reads queue up and
        coalesce into the next one."""
        slots = threading.Semaphore(self._threads)
        while True:
            first = self._queue.get()
            if first is None:
                return
            reads = [first]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    return
                reads.append(more)
            with self._lock:
                self._queued -= len(reads)
            slots.acquire()
            try:
                future = pool.submit(self._read, reads)
            except RuntimeError:  # shut down by close(): these reads answer the default
                return
            future.add_done_callback(lambda _: slots.release())

    def _read(self, reads: list[_Read]) -> None:
        """One store read for ``reads``; fills the near cache and hands each its rows."""
        by_table: dict[str, list[Keys]] = {}
        for read in reads:
            for table, table_keys in read.wanted.items():
                by_table.setdefault(table, []).append(table_keys)
        keys = {
            table: parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))
            for table, parts in by_table.items()
        }
        try:
            result = self.store.lookup_tables(keys)
        except Exception as exc:  # each request still waiting re-raises it
            log.warning("embedding read of %d tables failed: %s", len(keys), exc)
            for read in reads:
                read.deliver({}, exc)
            return
        expires = self._clock() + self.ttl_s
        for cache, part in self._by_cache(keys):
            cache.put(part, result, expires)
        if len(reads) == 1:
            reads[0].deliver(result, None)
            return
        for read in reads:
            mine: dict[str, LookupResult] = {}
            for table, table_keys in read.wanted.items():
                got = result[table]
                if len(by_table[table]) == 1:
                    mine[table] = got
                    continue
                at = np.searchsorted(keys[table], table_keys)
                mine[table] = LookupResult(got.rows[at], got.found[at])
            read.deliver(mine, None)
