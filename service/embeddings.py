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
  multi-get). ``threads`` reader threads take the queued misses: each takes every read
  queued so far and does them as one store read (a key wanted by several requests is
  read once). While they are all busy, new misses queue and coalesce into the next read,
  so under load per-request store round trips become per-batch ones.
* **Read processes.** With ``processes`` (``streamrec serve``: ``lookup_processes``,
  default 1) each reader thread hands its store reads to its own ``ReadProcess``, a
  child process with its own read-only view of the store: the reads' Python work (Redis
  commands and replies, row unpacking, RocksDB) then runs on another core instead of
  under the server's GIL, beside the event loop. A child that dies costs no request: its
  read, and the reads until a new child has started (in the background), run in the
  reader thread (``streamrec_service_read_process_failures_total``).
* **Async waits.** ``lookup_async`` is ``lookup`` for an event loop: the request waits
  on an asyncio future the reader thread resolves, so an async handler does its CPU work
  on the loop and hands off to a thread only for the store read (a sync handler in a
  thread pool costs a few more thread wake-ups per request, which on a 2-core machine
  cost more than the work they hand off).
* **Time budget.** A request waits at most ``budget_s`` for its store read; if it is not
  back by then (a slow cold-tier read, a stalled Redis) its missing keys answer with the
  default embedding, the zero vector that unknown and unadmitted ids read as in
  training too, and the read carries on in the background: its rows land in the near
  cache for the next request, and a writable store (``streamrec run``) promotes the
  cold rows it read into the hot tier as part of that same lookup (a read-only one,
  ``streamrec serve``, asks the trainer to: ``TieredStore.take_serving_reads``).
  Queued reads are capped (``max_pending``): beyond it misses answer the default at
  once.

A store that cannot be reached raises ``StoreUnavailable`` from ``lookup`` when the
request is still waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from service import metrics
from storage.base import EmbeddingStore, Floats, Keys, LookupResult
from storage.compiled import kernel
from storage.keyindex import sorted_distinct
from storage.read_process import ReadProcess, ReadProcessDied

log = logging.getLogger(__name__)


_RESTART_EVERY_S = 5.0  # a child that keeps dying is restarted at most this often

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplying spreads any key's bits upwards


_S32 = np.uint64(32)
# A slot, in 32-bit words: key (0-1, uint64), expiry (2-3, float64), found flag (4),
# row (5 on). Side by side, a lookup touches one or two cache lines instead of one per
# field (about half the time of separate arrays); the kernels see the slots through
# uint64, float64 and float32 views of the same memory, so one compiled kernel serves
# every dim.
_FOUND_AT = 4
_ROW_AT = 5


@kernel
def _cache_get(
    words: Keys,
    times: npt.NDArray[np.float64],
    floats: Floats,
    flat: Keys,
    starts: npt.NDArray[np.intp],
    bases: Keys,
    max_rows: np.uint64,
    now: float,
    out_rows: Floats,
    out_found: npt.NDArray[np.bool_],
    stale: npt.NDArray[np.bool_],
) -> None:
    """Copy out each key's cached row and found flag (the outputs start zeroed) and flag
    the keys whose slot holds another key or an expired entry. Table ``t``'s keys are
    ``flat[starts[t]:starts[t + 1]]``; its slots start at ``bases[t]``."""
    for t in range(len(bases)):
        for i in range(starts[t], starts[t + 1]):
            key = flat[i]
            s = bases[t] + (key * _MIX >> _S32) % max_rows
            if words[s, 0] == key and times[s, 1] > now:
                for j in range(out_rows.shape[1]):
                    out_rows[i, j] = floats[s, _ROW_AT + j]
                out_found[i] = floats[s, _FOUND_AT] != 0
            else:
                stale[i] = True


@kernel
def _cache_put(
    words: Keys,
    times: npt.NDArray[np.float64],
    floats: Floats,
    flat: Keys,
    starts: npt.NDArray[np.intp],
    bases: Keys,
    max_rows: np.uint64,
    new_rows: Floats,
    new_found: npt.NDArray[np.bool_],
    until: float,
) -> None:
    """Store each key's row in its slot; of keys sharing a slot, the last stays."""
    for t in range(len(bases)):
        for i in range(starts[t], starts[t + 1]):
            key = flat[i]
            s = bases[t] + (key * _MIX >> _S32) % max_rows
            words[s, 0] = key
            times[s, 1] = until
            floats[s, _FOUND_AT] = 1.0 if new_found[i] else 0.0
            for j in range(new_rows.shape[1]):
                floats[s, _ROW_AT + j] = new_rows[i, j]


class _Segments:
    """The near cache of the tables of one embedding dim, direct-mapped: table ``t``
    owns slots ``[t * max_rows, (t + 1) * max_rows)`` and a key's slot in them is a hash
    of the key. Reading or filling every table of a batch is one compiled pass over the
    concatenated keys (``_cache_get``, ``_cache_put``). A key whose slot another key took
    since reads as a miss (and is read again)."""

    def __init__(self, tables: list[str], dim: int, max_rows: int) -> None:
        self.base = {table: t * max_rows for t, table in enumerate(tables)}
        self.dim = dim
        width = -(-(_ROW_AT + dim) // 2)  # 64-bit words a slot takes
        self.words = np.zeros((len(tables) * max_rows, width), dtype=np.uint64)
        self.times = self.words.view(np.float64)
        self.floats = self.words.view(np.float32)
        self.times[:, 1] = -np.inf  # never-filled slots: always expired
        self.max_rows = np.uint64(max_rows)
        self.lock = threading.Lock()

    def _bases(self, tables: Iterable[str]) -> Keys:
        """Each table's first slot."""
        return np.array([self.base[t] for t in tables], dtype=np.uint64)

    @staticmethod
    def _spans(keys: Mapping[str, Keys]) -> tuple[Keys, npt.NDArray[np.intp]]:
        """The keys of every table in one array, and where each table's keys start in
        it (and the end)."""
        counts = [len(k) for k in keys.values()]
        flat = np.concatenate(list(keys.values())) if keys else np.zeros(0, dtype=np.uint64)
        starts = np.zeros(len(counts) + 1, dtype=np.intp)
        np.cumsum(counts, out=starts[1:])
        return flat, starts

    def get_spans(
        self, tables: Sequence[str], flat: Keys, starts: npt.NDArray[np.intp], now: float
    ) -> tuple[Floats, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Rows and found flags of keys laid end to end (table ``tables[t]``'s at
        ``flat[starts[t]:starts[t + 1]]``; zeros where not cached), and which keys are
        missing or expired."""
        bases = self._bases(tables)
        rows = np.zeros((len(flat), self.dim), dtype=np.float32)
        found = np.zeros(len(flat), dtype=np.bool_)
        stale = np.zeros(len(flat), dtype=np.bool_)
        with self.lock:
            _cache_get(
                self.words, self.times, self.floats, flat, starts, bases, self.max_rows, now,
                rows, found, stale,
            )  # fmt: skip
        return rows, found, stale

    def get(
        self, keys: Mapping[str, Keys], now: float
    ) -> dict[str, tuple[Floats, npt.NDArray[np.bool_], npt.NDArray[np.intp]]]:
        """Per table: rows and found flags of its keys (zeros where not cached) and the
        positions of its keys that are missing or expired."""
        flat, starts = self._spans(keys)
        rows, found, stale = self.get_spans(list(keys), flat, starts, now)
        at = starts.tolist()
        return {
            table: (rows[a:b], found[a:b], stale[a:b].nonzero()[0])
            for table, a, b in zip(keys, at, at[1:], strict=False)
        }

    def put(
        self, keys: Mapping[str, Keys], results: Mapping[str, LookupResult], expires: float
    ) -> None:
        flat, starts = self._spans(keys)
        bases = self._bases(keys)
        rows = np.concatenate([results[t].rows for t in keys])
        found = np.concatenate([results[t].found for t in keys])
        with self.lock:
            _cache_put(
                self.words, self.times, self.floats, flat, starts, bases, self.max_rows,
                rows, found, expires,
            )  # fmt: skip


class _Read:
    """One request's store read: its keys per table, and the rows once they arrive.
    ``on_done`` (from the reader thread) wakes an async waiter."""

    __slots__ = ("done", "error", "on_done", "results", "wanted")

    def __init__(
        self, wanted: Mapping[str, Keys], on_done: Callable[[], None] | None = None
    ) -> None:
        self.wanted = wanted
        self.results: dict[str, LookupResult] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.on_done = on_done

    def deliver(self, results: dict[str, LookupResult], error: BaseException | None) -> None:
        # Set before done: a waiter that sees done reads them, one that timed out ignores
        # them (nothing else reads them).
        self.results = results
        self.error = error
        self.done.set()
        if self.on_done is not None:
            self.on_done()


def _wake(loop: asyncio.AbstractEventLoop, woken: asyncio.Future[None]) -> Callable[[], None]:
    def resolve() -> None:
        if not woken.done():  # cancelled: the waiter timed out
            woken.set_result(None)

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(resolve)

    return wake


class EmbeddingReader:
    """Serving-side reads of a store's rows; see the module docstring."""

    def __init__(
        self,
        store: EmbeddingStore,
        *,
        ttl_s: float = 1.0,
        max_rows: int = 100_000,
        budget_s: float = 0.025,
        threads: int = 1,
        processes: Sequence[ReadProcess] = (),
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
        self._processes = list(processes)
        self._threads = len(self._processes) or threads
        self._restarting: dict[int, float] = {}  # process index: when its restart began
        self._closed = False
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._queued = 0
        self._lock = threading.Lock()
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        """Start the read processes (the reader threads start with the first read); one
        that cannot start leaves its reads to its thread, with a warning."""
        self._closed = False
        for i, process in enumerate(self._processes):
            self._start_process(i, process)

    def _start_process(self, i: int, process: ReadProcess) -> None:
        try:
            process.start()
        except Exception as exc:
            metrics.READ_PROCESS_FAILURES.inc()
            log.warning("read process %d cannot start (%s): reading in the server", i, exc)

    def close(self) -> None:
        """Stop the reader threads once they have done the reads queued before, then the
        read processes (a later lookup starts new threads, and processes restart: an
        app's lifespan may run more than once, e.g. under test clients)."""
        self._closed = True
        with self._lock:
            readers, self._readers = self._readers, []
            for _ in readers:
                self._queue.put(None)
        for thread in readers:
            thread.join(timeout=5.0)
        for process in self._processes:
            process.close()

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
        out, partial, wanted = self._from_cache(keys, cached, now)
        if wanted:
            self._fill(partial, self._wait(self._enqueue(wanted), now))
        return out

    async def lookup_async(self, keys: Mapping[str, Keys]) -> dict[str, LookupResult]:
        """``lookup`` from an event loop: waits for the store without blocking it."""
        now = self._clock()
        out, partial, wanted = self._from_cache(keys, True, now)
        if wanted:
            self._fill(partial, await self._read_async(wanted, now))
        return out

    async def lookup_spans_async(
        self, tables: Sequence[str], flat: Keys, starts: npt.NDArray[np.intp]
    ) -> tuple[Floats, npt.NDArray[np.bool_]]:
        """``lookup_async`` of keys laid end to end (table ``tables[t]``'s distinct keys
        at ``flat[starts[t]:starts[t + 1]]``, as ``keyindex.distinct_rows`` gives them),
        answered the same way: rows and found flags in that order. With every table in
        one near cache it is one pass over the keys, not a few steps per table."""
        cache = next((c for c in self._caches if all(t in c.base for t in tables)), None)
        if cache is None:  # no near cache, tables of several dims, or unknown tables
            keys = {t: flat[a:b] for t, a, b in zip(tables, starts, starts[1:], strict=False)}
            got = await self.lookup_async(keys)
            return (
                np.concatenate([got[t].rows for t in tables]),
                np.concatenate([got[t].found for t in tables]),
            )
        now = self._clock()
        rows, found, stale = cache.get_spans(tables, flat, starts, now)
        missing = np.flatnonzero(stale)
        metrics.NEAR_CACHE.labels(result="hit").inc(len(flat) - len(missing))
        metrics.NEAR_CACHE.labels(result="miss").inc(len(missing))
        if len(missing):
            cut = np.searchsorted(missing, starts).tolist()
            wanted = {
                t: flat[missing[a:b]]
                for t, a, b in zip(tables, cut, cut[1:], strict=False)
                if b > a
            }
            fetched = await self._read_async(wanted, now)
            if fetched:  # else late: the missing keys stay the default
                rows[missing] = np.concatenate([fetched[t].rows for t in wanted])
                found[missing] = np.concatenate([fetched[t].found for t in wanted])
        return rows, found

    async def _read_async(
        self, wanted: Mapping[str, Keys], started: float
    ) -> dict[str, LookupResult]:
        """Queue a store read of ``wanted`` and wait for it without blocking the loop,
        at most what is left of the budget (see ``_wait``)."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        read = self._enqueue(wanted, _wake(loop, woken))
        if read is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken, self._remaining(started))
        return self._wait(read, started)

    def _from_cache(
        self, keys: Mapping[str, Keys], cached: bool, now: float
    ) -> tuple[
        dict[str, LookupResult],
        dict[str, tuple[Floats, npt.NDArray[np.bool_], npt.NDArray[np.intp]]],
        dict[str, Keys],
    ]:
        """The results to fill (cached rows in place, zeros elsewhere), each table's rows,
        found flags and missing positions, and the missing keys per table."""
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
        return out, partial, wanted

    @staticmethod
    def _fill(
        partial: Mapping[str, tuple[Floats, npt.NDArray[np.bool_], npt.NDArray[np.intp]]],
        fetched: Mapping[str, LookupResult],
    ) -> None:
        # Rows not fetched in time stay the default: zeros, not found.
        for table, result in fetched.items():
            rows, found, missing = partial[table]
            rows[missing] = result.rows
            found[missing] = result.found

    def _remaining(self, started: float) -> float:
        return max(self.budget_s - (self._clock() - started), 0.0)

    def _enqueue(
        self, wanted: Mapping[str, Keys], on_done: Callable[[], None] | None = None
    ) -> _Read | None:
        """Queue the read for the reader threads (started on first use); None when
        ``max_pending`` reads are queued already (the caller defaults every key)."""
        with self._lock:
            if self._queued >= self.max_pending:
                metrics.LOOKUP_DEFAULTED.labels(reason="overloaded").inc(
                    sum(len(k) for k in wanted.values())
                )
                return None
            self._queued += 1
            if not self._readers:
                self._readers = [
                    threading.Thread(
                        target=self._serve_reads, args=(i,), name=f"embedding-read-{i}", daemon=True
                    )
                    for i in range(self._threads)
                ]
                for thread in self._readers:
                    thread.start()
        read = _Read(wanted, on_done)
        self._queue.put(read)
        return read

    def _wait(self, read: _Read | None, started: float) -> dict[str, LookupResult]:
        """The read's rows if it is back within what is left of the budget, else none
        (the caller defaults every key); a failed read re-raises its error."""
        if read is None:
            return {}
        if not read.done.wait(self._remaining(started)):
            metrics.LOOKUP_DEFAULTED.labels(reason="budget").inc(
                sum(len(k) for k in read.wanted.values())
            )
            return {}
        if read.error is not None:
            raise read.error  # e.g. StoreUnavailable: the request answers 503
        return read.results

    def _serve_reads(self, index: int) -> None:
        """A reader thread: take every read queued so far (each key once, however many
        requests want it) and do them as one store read, until ``close``."""
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
                if more is None:  # another reader's stop: leave it for that reader
                    self._queue.put(None)
                    break
                reads.append(more)
            with self._lock:
                self._queued -= len(reads)
            metrics.STORE_READ_REQUESTS.observe(len(reads))
            try:
                self._read(reads, index)
            except Exception:  # a bug must not stop the thread: these answer the default
                log.exception("embedding read of %d requests failed", len(reads))
                for read in reads:
                    if not read.done.is_set():
                        read.deliver({}, None)

    def _read(self, reads: list[_Read], index: int = 0) -> None:
        """One store read for ``reads`` (through reader thread ``index``'s read process,
        if it has one); fills the near cache and hands each its rows."""
        by_table: dict[str, list[Keys]] = {}
        for read in reads:
            for table, table_keys in read.wanted.items():
                by_table.setdefault(table, []).append(table_keys)
        keys = {
            table: parts[0] if len(parts) == 1 else sorted_distinct(np.concatenate(parts))
            for table, parts in by_table.items()
        }
        try:
            result = self._lookup(keys, index)
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

    def _lookup(self, keys: Mapping[str, Keys], index: int) -> dict[str, LookupResult]:
        process = self._processes[index] if index < len(self._processes) else None
        if process is not None:
            if process.alive:
                try:
                    return process.lookup_tables(keys)
                except ReadProcessDied as exc:
                    metrics.READ_PROCESS_FAILURES.inc()
                    log.warning("%s; reading in the server until a new one starts", exc)
            self._restart(index, process)
        return self.store.lookup_tables(keys)

    def _restart(self, index: int, process: ReadProcess) -> None:
        """Start a new child for ``process`` in the background, at most every few seconds."""
        now = time.monotonic()
        if now - self._restarting.get(index, -_RESTART_EVERY_S) < _RESTART_EVERY_S:
            return
        self._restarting[index] = now
        threading.Thread(
            target=self._restart_now,
            args=(index, process),
            name="read-process-start",
            daemon=True,
        ).start()

    def _restart_now(self, index: int, process: ReadProcess) -> None:
        self._start_process(index, process)
        if self._closed:  # closed while it started: no child may outlive the reader
            process.close()


def _load_kernels() -> None:
    """Run each kernel once (see ``storage.compiled``)."""
    cache = _Segments(["t"], 1, 1)
    keys = {"t": np.zeros(1, dtype=np.uint64)}
    cache.put(keys, {"t": LookupResult(np.zeros((1, 1), np.float32), np.ones(1, bool))}, 1.0)
    cache.get(keys, 0.0)


_load_kernels()
