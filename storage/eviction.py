"""Hot-tier capacity: the configuration, the in-process recency index and victim choice.

``TieredStore`` keeps one ``HotIndex`` per table: which keys its hot tier holds, with the
*step* each was last accessed in, an access count and a dirty flag (written since the
last flush). A step is the store's logical clock (see ``TieredStore``: it advances when a
training lookup comes back to a table already looked up in the current step, i.e. once
per trainer batch). The index is a ``storage.keyindex.KeyIndex`` (a numpy hash table), so
every per-batch operation is a handful of vectorised passes over the batch's keys, not a
Python loop per key. It costs 22 bytes a slot, 2 to 8 slots per hot row, in the process
that writes the store.

Victims (``choose_victims``) are exact at step granularity: among all rows of all tables
that are not protected, the least recently accessed (``lru``; ties broken arbitrarily)
or the least often accessed, older first among equal counts (``lfu``). Choosing is one
O(hot rows) pass (``lru``: a counting sort over the few steps the candidates span,
compiled; ``lfu``: ``argpartition``, no sort of the whole set), which the store
amortises by evicting in chunks down to ``low_water``.

The floor against eviction storms (both rules always hold):

* rows accessed in the current step or the ``protect_steps - 1`` steps before it are
  never chosen, so a burst of new ids never pushes out the rows the trainer is using;
* at most ``max_evict_fraction`` of the capacity is evicted per step, so a burst of new
  ids is absorbed over several batches instead of pushing out the warm set at once;
  the budget is lifted only while the hot tier is more than ``overshoot`` above
  capacity (so a sustained overload cannot grow it without bound), and then a pass
  evicts down to ``low_water`` of that ceiling (so the next lookups do not cross it at
  once again, each with a pass of its own).

Capacity is therefore soft: while the protected rows alone exceed it, or a burst outruns
the per-step budget, the hot tier stays above it (the store counts the steps where that
happened as ``eviction_floor_hits``) and catches up in later steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.base import Keys
from storage.compiled import kernel
from storage.keyindex import LIVE, KeyIndex, Positions

_FREQ_BITS = 22  # LFU score: count (capped) above 40 bits of step
_STEP_BITS = 40


class EvictionConfig(BaseModel):
    """Capacity of the hot tier (all tables together) and how rows leave it."""

    model_config = ConfigDict(extra="forbid")

    policy: Literal["lru", "lfu"] = Field(
        "lru",
        description="lru: least recently accessed first; lfu: least often accessed first "
        "(counts halve after every eviction pass, so old popularity fades).",
    )
    max_rows: int | None = Field(None, ge=1, description="Rows in the hot tier, all tables.")
    max_bytes: int | None = Field(
        None, ge=1, description="Packed row bytes in the hot tier (rows x row size), all tables."
    )
    low_water: float = Field(
        0.9, gt=0, lt=1, description="An eviction pass evicts down to this share of capacity."
    )
    protect_steps: int = Field(
        2, ge=1, description="Rows accessed in the last this many steps are never evicted."
    )
    max_evict_fraction: float = Field(
        0.25, gt=0, le=1, description="At most this share of capacity is evicted per step."
    )
    overshoot: float = Field(
        0.5,
        ge=0,
        description="Past capacity x (1 + overshoot) the per-step budget no longer holds "
        "eviction back: a pass evicts down to low_water of that ceiling (protected rows "
        "still stay).",
    )

    write_back: Literal["spill", "direct"] = Field(
        "spill",
        description="spill: demoted dirty rows wait in the cold tier's spill space until "
        "the next flush, so the cold tier never runs ahead of its recorded position; "
        "direct: written straight into the cold table (no second write at flush, but "
        "after a crash their updates since the last flush are replayed twice).",
    )

    @model_validator(mode="after")
    def _some_capacity(self) -> EvictionConfig:
        if self.max_rows is None and self.max_bytes is None:
            raise ValueError("eviction needs max_rows and/or max_bytes")
        return self


@kernel
def _record_access(
    pos: Positions,
    new: npt.NDArray[np.bool_],
    steps: npt.NDArray[np.int32],
    freq: npt.NDArray[np.uint32],
    dirty: npt.NDArray[np.bool_],
    step: int,
) -> None:
    """``HotIndex.touch``'s bookkeeping in one pass: new keys start clean at ``step``
    with count 1; the others count one more and move up to ``step`` (never back)."""
    for i in range(len(pos)):
        p = pos[i]
        if p < 0:
            continue
        if new[i]:
            steps[p] = step
            freq[p] = 1
            dirty[p] = False
        else:
            steps[p] = max(steps[p], step)
            freq[p] += 1


class HotIndex(KeyIndex):
    """The keys of one table in the hot tier, with last-access step, access count and
    dirty flag (see ``KeyIndex`` for positions and ``epoch``).

    ``touch`` and ``discard`` take distinct keys.
    """

    _columns: ClassVar[dict[str, type[np.generic]]] = {
        "step": np.int32,  # 2**31 steps: years of batches
        "freq": np.uint32,
        "dirty": np.bool_,
    }
    step: npt.NDArray[np.int32]
    freq: npt.NDArray[np.uint32]
    dirty: npt.NDArray[np.bool_]

    def touch(self, keys: Keys, step: int, *, add: bool = True) -> Positions:
        """Record an access at ``step`` (count + 1) of each key: a key's step never goes
        back. Absent keys are added (clean, count 1) or with ``add=False`` ignored.
        Returns each key's position (-1 for an ignored one)."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        if add:
            pos, new = self.add(keys)
        else:
            pos, new = self.find(keys), np.zeros(len(keys), dtype=np.bool_)
        _record_access(pos, new, self.step, self.freq, self.dirty, step)
        return pos

    def discard_at(self, pos: Positions) -> None:
        """Forget the keys at ``pos`` and their dirty flags."""
        super().discard_at(pos)
        self.dirty[pos] = False

    def dirty_positions(self) -> Positions:
        """Positions of live keys marked dirty."""
        out: Positions = np.flatnonzero(self.dirty & (self.state == LIVE))
        return out

    def candidates(self, before_step: int) -> Positions:
        """Positions of live keys last accessed before ``before_step``, ascending."""
        out: Positions = np.flatnonzero((self.state == LIVE) & (self.step < before_step))
        return out

    def age(self) -> None:
        """Halve every access count (LFU aging)."""
        self.freq >>= np.uint32(1)


@kernel
def _lowest_first(rel: Positions, span: int, k: int) -> Positions:
    """The indices of the ``k`` smallest ``rel`` (each in ``[0, span)``), smallest first,
    ties in index order: a stable counting sort cut at ``k``."""
    start = np.zeros(span + 1, dtype=np.int64)
    for r in rel:
        start[r + 1] += 1
    for v in range(span):
        start[v + 1] += start[v]
    out = np.empty(k, dtype=np.int64)
    for i in range(len(rel)):
        at = start[rel[i]]
        if at < k:
            out[at] = i
        start[rel[i]] = at + 1
    return out


def _first_k(score: Positions, k: int) -> Positions:
    """The indices of the ``k`` lowest ``score``, lowest first (ties in index order)."""
    n = len(score)
    low, span = int(score.min()), int(score.max() - score.min()) + 1
    if span <= 4 * n + 1024:  # LRU steps: a counting sort, O(n + span)
        return _lowest_first(score - low, span, k)
    part = np.argpartition(score, k - 1)[:k] if k < n else np.arange(n)
    out: Positions = part[np.argsort(score[part], kind="stable")]
    return out


# Run once on import (see storage.compiled).
_lowest_first(np.zeros(1, dtype=np.int64), 1, 1)
HotIndex().touch(np.arange(2, dtype=np.uint64), 0)


@dataclass(frozen=True)
class Victims:
    """The rows one pass evicts: per table (its position in ``indexes``), positions in
    that table's ``HotIndex``; and why the pass fell short of its target, if it did."""

    positions: dict[int, Positions]
    rows: int
    nbytes: int
    short_by: Literal["protected", "budget"] | None


def choose_victims(
    indexes: list[HotIndex],
    row_bytes: list[int],
    cfg: EvictionConfig,
    step: int,
    *,
    budget_rows: int | None = None,
    budget_bytes: int | None = None,
) -> Victims:
    """The rows one eviction pass removes at ``step`` (see the module docstring): none
    while the hot tier is within capacity, else the lowest-scored unprotected rows down
    to ``low_water``, at most ``budget_rows`` rows and ``budget_bytes`` bytes."""
    rows = sum(ix.live for ix in indexes)
    nbytes = sum(ix.live * b for ix, b in zip(indexes, row_bytes, strict=True))
    need_rows = need_bytes = 0
    if cfg.max_rows is not None and rows > cfg.max_rows:
        need_rows = rows - int(cfg.max_rows * cfg.low_water)
    if cfg.max_bytes is not None and nbytes > cfg.max_bytes:
        need_bytes = nbytes - int(cfg.max_bytes * cfg.low_water)
    if need_rows == 0 and need_bytes == 0:
        return Victims({}, 0, 0, short_by=None)
    if (budget_rows is not None and budget_rows <= 0) or (
        budget_bytes is not None and budget_bytes <= 0
    ):
        return Victims({}, 0, 0, short_by="budget")

    protect_from = step - cfg.protect_steps + 1
    pos_parts, table_parts, score_parts, tables_in = [], [], [], []
    candidate_bytes = 0
    for t, ix in enumerate(indexes):
        pos = ix.candidates(protect_from)
        if len(pos) == 0:
            continue
        score = ix.step[pos].astype(np.int64)
        if cfg.policy == "lfu":
            freq = np.minimum(ix.freq[pos], (1 << _FREQ_BITS) - 1).astype(np.int64)
            score = (freq << _STEP_BITS) | (score & ((1 << _STEP_BITS) - 1))
        pos_parts.append(pos)
        tables_in.append(t)
        table_parts.append(np.full(len(pos), t, dtype=np.int64))
        candidate_bytes += len(pos) * row_bytes[t]
        score_parts.append(score)
    if not pos_parts:
        return Victims({}, 0, 0, short_by="protected")
    pos_all = np.concatenate(pos_parts)
    table_all = np.concatenate(table_parts)
    score_all = np.concatenate(score_parts)
    n = len(pos_all)
    sizes = np.asarray(row_bytes, dtype=np.int64)
    mean_size = candidate_bytes / n

    # The k lowest scores in order, k grown until that prefix frees enough (row sizes
    # differ per table); then the prefix is cut at the target or at the budget.
    k = min(n, max(need_rows, math.ceil(need_bytes / mean_size), 1))
    while True:
        part = _first_k(score_all, k)
        cum = np.cumsum(sizes[table_all[part]])
        enough = (np.arange(1, k + 1) >= need_rows) & (cum >= need_bytes)
        if enough.any() or k == n:
            break
        k = min(n, 2 * k)
    short_by: Literal["protected", "budget"] | None = None
    if enough.any():
        take = int(np.argmax(enough)) + 1
    else:
        take, short_by = k, "protected"
    if budget_rows is not None and take > budget_rows:
        take, short_by = budget_rows, "budget"
    if budget_bytes is not None and cum[take - 1] > budget_bytes:
        take, short_by = int(np.searchsorted(cum, budget_bytes, side="right")), "budget"
    # Candidates lie in blocks per table: sorted, the chosen split at the block bounds.
    chosen = np.sort(part[:take])
    cuts = np.searchsorted(chosen, np.cumsum([0, *map(len, pos_parts)]))
    by_table: dict[int, Positions] = {}
    for t, a, b in zip(tables_in, cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        if b > a:
            by_table[t] = pos_all[chosen[a:b]]
    return Victims(by_table, take, int(cum[take - 1]) if take else 0, short_by=short_by)
