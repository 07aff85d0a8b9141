"""Admission policies: when a new id of a table gets a row (feature admission).

``TieredStore`` asks the table's policy about ids seen in a training lookup that have no
row in any tier. Until a policy admits an id it reads as the zero vector, its gradient is
dropped, and the store does not grow. One policy object per table; none is thread-safe
(the store calls them under its writer lock).

Contract of ``AdmissionPolicy.admit(keys, counts)``: ``keys`` are distinct; key ``i`` was
sighted ``counts[i]`` times (1 each without ``counts``); the policy records those
sightings and returns which keys are admitted now. An admitted key is not asked about
again while it has a row.

* ``AlwaysAdmit``: every id.
* ``CountMinAdmission``: once an id's estimated sightings reach ``threshold``. A count-min
  sketch (``depth`` rows of ``width`` counters) over-estimates only, so no id waits
  longer than ``threshold`` sightings; collisions admit some ids early. Conservative
  update (raise only the counters below the new estimate) keeps that error small, and
  counters saturate at ``threshold`` (1 byte each for thresholds up to 255). Every
  ``halve_every`` recorded sightings all counters halve (TinyLFU's reset), so ids seen
  long ago are forgotten and the sketch never fills up.
* ``ProbabilisticAdmission``: each sighting admits with ``probability`` (``k`` sightings at
  once: ``1 - (1 - p)**k``). Draws come from a generator seeded per table, so the
  same sequence of calls admits the same ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import numpy.typing as npt

from storage.base import AdmissionConfig, Keys, Mask
from storage.keys import splitmix64, table_salt

Counts = npt.NDArray[np.integer]


class AdmissionPolicy(ABC):
    """Records sightings of ids without a row and says which are admitted now."""

    @abstractmethod
    def admit(self, keys: Keys, counts: Counts | None = None) -> Mask:
        """See the module contract."""


class AlwaysAdmit(AdmissionPolicy):
    """Every id gets a row at its first sighting."""

    def admit(self, keys: Keys, counts: Counts | None = None) -> Mask:
        return np.ones(len(keys), dtype=np.bool_)


class CountMinAdmission(AdmissionPolicy):
    """Admits an id once a count-min sketch estimates ``threshold`` sightings of it."""

    def __init__(
        self,
        threshold: int,
        width: int = 1 << 20,
        depth: int = 4,
        *,
        seed: int = 0,
        halve_every: int | None = None,
    ) -> None:
        if threshold < 1 or width < 1 or depth < 1:
            raise ValueError("threshold, width and depth must be >= 1")
        self.threshold = min(threshold, 0xFFFFFFFF)
        self.width = width
        self.depth = depth
        self.halve_every = halve_every if halve_every is not None else 10 * width
        dtype: type[np.unsignedinteger[Any]] = np.uint32
        if self.threshold <= 0xFF:
            dtype = np.uint8
        elif self.threshold <= 0xFFFF:
            dtype = np.uint16
        self._counters: npt.NDArray[np.unsignedinteger[Any]] = np.zeros(depth * width, dtype)
        # One salt per sketch row; row r's cell of a key is a function of key ^ salt_r.
        self._salts = splitmix64(np.arange(depth, dtype=np.uint64) + np.uint64(seed))[:, None]
        self._row_base = (np.arange(depth, dtype=np.uint64) * np.uint64(width))[:, None]
        self._since_halving = 0

    def _cells(self, keys: Keys) -> npt.NDArray[np.uint64]:
        """The (depth, n) flat counter indexes of ``keys``."""
        h = splitmix64(keys[None, :] ^ self._salts)
        # Multiply-shift range reduction of the top 32 bits: no modulo, no bias to speak of.
        cell = ((h >> np.uint64(32)) * np.uint64(self.width)) >> np.uint64(32)
        out: npt.NDArray[np.uint64] = cell + self._row_base
        return out

    def estimate(self, keys: Keys) -> npt.NDArray[np.int64]:
        """Estimated sightings of ``keys`` (capped at ``threshold``), recording nothing."""
        keys = np.asarray(keys, dtype=np.uint64)
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int64)
        est: npt.NDArray[np.int64] = self._counters[self._cells(keys)].min(axis=0).astype(np.int64)
        return est

    def admit(self, keys: Keys, counts: Counts | None = None) -> Mask:
        n = len(keys)
        if n == 0:
            return np.zeros(0, dtype=np.bool_)
        cells = self._cells(np.asarray(keys, dtype=np.uint64))
        seen = self._counters[cells].min(axis=0).astype(np.int64)
        add = np.ones(n, np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        est = np.minimum(seen + add, self.threshold)
        # Conservative update: raise each of the key's counters to at most the new
        # estimate; maximum.at because distinct keys may share a counter.
        np.maximum.at(
            self._counters,
            cells.reshape(-1),
            np.broadcast_to(est.astype(self._counters.dtype), cells.shape).reshape(-1),
        )
        self._since_halving += int(add.sum())
        if self._since_halving >= self.halve_every:
            self._counters >>= 1
            self._since_halving = 0
        admitted: Mask = est >= self.threshold
        return admitted


class ProbabilisticAdmission(AdmissionPolicy):
    """Each sighting admits the id with probability ``probability``."""

    def __init__(self, probability: float, *, seed: int = 0) -> None:
        if not 0 < probability <= 1:
            raise ValueError(f"probability must be in (0, 1], got {probability}")
        self.probability = probability
        self._rng = np.random.default_rng(seed)

    def admit(self, keys: Keys, counts: Counts | None = None) -> Mask:
        n = len(keys)
        if self.probability >= 1:
            return np.ones(n, dtype=np.bool_)
        draws = self._rng.random(n)
        if counts is None:
            admitted: Mask = draws < self.probability
            return admitted
        chance = -np.expm1(np.asarray(counts, dtype=np.float64) * np.log1p(-self.probability))
        admitted = draws < chance
        return admitted


def make_policy(cfg: AdmissionConfig, table: str = "", *, seed: int = 0) -> AdmissionPolicy:
    """The policy ``cfg`` describes; its hashing and draws are seeded by ``seed`` and the
    table name, so tables get independent, reproducible policies."""
    salted = (int.from_bytes(table_salt(table), "little") ^ seed) & 0xFFFFFFFFFFFFFFFF
    if cfg.policy == "always":
        return AlwaysAdmit()
    if cfg.policy == "count_min":
        return CountMinAdmission(cfg.threshold, cfg.sketch_width, cfg.sketch_depth, seed=salted)
    return ProbabilisticAdmission(cfg.probability, seed=salted)
