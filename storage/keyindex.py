"""``KeyIndex``: a set of distinct uint64 keys at stable positions in numpy arrays.

An open-addressing hash table in numpy arrays (Fibonacci hashing, linear probing,
tombstones, rebuilt at half load to a quarter load) whose batch operations are loops
compiled by numba: one pass over the batch's keys, without the GIL, not a Python loop
(or a dict probe) per key. (Vectorised numpy probing took ~10x longer per batch.)
Subclasses keep per-key data in *columns*: arrays indexed by position, declared in
``_columns``, which a rebuild moves along with their keys. ``HotIndex``
(``storage.eviction``) and ``SlotIndex`` (the memory tier's arenas, the trainer cache)
are the two.

A key's position stays valid while ``epoch`` is unchanged and the key is not removed:
``epoch`` advances when a rebuild moves every key and when ``discard`` removes keys
(``discard_at`` does not: its caller knows which positions it removed).

Not thread-safe: callers serialise access.
"""

from __future__ import annotations

import math
from typing import ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from storage.base import Keys, Mask
from storage.compiled import kernel

Positions = npt.NDArray[np.int64]

EMPTY, LIVE, TOMB = 0, 1, 2  # values of KeyIndex.state
_PHI = np.uint64(0x9E3779B97F4A7C15)
_MIN_SIZE = 1024


def _as_u64(keys: Keys) -> Keys:
    # One compiled signature: every caller's keys as contiguous uint64 (no copy if so).
    return np.ascontiguousarray(keys, dtype=np.uint64)


@kernel
def _find(
    table: Keys,
    state: npt.NDArray[np.uint8],
    shift: np.uint64,
    mask: int,
    keys: Keys,
    out: Positions,
) -> None:
    for i in range(len(keys)):
        key = keys[i]
        # Fibonacci hashing: the top bits of key * 2**64/phi, so patterned keys spread too.
        p = np.int64((key * _PHI) >> shift)
        while state[p] != EMPTY:
            if state[p] == LIVE and table[p] == key:
                out[i] = p
                break
            p = (p + 1) & mask


@kernel
def _add(
    table: Keys,
    state: npt.NDArray[np.uint8],
    shift: np.uint64,
    mask: int,
    keys: Keys,
    out: Positions,
    new: Mask,
) -> tuple[int, int]:
    """Find or insert each key (the first tombstone on its probe path is reused);
    returns (keys inserted, empty slots used)."""
    inserted = used = 0
    for i in range(len(keys)):
        key = keys[i]
        p = np.int64((key * _PHI) >> shift)
        tomb = np.int64(-1)
        while True:
            s = state[p]
            if s == EMPTY:
                if tomb >= 0:
                    p = tomb
                else:
                    used += 1
                state[p] = LIVE
                table[p] = key
                out[i] = p
                new[i] = True
                inserted += 1
                break
            if s == LIVE:
                if table[p] == key:
                    out[i] = p
                    new[i] = False
                    break
            elif tomb < 0:
                tomb = p
            p = (p + 1) & mask
    return inserted, used


@kernel
def _rows_first_seen(
    keys: Keys, flat: Keys, starts: npt.NDArray[np.intp], inverse: npt.NDArray[np.intp]
) -> int:
    """The distinct keys of each row of a (rows, n) matrix in order of first sight
    (a throwaway table at most half full, cleared per row), laid end to end in ``flat``
    (row ``r``'s at ``starts[r]:starts[r + 1]``), and ``inverse[i, r]`` the position of
    ``keys[r, i]`` in ``flat``; returns their count."""
    bits = 1
    while (1 << bits) < 2 * keys.shape[1]:
        bits += 1
    shift = np.uint64(64 - bits)
    mask = (1 << bits) - 1
    table = np.empty(1 << bits, dtype=np.uint64)
    ids = np.empty(1 << bits, dtype=np.int64)
    found = 0
    starts[0] = 0
    for r in range(keys.shape[0]):
        ids[:] = -1
        for i in range(keys.shape[1]):
            key = keys[r, i]
            p = np.int64((key * _PHI) >> shift)
            while ids[p] >= 0 and table[p] != key:
                p = (p + 1) & mask
            if ids[p] < 0:
                ids[p] = found
                table[p] = key
                flat[found] = key
                found += 1
            inverse[i, r] = ids[p]
        starts[r + 1] = found
    return found


def distinct_rows(
    keys: Keys,
) -> tuple[Keys, npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """The distinct keys of each row of a (rows, n) matrix (a predict batch: one row
    per field), in order of first sight, in one compiled pass: ``(flat, starts,
    inverse)`` with row ``r``'s keys ``flat[starts[r]:starts[r + 1]]`` and
    ``keys[r, i] == flat[inverse[i, r]]``. ``inverse`` is transposed so that gathering
    rows of values by it gives ``(n, rows, ...)``."""
    keys = _as_u64(keys)
    flat = np.empty(keys.size, dtype=np.uint64)
    starts = np.empty(keys.shape[0] + 1, dtype=np.intp)
    inverse = np.empty((keys.shape[1], keys.shape[0]), dtype=np.intp)
    found = _rows_first_seen(keys, flat, starts, inverse)
    return flat[:found], starts, inverse


@kernel
def _segments_first_seen(
    keys: Keys,
    bounds: npt.NDArray[np.intp],
    flat: Keys,
    starts: npt.NDArray[np.intp],
    inverse: npt.NDArray[np.intp],
) -> int:
    """``_rows_first_seen`` of ragged segments: segment ``s`` is
    ``keys[bounds[s]:bounds[s + 1]]``; ``inverse[i]`` is the position of ``keys[i]`` in
    ``flat``."""
    longest = 1
    for s in range(len(bounds) - 1):
        longest = max(longest, bounds[s + 1] - bounds[s])
    bits = 1
    while (1 << bits) < 2 * longest:
        bits += 1
    shift = np.uint64(64 - bits)
    mask = (1 << bits) - 1
    table = np.empty(1 << bits, dtype=np.uint64)
    ids = np.full(1 << bits, -1, dtype=np.int64)
    found = 0
    starts[0] = 0
    for s in range(len(bounds) - 1):
        first = found
        for i in range(bounds[s], bounds[s + 1]):
            key = keys[i]
            p = np.int64((key * _PHI) >> shift)
            while ids[p] >= 0 and table[p] != key:
                p = (p + 1) & mask
            if ids[p] < 0:
                ids[p] = found
                table[p] = key
                flat[found] = key
                found += 1
            inverse[i] = ids[p]
        # Clear only the slots this segment took (segments are small, the table not).
        for j in range(first, found):
            p = np.int64((flat[j] * _PHI) >> shift)
            while table[p] != flat[j] or ids[p] != j:
                p = (p + 1) & mask
            ids[p] = -1
        starts[s + 1] = found
    return found


def distinct_segments(
    keys: Keys, bounds: npt.NDArray[np.intp]
) -> tuple[Keys, npt.NDArray[np.intp], npt.NDArray[np.intp] | None]:
    """The distinct keys of each segment ``keys[bounds[s]:bounds[s + 1]]`` in order of
    first sight, in one compiled pass (a serving read of a few dozen tables): ``(flat,
    starts, inverse)`` with segment ``s``'s keys ``flat[starts[s]:starts[s + 1]]`` and
    ``keys[i] == flat[inverse[i]]``; ``inverse`` None when no segment repeats a key
    (then ``flat`` is ``keys``)."""
    keys = _as_u64(keys)
    flat = np.empty(len(keys), dtype=np.uint64)
    starts = np.empty(len(bounds), dtype=np.intp)
    inverse = np.empty(len(keys), dtype=np.intp)
    found = _segments_first_seen(keys, np.asarray(bounds, dtype=np.intp), flat, starts, inverse)
    if found == len(keys):
        return keys, starts, None
    return flat[:found], starts, inverse


_Int = TypeVar("_Int", bound=np.integer)


def sorted_distinct(keys: npt.NDArray[_Int]) -> npt.NDArray[_Int]:
    """Sorted distinct values (a sort beats numpy 2's hash-based ``np.unique`` here)."""
    s = np.sort(keys)
    if len(s) > 1:
        s = s[np.concatenate(([True], s[1:] != s[:-1]))]
    return s


def is_sorted_distinct(keys: Keys) -> bool:
    """Whether ``keys`` strictly increase (so they are distinct): one vectorised pass."""
    return len(keys) < 2 or bool((keys[1:] > keys[:-1]).all())


def isin_sorted(keys: Keys, sorted_keys: Keys) -> Mask:
    """Which ``keys`` occur in ``sorted_keys`` (sorted, distinct)."""
    if len(sorted_keys) == 0 or len(keys) == 0:
        return np.zeros(len(keys), dtype=np.bool_)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    found: Mask = sorted_keys[at] == keys
    return found


def occurs_in(sorted_keys: Keys, others: Keys) -> Mask:
    """Which of ``sorted_keys`` (sorted, distinct) occur in ``others`` (any order,
    repeats allowed): ``np.isin(sorted_keys, others)`` with no sort of either (the
    mirror of ``isin_sorted``)."""
    out: Mask = np.zeros(len(sorted_keys), dtype=np.bool_)
    if len(sorted_keys) == 0 or len(others) == 0:
        return out
    at = np.searchsorted(sorted_keys, others)
    hit = at < len(sorted_keys)
    hit[hit] = sorted_keys[at[hit]] == others[hit]
    out[at[hit]] = True
    return out


def unique_inverse(keys: Keys) -> tuple[Keys, npt.NDArray[np.intp]]:
    """``np.unique(keys, return_inverse=True)``: the distinct keys by a compiled hash
    pass, then a sort of those alone (3x faster than an argsort of all the keys)."""
    distinct_keys, _, inverse = distinct_rows(np.reshape(keys, (1, -1)))
    first_seen = inverse[:, 0]
    order = np.argsort(distinct_keys)
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order))
    return distinct_keys[order], rank[first_seen]


def distinct(keys: Keys) -> tuple[Keys, npt.NDArray[np.intp] | None]:
    """``keys`` sorted without repeats and the inverse map; None for the map when they
    were sorted and distinct already (the common case: nothing to copy)."""
    if is_sorted_distinct(keys):
        return keys, None
    return unique_inverse(keys)


def _size_for(n: int) -> int:
    """A power of two at least 4n (load <= 1/4 right after a rebuild)."""
    return max(_MIN_SIZE, 1 << max(0, math.ceil(math.log2(max(1, 4 * n)))))


class KeyIndex:
    """Distinct uint64 keys at positions of numpy arrays (see the module docstring)."""

    _columns: ClassVar[dict[str, type[np.generic]]] = {}
    """Per-position data of a subclass: attribute name -> dtype (zeroed when allocated)."""

    def __init__(self, expected: int = 0) -> None:
        self.epoch = 0
        self._alloc(_size_for(expected))

    def _alloc(self, size: int) -> None:
        self._mask = size - 1
        self._shift = np.uint64(64 - (size.bit_length() - 1))
        self.keys = np.zeros(size, dtype=np.uint64)
        self.state = np.zeros(size, dtype=np.uint8)
        for name, dtype in self._columns.items():
            setattr(self, name, np.zeros(size, dtype=dtype))
        self.live = 0
        self._used = 0  # live + tombstones

    @property
    def size(self) -> int:
        return len(self.keys)

    def _home(self, keys: Keys) -> Positions:
        """Each key's first probe (as ``_find`` computes it; for tests)."""
        with np.errstate(over="ignore"):
            return ((_as_u64(keys) * _PHI) >> self._shift).astype(np.int64)

    def find(self, keys: Keys) -> Positions:
        """Position of each key, -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if len(keys) and self.live:
            _find(self.keys, self.state, self._shift, self._mask, _as_u64(keys), out)
        return out

    def reserve(self, extra: int) -> None:
        """Rebuild first if adding ``extra`` keys would pass half load (moves every key
        and its columns: positions found before are stale)."""
        if 2 * (self._used + extra) <= self.size:
            return
        live = self.state == LIVE
        keys = self.keys[live]
        columns = {name: getattr(self, name)[live] for name in self._columns}
        self.epoch += 1
        self._alloc(_size_for(len(keys) + extra))
        pos = self.insert(keys)
        for name, values in columns.items():
            getattr(self, name)[pos] = values

    def insert(self, keys: Keys) -> Positions:
        """Place distinct absent keys (room reserved with ``reserve``); their positions.
        Their columns hold whatever the positions held before: the caller sets them."""
        pos, _ = self._add(keys)
        return pos

    def add(self, keys: Keys) -> tuple[Positions, Mask]:
        """Positions of distinct ``keys``, inserting the absent ones; and which were
        inserted. May rebuild first (see ``reserve``)."""
        self.reserve(len(keys))
        return self._add(keys)

    def _add(self, keys: Keys) -> tuple[Positions, Mask]:
        n = len(keys)
        pos = np.empty(n, dtype=np.int64)
        new: Mask = np.empty(n, dtype=np.bool_)
        if n:
            inserted, used = _add(
                self.keys, self.state, self._shift, self._mask, _as_u64(keys), pos, new
            )
            self.live += inserted
            self._used += used
        return pos, new

    def discard(self, keys: Keys) -> int:
        """Forget the (distinct) keys; returns how many were present."""
        pos = self.find(keys)
        pos = pos[pos >= 0]
        self.epoch += 1
        self.discard_at(pos)
        return len(pos)

    def discard_at(self, pos: Positions) -> None:
        """Forget the keys at ``pos`` (distinct live positions from this index)."""
        self.state[pos] = TOMB
        self.live -= len(pos)

    def live_positions(self) -> Positions:
        """Positions of every key, in no particular order."""
        out: Positions = np.flatnonzero(self.state == LIVE)
        return out


class SlotIndex(KeyIndex):
    """Each key's slot in a caller's row arrays (the memory tier's arenas, the trainer
    cache's tables)."""

    _columns: ClassVar[dict[str, type[np.generic]]] = {"slot": np.int32}  # 2**31 rows
    slot: npt.NDArray[np.int32]

    def slots_of(self, keys: Keys) -> npt.NDArray[np.int64]:
        """The slot of each key, -1 where absent."""
        pos = self.find(keys)
        present = pos >= 0
        slots = np.full(len(keys), -1, dtype=np.int64)
        slots[present] = self.slot[pos[present]]
        return slots


def _load_kernels() -> None:
    """Run each kernel once (see ``storage.compiled``)."""
    keys = np.arange(2, dtype=np.uint64)
    index = KeyIndex()
    index.add(keys)
    index.find(keys)
    unique_inverse(keys)
    distinct_rows(keys.reshape(1, 2))
    distinct_segments(keys, np.array([0, 2], dtype=np.intp))


_load_kernels()
