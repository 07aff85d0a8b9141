from __future__ import annotations

import threading
import time
from pathlib import Path

import orjson

from streaming.log import InMemoryLog, JsonlFileProducer


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
