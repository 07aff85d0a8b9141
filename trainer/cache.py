"""The trainer's embedding cache with bounded staleness (after HET, VLDB'22).

``CachedStore`` wraps the store the trainer writes and keeps the rows it touched
locally, so popular rows (most of the traffic under a skewed id distribution) are
not read from and written to the store on every batch. It works in one of two modes.

**Write-back** (the default: this trainer is the store's only writer). The cache holds
whole rows (embedding, optimizer state, metadata) and applies the table's sparse
optimizer to them itself, with the store's code, so training at any staleness is
bit-identical to training without the cache: no other writer can make a cached row
stale.

* Write bound ``s_w``: a row goes back to the store (``write_rows``) once more than
  ``s_w`` of its updates are pending, and every row at each ``flush``, so a recorded
  stream position never covers updates that are only in the cache. Serving, which
  reads the store, sees a row at most ``s_w`` updates (or one flush interval) late.
* ``s_r`` bounds how far behind the store a served row may be; with one writer a
  cached row is never behind, so it does not force re-reads here.

**Shared** (``shared=True``: scale-out, several trainers write the same hot tier). The
cache holds embeddings and sends gradients, as HET does:

* Read bound ``s_r``: a cached row serves at most ``s_r`` training lookups after it
  was last synchronised with the store (read from it, or written to it: ``update``
  returns the rows it produced); the next lookup reads the store again, after
  pushing the row's pending updates so the read includes them.
* Write bound ``s_w``: gradients accumulate per row (summed) and are pushed as one
  update once more than ``s_w`` are pending, and for every row at each ``flush``.
* A cached copy misses at most ``s_w`` of its own trainer's updates and at most the
  updates other trainers made within its last ``s_r`` lookups. For stateful
  optimizers (AdaGrad, Adam) one step on the summed gradients is not the same as
  several steps, and the rows trained on are stale: the accuracy price of ``s > 0``.

In both modes ``s_r = s_w = 0`` is synchronous: every lookup and update goes to the
store. Rows the store did not find (ids not admitted yet) are never served from the
cache: every lookup of them reaches the store, so admission sees every sighting;
gradients with NaN/inf go to the store too, which rejects and counts them. The cache
holds at most ``capacity_rows`` rows; beyond that the least recently used go (their
pending updates written first), never rows of the current training step (a step larger
than the capacity overshoots it until the next). ``prefetch`` (the trainer's
lookahead) reads uncached rows into the cache ahead of their lookup, creating them in
tables that admit every id (as the lookup would); at s = 0 it only passes the hint on
to the store.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from storage.base import EmbeddingStore, Floats, Keys, LookupResult, Mask, Rows, TableConfig
from storage.keyindex import SlotIndex, distinct, sorted_distinct
from storage.optim import apply_sparse, finite_rows
from storage.rows import RowCodec

READS = Counter(
    "streamrec_trainer_cache_lookups",
    "Keys looked up through the trainer cache: hit (served by the cache) or miss (read "
    "from the store).",
    ["result"],
)
STORE_ROWS = Counter(
    "streamrec_trainer_store_rows",
    "Rows the trainer read from (read) or pushed to (write) the store, and the rows it "
    "would have without the cache (demand_read, demand_write).",
    ["op"],
)
STORE_BYTES = Counter(
    "streamrec_trainer_store_bytes",
    "Packed row bytes between the trainer and the store: from_store, to_store.",
    ["direction"],
)
STALENESS = Histogram(
    "streamrec_trainer_cache_staleness",
    "Lookups a cached row had served since it was last synchronised with the store, "
    "observed per served row.",
    buckets=(0, 1, 2, 4, 8, 16, 32, 64),
)
HITS, MISSES = READS.labels(result="hit"), READS.labels(result="miss")
ROWS_READ, ROWS_WRITTEN = STORE_ROWS.labels(op="read"), STORE_ROWS.labels(op="write")
DEMAND_READ, DEMAND_WRITE = (
    STORE_ROWS.labels(op="demand_read"),
    STORE_ROWS.labels(op="demand_write"),
)
FROM_STORE, TO_STORE = (
    STORE_BYTES.labels(direction="from_store"),
    STORE_BYTES.labels(direction="to_store"),
)


class CacheConfig(BaseModel):
    """Bounded-staleness trainer cache (HET); 0/0 is synchronous and exact."""

    model_config = ConfigDict(extra="forbid")

    read_staleness: int = Field(
        0, ge=0, description="s_r: lookups a cached row serves before it is read again."
    )
    write_staleness: int = Field(
        0, ge=0, description="s_w: updates a row accumulates before they are pushed."
    )
    capacity_rows: int = Field(2_000_000, ge=1, description="Rows the cache holds, all tables.")

    @property
    def synchronous(self) -> bool:
        return self.read_staleness == 0 and self.write_staleness == 0


def _observe_many(histogram: Histogram, values: npt.NDArray[np.int64]) -> None:
    """``histogram.observe(v)`` for every value, in O(buckets) calls."""
    bounds = histogram._upper_bounds  # prometheus_client keeps the bucket bounds here
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i, count in enumerate(counts[: len(bounds)].tolist()):
        if count:
            histogram._buckets[i].inc(count)
    histogram._sum.inc(float(values.sum()))


class _Table:
    """One table's cached rows in slot arrays; ``index`` maps a key to its slot (a numpy
    hash table: a batch's keys are found in a few vectorised passes)."""

    def __init__(self, cfg: TableConfig, *, shared: bool) -> None:
        self.cfg = cfg
        self.dim = cfg.dim
        self.codec = RowCodec(cfg)
        self.row_bytes = self.codec.nbytes
        self.index = SlotIndex()
        self.keys = np.zeros(0, dtype=np.uint64)
        self.rows = self.codec.zeros(0)  # shared mode keeps only "emb" current
        # Summed pending gradients: shared mode only (no columns otherwise).
        self.grad = np.zeros((0, cfg.dim if shared else 0), dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.int64)
        self.age = np.zeros(0, dtype=np.int64)
        self.used = np.zeros(0, dtype=np.int64)  # the step of the last access
        self.live = np.zeros(0, dtype=np.bool_)
        self.free: list[int] = []
        # Bumped by every drop: a prefetch that raced one is discarded (it may have read
        # a row older than the one the dropped copy wrote back). Writes of cached rows
        # need no bump: a prefetch only fills keys that are still uncached.
        self.changes = 0

    def slots_of(self, keys: Keys) -> npt.NDArray[np.int64]:
        """Slot of each key, -1 where it is not cached."""
        return self.index.slots_of(keys)

    def allocate(self, keys: Keys) -> npt.NDArray[np.int64]:
        """Fresh slots for distinct ``keys`` (not cached yet); the caller fills ``rows``."""
        n = len(keys)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if n > len(self.free):
            size = len(self.keys)
            self._grow(max(size + n - len(self.free), size * 3 // 2, 1024))
        slots = np.asarray(self.free[-n:], dtype=np.int64)
        del self.free[-n:]
        pos, _ = self.index.add(keys)
        self.index.slot[pos] = slots
        self.keys[slots] = keys
        self.grad[slots] = 0.0
        self.pending[slots] = 0
        self.age[slots] = 0
        self.live[slots] = True
        return slots

    def _grow(self, size: int) -> None:
        old = len(self.keys)
        self.keys = np.resize(self.keys, size)
        rows = self.codec.zeros(size)
        rows[:old] = self.rows
        self.rows = rows
        self.grad = np.resize(self.grad, (size, self.grad.shape[1]))
        self.pending = np.resize(self.pending, size)
        self.age = np.resize(self.age, size)
        self.used = np.resize(self.used, size)
        self.live = np.resize(self.live, size)
        self.live[old:] = False
        self.free.extend(range(size - 1, old - 1, -1))

    def drop(self, slots: npt.NDArray[np.int64]) -> None:
        slots = sorted_distinct(slots)
        self.index.discard(self.keys[slots])
        self.live[slots] = False
        self.free.extend(slots.tolist())
        self.changes += 1

    def __len__(self) -> int:
        return self.index.live


class _Plan(NamedTuple):
    """A table's part of a cached lookup: distinct keys, the inverse (None: the keys
    were distinct), cache slots (-1: uncached), which the cache serves, which it reads."""

    keys: Keys
    inverse: npt.NDArray[np.intp] | None
    slots: npt.NDArray[np.int64]
    usable: Mask
    need: npt.NDArray[np.intp]


class CachedStore(EmbeddingStore):
    """``store`` behind a bounded-staleness cache (see the module docstring);
    ``shared``: other trainers write the same store."""

    def __init__(
        self, store: EmbeddingStore, config: CacheConfig | None = None, *, shared: bool = False
    ) -> None:
        self.store = store
        self.config = config or CacheConfig()
        self.shared = shared
        self._tables = {name: _Table(cfg, shared=shared) for name, cfg in store.tables().items()}
        self._admit_all = {
            name: cfg.admission.policy == "always" for name, cfg in store.tables().items()
        }
        self._lock = threading.RLock()
        self._step = 0

    # -- the cache ----------------------------------------------------------------------

    def _sync(self, table: str, t: _Table, slots: npt.NDArray[np.int64]) -> None:
        """Lock held: hand the pending updates of ``slots`` to the store (whole rows, or
        in shared mode their summed gradients, whose resulting rows become the cached
        copies). The rows are then synchronised: age 0."""
        slots = slots[t.pending[slots] > 0]
        if len(slots) == 0:
            return
        if self.shared:
            t.rows["emb"][slots] = self.store.update(table, t.keys[slots], t.grad[slots])
            t.grad[slots] = 0.0
        else:
            self.store.write_rows(table, t.keys[slots], t.rows[slots])
        self._synced(t, slots)

    def _synced(self, t: _Table, slots: npt.NDArray[np.int64]) -> None:
        """Lock held: the store now holds every update of ``slots``."""
        t.pending[slots] = 0
        t.age[slots] = 0
        self._count_io(t, written=len(slots))

    def _count_io(self, t: _Table, *, read: int = 0, written: int = 0) -> None:
        if read:
            ROWS_READ.inc(read)
            FROM_STORE.inc(read * t.row_bytes)
        if written:
            ROWS_WRITTEN.inc(written)
            TO_STORE.inc(written * t.row_bytes)

    def _make_room(self, incoming: int) -> None:
        """Lock held: drop least recently used rows (pushing their updates) so that
        ``incoming`` more fit; goes down to 90% of capacity to batch the work."""
        total = sum(len(t) for t in self._tables.values())
        cap = self.config.capacity_rows
        if total + incoming <= cap:
            return
        excess = total + incoming - int(cap * 0.9)
        names = [n for n, t in self._tables.items() if len(t)]
        used = np.concatenate([self._tables[n].used[self._tables[n].live] for n in names])
        if excess >= len(used):
            cutoff = np.iinfo(np.int64).max
        else:
            cutoff = int(np.partition(used, excess - 1)[excess - 1])
        for name in names:
            t = self._tables[name]
            # Never the current step's rows: the trainer is about to update them.
            victims = np.flatnonzero(t.live & (t.used <= cutoff) & (t.used < self._step))
            if len(victims):
                self._sync(name, t, victims)
                t.drop(victims)

    def cached_rows(self) -> int:
        with self._lock:
            return sum(len(t) for t in self._tables.values())

    # -- EmbeddingStore -----------------------------------------------------------------

    def tables(self) -> Mapping[str, TableConfig]:
        return self.store.tables()

    def lookup(self, table: str, keys: Keys, *, create: bool = False) -> LookupResult:
        return self.lookup_tables({table: keys}, create=create)[table]

    def lookup_tables(
        self, keys: Mapping[str, Keys], *, create: bool = False
    ) -> dict[str, LookupResult]:
        """A training step's lookups: the rows no table's cache can serve are read from
        the store in one ``lookup_rows_tables`` (its reads overlap), and the step's rows
        all count as used now, so making room never drops one before its update."""
        keys = {table: np.asarray(k, dtype=np.uint64).reshape(-1) for table, k in keys.items()}
        total = sum(len(k) for k in keys.values())
        DEMAND_READ.inc(total)
        if self.config.synchronous or not create:
            out = self.store.lookup_tables(keys, create=create)
            for table, k in keys.items():
                self._count_io(self._tables[table], read=len(k))
            MISSES.inc(total)
            return out
        with self._lock:
            self._step += 1
            plans = {table: self._plan(table, k) for table, k in keys.items()}
            wanted = {table: p.keys[p.need] for table, p in plans.items() if len(p.need)}
            read = self.store.lookup_rows_tables(wanted, create=True) if wanted else {}
            out = {table: self._serve(table, p, read.get(table)) for table, p in plans.items()}
            self._make_room(0)
        return out

    def _plan(self, table: str, keys: Keys) -> _Plan:
        """Lock held: which of ``keys``' distinct keys the cache can serve."""
        t = self._tables[table]
        keys, inverse = distinct(keys)
        slots = t.slots_of(keys)
        cached = slots >= 0
        if self.shared:
            usable = np.zeros(len(keys), dtype=np.bool_)
            usable[cached] = t.age[slots[cached]] < self.config.read_staleness
            self._sync(table, t, slots[cached & ~usable])  # the read then includes them
        else:
            usable = cached  # the only writer: a cached row is never behind
        return _Plan(keys, inverse, slots, usable, np.flatnonzero(~usable))

    def _serve(self, table: str, plan: _Plan, read: tuple[Rows, Mask] | None) -> LookupResult:
        """Lock held: ``plan``'s result, the rows ``read`` from the store cached."""
        t = self._tables[table]
        slots, need = plan.slots, plan.need
        if read is not None:
            rows, found = read
            self._count_io(t, read=len(need))
            got = need[found]
            have = slots[got] >= 0
            slots[got[~have]] = t.allocate(plan.keys[got[~have]])
            fill = slots[got]
            t.rows[fill] = rows[found]
            t.age[fill] = 0
            # Unfound keys (not admitted) stay uncached: zeros, counted by the store.
            gone = need[~found]
            stale = slots[gone]
            if (stale >= 0).any():
                t.drop(stale[stale >= 0])
            slots[gone] = -1
        served = np.flatnonzero(plan.usable)
        if len(served):
            _observe_many(STALENESS, t.age[slots[served]])
            t.age[slots[served]] += 1
        HITS.inc(len(served))
        MISSES.inc(len(need))
        present = slots >= 0
        emb = np.zeros((len(plan.keys), t.dim), dtype=np.float32)
        emb[present] = t.rows["emb"][slots[present]]
        t.used[slots[present]] = self._step
        if plan.inverse is not None:
            emb, present = emb[plan.inverse], present[plan.inverse]
        return LookupResult(rows=emb, found=present)

    def update(self, table: str, keys: Keys, grads: Floats) -> Floats:
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        grads = np.asarray(grads, dtype=np.float32)
        t = self._tables[table]
        DEMAND_WRITE.inc(len(keys))
        if self.config.synchronous:
            self._count_io(t, written=len(keys))
            return self.store.update(table, keys, grads)
        if grads.shape != (len(keys), t.dim):
            raise ValueError(
                f"table {table!r}: gradient shape {grads.shape} != ({len(keys)}, {t.dim})"
            )
        with self._lock:
            slots = t.slots_of(keys)
            # Uncached keys (not admitted, or dropped) and non-finite gradients go straight
            # to the store, which applies, drops or rejects and counts them.
            direct: Mask = (slots < 0) | ~finite_rows(grads)
            out = np.zeros((len(keys), t.dim), dtype=np.float32)
            local = np.flatnonzero(~direct)
            s = slots[local]
            if self.shared:
                t.grad[s] += grads[local]
                t.pending[s] += 1
            elif len(s):
                rows = t.rows[s]
                ok = apply_sparse(t.cfg, rows["emb"], rows["state"], grads[local])
                RowCodec.touch(rows, np.flatnonzero(ok), self.store.now())
                t.rows[s] = rows
                t.pending[s[ok]] += 1
                if not ok.all():
                    # The step would overflow the row: the store, given the same row and
                    # gradient, rejects it the same way and counts it.
                    self._sync(table, t, s[~ok])
                    direct[local[~ok]] = True
            if direct.any():
                d = np.flatnonzero(direct)
                out[d] = self.store.update(table, keys[d], grads[d])
                self._count_io(t, written=len(d))
                hit = slots[d] >= 0
                if hit.any():
                    if self.shared:  # the store's row is the newer one
                        t.rows["emb"][slots[d[hit]]] = out[d[hit]]
                    else:  # the store rejected these: the cached row is unchanged
                        out[d[hit]] = t.rows["emb"][slots[d[hit]]]
            self._sync(table, t, s[t.pending[s] > self.config.write_staleness])
            out[local] = t.rows["emb"][s]
        return out

    def prefetch(self, table: str, keys: Keys) -> None:
        self.prefetch_tables({table: keys})

    def prefetch_tables(self, keys: Mapping[str, Keys]) -> None:
        """Read rows that the next lookup could not serve into the cache, the tables that
        admit every id in one store read (it creates their rows, as that lookup would:
        an id's sighting counts at its training lookup, so gated tables are read as they
        are); the store gets the hint too (it promotes cold rows)."""
        keys = {table: np.asarray(k, dtype=np.uint64).reshape(-1) for table, k in keys.items()}
        if self.config.synchronous:
            self.store.prefetch_tables(keys)
            return
        wanted: dict[str, Keys] = {}
        changes: dict[str, int] = {}
        with self._lock:
            for table, table_keys in keys.items():
                t = self._tables[table]
                table_keys, _ = distinct(table_keys)
                # Cached rows are refreshed by their lookup if due.
                table_keys = table_keys[t.slots_of(table_keys) < 0]
                if len(table_keys):
                    wanted[table], changes[table] = table_keys, t.changes
        open_tables = {table: k for table, k in wanted.items() if self._admit_all[table]}
        gated = {table: k for table, k in wanted.items() if table not in open_tables}
        read = self.store.lookup_rows_tables(open_tables, create=True) if open_tables else {}
        read.update(self.store.lookup_rows_tables(gated) if gated else {})
        with self._lock:
            for table, (rows, found) in read.items():
                t = self._tables[table]
                self._count_io(t, read=len(wanted[table]))
                if t.changes != changes[table]:
                    continue  # a write or drop may have changed rows we read: the lookup reads them
                fresh = wanted[table][found]
                fresh_rows = rows[found]
                absent = t.slots_of(fresh) < 0
                if absent.any():
                    self._make_room(int(absent.sum()))
                    slots = t.allocate(fresh[absent])
                    t.rows[slots] = fresh_rows[absent]
                    t.used[slots] = self._step

    def lookup_rows(self, table: str, keys: Keys, *, create: bool = False) -> tuple[Rows, Mask]:
        """The store's rows, after the cached updates of ``keys`` are written to it."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        t = self._tables[table]
        with self._lock:
            slots = t.slots_of(keys)
            self._sync(table, t, slots[slots >= 0])
            return self.store.lookup_rows(table, keys, create=create)

    def write_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        """Straight to the store; cached copies of ``keys`` (and their pending updates)
        are dropped."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        t = self._tables[table]
        with self._lock:
            slots = t.slots_of(keys)
            t.drop(slots[slots >= 0])
            self.store.write_rows(table, keys, rows)

    def now(self) -> int:
        return self.store.now()

    def admit(self, table: str, keys: Keys) -> None:
        with self._lock:
            self.store.admit(table, keys)

    def evict(self, table: str, keys: Keys) -> int:
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        t = self._tables[table]
        with self._lock:
            slots = t.slots_of(keys)
            t.drop(slots[slots >= 0])  # pending updates of evicted rows go with them
            return self.store.evict(table, keys)

    def expire(self, now: float | None = None) -> dict[str, int]:
        with self._lock:
            self._sync_all()
            removed = self.store.expire(now)
            if any(removed.values()):
                for t in self._tables.values():  # some cached rows may be gone
                    t.drop(np.flatnonzero(t.live))
            return removed

    def take_serving_reads(self) -> int:
        # No cache lock: promotion moves the store's own newest copy of a row (spill,
        # then cold) into its hot tier, never over a hot one; no row's value changes.
        return self.store.take_serving_reads()

    def _sync_all(self) -> None:
        for name, t in self._tables.items():
            self._sync(name, t, np.flatnonzero(t.live & (t.pending > 0)))

    def flush(
        self,
        position: Mapping[str, int] | None = None,
        *,
        rows: Mapping[str, tuple[Keys, Rows]] | None = None,
    ) -> None:
        """Every pending update goes to the store, then the store flushes. Write-back
        rows travel with the flush, so the store need not read them back."""
        with self._lock:
            for table, (keys, table_rows) in (rows or {}).items():
                self.write_rows(table, keys, table_rows)
            if self.shared:
                self._sync_all()
                self.store.flush(position)
                return
            pending: dict[str, tuple[Keys, Rows]] = {}
            synced: list[tuple[_Table, npt.NDArray[np.int64]]] = []
            for name, t in self._tables.items():
                slots = np.flatnonzero(t.live & (t.pending > 0))
                if len(slots):
                    pending[name] = (t.keys[slots], t.rows[slots])
                    synced.append((t, slots))
            self.store.flush(position, rows=pending)
            for t, slots in synced:
                self._synced(t, slots)

    def discard_unflushed(self) -> None:
        """Forget every cached row (pending updates are past the recorded position too),
        then let the store go back to its recorded position."""
        with self._lock:
            for t in self._tables.values():
                t.drop(np.flatnonzero(t.live))
            self.store.discard_unflushed()

    def position(self) -> dict[str, int] | None:
        return self.store.position()

    def put_blob(self, name: str, data: bytes) -> None:
        self.store.put_blob(name, data)

    def get_blob(self, name: str) -> bytes | None:
        return self.store.get_blob(name)

    def delete_blob(self, name: str) -> None:
        self.store.delete_blob(name)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.store.stats())
            out["cache_rows"] = sum(len(t) for t in self._tables.values())
            out["cache_pending_rows"] = sum(
                int((t.pending[t.live] > 0).sum()) for t in self._tables.values()
            )
        return out

    def close(self) -> None:
        self.store.close()
