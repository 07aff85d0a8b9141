"""Traffic-aware slot placement on a Redis Cluster: AutoShard's idea, for our buckets.

Hashing spreads every table's buckets over the 16384 hash slots, so memory balances by
itself; traffic does not. A popular id's bucket takes a large share of its table's
reads and writes, a table of a few ids is one bucket read by every request, and the
more masters, the more a few hot slots make one of them the
bottleneck. ``redis-cli --cluster rebalance`` balances slot counts, blind to that.
Here the load is measured, and the plan follows it as it drifts:

1. Every ``RedisTier`` on a cluster counts the rows it reads and writes per slot
   (``SlotTraffic``) and every ``REPORT_EVERY_S`` publishes its rates, decayed with a
   ``HALF_LIFE_S`` half-life, to a key of its own (``report_key``: all of a prefix's
   in one hash slot, so ``ClusterAdmin.traffic`` lists them with ``CLUSTER
   GETKEYSINSLOT``; each expires after ``MAX_REPORT_AGE_S``, so a process that died
   leaves nothing behind).
2. ``plan_moves``, the cost model: a slot costs ``reads + write_cost * writes`` rows per
   second, and holds memory in proportion to its keys. Greedy moves from the most to
   the least loaded master, each the slot whose load is closest to half their gap,
   until every master is within ``tolerance`` of the mean; a move never takes a
   master's memory past ``max(the largest now, (1 + memory_slack) * the mean)``.
3. ``ClusterAdmin.migrate`` moves a slot as ``redis-cli --cluster reshard`` does; stores
   follow the ``ASK``/``MOVED`` replies, so trainers train on without a rewind. A slot
   a failed move left half-migrated is listed (``open_migrations``) and finished first.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import redis

from storage.base import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

SLOTS = 16384
REPORT_EVERY_S = 10.0
HALF_LIFE_S = 300.0
# A report older than this is from a process that stopped: left out of the sum.
MAX_REPORT_AGE_S = 6 * REPORT_EVERY_S
_REPORT_HEAD = struct.Struct("<dI")  # the wall time it was made, the slot count
# Slots counted are kept as the arrays routing made and summed once this many pile up:
# a bincount over all 16384 slots per routed batch would cost serving ~20 us per table.
_FOLD_AT = 1 << 20


def report_key(prefix: str, reporter: bytes) -> bytes:
    """The key ``reporter`` (a store of ``prefix``) reports its slot traffic under;
    the hash tag holds ``prefix`` only, so all of them share a slot."""
    return b"{" + prefix.encode() + b":slot-load}:" + reporter


class SlotTraffic:
    """The rows one process reads and writes per hash slot, as rates that forget with
    a ``half_life_s`` half-life (so they follow traffic as it drifts)."""

    def __init__(
        self,
        *,
        half_life_s: float = HALF_LIFE_S,
        every_s: float = REPORT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.half_life_s = half_life_s
        self.every_s = every_s
        self._clock = clock
        self._counts = np.zeros((2, SLOTS))  # [read, write] rows since the last fold
        self._pending: tuple[list[npt.NDArray[np.integer[Any]]], ...] = ([], [])
        self._pending_rows = 0
        self._rates = np.zeros((2, SLOTS))
        # The weight of the history the rates hold: dividing by it keeps a young
        # process's rates from reading low (Adam's bias correction).
        self._weight = 0.0
        self._since = clock()
        self._lock = threading.Lock()

    def count(self, slots: npt.NDArray[np.integer[Any]], *, write: bool) -> None:
        """Count a row read (or written) in each of ``slots`` (kept, not copied)."""
        if len(slots):
            with self._lock:
                self._pending[int(write)].append(slots)
                self._pending_rows += len(slots)
                if self._pending_rows >= _FOLD_AT:
                    self._sum_pending()

    def _sum_pending(self) -> None:
        for kind, arrays in enumerate(self._pending):
            if arrays:
                self._counts[kind] += np.bincount(np.concatenate(arrays), minlength=SLOTS)
                arrays.clear()
        self._pending_rows = 0

    def due(self) -> bool:
        return self._clock() - self._since >= self.every_s

    def rates(self) -> npt.NDArray[np.float64]:
        """Rows per second of each slot (``[0]`` reads, ``[1]`` writes), up to now."""
        with self._lock:
            self._sum_pending()
            now = self._clock()
            elapsed = now - self._since
            if elapsed > 0:
                decay = 0.5 ** (elapsed / self.half_life_s)
                self._rates = decay * self._rates + (1 - decay) * self._counts / elapsed
                self._weight = decay * self._weight + (1 - decay)
                self._counts[:] = 0
                self._since = now
            return self._rates / self._weight if self._weight else self._rates.copy()


def encode_report(at: float, rates: npt.NDArray[np.float64]) -> bytes:
    return _REPORT_HEAD.pack(at, SLOTS) + np.asarray(rates, "<f4").reshape(2, SLOTS).tobytes()


def decode_report(data: bytes) -> tuple[float, npt.NDArray[np.float64]]:
    """The time and the rates of a report; ``ValueError`` if it is not one."""
    if len(data) != _REPORT_HEAD.size + 2 * SLOTS * 4:
        raise ValueError(f"a slot-load report of {len(data)} bytes")
    at, slots = _REPORT_HEAD.unpack_from(data)
    rates = np.frombuffer(data, "<f4", offset=_REPORT_HEAD.size).astype(np.float64)
    if slots != SLOTS or not math.isfinite(at) or not np.isfinite(rates).all() or (rates < 0).any():
        raise ValueError("a slot-load report with a bad head or negative/non-finite rates")
    return at, rates.reshape(2, SLOTS)


def sum_reports(
    entries: Mapping[bytes, bytes], now: float, max_age_s: float = MAX_REPORT_AGE_S
) -> tuple[npt.NDArray[np.float64], int, list[bytes]]:
    """The summed rates of the fresh reports among ``entries`` (by reporter), how many
    there were, and the reporters whose report is stale or malformed."""
    total = np.zeros((2, SLOTS))
    fresh, dropped = 0, []
    for reporter, data in entries.items():
        try:
            at, rates = decode_report(bytes(data))
        except ValueError as e:
            log.warning("slot-load report of %r skipped: %s", reporter, e)
            dropped.append(reporter)
            continue
        if now - at > max_age_s:
            dropped.append(reporter)
            continue
        total += rates
        fresh += 1
    return total, fresh, dropped


# -- the plan -------------------------------------------------------------------------


def imbalance(per_master: npt.ArrayLike) -> float:
    """The largest master's share over the mean (1.0: even; an idle cluster: 1.0)."""
    values = np.asarray(per_master, dtype=np.float64)
    mean = float(values.mean())
    return float(values.max()) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class SlotMove:
    slot: int
    source: int  # master index
    target: int
    load: float  # what the slot costs, in the cost model's unit
    memory: float  # bytes, estimated


@dataclass(frozen=True)
class Plan:
    moves: list[SlotMove]
    load_before: npt.NDArray[np.float64]  # per master
    load_after: npt.NDArray[np.float64]
    memory_before: npt.NDArray[np.float64]
    memory_after: npt.NDArray[np.float64]

    @property
    def imbalance_before(self) -> float:
        return imbalance(self.load_before)

    @property
    def imbalance_after(self) -> float:
        return imbalance(self.load_after)


def plan_moves(
    load: npt.ArrayLike,
    memory: npt.ArrayLike,
    owner: npt.ArrayLike,
    masters: int,
    *,
    max_moves: int = 64,
    tolerance: float = 0.05,
    memory_slack: float = 0.1,
) -> Plan:
    """Slot moves that even out ``load`` (per slot) over the masters (``owner``: each
    slot's master, 0 to ``masters - 1``). Each move is the one slot of the most loaded
    master whose load is closest to half its gap to the least loaded one (and under
    the gap, so neither ends above where the most loaded was: the largest load never
    grows); a slot moves once at most. Stops within ``tolerance`` of the mean, after
    ``max_moves``, or when no slot fits."""
    load = np.asarray(load, dtype=np.float64)
    memory = np.asarray(memory, dtype=np.float64)
    owner = np.array(owner, dtype=np.intp)
    if not load.shape == memory.shape == owner.shape or load.ndim != 1:
        raise ValueError(
            f"load, memory and owner differ: {load.shape}, {memory.shape}, {owner.shape}"
        )
    if masters < 1 or (owner.size and not 0 <= owner.min() <= owner.max() < masters):
        raise ValueError(f"owners must be masters 0 to {masters - 1}")
    if (load < 0).any() or (memory < 0).any() or max_moves < 0 or tolerance < 0:
        raise ValueError("load, memory, max_moves and tolerance must be >= 0")
    node_load = np.bincount(owner, weights=load, minlength=masters).astype(np.float64)
    node_memory = np.bincount(owner, weights=memory, minlength=masters).astype(np.float64)
    before = node_load.copy(), node_memory.copy()
    memory_cap = max(float(node_memory.max()), (1 + memory_slack) * float(node_memory.mean()))
    mean = float(node_load.mean())
    movable = load > 0
    moves: list[SlotMove] = []
    while len(moves) < max_moves and node_load.max() > (1 + tolerance) * mean:
        hot, cold = int(np.argmax(node_load)), int(np.argmin(node_load))
        gap = node_load[hot] - node_load[cold]
        fits = (owner == hot) & movable & (load < gap) & (node_memory[cold] + memory <= memory_cap)
        candidates = np.flatnonzero(fits)
        if not candidates.size:
            break
        slot = int(candidates[np.argmin(np.abs(load[candidates] - gap / 2))])
        moves.append(SlotMove(slot, hot, cold, float(load[slot]), float(memory[slot])))
        owner[slot], movable[slot] = cold, False
        node_load[hot] -= load[slot]
        node_load[cold] += load[slot]
        node_memory[hot] -= memory[slot]
        node_memory[cold] += memory[slot]
    return Plan(moves, before[0], node_load, before[1], node_memory)


def plan_report(masters: Sequence[Master], plan: Plan, reporters: int) -> dict[str, Any]:
    """``plan`` as JSON-ready data (what ``streamrec rebalance`` prints)."""
    return {
        "reporters": reporters,
        "imbalance_before": round(plan.imbalance_before, 4),
        "imbalance_after": round(plan.imbalance_after, 4),
        "memory_imbalance_before": round(imbalance(plan.memory_before), 4),
        "memory_imbalance_after": round(imbalance(plan.memory_after), 4),
        "masters": [
            {
                "address": master.address,
                "load_before": round(float(plan.load_before[i]), 1),
                "load_after": round(float(plan.load_after[i]), 1),
                "memory_before": int(plan.memory_before[i]),
                "memory_after": int(plan.memory_after[i]),
            }
            for i, master in enumerate(masters)
        ],
        "moves": [
            {
                "slot": move.slot,
                "from": masters[move.source].address,
                "to": masters[move.target].address,
                "load": round(move.load, 1),
            }
            for move in plan.moves
        ],
    }


# -- the cluster ----------------------------------------------------------------------


@dataclass(frozen=True)
class Master:
    id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ClusterAdmin:
    """The masters of the Redis Cluster at ``url`` (``redis://`` or ``rediss://``),
    and what a rebalance reads from and does to them."""

    def __init__(self, url: str, prefix: str = "sr", *, timeout_s: float = 10.0) -> None:
        self.url = url
        self.prefix = prefix
        self._timeout_s = timeout_s
        if "+sentinel://" in url:
            raise StoreError("Redis Sentinel serves one master: only a cluster can be rebalanced")
        seed = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._pool_class = seed.connection_pool.connection_class
        self._kwargs = dict(seed.connection_pool.connection_kwargs)
        self._clients: dict[tuple[str, int], redis.Redis] = {}
        try:
            with self._failing(f"{self._kwargs.get('host')}:{self._kwargs.get('port')}"):
                enabled = seed.info("cluster").get("cluster_enabled")
        finally:
            seed.close()
        if enabled != 1:
            raise StoreError(f"Redis at {url} is not a Redis Cluster: nothing to rebalance")
        self.masters: list[Master] = []
        self.owner = np.zeros(SLOTS, dtype=np.intp)  # each slot's index in ``masters``
        # Slots left half-migrated (by a move that failed, here or by redis-cli):
        # (slot, source, target).
        self.open_migrations: list[tuple[int, Master, Master]] = []
        self.refresh()

    @contextmanager
    def _failing(self, address: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreUnavailable(f"Redis at {address} is unreachable: {e}") from e
        except redis.ResponseError as e:
            raise StoreError(f"Redis at {address}: {e}") from e

    def client(self, master: Master) -> redis.Redis:
        key = (master.host, master.port)
        if key not in self._clients:
            pool = redis.ConnectionPool(
                connection_class=self._pool_class,
                **{**self._kwargs, "host": master.host, "port": master.port},
            )
            self._clients[key] = redis.Redis(connection_pool=pool)
        return self._clients[key]

    def command(self, master: Master, *args: object) -> Any:
        with self._failing(master.address):
            return self.client(master).execute_command(*args)  # type: ignore[no-untyped-call]

    def refresh(self) -> None:
        """Read the masters and the slot map (``CLUSTER NODES``: masters without slots
        too, such as one just added) from the first master that answers; masters are
        listed in the order of their first slots, masters without any last."""
        seed_host = str(self._kwargs["host"])
        candidates = self.masters or [Master("", seed_host, int(self._kwargs["port"]))]
        errors = []
        for master in candidates:
            try:
                reply = self.command(master, "CLUSTER", "NODES")
                break
            except StoreUnavailable as e:
                errors.append(str(e))
        else:
            raise StoreUnavailable("; ".join(errors))
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        found: list[tuple[int, Master, list[tuple[int, int]]]] = []
        for line in text.splitlines():
            fields = line.split()
            node_id, address, flags = fields[:3]
            ranges = [
                (int(a), int(b or a))
                for a, _, b in (r.partition("-") for r in fields[8:] if "[" not in r)
            ]
            flags_set = set(flags.split(","))
            if "master" not in flags_set or flags_set & {"fail", "noaddr", "handshake"}:
                continue
            host, _, port = address.split("@")[0].rpartition(":")
            first = min((a for a, _ in ranges), default=SLOTS)
            found.append((first, Master(node_id, host or seed_host, int(port)), ranges))
        found.sort(key=lambda entry: (entry[0], entry[1].address))
        owner = np.full(SLOTS, -1, dtype=np.intp)
        for index, (_, _, ranges) in enumerate(found):
            for first, last in ranges:
                owner[first : last + 1] = index
        if (owner < 0).any():
            raise StoreUnavailable(
                f"Redis Cluster at {self.url}: {int((owner < 0).sum())} hash slots have no "
                "master (cluster_state not ok?)"
            )
        self.masters, self.owner = [master for _, master, _ in found], owner
        self.open_migrations = self._open_migrations()

    def _open_migrations(self) -> list[tuple[int, Master, Master]]:
        """The slots a master is migrating away (``[slot->-target id]`` on its own line
        of ``CLUSTER NODES``: only the master itself shows it)."""
        by_id = {master.id: master for master in self.masters}
        found = []
        for master in self.masters:
            reply = self.command(master, "CLUSTER", "NODES")
            text = reply.decode() if isinstance(reply, bytes) else str(reply)
            mine = next((line for line in text.splitlines() if "myself" in line), "")
            for entry in mine.split()[8:]:
                slot, arrow, target = entry.strip("[]").partition("->-")
                if entry.startswith("[") and arrow and target in by_id:
                    found.append((int(slot), master, by_id[target]))
        return found

    def memory(self) -> npt.NDArray[np.float64]:
        """Each slot's bytes, estimated: its keys times its master's dataset bytes per
        key (buckets are of about one size)."""
        out = np.zeros(SLOTS)
        for index, master in enumerate(self.masters):
            slots = np.flatnonzero(self.owner == index)
            client = self.client(master)
            with self._failing(master.address):
                info = client.info("memory")
                pipe = client.pipeline(transaction=False)
                for slot in slots.tolist():
                    pipe.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)  # type: ignore[no-untyped-call]
                keys = np.asarray(pipe.execute(), dtype=np.float64)
            total = keys.sum()
            if total:
                out[slots] = keys * float(info.get("used_memory_dataset", 0)) / total
        return out

    def traffic(self, now: float | None = None) -> tuple[npt.NDArray[np.float64], int]:
        """The slot traffic the stores of ``prefix`` report (``[0]`` reads, ``[1]``
        writes, rows per second), and how many report."""
        head = report_key(self.prefix, b"")
        slot = int(self.command(self.masters[0], "CLUSTER", "KEYSLOT", head))
        master = self.masters[int(self.owner[slot])]
        in_slot = self.command(master, "CLUSTER", "GETKEYSINSLOT", slot, 1_000_000)
        keys = [bytes(k) for k in in_slot if bytes(k).startswith(head)]
        entries: dict[bytes, bytes] = {}
        for at in range(0, len(keys), 1000):
            chunk = keys[at : at + 1000]
            values = self.command(master, "MGET", *chunk)
            entries.update((k, v) for k, v in zip(chunk, values, strict=True) if v is not None)
        rates, fresh, _ = sum_reports(entries, time.time() if now is None else now)
        return rates, fresh

    def migrate(
        self,
        slot: int,
        source: Master,
        target: Master,
        *,
        batch: int = 100,
        timeout_ms: int = 10_000,
        finish: bool = True,
    ) -> int:
        """Move ``slot`` and its keys from ``source`` to ``target`` the way
        ``redis-cli --cluster reshard`` does; the keys moved. ``finish=False`` stops with
        the keys moved but the slot still the source's (mid-migration: ``ASK``)."""
        self.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
        auth: list[object] = []
        if self._kwargs.get("password"):
            user = self._kwargs.get("username")
            auth = (
                ["AUTH2", user, self._kwargs["password"]]
                if user
                else ["AUTH", self._kwargs["password"]]
            )
        moved = 0
        while keys := self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            self.command(
                source, "MIGRATE", target.host, target.port, "", 0, timeout_ms, *auth, "KEYS", *keys
            )
            moved += len(keys)
        if finish:  # the new owner first, then the old one (Redis's own order), then the rest
            for master in sorted(self.masters, key=lambda m: (m != target, m != source)):
                self.command(master, "CLUSTER", "SETSLOT", slot, "NODE", target.id)
            self.owner[slot] = self.masters.index(target)
        return moved

    def apply(self, moves: Sequence[SlotMove]) -> int:
        """Carry ``moves`` out, one slot after another, logging progress; the keys moved."""
        started, keys = time.monotonic(), 0
        for done, move in enumerate(moves, 1):
            source, target = self.masters[move.source], self.masters[move.target]
            if int(self.owner[move.slot]) != move.source:
                raise StoreError(
                    f"slot {move.slot} is no longer {source.address}'s: the cluster changed "
                    "since the plan; plan again"
                )
            try:
                keys += self.migrate(move.slot, source, target)
            except StoreError as e:
                raise type(e)(
                    f"moving slot {move.slot} from {source.address} to {target.address} "
                    f"failed ({e}); it is left migrating: `streamrec rebalance --apply` "
                    f"finishes it first (or `redis-cli --cluster fix {source.address}`)"
                ) from e
            elapsed = time.monotonic() - started
            if done == len(moves) or done % 10 == 0:
                log.info(
                    "moved %d/%d slots (%d keys) in %.1f s, %.1f slots/s, ETA %.0f s",
                    done, len(moves), keys, elapsed, done / elapsed,
                    elapsed / done * (len(moves) - done),
                )  # fmt: skip
        return keys

    def finish_open_migrations(self) -> int:
        """Finish the slots left half-migrated (``open_migrations``); the keys moved."""
        keys = 0
        for slot, source, target in self.open_migrations:
            log.info("finishing slot %d's move from %s to %s", slot, source.address, target.address)
            keys += self.migrate(slot, source, target)
        self.refresh()
        return keys

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
