"""The event log the trainer consumes: Kafka in production, an in-process log in
the embedded mode. Both speak the same small interface.

A *position* maps ``"topic:partition"`` to the offset of the next record to read
(the offset after the last record applied). The trainer records it in the store
together with the rows it produced, then commits it to the log.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import Counter

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes

    @property
    def slot(self) -> str:
        return position_slot(self.topic, self.partition)


def position_slot(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


class LogUnavailable(RuntimeError):
    """The log (Kafka) cannot be reached; the message names the address."""


class EventConsumer(ABC):
    """Reads records of one topic, in order per partition."""

    @abstractmethod
    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to ``max_records`` records; an empty list when none arrived in time. Raises
        ``LogUnavailable`` when the log cannot be read."""

    @abstractmethod
    def commit(self, position: Mapping[str, int]) -> None:
        """Acknowledge everything before ``position`` (after the store recorded it)."""

    @abstractmethod
    def seek(self, position: Mapping[str, int]) -> None:
        """Read on from ``position``: after a rewind to the store's recorded position.
        Records fetched but not returned yet are dropped; partitions the position lacks
        go back to where a fresh consumer would start."""

    def assignment(self) -> set[str]:
        """The position slots (``topic:partition``) this consumer reads now."""
        return set()

    def end_offsets(self) -> dict[str, int]:
        """The end offset (one past the last record) of each partition read, as last
        seen: no round trip to the log. Partitions whose end is not known yet are left
        out."""
        return {}

    def on_revoked(  # noqa: B027 - optional hook
        self, callback: Callable[[], Mapping[str, int]]
    ) -> None:
        """Before partitions are taken away in a rebalance (from inside ``poll``), call
        ``callback``: it makes what was trained durable and returns the position to
        commit, which the consumer commits before the partitions move."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Leave the group and release sockets."""


class EventProducer(ABC):
    @abstractmethod
    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue one record; may block for backpressure."""

    @abstractmethod
    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued record is stored."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release sockets."""


class InMemoryLog:
    """A single-partition, in-process log per topic for the embedded mode.

    ``capacity`` bounds the records held past the last commit: a producer that
    runs ahead blocks until the trainer commits (backpressure), so an endless
    synthetic stream never grows memory. Committed records are dropped.
    """

    def __init__(self, capacity: int = 200_000, start: Mapping[str, int] | None = None) -> None:
        self._capacity = capacity
        self._cond = threading.Condition()
        self._topics: dict[str, deque[bytes]] = {}
        self._base: dict[str, int] = {}  # offset of the first record held per topic
        self._start = dict(start or {})
        self._closed = False

    def _topic(self, topic: str) -> deque[bytes]:
        if topic not in self._topics:
            self._topics[topic] = deque()
            # Offsets continue from a recorded position so they stay monotonic across restarts.
            self._base[topic] = self._start.get(position_slot(topic, 0), 0)
        return self._topics[topic]

    def append(self, topic: str, value: bytes, block: bool = True) -> None:
        with self._cond:
            records = self._topic(topic)
            while block and len(records) >= self._capacity and not self._closed:
                self._cond.wait(0.1)
            records.append(value)
            self._cond.notify_all()

    def end_offset(self, topic: str) -> int:
        """One past the last record appended to ``topic``."""
        with self._cond:
            records = self._topic(topic)
            return self._base[topic] + len(records)

    def base_offset(self, topic: str) -> int:
        with self._cond:
            self._topic(topic)
            return self._base[topic]

    def read(self, topic: str, offset: int, max_records: int, timeout_s: float) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            records = self._topic(topic)
            while True:
                base = self._base[topic]
                start = max(offset - base, 0)
                if start < len(records) or self._closed:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            stop = min(start + max_records, len(records))
            # islice walks the deque once; indexing it is linear in the distance from
            # its ends (7% of an embedded trainer's time over a 100k-event backlog).
            values = islice(records, start, stop)
            return [
                Record(topic, 0, base + i, v)
                for i, v in zip(range(start, stop), values, strict=True)
            ]

    def trim(self, topic: str, before: int) -> None:
        """Drop records below offset ``before`` (they are committed)."""
        with self._cond:
            records = self._topic(topic)
            while records and self._base[topic] < before:
                records.popleft()
                self._base[topic] += 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def producer(self) -> InMemoryProducer:
        return InMemoryProducer(self)

    def consumer(self, topic: str, position: Mapping[str, int] | None = None) -> InMemoryConsumer:
        return InMemoryConsumer(self, topic, position)


class InMemoryProducer(EventProducer):
    def __init__(self, log: InMemoryLog) -> None:
        self._log = log

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._log.append(topic, value)

    def flush(self, timeout_s: float = 30.0) -> None:
        return None


class InMemoryConsumer(EventConsumer):
    def __init__(
        self, log: InMemoryLog, topic: str, position: Mapping[str, int] | None = None
    ) -> None:
        self._log = log
        self._topic = topic
        self._offset = (position or {}).get(position_slot(topic, 0), log.base_offset(topic))

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        records = self._log.read(self._topic, self._offset, max_records, timeout_s)
        if records:
            self._offset = records[-1].offset + 1
        return records

    def commit(self, position: Mapping[str, int]) -> None:
        offset = position.get(position_slot(self._topic, 0))
        if offset is not None:
            self._log.trim(self._topic, offset)

    def assignment(self) -> set[str]:
        return {position_slot(self._topic, 0)}

    def end_offsets(self) -> dict[str, int]:
        return {position_slot(self._topic, 0): self._log.end_offset(self._topic)}

    def seek(self, position: Mapping[str, int]) -> None:
        # Nothing below the last commit is trimmed, and the store records before commits.
        offset = position.get(position_slot(self._topic, 0))
        self._offset = offset if offset is not None else self._log.base_offset(self._topic)


RECONNECT_BACKOFF_MAX_MS = 1000
"""kafka-python backs off reconnects up to 30 s by default: a restarted broker would sit
unused for that long."""

COMMIT_TIMEOUT_S = 5.0

GROUP_REJOINS = Counter(
    "streamrec_log_group_rejoins",
    "Kafka group members replaced because their group join did not settle in time.",
)

GROUP_STUCK_S = 60.0
"""How long a group join may go unsettled, the coordinator reachable, before the consumer
gives up on it and joins as a new member (a healthy join of trainers that poll every
few hundred milliseconds takes seconds)."""

TOPIC_METADATA_WAIT_S = 30.0
"""How long a new consumer waits for its topic's partitions before it joins the group."""


class KafkaEventConsumer(EventConsumer):
    """A kafka-python consumer in a group, with auto-commit off.

    On every partition assignment it seeks to ``resume_from()``: the position of what the
    trainer has read (rebalances, e.g. after a broker restart, must neither skip nor
    repeat records the trainer holds; the runtime points it at the trainer once built),
    initially the position the store recorded. Before partitions are revoked it calls
    the ``on_revoked`` callback and commits the position it returns. With ``shared=True``
    (several trainers over one shared hot tier) an assignment seeks to the later of
    ``resume_from()`` and the group's committed offset: another member may have trained
    a partition further since this trainer last held it. Otherwise Kafka's offsets only
    help tools that watch the group's lag: a commit that fails (broker down) is logged
    and retried with the next one.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        resume_from: Callable[[], Mapping[str, int] | None],
        *,
        shared: bool = False,
        group_stuck_s: float = GROUP_STUCK_S,
        **config: Any,
    ) -> None:
        """``group_stuck_s``: a group join that has not settled after this long, with the
        coordinator reachable, is abandoned: this member leaves and a new one joins."""
        self._topic = topic
        self.resume_from = resume_from
        self.bootstrap_servers = bootstrap_servers
        self.group_id = group_id
        self.shared = shared
        self.group_stuck_s = group_stuck_s
        self._config = {
            "bootstrap_servers": bootstrap_servers,
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
            **config,
        }
        self._revoked: Callable[[], Mapping[str, int]] | None = None
        self._unsettled_since: float | None = None
        self._consumer = self._join()

    def _join(self) -> Any:
        """A new kafka-python consumer, subscribed to the topic as a new group member."""
        from kafka import KafkaConsumer
        from kafka.consumer.subscription_state import (
            AsyncConsumerRebalanceListener,
            TopicPartitionState,
        )
        from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

        try:
            consumer = KafkaConsumer(**self._config)
        except (KafkaConnectionError, KafkaTimeoutError):
            raise LogUnavailable(f"no Kafka broker reachable at {self.bootstrap_servers}") from None
        outer = self

        # kafka-python 3 runs listeners on its IO loop, where blocking consumer calls are
        # refused: offsets are fetched and committed with the coordinator's coroutines.
        class _SeekToStore(AsyncConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                if revoked and outer._revoked is not None:
                    offsets = outer._offsets(outer._revoked(), set(revoked))
                    try:
                        commit = consumer._coordinator._commit_offsets_sync_async
                        await commit(offsets, timeout_ms=int(COMMIT_TIMEOUT_S * 1000))
                    except KafkaError as e:
                        log.warning("could not commit offsets before a rebalance: %s", e)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                recorded = outer.resume_from() or {}
                known = {
                    tp: recorded[slot]
                    for tp in assigned
                    if (slot := position_slot(tp.topic, tp.partition)) in recorded
                }
                if outer.shared and known:
                    await outer._advance_to_committed(consumer, known)
                for tp in assigned:
                    if tp in known:
                        consumer.seek(tp, known[tp])
                    elif outer._revoked is not None:
                        # The revoke callback dropped what it buffered, so the fetch
                        # position may be past untrained records: forget it. The consumer
                        # then starts from the group's committed offset, else the
                        # beginning, on its next poll (fetching the offset here instead
                        # can block the group's join without a bound).
                        consumer._subscription.assignment[tp] = TopicPartitionState()
                log.info("assigned %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

        self._await_topic_metadata(consumer)
        consumer.subscribe([self._topic], listener=_SeekToStore())
        return consumer

    def _watch_group(self) -> None:
        """Replace this member if its group join has not settled for ``group_stuck_s``
        while the coordinator is reachable (kafka-python 3.0 has been seen sitting in a
        join forever, fetching nothing). The new member's assignment
        seeks to ``resume_from()``, so nothing is skipped or read twice. A broker that is
        down is not a stuck join: reconnecting is kafka-python's job."""
        from kafka.coordinator.base import MemberState

        coordinator = self._consumer._coordinator
        now = time.monotonic()
        if coordinator.state is MemberState.STABLE and not coordinator.need_rejoin():
            self._unsettled_since = None
            return
        if self._unsettled_since is None or coordinator.coordinator() is None:
            self._unsettled_since = now
            return
        if now - self._unsettled_since < self.group_stuck_s:
            return
        log.warning(
            "group %s has not settled for %.0f s with its coordinator reachable; leaving "
            "it and joining as a new member",
            self.group_id,
            now - self._unsettled_since,
        )
        self._unsettled_since = None
        try:
            fresh = self._join()
        except LogUnavailable as e:
            log.warning("could not create a new member (%s); keeping the old one", e)
            return
        stuck, self._consumer = self._consumer, fresh
        GROUP_REJOINS.inc()
        try:
            stuck.close(autocommit=False, timeout_ms=int(COMMIT_TIMEOUT_S * 1000))
        except Exception as e:  # best effort: the broker drops a silent member anyway
            log.warning("closing the stuck group member failed: %s", e)

    @staticmethod
    async def _advance_to_committed(consumer: Any, positions: dict[Any, int]) -> None:
        """Move each position up to the group's committed offset (in place): another
        member sharing the hot tier may have trained the partition further."""
        from kafka.errors import KafkaError

        fetch = consumer._coordinator.fetch_committed_offsets_async
        try:
            committed = await fetch(set(positions), timeout_ms=int(COMMIT_TIMEOUT_S * 1000))
        except KafkaError as e:
            log.warning(
                "could not fetch the group's offsets (%s); resuming from the store's "
                "positions, events another trainer took may be trained again",
                e,
            )
            return
        for tp, offset in committed.items():
            if offset is not None and offset.offset > positions[tp]:
                positions[tp] = offset.offset

    def _await_topic_metadata(self, consumer: Any) -> None:
        # A group leader that joins before it holds the topic's metadata assigns no
        # partitions, and kafka-python does not always rejoin once the metadata arrives:
        # the trainer would then wait forever on an empty assignment.
        deadline = time.monotonic() + TOPIC_METADATA_WAIT_S
        while not consumer.partitions_for_topic(self._topic):
            if time.monotonic() >= deadline:
                log.warning(
                    "topic %s has no partitions on %s after %.0f s; subscribing anyway, "
                    "partitions are assigned once it is created",
                    self._topic,
                    self.bootstrap_servers,
                    TOPIC_METADATA_WAIT_S,
                )
                return
            time.sleep(0.5)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        from kafka.errors import KafkaError

        try:
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        except KafkaError as e:  # e.g. a coordinator error while the broker restarts
            raise LogUnavailable(f"Kafka at {self.bootstrap_servers}: {e!r}") from e
        if not batches:
            self._watch_group()
        out: list[Record] = []
        for tp, messages in batches.items():
            out.extend(Record(tp.topic, tp.partition, m.offset, m.value) for m in messages)
        return out

    @staticmethod
    def _offsets(position: Mapping[str, int], assigned: set[Any]) -> dict[Any, Any]:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        offsets = {}
        for slot, offset in position.items():
            topic, _, partition = slot.rpartition(":")
            tp = TopicPartition(topic, int(partition))
            if tp in assigned:
                offsets[tp] = OffsetAndMetadata(offset, "", -1)
        return offsets

    def commit(self, position: Mapping[str, int]) -> None:
        offsets = self._offsets(position, self._consumer.assignment())
        if not offsets:
            return
        from kafka.errors import KafkaError

        try:
            self._consumer.commit(offsets, timeout_ms=int(COMMIT_TIMEOUT_S * 1000))
        except KafkaError as e:
            log.warning(
                "could not commit offsets to Kafka at %s (%s); the store holds the position, "
                "the next checkpoint commits again",
                self.bootstrap_servers,
                e,
            )

    def seek(self, position: Mapping[str, int]) -> None:
        from kafka.structs import TopicPartition

        fresh: list[TopicPartition] = []
        for tp in self._consumer.assignment():
            offset = position.get(position_slot(tp.topic, tp.partition))
            if offset is not None:
                self._consumer.seek(tp, offset)
            else:
                fresh.append(tp)
        from kafka.errors import KafkaError

        for tp in fresh:
            try:
                committed = self._consumer.committed(tp, timeout_ms=int(COMMIT_TIMEOUT_S * 1000))
            except KafkaError as e:
                raise LogUnavailable(f"Kafka at {self.bootstrap_servers}: {e}") from e
            if committed is not None:
                self._consumer.seek(tp, committed)
            else:
                self._consumer.seek_to_beginning(tp)  # auto_offset_reset="earliest"

    def assignment(self) -> set[str]:
        return {position_slot(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def end_offsets(self) -> dict[str, int]:
        from kafka.errors import KafkaError

        # The high watermark of each partition's last fetch response.
        ends = {}
        for tp in self._consumer.assignment():
            try:
                end = self._consumer.highwater(tp)
            except KafkaError:  # unassigned since (a rebalance on the IO thread)
                continue
            if end is not None:
                ends[position_slot(tp.topic, tp.partition)] = end
        return ends

    def on_revoked(self, callback: Callable[[], Mapping[str, int]]) -> None:
        self._revoked = callback

    def close(self) -> None:
        self._consumer.close()


_PRUNE_EVERY = 4096  # sends between drops of acknowledged records from the resend list


class KafkaEventProducer(EventProducer):
    """A kafka-python producer (``acks="all"``) that never loses a record silently:
    kafka-python reports a record it gave up on (broker down past
    ``delivery_timeout_ms``) only through its future, so ``flush`` checks every future
    since the last flush, sends failed records again and raises ``LogUnavailable``."""

    def __init__(self, bootstrap_servers: str, **config: Any) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaConnectionError, KafkaTimeoutError

        self.bootstrap_servers = bootstrap_servers
        # (future, (topic, value, key, headers)) of every record not known to be stored.
        self._unacked: list[tuple[Any, tuple[str, bytes, bytes | None, Any]]] = []
        self._sends = 0
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap_servers,
                acks="all",
                linger_ms=5,
                **{"reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS, **config},
            )
        except (KafkaConnectionError, KafkaTimeoutError):
            raise LogUnavailable(f"no Kafka broker reachable at {bootstrap_servers}") from None

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        encoded = [(k, v.encode()) for k, v in (headers or {}).items()] or None
        self._send((topic, value, key, encoded))
        self._sends += 1
        if self._sends % _PRUNE_EVERY == 0:
            self._unacked = [u for u in self._unacked if not u[0].succeeded()]

    def _send(self, record: tuple[str, bytes, bytes | None, Any]) -> None:
        from kafka.errors import KafkaError

        topic, value, key, headers = record
        try:
            future = self._producer.send(topic, value=value, key=key, headers=headers)
        except KafkaError as e:  # e.g. no metadata for the topic within max_block_ms
            raise LogUnavailable(f"Kafka at {self.bootstrap_servers}: {e}") from e
        self._unacked.append((future, record))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every record sent is stored; raises ``LogUnavailable`` when some
        are not (they are sent again, for the next flush)."""
        from kafka.errors import KafkaError

        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as e:
            raise LogUnavailable(
                f"Kafka at {self.bootstrap_servers}: records not stored within {timeout_s:.0f} s"
            ) from e
        failed = [(f, record) for f, record in self._unacked if f.failed()]
        self._unacked = []
        if failed:
            for _, record in failed:
                self._send(record)
            raise LogUnavailable(
                f"Kafka at {self.bootstrap_servers}: {len(failed)} records were not stored "
                f"({failed[0][0].exception!r}); sent again"
            )

    def close(self) -> None:
        self._producer.close()


class JsonlFileProducer(EventProducer):
    """Appends records to a JSON-lines file: the dead-letter "topic" of the
    embedded mode, so a rejected event survives the process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("ab")
        self._lock = threading.Lock()

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        line = orjson.dumps(
            {
                "topic": topic,
                "headers": dict(headers or {}),
                "value": value.decode("utf-8", "backslashreplace"),
            }
        )
        with self._lock:
            self._file.write(line + b"\n")

    def flush(self, timeout_s: float = 30.0) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
