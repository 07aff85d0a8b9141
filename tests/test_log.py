from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY
from support import new_topic

from streaming.log import InMemoryLog, JsonlFileProducer, KafkaEventConsumer, KafkaEventProducer


def produce_numbers(kafka_bootstrap: str, topic: str, n: int) -> None:
    """Records ``b"0"`` ... ``str(n - 1)`` at offsets 0 ... n - 1."""
    producer = KafkaEventProducer(kafka_bootstrap)
    for i in range(n):
        producer.send(topic, str(i).encode())
    producer.flush()
    producer.close()


def test_consumer_reads_in_order_and_commit_trims() -> None:
    log = InMemoryLog(capacity=100)
    producer = log.producer()
    for i in range(10):
        producer.send("t", str(i).encode())
    consumer = log.consumer("t")
    first = consumer.poll(4, 0.1)
    assert [r.offset for r in first] == [0, 1, 2, 3]
    assert [r.value for r in first] == [b"0", b"1", b"2", b"3"]
    consumer.commit({"t:0": 4})
    assert log.base_offset("t") == 4
    rest = consumer.poll(100, 0.1)
    assert [r.offset for r in rest] == list(range(4, 10))
    assert consumer.poll(10, 0.05) == []


def test_offsets_continue_from_a_recorded_position() -> None:
    log = InMemoryLog(start={"t:0": 500})
    log.append("t", b"x")
    consumer = log.consumer("t", {"t:0": 500})
    assert [r.offset for r in consumer.poll(5, 0.1)] == [500]


def test_producer_blocks_until_the_consumer_commits() -> None:
    log = InMemoryLog(capacity=3)
    for i in range(3):
        log.append("t", bytes([i]))
    done = threading.Event()

    def produce() -> None:
        log.append("t", b"late")
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    time.sleep(0.2)
    assert not done.is_set()  # backpressure: the log is full
    consumer = log.consumer("t")
    consumer.poll(3, 0.1)
    consumer.commit({"t:0": 3})
    assert done.wait(2)


def test_jsonl_dead_letters_keep_the_raw_value(tmp_path: Path) -> None:
    path = tmp_path / "dlq.jsonl"
    producer = JsonlFileProducer(path)
    producer.send("dlq", b"\xffnot json", headers={"reason": "invalid_json"})
    producer.flush()
    producer.close()
    line = orjson.loads(path.read_bytes().splitlines()[0])
    assert line["headers"] == {"reason": "invalid_json"}
    assert line["value"].endswith("not json")


def test_in_memory_consumer_seeks_back_to_a_position() -> None:
    log = InMemoryLog()
    for i in range(10):
        log.append("t", str(i).encode())
    consumer = log.consumer("t")
    consumer.poll(8, 0.1)
    consumer.commit({"t:0": 3})
    consumer.seek({"t:0": 5})
    assert [r.offset for r in consumer.poll(100, 0.1)] == [5, 6, 7, 8, 9]
    consumer.seek({})  # no position: back to the oldest record held
    assert [r.offset for r in consumer.poll(2, 0.1)] == [3, 4]


@pytest.mark.integration
def test_kafka_consumer_seeks_back_and_drops_what_it_fetched(kafka_bootstrap: str) -> None:
    topic = new_topic(kafka_bootstrap, "seek", partitions=1)
    produce_numbers(kafka_bootstrap, topic, 20)
    consumer = KafkaEventConsumer(kafka_bootstrap, topic, topic, resume_from=lambda: None)
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while len(seen) < 5 and time.monotonic() < deadline:
        seen += [r.offset for r in consumer.poll(5, 0.5)]  # the rest sits fetched
    assert seen == [0, 1, 2, 3, 4]
    consumer.seek({f"{topic}:0": 2})
    again: list[int] = []
    while len(again) < 18 and time.monotonic() < deadline:
        again += [r.offset for r in consumer.poll(100, 0.5)]
    assert again == list(range(2, 20))
    consumer.commit({f"{topic}:0": 10})
    consumer.seek({})  # no position: back to the committed offset
    rest: list[int] = []
    while len(rest) < 10 and time.monotonic() < deadline:
        rest += [r.offset for r in consumer.poll(100, 0.5)]
    assert rest == list(range(10, 20))
    consumer.close()


@pytest.mark.integration
def test_kafka_consumer_without_a_position_starts_at_the_groups_offset(
    kafka_bootstrap: str,
) -> None:
    """A trainer with no recorded position for a partition starts at the group's
    committed offset (an operator may have set it), else at the beginning."""
    topic = new_topic(kafka_bootstrap, "no-position", partitions=1)
    produce_numbers(kafka_bootstrap, topic, 20)

    def first_offsets(group: str, commit: int | None = None) -> list[int]:
        consumer = KafkaEventConsumer(kafka_bootstrap, topic, group, resume_from=lambda: None)
        seen: list[int] = []
        deadline = time.monotonic() + 30
        while len(seen) < 3 and time.monotonic() < deadline:
            seen += [r.offset for r in consumer.poll(3 - len(seen), 0.5)]
        if commit is not None:
            consumer.commit({f"{topic}:0": commit})
        consumer.close()
        return seen

    assert first_offsets(f"{topic}-a", commit=12) == [0, 1, 2]
    assert first_offsets(f"{topic}-a") == [12, 13, 14]
    assert first_offsets(f"{topic}-b") == [0, 1, 2]


@pytest.mark.integration
def test_a_member_whose_group_join_never_settles_is_replaced(kafka_bootstrap: str) -> None:
    """kafka-python has been seen waiting forever on a group join; after
    ``group_stuck_s`` the consumer joins as a new member, which resumes where the
    trainer had read to: nothing skipped, nothing read twice."""
    topic = new_topic(kafka_bootstrap, "stuck-join", partitions=1)
    produce_numbers(kafka_bootstrap, topic, 20)
    seen: list[int] = []
    consumer = KafkaEventConsumer(
        kafka_bootstrap,
        topic,
        topic,
        resume_from=lambda: {f"{topic}:0": seen[-1] + 1} if seen else None,
        group_stuck_s=1.0,
    )
    deadline = time.monotonic() + 30
    while len(seen) < 5 and time.monotonic() < deadline:
        seen += [r.offset for r in consumer.poll(5 - len(seen), 0.5)]
    assert seen == [0, 1, 2, 3, 4]
    before = REGISTRY.get_sample_value("streamrec_log_group_rejoins_total") or 0.0
    stuck = consumer._consumer
    # What a join that never completes looks like: never settled, nothing fetched.
    stuck._coordinator.need_rejoin = lambda: True
    stuck.pause(*stuck.assignment())
    while len(seen) < 20 and time.monotonic() < deadline:
        seen += [r.offset for r in consumer.poll(100, 0.5)]
    assert seen == list(range(20))
    assert consumer._consumer is not stuck
    assert REGISTRY.get_sample_value("streamrec_log_group_rejoins_total") == before + 1
    consumer.close()
