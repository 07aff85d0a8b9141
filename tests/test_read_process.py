"""Store reads in a child process (``storage.read_process``), and the service's reader
using them, against real Redis and RocksDB: same rows as reading in process, errors
carried over, and a killed child costing no read."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.embeddings import EmbeddingReader
from storage.base import AdmissionConfig, StoreUnavailable, TableConfig
from storage.config import StoreConfig
from storage.factory import open_store
from storage.read_process import ReadProcess, ReadProcessDied
from storage.tiered import TieredStore

pytestmark = [pytest.mark.integration]

TABLES = [
    TableConfig(name="user", dim=8, admission=AdmissionConfig(policy="always")),
    TableConfig(name="item", dim=4, admission=AdmissionConfig(policy="always")),
]


def stored(redis_url: str, data_dir: Path) -> tuple[StoreConfig, TieredStore]:
    """A trainer's store with rows in Redis and, after a flush, in RocksDB."""
    config = StoreConfig(hot="redis", redis_url=redis_url, redis_prefix="rp", data_dir=data_dir)
    store = open_store(config, TABLES)
    rng = np.random.default_rng(7)
    for table in TABLES:
        keys = np.arange(1, 301, dtype=np.uint64) * np.uint64(7919)
        store.lookup(table.name, keys, create=True)
        grads = rng.standard_normal((len(keys), table.dim)).astype(np.float32)
        store.update(table.name, keys, grads)
    store.flush()
    return config, store


def wanted() -> dict[str, np.ndarray]:
    """Stored keys and absent ones, sorted and distinct per table, as the service asks."""
    keys = np.unique(np.arange(1, 401, dtype=np.uint64) * np.uint64(7919))
    return {"user": keys, "item": keys[::3]}


def failures() -> float:
    return REGISTRY.get_sample_value("streamrec_service_read_process_failures_total") or 0.0


def test_reads_in_the_child_equal_reads_in_process(clean_redis: str, tmp_path: Path) -> None:
    config, writer = stored(clean_redis, tmp_path)
    reader = open_store(config, TABLES, read_only=True)
    process = ReadProcess(config, TABLES)
    try:
        process.start()
        got = process.lookup_tables(wanted())
        expected = reader.lookup_tables(wanted())
        for table in ("user", "item"):
            np.testing.assert_array_equal(got[table].found, expected[table].found)
            assert got[table].rows.tobytes() == expected[table].rows.tobytes()
        assert got["user"].found.sum() == 300  # the 100 keys past the stored ones are absent
        with pytest.raises(KeyError, match="nope"):  # the store's own errors, as they are
            process.lookup_tables({"nope": np.array([1], dtype=np.uint64)})
        assert process.alive  # an error answer is not a dead child
    finally:
        process.close()
        reader.close()
        writer.close()


def test_a_killed_child_raises_and_a_new_one_starts(clean_redis: str, tmp_path: Path) -> None:
    config, writer = stored(clean_redis, tmp_path)
    process = ReadProcess(config, TABLES)
    try:
        process.start()
        pid = process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ReadProcessDied, match=f"read process {pid}"):
            process.lookup_tables(wanted())
        assert not process.alive
        with pytest.raises(ReadProcessDied, match="no read process"):
            process.lookup_tables(wanted())
        process.start()
        assert process.pid != pid
        assert process.lookup_tables(wanted())["user"].found.sum() == 300
    finally:
        process.close()
        writer.close()


def test_close_ends_the_child_and_removes_its_files(clean_redis: str, tmp_path: Path) -> None:
    config, writer = stored(clean_redis, tmp_path)
    process = ReadProcess(config, TABLES)
    process.start()
    pid = process.pid
    child = process._child
    assert pid is not None and child is not None
    process.close()
    assert not Path(child.secondary).exists()
    with pytest.raises(ProcessLookupError):  # reaped: gone for good
        os.kill(pid, 0)
    writer.close()


def test_a_child_that_cannot_open_the_store_says_why(tmp_path: Path) -> None:
    config = StoreConfig(hot="redis", redis_url="redis://127.0.0.1:1/0", data_dir=tmp_path)
    process = ReadProcess(config, TABLES)
    with pytest.raises(StoreUnavailable, match=re.escape("127.0.0.1:1")):
        process.start()
    assert not process.alive


def test_the_service_reader_survives_its_child_being_killed(
    clean_redis: str, tmp_path: Path
) -> None:
    """Reads keep answering the stored rows (in the server meanwhile), the failure is
    counted, and a new child takes over within seconds."""
    config, writer = stored(clean_redis, tmp_path)
    store = open_store(config, TABLES, read_only=True)
    process = ReadProcess(config, TABLES)
    reader = EmbeddingReader(store, ttl_s=0, budget_s=30.0, processes=[process])
    expected = store.lookup_tables(wanted())
    try:
        reader.start()
        pid = process.pid
        assert pid is not None
        before = failures()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            got = reader.lookup(wanted())
            for table in ("user", "item"):
                assert got[table].rows.tobytes() == expected[table].rows.tobytes()
            if process.alive and process.pid != pid:
                break
            assert time.monotonic() < deadline, "no new read process within 30 s"
            time.sleep(0.05)
        assert failures() == before + 1
        got = reader.lookup(wanted())  # through the new child
        assert got["user"].rows.tobytes() == expected["user"].rows.tobytes()
    finally:
        reader.close()
        store.close()
        writer.close()
    assert not process.alive
