"""``TieredStore``: the embedding store over a hot tier and an optional durable cold tier.

Reads and writes:

* ``lookup``: hot, then cold for hot misses (found rows are promoted into hot; a
  read-only store asks the writer to instead, see ``take_serving_reads``), then for
  keys still missing: with ``create=True`` (training) the table's admission policy
  (``storage.admission``) sees them, with each key's occurrences in the batch as its
  sightings; admitted keys get a new row (written to
  hot, dirty, ``found`` True), the others read as zeros with ``found`` False and nothing
  is written. With ``create=False`` (serving) missing keys read as zeros and nothing is
  admitted. Duplicate keys are fine: each distinct key is fetched once.
* ``update``: fetches like a training lookup, applies the table's sparse optimizer,
  stamps time and update count, writes hot, marks the rows dirty. A key without a row
  gets one only under the ``always`` policy (every id is admitted); under the others its
  gradient is dropped and counted (``dropped_gradients``), so an unadmitted id never
  grows the store. Rows whose gradient holds NaN/inf are left unchanged and counted.
* ``admit``: rows for the keys now, whatever the policy says (counted as ``forced``).
* ``flush``: dirty rows (read back from hot) and spilled rows (below) go to the cold tier
  with the stream position in one ``commit`` (atomic in RocksDB); without a cold tier the
  position is recorded in hot. First, a hot tier with replicas to wait for
  (``wait_for_replicas``: Redis with ``min_replicas``) has them confirm its writes, so
  a failover cannot bring back rows older than the commit. Dirty rows stay dirty if
  the commit fails. If the hot
  tier lost its contents since the writer opened it or last called
  ``discard_unflushed`` (a marker blob is gone, or dirty rows are missing), ``flush``
  raises ``HotTierLost`` and commits nothing; ``discard_unflushed`` then drops every
  update since the last flush (hot rows, spill, dirty sets) so the store reads as of its
  recorded position, and the writer replays from there.
* ``position``: cold first (durable), else hot. Blobs: written to both, read hot first.

Capacity (``eviction``, see ``storage.eviction``): the store keeps an in-process index of
the hot tier's keys with the step each was last accessed in and a count. Training
lookups, updates, ``admit`` and serving lookups (these buffered and applied by the next
writer call) all count as accesses, and so do the reads that read-only stores in other
processes report through a shared hot tier (``take_serving_reads``).
A step starts when a training lookup comes back to a table already looked up in the
current step, i.e. once per trainer batch however many tables it has. When a write
takes the hot tier over capacity, one pass evicts the least recently (``lru``) or least
often (``lfu``) accessed rows down to ``low_water`` of capacity, never rows accessed in
the last ``protect_steps`` steps and at most ``max_evict_fraction`` of capacity per step
unless the hot tier is more than ``overshoot`` above capacity (the floor against eviction
storms; capacity is soft while it binds).

* With a cold tier an evicted row is *demoted*: a clean row (identical in the cold tier
  already) is deleted from hot; a dirty one is first written whole (packed bytes,
  optimizer state and metadata included) to the table's *spill* space in the cold tier.
  The next ``flush`` moves spilled rows into the table with the position, so the cold
  tier's rows always match its recorded position (crash recovery stays exactly-once);
  spill left behind by a crash is deleted when the next writer opens the store. Lookups
  and updates read spill before the cold table and promote from it (such rows stay
  dirty). A *read-only* store (another process) does not see spill: it reads a demoted
  row's last flushed value until the trainer's next flush.
  With ``write_back="direct"`` dirty rows go straight into the cold table instead:
  flushes are cheaper (no second write), but the cold tier may run ahead of its recorded
  position, so a replay after a crash applies those rows' recent updates twice.
* Without a cold tier an evicted row is deleted (reason ``capacity``): its next training
  lookup starts it afresh.

When the writer opens the store, rows already in the hot tier (e.g. Redis) are indexed
as the oldest and dirty (with a cold tier), so the next flush makes them durable and
none is ever dropped by a demotion.

``expire(now)`` (the trainer calls it at flush time) removes from every tier the rows
whose last update is older than the table's ``ttl_s`` (reason ``ttl``) or whose
embedding norm is below ``min_l2_norm`` (``l2_norm``), judging each key by its newest
copy (hot, then spill, then cold). It scans every tier: O(rows), under the writer lock.
``evict(table, keys)`` removes keys from every tier (``manual``). A removed row goes
whole, embedding and optimizer state together, so it never comes back half reset. Both
delete from the cold tier at once, not at the next flush: a crash before that flush does
not bring the rows back (their next admitted sighting starts them afresh).

Threads (the embedded mode: one trainer thread, many HTTP reader threads): every
mutation (``update``, ``lookup(create=True)``, ``admit``, ``evict``, ``expire``,
``flush``, promotion, demotion, the index) runs under one re-entrant lock. Readers with
``create=False`` read hot without it and take it only to handle hot misses when there
is a cold tier, re-reading hot under the lock so an older cold row never overwrites a
newer hot one. Tiers replace a row's value whole, so a reader never sees a half-written
row; a demoted row is in the cold tier before it leaves hot.

``read_only=True`` is for a separate serving process: lookups never write, create or
promote (no index, no eviction); ``update``/``flush``/``put_blob``/``admit``/``evict``/
``expire`` and ``lookup(create=True)`` raise ``ReadOnlyStore``.

The store owns its tiers: ``close`` closes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from storage import metrics
from storage.admission import AdmissionPolicy, AlwaysAdmit, make_policy
from storage.base import (
    EmbeddingStore,
    Floats,
    HotTierLost,
    Keys,
    LookupResult,
    Mask,
    ReadOnlyStore,
    RowFormatError,
    RowTier,
    StoreError,
    TableConfig,
    present_mask,
)
from storage.eviction import EvictionConfig, HotIndex, choose_victims
from storage.keyfilter import KeyFilter
from storage.keyindex import (
    KeyIndex,
    Positions,
    distinct_segments,
    is_sorted_distinct,
    isin_sorted,
    unique_inverse,
)
from storage.keyindex import sorted_distinct as _unique
from storage.optim import apply_sparse
from storage.rows import RowCodec, Rows

log = logging.getLogger(__name__)

# Per table: 128 KiB to start, 10.6 MiB at 5.3M keys; the next layer (32 MiB) would pass
# this, and the table's new ids are read from RocksDB again (its own bloom filters).
COLD_FILTER_BYTES = 16 << 20

POSITION_BLOB = "streamrec.store.position"
"""Blob name under which ``flush`` records the stream position (JSON object)."""

SPILL_BLOB = "streamrec.store.spill"
"""Cold-tier blob listing the tables with spilled rows not yet flushed (JSON list)."""

HOT_MARKER_BLOB = "streamrec.store.hot-marker"
"""Prefix of the hot-tier blob a writer sets, named and valued by a random token of its
own (several writers may share the hot tier); gone means the hot tier lost its contents
(e.g. Redis restarted without persistence) and ``flush`` refuses to commit."""

HOT_READS_BLOB = "streamrec.store.hot-reads-wanted"
"""Hot-tier blob a writer with a capacity keeps fresh (the time, set at open and at
every ``take_serving_reads``): while it is, read-only stores report the rows they find
hot too, so serving's uses count for eviction; a writer gone, they stop."""
_HOT_READS_CHECK_S = 30.0  # a read-only store looks at ``HOT_READS_BLOB`` this often
_HOT_READS_FRESH_S = 120.0  # an older ``HOT_READS_BLOB``: its writer is gone

_DIRTY_COMPACT = 1 << 20  # dedupe a table's dirty key list beyond this many entries
_U32_MAX = 0xFFFFFFFF
_SCAN_BATCH = 8192
_READ_TOUCHES = 256  # serving accesses buffered for the writer; older ones are dropped
_EMPTY_KEYS: Keys = np.zeros(0, dtype=np.uint64)

_COUNTERS = (
    "hot_hits",
    "cold_hits",
    "misses",
    "created_rows",
    "admissions",
    "admission_rejections",
    "forced_admissions",
    "rejected_gradients",
    "dropped_gradients",
    "promotions",
    "demotions",
    "cold_reads_skipped",
    *(f"evictions.{reason}" for reason in metrics.EVICTION_REASONS),
    "eviction_passes",
    "eviction_floor_hits",
    "lost_dirty_rows",
)


def spill_table(table: str) -> str:
    """The cold-tier table holding ``table``'s demoted dirty rows until the next flush."""
    return "\x00spill\x00" + table


def _holds_rows(tier: RowTier, table: str) -> bool:
    chunks = tier.scan(table, 1)
    found = any(len(keys) for keys, _ in chunks)
    close = getattr(chunks, "close", None)
    if close is not None:  # a generator: its iterator is released now, not at collection
        close()
    return found


def _result(rows: Rows, found: Mask, inverse: npt.NDArray[np.intp]) -> LookupResult:
    """The lookup result of keys whose distinct keys' rows are ``rows``."""
    # The distinct rows' embeddings made contiguous first: take of whole rows from that
    # is faster than gathering the strided field.
    emb: Floats = np.take(np.ascontiguousarray(rows["emb"], dtype=np.float32), inverse, axis=0)
    return LookupResult(rows=emb, found=found[inverse])


def _past_ceiling(size: int, capacity: int, cfg: EvictionConfig) -> int:
    """How much a pass may evict beyond the per-step budget: none within the overshoot
    ceiling, else down to ``low_water`` of it."""
    ceiling = int(capacity * (1 + cfg.overshoot))
    return size - int(ceiling * cfg.low_water) if size > ceiling else 0


def _holds(index: KeyIndex | None, keys: Keys) -> Mask:
    """Which ``keys`` are in ``index`` (none without one)."""
    if index is None or not index.live:
        return np.zeros(len(keys), dtype=np.bool_)
    found: Mask = index.find(keys) >= 0
    return found


class _Touched(NamedTuple):
    """A training lookup's distinct keys, rows and index positions, so the update of the
    same keys in the same step neither reads them again nor finds them in the index."""

    keys: Keys
    loaded: _Loaded
    step: int
    epoch: int


class _Loaded(NamedTuple):
    rows: Rows
    found: Mask
    pos: Positions | None  # hot-index positions of found keys (-1 elsewhere), if indexed
    hot_misses: int
    cold_hits: int


def _fill_rows(
    codecs: Sequence[RowCodec],
    bounds: npt.NDArray[np.intp],
    keys: Keys,
    rows: Rows,
    found: Mask,
    idx: npt.NDArray[np.intp],
    values: list[bytes | None],
) -> npt.NDArray[np.intp]:
    """Fill ``rows[idx]`` from ``values`` (one per position) where present and return
    the positions still missing. Positions ``bounds[i]:bounds[i + 1]`` are table ``i``'s
    (``codecs[i]``, all of one row layout): a value of the wrong size raises
    ``RowFormatError`` naming its own table."""
    hit = present_mask(values)
    if hit.any():
        at = idx[hit]
        present = [v for v in values if v is not None]
        try:
            rows[at] = codecs[0].unpack(keys[at], present)
        except RowFormatError:
            sizes = np.fromiter(map(len, present), dtype=np.intp, count=len(present))
            bad = int(np.flatnonzero(sizes != codecs[0].nbytes)[0])
            table = int(np.searchsorted(bounds, at[bad], side="right")) - 1
            codecs[table].check_sizes(keys[at[bad : bad + 1]], sizes[bad : bad + 1])
            raise
        found[at] = True
    missing: npt.NDArray[np.intp] = idx[~hit]
    return missing


class TieredStore(EmbeddingStore):
    """Embedding rows in ``hot`` (always) and ``cold`` (durable, optional); see the module
    docstring for admission, capacity, expiry and threads."""

    def __init__(
        self,
        tables: Sequence[TableConfig],
        hot: RowTier,
        cold: RowTier | None = None,
        *,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
        eviction: EvictionConfig | None = None,
        hot_capacity_rows: int | None = None,
        admission_seed: int = 0,
        discard_hot_rows: bool = False,
        spill: RowTier | None = None,
        shared_hot: bool = False,
    ) -> None:
        """``eviction``: hot-tier capacity and policy (None: unbounded).
        ``hot_capacity_rows``: shorthand for ``eviction.max_rows`` (LRU, defaults
        otherwise). ``admission_seed`` seeds every table's admission policy (mixed with
        the table name). ``discard_hot_rows``: a restarting single writer over a shared
        hot tier drops its rows first (see ``_discard_hot_rows``). ``spill``: where demoted
        dirty rows wait for the next flush (default: the cold tier); it need not survive
        a crash, so a scratch tier is the fast choice (``MemoryTier.scratch``: mapped
        files; ``RocksDBTier.scratch``: no write-ahead log).
        ``shared_hot``: other writers use the hot tier too (scale-out), so
        ``discard_unflushed`` leaves its rows alone."""
        self._tables: dict[str, TableConfig] = {}
        for cfg in tables:
            if cfg.name in self._tables:
                raise ValueError(f"table {cfg.name!r} is configured twice")
            self._tables[cfg.name] = cfg
        self._codecs = {name: RowCodec(cfg) for name, cfg in self._tables.items()}
        self.hot = hot
        self.cold = cold
        self.spill = spill if spill is not None else cold
        self.read_only = read_only
        self._clock = clock
        self._lock = threading.RLock()
        self._dirty: dict[str, list[Keys]] = {}  # without an index (no eviction)
        self._dirty_len: dict[str, int] = {}
        # Rows created since the last flush, which the cold tier cannot hold yet (it was
        # read before each was created): the flush's commit need not check them.
        self._created_keys: dict[str, list[Keys]] = {}
        # Tables whose cold rows all have a hot copy, so a key missing from hot is new
        # and the cold read would only confirm it (most of a fresh embedded store's cold
        # reads): see ``_note_cold_within_hot``.
        self._cold_within_hot: frozenset[str] = frozenset()
        # Every key written to a cold table that was empty at open (a writer's), for the
        # tables with a capacity or a shared hot tier: a hot miss these rule out is a new
        # id, so the cold read is skipped.
        self._cold_keys: dict[str, KeyFilter] = {}
        self._tally: Tally[str] = Tally()
        self._tally_lock = threading.Lock()
        self._policies: dict[str, AdmissionPolicy] = {
            name: make_policy(cfg.admission, name, seed=admission_seed)
            for name, cfg in self._tables.items()
        }
        self._admit_all = {n: isinstance(p, AlwaysAdmit) for n, p in self._policies.items()}
        self._created = {name: metrics.ROWS_CREATED.labels(table=name) for name in self._tables}
        self._rejected = {
            name: metrics.REJECTED_GRADIENTS.labels(table=name) for name in self._tables
        }
        self._dropped = {
            name: metrics.DROPPED_GRADIENTS.labels(table=name) for name in self._tables
        }
        self._admissions = {
            (name, result): metrics.ADMISSIONS.labels(table=name, result=result)
            for name in self._tables
            for result in ("admitted", "rejected", "forced")
        }
        self._promoted = {name: metrics.PROMOTIONS.labels(table=name) for name in self._tables}
        self._demoted = {name: metrics.DEMOTIONS.labels(table=name) for name in self._tables}
        self._evicted = {
            (name, reason): metrics.EVICTIONS.labels(table=name, reason=reason)
            for name in self._tables
            for reason in metrics.EVICTION_REASONS
        }

        if hot_capacity_rows is not None:
            base = eviction.model_dump() if eviction is not None else {}
            eviction = EvictionConfig.model_validate({**base, "max_rows": hot_capacity_rows})
        self.eviction = eviction
        # Index, steps and spill exist only in a writer with a capacity.
        self._index: dict[str, HotIndex] | None = None
        self._step = 1  # bootstrapped rows are step 0, the oldest
        self._step_tables: set[str] = set()
        self._budget_step = 0
        self._budget_rows = 0
        self._budget_bytes = 0
        self._idle_step = 0  # every unprotected row is gone: no more passes this step
        self._floor_step = 0  # the floor held eviction back in this step
        self._reads: deque[tuple[str, Keys]] = deque(maxlen=_READ_TOUCHES)
        self._spilled: dict[str, KeyIndex] = {}  # keys in spill per table
        self._touched: dict[str, _Touched] = {}  # the last training lookup per table
        self.shared_hot = shared_hot
        self._hot_reads = False  # a reader: whether a writer wants its hot reads
        self._hot_reads_checked_at = -math.inf
        self._serving_reads = {
            (table, tier, side): metrics.SERVING_READS.labels(table=table, tier=tier, side=side)
            for table in self._tables
            for tier in ("cold", "hot")
            for side in ("sent", "taken")
        }
        self._marker = uuid.uuid4().hex.encode()
        if not read_only:
            with self._lock:
                if discard_hot_rows:
                    self._discard_hot_rows()
                if cold is not None:
                    self._clear_stale_spill()
                    self.hot.put_marker(self._marker_blob, self._marker)
                if eviction is not None:
                    self._index = {name: HotIndex() for name in self._tables}
                    self._bootstrap_index()
                    self._want_hot_reads()
                self._note_cold_within_hot()
                if cold is not None:
                    # Tables within hot need no filter (no cold read at all), and keep
                    # none if they leave it: one started late would lack earlier keys.
                    self._cold_keys = {
                        name: KeyFilter(max_bytes=COLD_FILTER_BYTES)
                        for name in self._tables
                        if name not in self._cold_within_hot and not _holds_rows(cold, name)
                    }

    # -- helpers ------------------------------------------------------------------------

    def _note_cold_within_hot(self) -> None:
        """Lock held (at open, and once hot rows were dropped): the tables whose cold
        rows all have a hot copy from now on. That holds for a cold table empty now under
        a hot tier that only this store changes (``RowTier.private``) and that no row
        leaves (no capacity): flushes copy hot rows, expiry and ``evict`` remove from
        both tiers."""
        cold = self.cold
        self._cold_within_hot = frozenset()
        if cold is None or self.eviction is not None or self.shared_hot or not self.hot.private:
            return
        self._cold_within_hot = frozenset(
            name for name in self._tables if not _holds_rows(cold, name)
        )

    def import_cold(self, table: str, keys: Keys, values: list[bytes]) -> None:
        """Write packed rows straight to the cold tier (a snapshot's restore)."""
        if self.cold is None:
            raise ValueError("the store has no cold tier to import into")
        with self._lock:
            self._cold_within_hot -= {table}
            self._note_cold_writes(table, keys)
            self.cold.put_many(table, keys, values)

    def _note_cold_writes(self, table: str, keys: Keys) -> None:
        """Lock held: ``keys`` are about to be written to ``table``'s cold rows."""
        written = self._cold_keys.get(table)
        if written is not None and not written.add(keys):
            del self._cold_keys[table]
            log.info(
                "table %r: over %d keys written to the cold tier since open; its hot misses "
                "are read from the cold tier again",
                table,
                len(written),
            )

    @property
    def _marker_blob(self) -> str:
        return f"{HOT_MARKER_BLOB}/{self._marker.decode()}"

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

    def _count_named(self, name: str, delta: int) -> None:
        with self._tally_lock:
            self._tally[name] += delta

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStore(f"{what} through a read-only store")

    def _discard_hot_rows(self) -> None:
        """A shared hot tier (Redis) outlives a crashed writer and may hold rows updated
        after the position the cold tier recorded; replaying from that position would
        apply those updates twice. A restarting writer drops them, and rows come back
        from the cold tier exactly as of the recorded position."""
        for table in self._tables:
            self.hot.clear(table)

    def _clear_stale_spill(self) -> None:
        """Spill left by a writer that died before flushing is ahead of the recorded
        position: drop it."""
        assert self.spill is not None
        raw = self.spill.get_blob(SPILL_BLOB)
        if raw is None:
            return
        for table in json.loads(raw):
            self.spill.clear(spill_table(str(table)))
        self.spill.delete_blob(SPILL_BLOB)

    def _bootstrap_index(self) -> None:
        assert self._index is not None
        for table, index in self._index.items():
            if self.hot.count(table) == 0:
                continue  # skip the scan (for Redis, one HSCAN per bucket)
            for keys, _ in self.hot.scan(table, _SCAN_BATCH):
                pos = index.touch(_unique(keys), 0)
                if self.cold is not None:
                    index.dirty[pos] = True  # unknown to the cold tier: flush them

    def _advance(self, table: str) -> None:
        """A training lookup: a new step when ``table`` was already looked up in this one."""
        if table in self._step_tables:
            self._step += 1
            self._step_tables = {table}
        else:
            self._step_tables.add(table)

    def _drain_reads(self) -> None:
        """Apply buffered serving hits to the index (keys evicted since are ignored)."""
        if self._index is None:
            return
        while self._reads:
            table, keys = self._reads.popleft()
            self._index[table].touch(keys, self._step, add=False)

    def _mark_dirty(self, table: str, keys: Keys) -> None:
        """Without an index: remember ``keys`` for the next flush."""
        if self.cold is None or len(keys) == 0:
            return  # nothing to flush rows to
        parts = self._dirty.setdefault(table, [])
        parts.append(keys.copy())
        size = self._dirty_len.get(table, 0) + len(keys)
        # Dedupe when the list doubles past its last deduped size: amortised O(1) per key.
        if size > max(_DIRTY_COMPACT, 2 * len(parts[0])) and len(parts) > 1:
            merged = _unique(np.concatenate(parts))
            parts[:] = [merged]
            size = len(merged)
        self._dirty_len[table] = size

    def _from_hot(self, codec: RowCodec, keys: Keys) -> tuple[Rows, Mask, npt.NDArray[np.intp]]:
        """Rows of ``keys`` from hot (zeros where absent), which were found, and the
        positions still missing."""
        rows, found = self.hot.get_rows(codec.table, keys, codec)
        missing: npt.NDArray[np.intp] = np.flatnonzero(~found)
        return rows, found, missing

    def _from_cold(
        self, codec: RowCodec, keys: Keys, rows: Rows, found: Mask, idx: npt.NDArray[np.intp]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Fill ``rows[idx]`` from the cold tier where present, spill first; return the
        positions still missing, those found in spill (to stay dirty once promoted) and
        those found in the cold table. Writes nothing: see ``_promote``."""
        assert self.cold is not None and self.spill is not None
        table = codec.table
        from_spill = idx[:0]
        spilled = self._spilled.get(table)
        if spilled is not None and spilled.live and len(idx):
            in_spill = spilled.find(keys[idx]) >= 0
            if in_spill.any():
                at = idx[in_spill]
                got, hit = self.spill.get_rows(spill_table(table), keys[at], codec)
                from_spill = at[hit]
                rows[from_spill] = got[hit]
                found[from_spill] = True
                idx = np.concatenate([idx[~in_spill], at[~hit]])
        if table in self._cold_within_hot:
            return idx, from_spill, idx[:0]
        new_ids = idx[:0]
        written = self._cold_keys.get(table)
        if written is not None and len(idx):
            maybe = written.may_contain(keys[idx])
            new_ids, idx = idx[~maybe], idx[maybe]
            metrics.COLD_READS_SKIPPED.inc(len(new_ids))
            self._count(cold_reads_skipped=len(new_ids))
        got, hit = self.cold.get_rows(table, keys[idx], codec)
        from_cold = idx[hit]
        rows[from_cold] = got[hit]
        found[from_cold] = True
        missing: npt.NDArray[np.intp] = idx[~hit]
        if len(new_ids):
            missing = np.concatenate([missing, new_ids])
        return missing, from_spill, from_cold

    def _promote(
        self, codec: RowCodec, keys: Keys, rows: Rows, at: npt.NDArray[np.intp], promoted: int
    ) -> None:
        """Lock held: write ``rows[at]`` to hot in one call (``promoted`` of them come
        from the cold tier: counted)."""
        if len(at):
            self.hot.put_rows(codec.table, keys[at], rows[at])
        if promoted:
            self._promoted[codec.table].inc(promoted)
            self._count(promotions=promoted)

    def _load(
        self,
        codec: RowCodec,
        keys: Keys,
        *,
        admit: Literal["never", "policy", "force"],
        counts: npt.NDArray[np.intp] | None = None,
        hot: tuple[Rows, Mask] | None = None,
    ) -> _Loaded:
        """Writer path, lock held: rows of distinct ``keys`` from hot (read now, or
        ``hot`` as already read), then cold (promoted), then new rows for the missing
        keys ``admit`` lets in (``counts``: sightings per key for the policy). Records the
        access in the index."""
        table = codec.table
        n = len(keys)
        if hot is None:
            rows, found, missing = self._from_hot(codec, keys)
        else:
            rows, found = hot
            missing = np.flatnonzero(~found)
        hot_misses = len(missing)
        dirty_idx: list[npt.NDArray[np.intp]] = []
        to_hot: list[npt.NDArray[np.intp]] = []  # promoted and created: one write
        if hot_misses and self.cold is not None:
            missing, from_spill, from_cold = self._from_cold(codec, keys, rows, found, missing)
            dirty_idx.append(from_spill)
            to_hot += [from_spill, from_cold]
        cold_hits = hot_misses - len(missing)
        if len(missing) and admit != "never":
            if admit == "force" or self._admit_all[table]:
                take = missing
                result = "forced" if admit == "force" else "admitted"
            else:
                sightings = counts[missing] if counts is not None else None
                ok = self._policies[table].admit(keys[missing], sightings)
                take = missing[ok]
                result = "admitted"
                rejected = len(missing) - len(take)
                if rejected:
                    self._admissions[table, "rejected"].inc(rejected)
                    self._count(admission_rejections=rejected)
            if len(take):
                rows[take] = codec.new_rows(keys[take], self._now())
                found[take] = True
                if self.cold is not None:
                    self._created_keys.setdefault(table, []).append(keys[take])
                to_hot.append(take)
                dirty_idx.append(take)
                self._created[table].inc(len(take))
                self._admissions[table, result].inc(len(take))
                self._count_named(
                    "forced_admissions" if admit == "force" else "admissions", len(take)
                )
                self._count(created_rows=len(take))
        if to_hot:
            self._promote(codec, keys, rows, np.concatenate(to_hot), cold_hits)
        pos: Positions | None = None
        if self._index is not None:
            index = self._index[table]
            pos = np.full(n, -1, dtype=np.int64)
            at = np.flatnonzero(found)
            if len(at):
                pos[at] = index.touch(keys[at], self._step)
            for d in dirty_idx:
                if self.cold is not None and len(d):
                    index.dirty[pos[d]] = True
        else:
            for d in dirty_idx:
                self._mark_dirty(table, keys[d])
        return _Loaded(rows, found, pos, hot_misses, cold_hits)

    def _known(self, table: str, keys: Keys) -> _Loaded | None:
        """What this step's training lookup of ``table`` loaded, if ``keys`` are exactly
        its distinct keys and none has moved since: capacity eviction never takes rows of
        the current step, and ``evict``, ``expire`` and ``admit`` forget the lookup. Only
        this writer changes rows of the current step, so the rows are still current."""
        touched = self._touched.pop(table, None)
        if (
            touched is None
            or touched.step != self._step
            or (self._index is not None and touched.epoch != self._index[table].epoch)
            or len(touched.keys) != len(keys)
            or not np.array_equal(touched.keys, keys)
        ):
            return None
        return touched.loaded

    def _record(self, n: int, hot_misses: int, cold_hits: int, misses: int) -> None:
        metrics.HOT_HIT.inc(n - hot_misses)
        metrics.HOT_MISS.inc(hot_misses)
        if hot_misses and self.cold is not None:
            metrics.COLD_HIT.inc(cold_hits)
            metrics.COLD_MISS.inc(misses)
        self._count(hot_hits=n - hot_misses, cold_hits=cold_hits, misses=misses)

    def _read(self, codec: RowCodec, keys: Keys) -> tuple[Rows, Mask]:
        """Serving path: rows of distinct ``keys``; creates nothing."""
        n = len(keys)
        rows, found, missing = self._from_hot(codec, keys)
        hot_misses = len(missing)
        if self.read_only:
            hot = {codec.table: keys[found]} if self._wants_hot_reads() else {}
            cold: dict[str, Keys] = {}
            if hot_misses and self.cold is not None:
                missing, _, from_cold = self._from_cold(codec, keys, rows, found, missing)
                cold[codec.table] = keys[from_cold]
            self._report_reads(cold, hot)
        elif hot_misses and self.cold is not None:
            with self._lock:
                hot_misses, _ = self._load_missing(codec, keys, rows, found, missing)
                missing = np.flatnonzero(~found)
        elif self._index is not None and n:
            self._reads.append((codec.table, keys))  # recency from serving, applied later
        self._record(n, hot_misses, hot_misses - len(missing), len(missing))
        return rows, found

    def _load_missing(
        self, codec: RowCodec, keys: Keys, rows: Rows, found: Mask, missing: Positions
    ) -> tuple[int, int]:
        """Lock held, a writer's read: ``keys[missing]`` (hot misses) from hot again,
        then spill and cold, promoted into hot; every row found counts as accessed.
        Returns the hot misses left after the second look and the rows promoted."""
        # Re-read hot under the lock: the writer may have stored the row since, and
        # promoting the older cold value would overwrite it.
        again, hit = self.hot.get_rows(codec.table, keys[missing], codec)
        rows[missing[hit]] = again[hit]
        found[missing[hit]] = True
        missing = missing[~hit]
        _, from_spill, from_cold = self._from_cold(codec, keys, rows, found, missing)
        fetched = np.concatenate([from_spill, from_cold])
        self._promote(codec, keys, rows, fetched, len(fetched))
        if self._index is not None:  # else there is no spill either
            have = np.flatnonzero(found)
            index = self._index[codec.table]
            pos = index.touch(keys[have], self._step)
            if len(from_spill):
                index.dirty[pos[np.isin(have, from_spill)]] = True
            self._maybe_evict()
        return len(missing), len(fetched)

    # -- capacity -----------------------------------------------------------------------

    def _hot_size(self) -> tuple[int, int]:
        """Rows and packed bytes in the hot tier, from the index."""
        assert self._index is not None
        rows = nbytes = 0
        for table, index in self._index.items():
            rows += index.live
            nbytes += index.live * self._codecs[table].nbytes
        return rows, nbytes

    def _maybe_evict(self) -> None:
        """Lock held: one eviction pass if the hot tier is over capacity (see
        ``storage.eviction`` for the choice and the floor)."""
        if self._index is None or self.eviction is None or self._idle_step == self._step:
            return
        cfg = self.eviction
        rows, nbytes = self._hot_size()
        over_rows = cfg.max_rows is not None and rows > cfg.max_rows
        over_bytes = cfg.max_bytes is not None and nbytes > cfg.max_bytes
        if not (over_rows or over_bytes):
            return
        start = time.perf_counter()
        if self._budget_step != self._step:
            self._budget_step = self._step
            self._budget_rows = self._budget_bytes = 0
        # The per-step budget, lifted past the overshoot ceiling: down to low_water of
        # the ceiling, so a sustained overload costs one pass per few batches, not a
        # pass per lookup that crosses the ceiling again.
        budget_rows = budget_bytes = None
        if cfg.max_rows is not None:
            budget_rows = max(
                int(cfg.max_rows * cfg.max_evict_fraction) - self._budget_rows,
                _past_ceiling(rows, cfg.max_rows, cfg),
            )
        if cfg.max_bytes is not None:
            budget_bytes = max(
                int(cfg.max_bytes * cfg.max_evict_fraction) - self._budget_bytes,
                _past_ceiling(nbytes, cfg.max_bytes, cfg),
            )
        names = list(self._index)
        indexes = [self._index[t] for t in names]
        victims = choose_victims(
            indexes,
            [self._codecs[t].nbytes for t in names],
            cfg,
            self._step,
            budget_rows=budget_rows,
            budget_bytes=budget_bytes,
        )
        for t, pos in victims.positions.items():
            self._demote(names[t], indexes[t], pos)
        self._budget_rows += victims.rows
        self._budget_bytes += victims.nbytes
        if victims.rows:
            self._count(eviction_passes=1)
            if cfg.policy == "lfu":
                for index in indexes:
                    index.age()
        if victims.short_by == "protected":
            self._idle_step = self._step  # nothing else can become evictable this step
        if victims.short_by is not None and self._floor_step != self._step:
            self._floor_step = self._step
            self._count(eviction_floor_hits=1)
        metrics.DEMOTE_SECONDS.observe(time.perf_counter() - start)

    def _demote(self, table: str, index: HotIndex, pos: Positions) -> None:
        """Lock held: move the rows at ``pos`` of ``table``'s index out of hot; dirty
        ones are written to the cold tier first (spill or table, per ``write_back``)."""
        keys = index.keys[pos]
        if self.cold is not None:
            moving = keys[index.dirty[pos]]
            if len(moving):
                rows, kept = self.hot.get_rows(table, moving, self._codecs[table])
                if not kept.all():
                    moving, rows = moving[kept], rows[kept]
                assert self.eviction is not None
                if self.eviction.write_back == "direct":
                    self._note_cold_writes(table, moving)
                    self.cold.put_rows(table, moving, rows)
                elif len(moving):
                    assert self.spill is not None
                    self._note_spill(table)
                    self.spill.put_rows(spill_table(table), moving, rows)
                    self._spilled[table].add(moving)
            self._demoted[table].inc(len(keys))
            self._count(demotions=len(keys))
        self.hot.delete_many(table, keys)
        index.discard_at(pos)
        self._evicted[table, "capacity"].inc(len(keys))
        self._count_named("evictions.capacity", len(keys))

    def _note_spill(self, table: str) -> None:
        """Record in the cold tier that ``table`` has spill, before writing any."""
        assert self.spill is not None
        if table not in self._spilled:
            self._spilled[table] = KeyIndex()
            self.spill.put_blob(SPILL_BLOB, json.dumps(sorted(self._spilled)).encode())

    def _remove(self, table: str, keys: Keys) -> None:
        """Lock held: delete distinct ``keys`` from every tier and all bookkeeping."""
        if len(keys) == 0:
            return
        self._touched.pop(table, None)
        self.hot.delete_many(table, keys)
        if self.cold is not None:
            self.cold.delete_many(table, keys)
            spilled = self._spilled.get(table)
            if spilled is not None and spilled.live:
                pos = spilled.find(keys)
                gone = pos >= 0
                if gone.any():
                    assert self.spill is not None
                    self.spill.delete_many(spill_table(table), keys[gone])
                    spilled.discard_at(pos[gone])
        if self._index is not None:
            self._index[table].discard(keys)
        elif self._dirty.get(table):
            merged = _unique(np.concatenate(self._dirty[table]))
            merged = merged[~isin_sorted(merged, _unique(keys))]
            self._dirty[table] = [merged]
            self._dirty_len[table] = len(merged)

    # -- EmbeddingStore -----------------------------------------------------------------

    def tables(self) -> Mapping[str, TableConfig]:
        return dict(self._tables)

    def lookup(self, table: str, keys: Keys, *, create: bool = False) -> LookupResult:
        """See ``EmbeddingStore.lookup`` and the module docstring; with ``create=True``
        created rows are ``found``, unadmitted keys are not."""
        start = time.perf_counter()
        codec = self._codec(table)
        unique, inverse, counts = self._distinct(table, keys, create)
        rows, found = self._rows(codec, unique, create, counts)
        result = _result(rows, found, inverse)
        metrics.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return result

    def _distinct(
        self, table: str, keys: Keys, create: bool
    ) -> tuple[Keys, npt.NDArray[np.intp], npt.NDArray[np.intp] | None]:
        """``keys``' distinct keys, the inverse, and (for admission by a policy) how often
        each was seen."""
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        unique, inverse = unique_inverse(keys)
        counts = None
        if create and not self._admit_all[table]:
            counts = np.bincount(inverse, minlength=len(unique))
        return unique, inverse, counts

    def lookup_rows(self, table: str, keys: Keys, *, create: bool = False) -> tuple[Rows, Mask]:
        """See ``EmbeddingStore.lookup_rows``: ``lookup`` of distinct keys, whole rows."""
        start = time.perf_counter()
        codec = self._codec(table)
        rows, found = self._rows(codec, self._check_distinct(table, keys), create, None)
        metrics.LOOKUP_SECONDS.observe(time.perf_counter() - start)
        return rows, found

    def _check_distinct(self, table: str, keys: Keys) -> Keys:
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        if not is_sorted_distinct(keys) and len(_unique(keys)) != len(keys):
            raise ValueError(f"table {table!r}: lookup_rows keys must be unique")
        return keys

    def _rows(
        self,
        codec: RowCodec,
        keys: Keys,
        create: bool,
        counts: npt.NDArray[np.intp] | None,
    ) -> tuple[Rows, Mask]:
        """Rows of distinct ``keys``; ``counts``: sightings per key for admission."""
        if not create:
            return self._read(codec, keys)
        return self._load_tables({codec.table: (keys, counts)})[codec.table]

    def _load_tables(
        self, wanted: Mapping[str, tuple[Keys, npt.NDArray[np.intp] | None]]
    ) -> dict[str, tuple[Rows, Mask]]:
        """Writer lookup (``create=True``) of the distinct keys of each table (with
        sightings per key, for the admission policy), under one hold of the lock. The
        hot tier reads each table while the one before is loaded (``get_rows_ahead``),
        so the eviction pass waits for the last table: one in between could demote rows
        of a later table that were already read."""
        self._check_writable("lookup(create=True)")
        loaded: dict[str, _Loaded] = {}
        with self._lock:
            for table in wanted:
                self._advance(table)
            self._drain_reads()
            requests = [(table, keys, self._codecs[table]) for table, (keys, _) in wanted.items()]
            with contextlib.closing(self.hot.get_rows_ahead(requests)) as from_hot:
                for (table, (keys, counts)), hot in zip(wanted.items(), from_hot, strict=True):
                    got = self._load(
                        self._codecs[table], keys, admit="policy", counts=counts, hot=hot
                    )
                    epoch = self._index[table].epoch if self._index is not None else 0
                    self._touched[table] = _Touched(keys, got, self._step, epoch)
                    loaded[table] = got
            self._maybe_evict()
        for table, got in loaded.items():
            self._record(
                len(wanted[table][0]), got.hot_misses, got.cold_hits, got.hot_misses - got.cold_hits
            )
        return {table: (got.rows, got.found) for table, got in loaded.items()}

    def write_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        """See ``EmbeddingStore.write_rows``: the rows go to hot, dirty (the next flush
        writes them to cold) and most recently used."""
        start = time.perf_counter()
        self._check_writable("write_rows")
        keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        self._check_rows(table, keys, rows)
        with self._lock:
            self._write_rows(table, keys, rows)
        metrics.UPDATE_SECONDS.observe(time.perf_counter() - start)

    def _check_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        codec = self._codec(table)
        if rows.dtype != codec.dtype or len(rows) != len(keys):
            raise ValueError(
                f"table {table!r}: write_rows needs {len(keys)} rows of {codec.nbytes} bytes "
                f"(dim {codec.dim}, optimizer {codec.cfg.optimizer}), got {len(rows)} of "
                f"{rows.dtype.itemsize}"
            )

    def _write_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        """Lock held: ``write_rows``."""
        if len(keys) == 0:
            return
        self._drain_reads()
        self._touched.pop(table, None)  # its rows are older than these
        self.hot.put_rows(table, keys, rows)
        if self._index is None:
            self._mark_dirty(table, keys)
        else:
            pos = self._index[table].touch(keys, self._step)
            if self.cold is not None:
                self._index[table].dirty[pos] = True
        self._maybe_evict()

    def now(self) -> int:
        return self._now()

    def lookup_tables(
        self, keys: Mapping[str, Keys], *, create: bool = False
    ) -> dict[str, LookupResult]:
        """A writer's training lookup (``create``) loads the tables under one hold of
        the lock, reading each from hot while the one before is loaded. A read-only
        store (a serving process) reads every table's keys with one hot-tier read and
        one cold-tier read for all the hot misses; a writer's plain reads go table by
        table (``lookup``: its hot misses take the lock and promote)."""
        start = time.perf_counter()
        if create:
            return self._lookup_created(keys, start)
        if not self.read_only:
            return super().lookup_tables(keys)
        layouts: dict[np.dtype[np.void], list[str]] = {}
        for table in keys:
            codec = self._codec(table)  # unknown table: KeyError before any read
            layouts.setdefault(codec.dtype, []).append(table)
        # Every table's distinct keys in one compiled pass (per-table calls cost more
        # than a serving read's few dozen keys a table).
        parts = [np.asarray(k, dtype=np.uint64).reshape(-1) for k in keys.values()]
        bounds = np.zeros(len(parts) + 1, dtype=np.intp)
        np.cumsum([len(k) for k in parts], out=bounds[1:])
        flat, starts, inverse = distinct_segments(
            np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64), bounds
        )
        wanted: dict[str, tuple[Keys, npt.NDArray[np.intp] | None]] = {
            table: (
                flat[starts[i] : starts[i + 1]],
                None if inverse is None else inverse[bounds[i] : bounds[i + 1]] - starts[i],
            )
            for i, table in enumerate(keys)
        }
        hot = self.hot.get_tables({t: u for t, (u, _) in wanted.items()})
        out: dict[str, LookupResult] = {}
        for tables in layouts.values():
            out.update(self._read_tables(tables, wanted, hot))
        metrics.LOOKUP_TABLES_SECONDS.observe(time.perf_counter() - start)
        return {table: out[table] for table in keys}

    def _lookup_created(self, keys: Mapping[str, Keys], start: float) -> dict[str, LookupResult]:
        wanted, inverses = {}, {}
        for table, table_keys in keys.items():
            self._codec(table)  # unknown table: KeyError before any read
            unique, inverses[table], counts = self._distinct(table, table_keys, True)
            wanted[table] = (unique, counts)
        loaded = self._load_tables(wanted)
        out = {table: _result(*loaded[table], inverses[table]) for table in keys}
        metrics.LOOKUP_TABLES_SECONDS.observe(time.perf_counter() - start)
        return out

    def _read_tables(
        self,
        tables: list[str],
        wanted: Mapping[str, tuple[Keys, npt.NDArray[np.intp] | None]],
        hot: Mapping[str, list[bytes | None]],
    ) -> dict[str, LookupResult]:
        """``lookup_tables`` of tables whose rows share one layout, as one array (a
        serving read has a few dozen tables of a few dozen keys each: per-table numpy
        calls would cost more than the reads)."""
        codecs = [self._codecs[t] for t in tables]
        keys = np.concatenate([wanted[t][0] for t in tables])
        bounds = np.cumsum([0, *(len(wanted[t][0]) for t in tables)])
        rows = codecs[0].zeros(len(keys))
        found = np.zeros(len(keys), dtype=np.bool_)
        values = list(chain.from_iterable(hot[t] for t in tables))
        idx = np.arange(len(keys), dtype=np.intp)
        missing = _fill_rows(codecs, bounds, keys, rows, found, idx, values)
        hot_misses = len(missing)
        hot_hits = np.flatnonzero(found) if self._wants_hot_reads() else None
        from_cold = missing[:0]
        if hot_misses and self.cold is not None:
            cuts = np.searchsorted(missing, bounds)
            cold = self.cold.get_tables(
                {t: keys[missing[cuts[i] : cuts[i + 1]]] for i, t in enumerate(tables)}
            )
            values = list(chain.from_iterable(cold[t] for t in tables))
            before = missing
            missing = _fill_rows(codecs, bounds, keys, rows, found, missing, values)
            from_cold = before[found[before]]

        def by_table(at: Positions) -> dict[str, Keys]:
            cuts = np.searchsorted(at, bounds)
            return {t: keys[at[cuts[i] : cuts[i + 1]]] for i, t in enumerate(tables)}

        if len(from_cold) or hot_hits is not None:
            self._report_reads(by_table(from_cold), {} if hot_hits is None else by_table(hot_hits))
        self._record(len(keys), hot_misses, hot_misses - len(missing), len(missing))
        emb = np.ascontiguousarray(rows["emb"], dtype=np.float32)
        out: dict[str, LookupResult] = {}
        for table, a, b in zip(tables, bounds, bounds[1:], strict=False):
            table_emb, table_found = emb[a:b], found[a:b]
            inverse = wanted[table][1]
            if inverse is not None:
                table_emb, table_found = table_emb[inverse], table_found[inverse]
            out[table] = LookupResult(table_emb, table_found)
        return out

    def lookup_rows_tables(
        self, keys: Mapping[str, Keys], *, create: bool = False
    ) -> dict[str, tuple[Rows, Mask]]:
        """With ``create``: as ``lookup_tables`` (one hold of the lock, each table read
        while the one before loads)."""
        if not create:
            return super().lookup_rows_tables(keys)
        start = time.perf_counter()
        wanted = {}
        for table, table_keys in keys.items():
            self._codec(table)  # unknown table: KeyError before any read
            wanted[table] = (self._check_distinct(table, table_keys), None)
        out = self._load_tables(wanted)
        metrics.LOOKUP_TABLES_SECONDS.observe(time.perf_counter() - start)
        return out

    def _want_hot_reads(self) -> None:
        """A writer with a capacity over a shared hot tier: ask readers for the rows
        they find hot (refreshes ``HOT_READS_BLOB``)."""
        if self._index is not None and not self.hot.private:
            self.hot.put_blob(HOT_READS_BLOB, repr(time.time()).encode())

    def _wants_hot_reads(self) -> bool:
        """A read-only store: whether a writer with a capacity asks for the rows it
        finds hot (a fresh ``HOT_READS_BLOB``, looked at every ``_HOT_READS_CHECK_S``)."""
        now = time.monotonic()
        if now >= self._hot_reads_checked_at + _HOT_READS_CHECK_S:
            self._hot_reads_checked_at = now
            asked = self.hot.get_blob(HOT_READS_BLOB)
            try:
                self._hot_reads = time.time() - float(asked or 0) < _HOT_READS_FRESH_S
            except ValueError:  # not a time: not ours to read
                self._hot_reads = False
        return self._hot_reads

    def _report_reads(self, cold: Mapping[str, Keys], hot: Mapping[str, Keys]) -> None:
        """A read-only store tells the writer what it read (``take_serving_reads``): the
        rows it found only in the cold tier, to promote, and (when ``_wants_hot_reads``)
        the rows it found hot, as uses."""
        reports = {
            "cold": {t: k for t, k in cold.items() if len(k)},
            "hot": {t: k for t, k in hot.items() if len(k)},
        }
        if reports["cold"] or reports["hot"]:
            self.hot.report_reads(reports["cold"], reports["hot"])
            for tier, keys in reports.items():
                for table, k in keys.items():
                    self._serving_reads[table, tier, "sent"].inc(len(k))

    def take_serving_reads(self, max_reports: int = 10_000) -> int:
        """See ``EmbeddingStore.take_serving_reads``: takes up to ``max_reports`` of the
        readers' reports off the hot tier; promotes the rows they found only in cold
        from spill or cold as a writer's own read would (under the lock, never over a
        row in hot), and counts every reported row in hot as used in this step."""
        self._check_writable("take_serving_reads")
        self._want_hot_reads()
        cold, hot = self.hot.take_read_reports(max_reports)
        promoted = 0
        for table, keys in cold.items():
            codec = self._codecs.get(table)
            if codec is None:  # another model's table under the same prefix
                continue
            self._serving_reads[table, "cold", "taken"].inc(len(keys))
            if self.cold is None:
                continue
            rows, found, missing = self._from_hot(codec, keys)
            if len(missing):
                with self._lock:
                    promoted += self._load_missing(codec, keys, rows, found, missing)[1]
        if self._index is not None and hot:
            with self._lock:
                for table, keys in hot.items():
                    if table in self._index:
                        self._serving_reads[table, "hot", "taken"].inc(len(keys))
                        self._index[table].touch(keys, self._step, add=False)
        return promoted

    def prefetch(self, table: str, keys: Keys) -> None:
        """A writer with a capacity promotes the demoted rows of ``keys`` (spill or cold)
        into hot ahead of their training lookup; creates nothing and counts no sighting.
        Without a capacity every row stays hot, so there is nothing to fetch."""
        codec = self._codec(table)
        if self.read_only or self.cold is None or self._index is None:
            return
        start = time.perf_counter()
        keys = _unique(np.asarray(keys, dtype=np.uint64).reshape(-1))
        with self._lock:
            index = self._index[table]
            absent = keys[index.find(keys) < 0]
            if len(absent) == 0:
                return
            rows, found = codec.zeros(len(absent)), np.zeros(len(absent), dtype=np.bool_)
            idx = np.arange(len(absent), dtype=np.intp)
            _, from_spill, from_cold = self._from_cold(codec, absent, rows, found, idx)
            fetched = np.concatenate([from_spill, from_cold])
            self._promote(codec, absent, rows, fetched, len(fetched))
            have = np.flatnonzero(found)
            pos = index.touch(absent[have], self._step)
            if len(from_spill):
                index.dirty[pos[np.isin(have, from_spill)]] = True
            self._maybe_evict()
        metrics.PREFETCH_SECONDS.observe(time.perf_counter() - start)

    def update(self, table: str, keys: Keys, grads: Floats) -> Floats:
        """See ``EmbeddingStore.update`` and the module docstring (which keys get rows)."""
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
            return codec.zeros(0)["emb"]
        with self._lock:
            loaded = self._known(table, keys)  # its keys are distinct: no check needed
            if loaded is None and len(_unique(keys)) != len(keys):
                raise ValueError(f"table {table!r}: update keys must be unique")
            self._drain_reads()
            if loaded is None:
                admit: Literal["policy", "never"] = "policy" if self._admit_all[table] else "never"
                loaded = self._load(codec, keys, admit=admit)
            rows, found = loaded.rows, loaded.found
            have = np.flatnonzero(found)
            if len(have) == len(keys):
                ok = apply_sparse(codec.cfg, rows["emb"], rows["state"], grads)
                applied = np.flatnonzero(ok)
            elif len(have):
                sub = rows[have]
                ok = apply_sparse(codec.cfg, sub["emb"], sub["state"], grads[have])
                rows[have] = sub
                applied = have[ok]
            else:
                ok, applied = np.zeros(0, dtype=np.bool_), have
            rejected = len(ok) - len(applied)
            if len(applied):
                RowCodec.touch(rows, applied, self._now())
                if len(applied) == len(keys):
                    self.hot.put_rows(table, keys, rows)
                else:
                    self.hot.put_rows(table, keys[applied], rows[applied])
                if self._index is None:
                    self._mark_dirty(table, keys[applied])
                elif self.cold is not None and loaded.pos is not None:
                    self._index[table].dirty[loaded.pos[applied]] = True
            self._maybe_evict()
        dropped = len(keys) - len(have)
        if dropped:
            self._dropped[table].inc(dropped)
            self._count(dropped_gradients=dropped)
        if rejected:
            self._rejected[table].inc(rejected)
            self._count(rejected_gradients=rejected)
        metrics.UPDATE_SECONDS.observe(time.perf_counter() - start)
        emb: Floats = np.ascontiguousarray(rows["emb"], dtype=np.float32)
        return emb

    def admit(self, table: str, keys: Keys) -> None:
        """Rows for ``keys`` now, whatever the policy (``forced`` admissions)."""
        start = time.perf_counter()
        self._check_writable("admit")
        codec = self._codec(table)
        unique = _unique(np.asarray(keys, dtype=np.uint64).reshape(-1))
        with self._lock:
            self._drain_reads()
            self._touched.pop(table, None)
            self._load(codec, unique, admit="force")
            self._maybe_evict()
        metrics.ADMIT_SECONDS.observe(time.perf_counter() - start)

    def evict(self, table: str, keys: Keys) -> int:
        """Remove ``keys`` from every tier (hot, spill, cold) and from the dirty set, so no
        later flush writes them back; returns how many had a row."""
        start = time.perf_counter()
        self._check_writable("evict")
        self._codec(table)
        unique = _unique(np.asarray(keys, dtype=np.uint64).reshape(-1))
        with self._lock:
            present = present_mask(self.hot.get_many(table, unique))
            if self.cold is not None:
                present |= present_mask(self.cold.get_many(table, unique))
                present |= _holds(self._spilled.get(table), unique)
            self._remove(table, unique)
        existed = int(present.sum())
        if existed:
            self._evicted[table, "manual"].inc(existed)
            self._count_named("evictions.manual", existed)
        metrics.EVICT_SECONDS.observe(time.perf_counter() - start)
        return existed

    def expire(self, now: float | None = None) -> dict[str, int]:
        """Remove rows past their table's ``ttl_s`` or below its ``min_l2_norm`` from every
        tier (see the module docstring); ``now`` defaults to the store's clock. Returns
        how many were removed, by reason (``ttl``, ``l2_norm``)."""
        start = time.perf_counter()
        self._check_writable("expire")
        at = float(self._clock() if now is None else now)
        out = {"ttl": 0, "l2_norm": 0}
        with self._lock:
            for table, cfg in self._tables.items():
                if cfg.ttl_s is None and cfg.min_l2_norm is None:
                    continue
                for reason, n in self._expire_table(self._codecs[table], at).items():
                    out[reason] += n
                    if n:
                        self._evicted[table, reason].inc(n)
                        self._count_named(f"evictions.{reason}", n)
        metrics.EXPIRE_SECONDS.observe(time.perf_counter() - start)
        return out

    def _expired(
        self, codec: RowCodec, keys: Keys, values: list[bytes], at: float
    ) -> npt.NDArray[np.int8]:
        """Per row: 0 keep, 1 expired by ttl, 2 by l2 norm (ttl wins when both)."""
        rows = codec.unpack(keys, values)
        why = np.zeros(len(keys), dtype=np.int8)
        if codec.cfg.min_l2_norm is not None:
            emb = rows["emb"].astype(np.float64)
            why[np.sqrt(np.einsum("ij,ij->i", emb, emb)) < codec.cfg.min_l2_norm] = 2
        if codec.cfg.ttl_s is not None:
            why[rows["updated_at"].astype(np.float64) + codec.cfg.ttl_s < at] = 1
        return why

    def _expire_table(self, codec: RowCodec, at: float) -> dict[str, int]:
        """Lock held: expire one table. Each key is judged by its newest copy: hot, else
        spill, else cold."""
        table = codec.table
        doomed: list[Keys] = []
        reasons: list[npt.NDArray[np.int8]] = []

        def sweep(tier: RowTier, name: str, shadowed: Callable[[Keys], Mask]) -> None:
            if tier.count(name) == 0:
                return
            for keys, values in tier.scan(name, _SCAN_BATCH):
                why = self._expired(codec, keys, values, at)
                cand = np.flatnonzero(why)
                if len(cand) == 0:
                    continue
                keep = ~shadowed(keys[cand])
                doomed.append(keys[cand[keep]])
                reasons.append(why[cand[keep]])

        sweep(self.hot, table, lambda k: np.zeros(len(k), dtype=np.bool_))
        if self.cold is not None:
            spilled = self._spilled.get(table)

            def in_hot(k: Keys) -> Mask:
                return present_mask(self.hot.get_many(table, k))

            if spilled is not None and spilled.live:
                assert self.spill is not None
                sweep(self.spill, spill_table(table), in_hot)
            sweep(self.cold, table, lambda k: in_hot(k) | _holds(spilled, k))
        if not doomed:
            return {"ttl": 0, "l2_norm": 0}
        keys_all = np.concatenate(doomed)
        why_all = np.concatenate(reasons)
        keys_u, first = np.unique(keys_all, return_index=True)  # a key counts once
        why_u = why_all[first]
        self._remove(table, keys_u)
        return {"ttl": int((why_u == 1).sum()), "l2_norm": int((why_u == 2).sum())}

    def flush(
        self,
        position: Mapping[str, int] | None = None,
        *,
        rows: Mapping[str, tuple[Keys, Rows]] | None = None,
    ) -> None:
        self._check_writable("flush")
        blob = None
        if position is not None:
            blob = json.dumps({str(k): int(v) for k, v in position.items()}, sort_keys=True)
        given: dict[str, tuple[Keys, Rows]] = {}
        for table, (table_keys, table_rows) in (rows or {}).items():
            keys = np.asarray(table_keys, dtype=np.uint64).reshape(-1)
            self._check_rows(table, keys, table_rows)
            if len(keys):
                given[table] = (keys, table_rows)
        start = time.perf_counter()
        with self._lock:
            for table, (keys, table_rows) in given.items():
                self._write_rows(table, keys, table_rows)
            if self.cold is None:
                if blob is not None:
                    self.hot.put_blob(POSITION_BLOB, blob.encode())
                    self.hot.wait_for_replicas()
            else:
                self._flush_to_cold(blob, given)
            self.hot.sync()  # what was flushed is in Redis for every other client too
            self._set_gauges()
        elapsed = time.perf_counter() - start
        metrics.FLUSH_SECONDS.observe(elapsed)
        metrics.FLUSH_OP_SECONDS.observe(elapsed)

    def _flush_to_cold(self, blob: str | None, given: Mapping[str, tuple[Keys, Rows]]) -> None:
        """Lock held: dirty rows from hot (``given`` ones as given, not read back) and
        spilled rows (not in hot) with the position in one commit; then the spill is
        dropped. Raises ``HotTierLost`` (committing nothing) if the hot tier lost its
        contents since the last flush: rows promoted from cold since then carry updates
        on top of stale values, and rows gone cannot be written back."""
        assert self.cold is not None
        if not self.hot.has_marker(self._marker_blob, self._marker):
            raise HotTierLost(
                "the hot tier lost its contents since the last flush (restarted without "
                "persistence?); nothing was committed"
            )
        rows: dict[str, tuple[Keys, list[bytes]]] = {}
        cleaned: dict[str, Positions] = {}
        lost = 0
        for table in self._tables:
            if self._index is not None:
                index = self._index[table]
                pos = index.dirty_positions()
                keys = index.keys[pos]
                cleaned[table] = pos
            elif self._dirty.get(table):
                keys = _unique(np.concatenate(self._dirty[table]))
            else:
                keys = _EMPTY_KEYS
            fresh_keys, fresh_rows = given.get(table, (_EMPTY_KEYS, None))
            if fresh_rows is not None and len(keys):
                # Dirty rows the writer handed over: newest by definition, and still in
                # hot unless the write just evicted them (then spilled, newer than cold).
                keys = keys[~isin_sorted(keys, _unique(fresh_keys))]
            values = self.hot.get_many(table, keys) if len(keys) else []
            keep = present_mask(values)
            keys = keys[keep]
            present = [v for v in values if v is not None]
            if fresh_rows is not None:
                keys = np.concatenate([keys, fresh_keys])
                present.extend(self._codecs[table].pack(fresh_rows))
            spilled = self._spilled.get(table)
            if spilled is not None and spilled.live and self.spill is not None:
                # Rows in hot are newer than their spill copy (promoted rows stay dirty).
                spilled_keys = spilled.keys[spilled.live_positions()]
                rest = spilled_keys[~isin_sorted(spilled_keys, _unique(keys))]
                more = self.spill.get_many(spill_table(table), rest)
                ok = present_mask(more)
                keys = np.concatenate([keys, rest[ok]])
                present.extend(v for v in more if v is not None)
                keep = np.concatenate([keep, ok])
            # A row gone from hot (e.g. Redis flushed) cannot be written back.
            lost += len(keep) - int(keep.sum())
            if len(keys):
                rows[table] = (keys, present)
        if lost:
            self._count(lost_dirty_rows=lost)
            raise HotTierLost(
                f"{lost} dirty rows vanished from the hot tier before they were flushed; "
                "nothing was committed"
            )
        blobs = {POSITION_BLOB: blob.encode()} if blob is not None else {}
        if rows or blobs:
            for table, (keys, _) in rows.items():
                self._note_cold_writes(table, keys)
            absent = {t: np.concatenate(k) for t, k in self._created_keys.items() if t in rows}
            # Hot's copies of these rows read as clean from now on: a failover must not
            # bring back older ones.
            self.hot.wait_for_replicas()
            self.cold.commit(rows, blobs, absent=absent)
        self._created_keys.clear()
        if self._index is not None:
            for table, pos in cleaned.items():
                self._index[table].dirty[pos] = False
        self._dirty.clear()
        self._dirty_len.clear()
        if self._spilled:
            assert self.spill is not None
            for table in self._spilled:
                self.spill.clear(spill_table(table))
            self._spilled.clear()
            self.spill.delete_blob(SPILL_BLOB)

    def _set_gauges(self) -> dict[str, int]:
        """Rows and bytes per tier and table into the gauges; returns the row counts."""
        out: dict[str, int] = {}
        for table, codec in self._codecs.items():
            tiers = {"hot": self.hot.count(table)}
            if self.cold is not None:
                tiers["cold"] = self.cold.count(table)
                spilled = self._spilled.get(table)
                tiers["spill"] = spilled.live if spilled is not None else 0
            for tier, n in tiers.items():
                metrics.ROWS.labels(tier=tier, table=table).set(n)
                metrics.BYTES.labels(tier=tier, table=table).set(n * codec.nbytes)
                out[f"{tier}_rows.{table}"] = n
        return out

    def discard_unflushed(self) -> None:
        """Drop every update since the last ``flush``: all hot rows (rows come back from
        the cold tier, as of its recorded position, on their next lookup), the spill and
        the dirty bookkeeping; then mark the hot tier as intact again. What a restarting
        writer does, without reopening the store (serving threads keep their handle).
        Needs a cold tier."""
        self._check_writable("discard_unflushed")
        if self.cold is None:
            raise NotImplementedError("without a cold tier there is nothing to go back to")
        with self._lock:
            if not self.shared_hot:  # shared rows are the other writers' too: kept
                self._discard_hot_rows()
            self._clear_stale_spill()
            self._spilled.clear()
            self._dirty.clear()
            self._dirty_len.clear()
            self._created_keys.clear()
            self._touched.clear()
            self._reads.clear()
            if self._index is not None:
                self._index = {name: HotIndex() for name in self._tables}
            self._note_cold_within_hot()  # the flushed rows are now only in cold
            self.hot.delete_marker(self._marker_blob)
            self._marker = uuid.uuid4().hex.encode()
            self.hot.put_marker(self._marker_blob, self._marker)

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
        """Row counts: ``hot_rows.<table>``, ``cold_rows.<table>``, ``spill_rows.<table>``
        (demoted dirty rows awaiting flush), ``hot_bytes`` (packed), ``dirty_rows`` (an
        upper bound without eviction); counters: ``hot_hits``, ``cold_hits``, ``misses``
        (distinct keys of lookups), ``created_rows``, ``admissions``,
        ``admission_rejections`` (distinct keys per call), ``forced_admissions``,
        ``rejected_gradients`` (NaN/inf), ``dropped_gradients`` (no row),
        ``promotions``, ``demotions``, ``cold_reads_skipped`` (hot misses the cold
        key filter ruled out), ``evictions.<reason>`` for capacity, ttl, l2_norm
        and manual, ``eviction_passes``, ``eviction_floor_hits`` (steps where the floor held
        eviction back), ``lost_dirty_rows``. Also refreshes the row and byte gauges."""
        with self._lock:
            out = self._set_gauges()
            out["hot_bytes"] = sum(out[f"hot_rows.{t}"] * c.nbytes for t, c in self._codecs.items())
            if self._index is not None:
                out["dirty_rows"] = sum(len(ix.dirty_positions()) for ix in self._index.values())
            else:
                out["dirty_rows"] = sum(self._dirty_len.values())
            out["step"] = self._step
        with self._tally_lock:
            for name in _COUNTERS:
                out[name] = self._tally[name]
        return out

    def close(self) -> None:
        """Close every tier (unflushed dirty rows stay only in hot)."""
        if not self.read_only and self.cold is not None:
            with contextlib.suppress(StoreError):
                self.hot.delete_marker(self._marker_blob)
        self.hot.close()
        if self.cold is not None:
            self.cold.close()
        if self.spill is not None and self.spill is not self.cold:
            self.spill.close()
