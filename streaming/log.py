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
from pathlib import Path
from typing import Any

import orjson

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
        """Up to ``max_records`` records; an empty list when none arrived in time."""

    @abstractmethod
    def commit(self, position: Mapping[str, int]) -> None:
        """Acknowledge everything before ``position`` (after the store recorded it)."""

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
            return [Record(topic, 0, base + i, records[i]) for i in range(start, stop)]

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


class KafkaEventConsumer(EventConsumer):
    """A kafka-python consumer in a group, with auto-commit off.

    On every partition assignment it seeks to the position the store recorded
    (``resume_from``), so what the store holds and what is read next agree.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        resume_from: Callable[[], Mapping[str, int] | None],
        **config: Any,
    ) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer
        from kafka.errors import KafkaConnectionError, KafkaTimeoutError

        self._topic = topic
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap_servers,
                group_id=group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                **config,
            )
        except (KafkaConnectionError, KafkaTimeoutError):
            raise LogUnavailable(f"no Kafka broker reachable at {bootstrap_servers}") from None

        consumer = self._consumer

        class _SeekToStore(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            def on_partitions_assigned(self, assigned: Any) -> None:
                recorded = resume_from() or {}
                for tp in assigned:
                    offset = recorded.get(position_slot(tp.topic, tp.partition))
                    if offset is not None:
                        consumer.seek(tp, offset)
                log.info("assigned %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))

        consumer.subscribe([topic], listener=_SeekToStore())

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[Record] = []
        for tp, messages in batches.items():
            out.extend(Record(tp.topic, tp.partition, m.offset, m.value) for m in messages)
        return out

    def commit(self, position: Mapping[str, int]) -> None:
        from kafka.structs import OffsetAndMetadata, TopicPartition

        offsets = {}
        assigned = self._consumer.assignment()
        for slot, offset in position.items():
            topic, _, partition = slot.rpartition(":")
            tp = TopicPartition(topic, int(partition))
            if tp in assigned:
                offsets[tp] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self._consumer.commit(offsets)

    def close(self) -> None:
        self._consumer.close()


class KafkaEventProducer(EventProducer):
    def __init__(self, bootstrap_servers: str, **config: Any) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaConnectionError, KafkaTimeoutError

        self._servers = bootstrap_servers
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap_servers,
                acks="all",
                linger_ms=5,
                **config,
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
        from kafka.errors import KafkaError

        encoded = [(k, v.encode()) for k, v in (headers or {}).items()]
        try:
            self._producer.send(topic, value=value, key=key, headers=encoded or None)
        except KafkaError as exc:
            raise LogUnavailable(f"Kafka at {self._servers}: {exc}") from None

    def flush(self, timeout_s: float = 30.0) -> None:
        from kafka.errors import KafkaError

        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise LogUnavailable(f"Kafka at {self._servers}: {exc}") from None

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
