"""One contract for every ``RowTier`` and for ``TieredStore`` over each hot tier.

Redis runs for real (``clean_redis`` starts it via deploy/local/services.sh); RocksDB
lives under ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY
from support import (
    LocalRedisCluster,
    LocalSentinel,
    cluster_masters,
    free_port,
    migrate_slot,
    redis_command,
    redis_redirects,
)

from storage.base import (
    Keys,
    ReadOnlyStore,
    RowFormatError,
    RowTier,
    StoreError,
    StoreUnavailable,
    TableConfig,
)
from storage.config import StoreConfig
from storage.eviction import EvictionConfig
from storage.factory import open_store
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import HOT_READS_BLOB, POSITION_BLOB, TieredStore

TIER_KINDS = [
    "memory",
    "mapped",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("redis_cluster", marks=pytest.mark.integration),
    "rocksdb",
]
STORE_KINDS = [
    "memory",
    pytest.param("redis", marks=pytest.mark.integration),
    pytest.param("redis_cluster", marks=pytest.mark.integration),
]
REDIS_FIXTURES = {"redis": "clean_redis", "redis_cluster": "clean_redis_cluster"}


def u64(*values: int) -> Keys:
    return np.array(values, dtype=np.uint64)


def keys_of(rng: np.random.Generator, n: int) -> Keys:
    """``n`` distinct random 64-bit keys."""
    return np.unique(rng.integers(0, 2**64 - 1, n * 2, dtype=np.uint64))[:n]


def blobs_of(rng: np.random.Generator, n: int, size: int = 24) -> list[bytes]:
    return [rng.bytes(size) for _ in range(n)]


# -- RowTier contract -------------------------------------------------------------------


@pytest.fixture(params=TIER_KINDS)
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RowTier]:
    t: RowTier
    if request.param == "memory":
        t = MemoryTier()
    elif request.param == "mapped":  # the spill of build_store
        t = MemoryTier.scratch(tmp_path / "mapped")
    elif request.param in REDIS_FIXTURES:
        # Few buckets, small chunks: several keys per hash and several sends per batch
        # (on the cluster: buckets on every master).
        t = RedisTier(request.getfixturevalue(REDIS_FIXTURES[request.param]), buckets=8, chunk=3)
    else:
        t = RocksDBTier(tmp_path / "db")
    yield t
    t.close()


def test_missing_keys_read_none(tier: RowTier) -> None:
    assert tier.get_many("t", u64(1, 2, 3)) == [None, None, None]
    assert tier.get_many("t", u64()) == []
    assert tier.count("t") == 0
    assert tier.get_blob("nope") is None


def test_put_then_get_in_request_order(tier: RowTier) -> None:
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    keys = np.unique(keys)
    values = blobs_of(rng, len(keys))
    tier.put_many("t", keys, values)
    assert tier.count("t") == len(keys)
    order = rng.permutation(len(keys))[:100]
    probe = np.concatenate([keys[order], u64(0, 2)])  # even keys were never written
    assert tier.get_many("t", probe) == [values[i] for i in order] + [None, None]


def test_extreme_keys_and_empty_put(tier: RowTier) -> None:
    keys = u64(0, 2**64 - 1, 2**63)
    tier.put_many("t", keys, [b"a" * 8, b"b" * 8, b"c" * 8])
    tier.put_many("t", u64(), [])
    assert tier.get_many("t", keys[::-1]) == [b"c" * 8, b"b" * 8, b"a" * 8]
    assert tier.count("t") == 3


def test_duplicate_keys(tier: RowTier) -> None:
    tier.put_many("t", u64(5, 6, 5), [b"first", b"six", b"last"])  # the last write wins
    assert tier.count("t") == 2
    assert tier.get_many("t", u64(5, 5, 7, 6, 5)) == [b"last", b"last", None, b"six", b"last"]


def test_overwrite_keeps_count(tier: RowTier) -> None:
    tier.put_many("t", u64(1, 2), [b"x", b"y"])
    tier.put_many("t", u64(2, 3), [b"Y", b"z"])
    assert tier.count("t") == 3
    assert tier.get_many("t", u64(1, 2, 3)) == [b"x", b"Y", b"z"]


def test_delete(tier: RowTier) -> None:
    tier.put_many("t", u64(1, 2, 3), [b"a", b"b", b"c"])
    tier.delete_many("t", u64(2, 9, 2))  # missing and repeated keys are ignored
    tier.delete_many("t", u64())
    assert tier.count("t") == 2
    assert tier.get_many("t", u64(1, 2, 3)) == [b"a", None, b"c"]
    tier.delete_many("other", u64(1))
    assert tier.get_many("t", u64(1)) == [b"a"]


def test_clear_empties_only_that_table(tier: RowTier) -> None:
    rng = np.random.default_rng(5)
    keys = keys_of(rng, 50)
    tier.put_many("a", keys, blobs_of(rng, 50))
    tier.put_many("b", keys, blobs_of(rng, 50))
    tier.clear("a")
    assert tier.count("a") == 0 and tier.get_many("a", keys) == [None] * 50
    assert tier.count("b") == 50 and None not in tier.get_many("b", keys)
    tier.put_many("a", keys[:3], blobs_of(rng, 3))
    assert tier.count("a") == 3


def test_tables_are_separate(tier: RowTier) -> None:
    tier.put_many("a", u64(1), [b"in a"])
    tier.put_many("b", u64(1, 2), [b"in b", b"b2"])
    assert tier.get_many("a", u64(1, 2)) == [b"in a", None]
    assert tier.get_many("b", u64(1)) == [b"in b"]
    assert (tier.count("a"), tier.count("b"), tier.count("c")) == (1, 2, 0)


def test_blobs(tier: RowTier) -> None:
    tier.put_blob("model/x/latest", b"1")
    tier.put_blob("model/x/latest", b"2")
    tier.put_blob("empty", b"")
    big = bytes(range(256)) * 4096
    tier.put_blob("big", big)
    assert tier.get_blob("model/x/latest") == b"2"
    assert tier.get_blob("empty") == b""
    assert tier.get_blob("big") == big
    assert tier.count("model/x/latest") == 0  # blobs are not rows
    tier.delete_blob("big")
    tier.delete_blob("never-written")
    assert tier.get_blob("big") is None and tier.get_blob("empty") == b""


def test_large_batch(tier: RowTier) -> None:
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(0, 2**64 - 1, 5000, dtype=np.uint64, endpoint=True))
    values = blobs_of(rng, len(keys), 76)
    tier.put_many("t", keys, values)
    assert tier.get_many("t", keys) == values
    assert tier.count("t") == len(keys)


def test_scan_returns_every_row_of_the_table(tier: RowTier) -> None:
    rng = np.random.default_rng(5)
    keys = np.unique(rng.integers(0, 2**64 - 1, 500, dtype=np.uint64, endpoint=True))
    values = blobs_of(rng, len(keys))
    tier.put_many("t", keys, values)
    tier.put_many("other", u64(1), [b"not in t"])
    tier.put_blob("t", b"a blob is not a row")
    seen: dict[int, bytes] = {}
    for chunk_keys, chunk_values in tier.scan("t", batch=64):
        assert chunk_keys.dtype == np.uint64
        assert 0 < len(chunk_keys) == len(chunk_values) <= 64
        seen.update(zip(chunk_keys.tolist(), chunk_values, strict=True))
    assert seen == dict(zip(keys.tolist(), values, strict=True))
    assert list(tier.scan("never-written")) == []


def test_scan_while_deleting(tier: RowTier) -> None:
    keys = np.arange(1, 301, dtype=np.uint64) * np.uint64(2**40 + 7)
    tier.put_many("t", keys, [b"v%d" % i for i in range(300)])
    seen: set[int] = set()
    for chunk_keys, _ in tier.scan("t", batch=50):
        seen.update(chunk_keys.tolist())
        tier.delete_many("t", chunk_keys)
    assert seen == set(keys.tolist())
    assert tier.count("t") == 0


def test_rows_path_matches_bytes_path(tier: RowTier) -> None:
    """``put_rows``/``get_rows`` store the packed rows ``put_many``/``get_many`` see."""
    codec = RowCodec(TableConfig(name="t", dim=4, optimizer="adagrad"))
    rng = np.random.default_rng(3)
    keys = keys_of(rng, 300)
    rows = codec.new_rows(keys, 1_700_000_000)
    rows["state"] = rng.random(rows["state"].shape, dtype=np.float32)
    tier.put_rows("t", keys[:200], rows[:200])
    tier.put_many("t", keys[200:], codec.pack(rows[200:]))
    assert tier.count("t") == 300
    assert tier.get_many("t", keys) == codec.pack(rows)
    probe = np.concatenate([keys[::-1], u64(1, 3)])  # never written: zeros, not found
    got, found = tier.get_rows("t", probe, codec)
    assert found.tolist() == [True] * 300 + [False, False]
    assert got[:300].tobytes() == rows[::-1].tobytes()
    assert got[300:].tobytes() == codec.zeros(2).tobytes()
    got[0]["count"] = 99  # the caller's copy: the stored row stays
    assert tier.get_rows("t", keys[-1:], codec)[0].tobytes() == rows[-1:].tobytes()
    none, found = tier.get_rows("never-written", keys[:3], codec)
    assert not found.any() and none.tobytes() == codec.zeros(3).tobytes()


def test_get_rows_names_table_and_key_of_a_wrong_size_value(tier: RowTier) -> None:
    codec = RowCodec(TableConfig(name="t", dim=4))
    keys = u64(11, 12, 13)
    tier.put_many("t", keys, [*codec.pack(codec.new_rows(keys[:2], 0)), b"short"])
    with pytest.raises(RowFormatError, match=r"'t'.*key 13\b"):
        tier.get_rows("t", keys, codec)
    assert tier.get_rows("t", keys[:2], codec)[1].all()


def test_memory_tier_reuses_slots_and_takes_longer_values() -> None:
    tier = MemoryTier()
    keys = np.arange(1, 3001, dtype=np.uint64)
    tier.put_many("t", keys, [b"%08d" % i for i in range(3000)])
    tier.delete_many("t", keys[:2000])
    tier.put_many("t", keys[:2000] + np.uint64(10_000), [b"n%07d" % i for i in range(2000)])
    assert tier.count("t") == 3000
    assert tier._tables["t"].top == 3000  # freed slots went to the new keys
    tier.put_many("t", u64(5000, 2999), [b"a much longer value", b"x"])
    assert tier.get_many("t", u64(2999, 5000, 3000, 1)) == [
        b"x",
        b"a much longer value",
        b"%08d" % 2999,
        None,
    ]
    assert tier.get_many("t", u64(10_001)) == [b"n0000000"]


def test_get_tables_reads_like_get_many(tier: RowTier) -> None:
    """Several tables in one call (names of several lengths: Redis builds each command
    shape apart), present and missing keys, unsorted, an empty and an unwritten table."""
    rng = np.random.default_rng(1)
    stored = {name: np.unique(keys_of(rng, 40)) for name in ("a", "bb", "t10")}
    for name, keys in stored.items():
        tier.put_many(name, keys, blobs_of(rng, len(keys)))
    asked = {
        name: rng.permutation(np.concatenate([keys[::2], keys_of(rng, 7)]))
        for name, keys in stored.items()
    }
    asked["empty"] = u64()
    asked["never"] = keys_of(rng, 5)
    got = tier.get_tables(asked)
    assert list(got) == list(asked)
    for name, keys in asked.items():
        assert got[name] == tier.get_many(name, keys)
    assert sum(v is not None for v in got["a"]) == 20
    assert tier.get_tables({}) == {}


def test_get_rows_ahead_reads_like_get_rows(tier: RowTier) -> None:
    """Each request's rows as ``get_rows`` gives them, also when the caller writes a
    table between two of them (Redis: sent on another connection, after the read)."""
    rng = np.random.default_rng(2)
    codec = RowCodec(TableConfig(name="r", dim=4))
    stored = {name: np.unique(keys_of(rng, 50)) for name in ("a", "bb", "c")}
    for name, keys in stored.items():
        tier.put_rows(name, keys, codec.new_rows(keys, 1))
    requests = [
        (name, rng.permutation(np.concatenate([keys[::3], keys_of(rng, 5)])), codec)
        for name, keys in stored.items()
    ]
    requests.insert(1, ("empty", u64(), codec))
    requests.append(("never", keys_of(rng, 4), codec))
    expected = [tier.get_rows(name, keys, codec) for name, keys, _ in requests]
    got = []
    for i, read in enumerate(tier.get_rows_ahead(requests)):
        got.append(read)
        name, keys, _ = requests[i]
        if name != "never":
            tier.put_rows(name, keys, codec.new_rows(keys, 2))  # after its read
    for (rows, found), (want_rows, want_found) in zip(got, expected, strict=True):
        assert rows.tobytes() == want_rows.tobytes()
        assert np.array_equal(found, want_found)
    assert list(tier.get_rows_ahead([])) == []


def test_commit_writes_rows_and_blobs(tier: RowTier) -> None:
    tier.commit({"a": (u64(1, 2), [b"a1", b"a2"]), "b": (u64(1), [b"b1"])}, {"pos": b"7"})
    assert tier.get_many("a", u64(1, 2)) == [b"a1", b"a2"]
    assert tier.get_many("b", u64(1)) == [b"b1"]
    assert tier.get_blob("pos") == b"7"
    assert (tier.count("a"), tier.count("b")) == (2, 1)
    tier.commit({}, {})


def test_commit_with_bad_input_writes_nothing(tier: RowTier) -> None:
    with pytest.raises(ValueError, match="'b'"):
        tier.commit({"a": (u64(1), [b"a1"]), "b": (u64(1, 2), [b"b1"])}, {"pos": b"1"})
    assert tier.get_many("a", u64(1)) == [None]
    assert tier.get_blob("pos") is None
    assert tier.count("a") == 0


def test_commit_blob_never_ahead_of_rows(tier: RowTier) -> None:
    """A reader that sees commit k's blob also sees commit k's rows."""
    rounds, per_round = 30, 50
    errors: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            raw = tier.get_blob("pos")
            if raw is None:
                continue
            k = int(raw)
            keys = np.arange(k * per_round, (k + 1) * per_round, dtype=np.uint64)
            got = tier.get_many("t", keys)
            if got != [b"r%d" % k] * per_round:
                errors.append(f"blob at {k} but rows {got[:3]}...")
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for k in range(rounds):
            keys = np.arange(k * per_round, (k + 1) * per_round, dtype=np.uint64)
            tier.commit({"t": (keys, [b"r%d" % k] * per_round)}, {"pos": str(k).encode()})
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert tier.count("t") == rounds * per_round


# -- tier specifics ---------------------------------------------------------------------


def test_redis_unreachable_names_address() -> None:
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1:1\b"):
        RedisTier("redis://127.0.0.1:1/0", connect_timeout=2)


@contextlib.contextmanager
def redis_server(workdir: Path, *listen: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``redis-server`` of the test's own, no persistence; ``listen``: its port, TLS
    and password options."""
    server = subprocess.Popen(
        [
            *("redis-server", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(workdir), *listen),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield server
    finally:
        server.terminate()
        server.wait(10)


def tier_once_up(url: str, server: subprocess.Popen[bytes]) -> RedisTier:
    """A ``RedisTier`` on ``url`` as soon as ``server`` listens."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return RedisTier(url, buckets=64)
        except StoreUnavailable as e:  # not listening yet
            assert server.poll() is None and time.monotonic() < deadline, e
            time.sleep(0.05)


@pytest.mark.integration
def test_redis_credentials_are_used_and_a_refusal_is_a_clear_error(
    services: None, tmp_path: Path
) -> None:
    """A password-protected ``redis-server``: the password in the URL is used (on every
    connection of the pool); a wrong or missing one is a ``StoreError`` (no retry
    helps) naming the address, never the password."""
    port = free_port()
    with redis_server(tmp_path, "--port", str(port), "--requirepass", "s3cret") as server:
        tier = tier_once_up(f"redis://:s3cret@127.0.0.1:{port}/0", server)
        try:
            keys = np.arange(1, 101, dtype=np.uint64)
            tier.put_many("t", keys, [b"v"] * 100)
            assert tier.get_many("t", keys[:2]) == [b"v", b"v"] and tier.count("t") == 100
        finally:
            tier.close()
        for url in (f"redis://:wrong@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
            with pytest.raises(StoreError, match=f"127.0.0.1:{port}.*credentials") as caught:
                RedisTier(url)
            assert not isinstance(caught.value, StoreUnavailable)
            assert "wrong" not in str(caught.value)


@pytest.mark.integration
def test_a_misconfigured_redis_is_named(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``redis-server`` with its default listpack limits (128 fields, 64-byte values)
    under 76-byte rows: a table's first write warns, once, naming the settings to
    raise. One that evicts any key under ``maxmemory`` warns once, naming the policy.
    The local Redis (configured as ``deploy/local`` does) gives no warning, and a
    server that refuses ``CONFIG`` is not checked."""
    keys = np.arange(1, 11, dtype=np.uint64)

    def warnings_of(url: str, server: subprocess.Popen[bytes] | None = None) -> list[str]:
        caplog.clear()
        tier = tier_once_up(url, server) if server else RedisTier(url, prefix="lp", buckets=64)
        try:
            with caplog.at_level(logging.WARNING, logger="storage.redis_tier"):
                tier.put_many("t", keys, [b"x" * 76] * 10)
                tier.put_many("t", keys, [b"y" * 76] * 10)
                tier.put_many("u", keys, [b"z" * 76] * 10)
                assert tier.get_many("t", keys[:1]) == [b"y" * 76]
        finally:
            tier.close()
        return [r.getMessage() for r in caplog.records if "Redis at" in r.getMessage()]

    port = free_port()
    with redis_server(tmp_path, "--port", str(port)) as server:
        listpack_t, listpack_u = warnings_of(f"redis://127.0.0.1:{port}/0", server)
    assert f"127.0.0.1:{port}" in listpack_t and "table 't' (76-byte rows" in listpack_t
    assert "hash-max-listpack-entries >= 256 and hash-max-listpack-value >= 1024" in listpack_t
    assert "table 'u'" in listpack_u
    port = free_port()
    evicting = ("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")
    listpacks = ("--hash-max-listpack-entries", "512", "--hash-max-listpack-value", "1024")
    with redis_server(tmp_path, "--port", str(port), *evicting, *listpacks) as server:
        (policy,) = warnings_of(f"redis://127.0.0.1:{port}/0", server)
    assert "maxmemory-policy allkeys-lru" in policy and "noeviction" in policy
    assert warnings_of(redis_url) == []
    port = free_port()
    with redis_server(tmp_path, "--port", str(port), "--rename-command", "CONFIG", "x") as server:
        assert warnings_of(f"redis://127.0.0.1:{port}/0", server) == []


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1, its own CA, and its key (made by ``openssl``)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not on PATH (it makes the test's certificate)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.integration
def test_redis_sentinel_over_tls(services: None, tmp_path: Path) -> None:
    """``rediss+sentinel://``: sentinels and servers that speak only TLS; the store
    finds the master and its replica (a wait for it, replica reads) and reads and writes
    rows over TLS; without the CA the certificate is refused, naming the sentinels."""
    tls = self_signed_certificate(tmp_path)
    group = LocalSentinel(tmp_path / "sentinel", replicas=1, sentinels=1, tls=tls)
    assert group.url.startswith("rediss+sentinel://")
    tier = RedisTier(group.url, buckets=64, min_replicas=1)
    reader = RedisTier(group.url, buckets=64, replica_reads=True)
    try:
        keys = np.arange(1, 1001, dtype=np.uint64)
        values = [b"v%d" % k for k in keys.tolist()]
        tier.put_many("t", keys, values)
        tier.wait_for_replicas()
        assert tier.get_many("t", keys) == values
        assert reader.get_tables({"t": keys})["t"] == values
        assert tier.address.startswith("rediss+sentinel://") and "(master 127.0.0.1:" in (
            tier.address
        )
        plain = group.url.partition("?")[0]
        with pytest.raises(StoreUnavailable, match=re.escape(plain)):
            RedisTier(plain)  # no CA given: the self-signed certificate is not trusted
    finally:
        reader.close()
        tier.close()
        group.stop()


@pytest.mark.integration
def test_redis_over_tls(services: None, tmp_path: Path) -> None:
    """``rediss://``: rows go both ways over TLS (the store's own socket reads and writes
    included), against a ``redis-server`` that speaks only TLS; a certificate the client
    cannot verify is refused, naming the address."""
    cert, key = self_signed_certificate(tmp_path)
    port = free_port()
    url = f"rediss://127.0.0.1:{port}/0"
    with redis_server(
        tmp_path,
        *("--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert)),
        *("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)),
        *("--tls-auth-clients", "no"),
    ) as server:
        tier = tier_once_up(f"{url}?ssl_ca_certs={cert}", server)
        try:
            keys = np.arange(1, 20001, dtype=np.uint64)
            values = [b"v%d" % k for k in keys.tolist()]
            tier.put_many("t", keys, values)
            codec = RowCodec(TableConfig(name="r", dim=4))
            rows = codec.new_rows(keys, 1)
            tier.put_rows("r", keys, rows)
            assert tier.get_many("t", keys) == values
            assert tier.get_tables({"t": keys[::-1]})["t"] == values[::-1]
            got, found = tier.get_rows("r", keys, codec)
            assert found.all() and got.tobytes() == rows.tobytes()
            assert tier.count("t") == 20000
        finally:
            tier.close()
        with pytest.raises(StoreUnavailable, match=rf"rediss://127\.0\.0\.1:{port}.*verify"):
            RedisTier(url)  # no CA given: the self-signed certificate is not trusted


@pytest.mark.integration
def test_redis_recount_matches_counter(clean_redis: str) -> None:
    tier = RedisTier(clean_redis, buckets=16)
    try:
        tier.put_many("t", np.arange(100, dtype=np.uint64), [b"v"] * 100)
        tier.delete_many("t", np.arange(10, dtype=np.uint64))
        assert tier.count("t") == 90
        assert tier.recount("t") == 90
    finally:
        tier.close()


@pytest.mark.integration
def test_redis_writes_in_flight_are_read_back_and_synced(clean_redis: str) -> None:
    """Writes go out without waiting for their replies: the writer's own reads see them
    at once, other clients after ``sync``, counters included."""
    tier = RedisTier(clean_redis, buckets=16)
    other = RedisTier(clean_redis, buckets=16)
    try:
        keys = np.arange(1000, dtype=np.uint64)
        values = [b"v%d" % k for k in keys]
        tier.put_many("t", keys, values)
        assert tier.get_many("t", keys) == values
        tier.delete_many("t", keys[:10])
        tier.sync()
        assert other.get_many("t", keys[:11]) == [None] * 10 + [values[10]]
        assert other.count("t") == 990
    finally:
        tier.close()
        other.close()


@pytest.fixture
def tier_and_admin(clean_redis: str) -> Iterator[tuple[RedisTier, redis.Redis]]:
    """A 16-bucket ``RedisTier`` and a plain client of the same server, to break it."""
    tier = RedisTier(clean_redis, buckets=16)
    admin = redis.Redis.from_url(clean_redis)
    try:
        yield tier, admin
    finally:
        admin.close()
        tier.close()


@pytest.mark.integration
def test_redis_failed_write_raises_at_the_next_call(
    tier_and_admin: tuple[RedisTier, redis.Redis],
) -> None:
    tier, admin = tier_and_admin
    layout = tier.layout("t", create=True)
    assert layout is not None
    admin.set(layout.bucket_name(3), b"not a hash")  # key 3's bucket
    tier.put_many("t", u64(3, 4), [b"a", b"b"])  # sent; the error reply comes later
    with pytest.raises(StoreError, match=r"WRONGTYPE") as raised:
        tier.sync()
    assert tier.address in str(raised.value)
    assert tier.get_many("t", u64(4)) == [b"b"]  # the connection is still in step
    tier.put_many("t", u64(3), [b"c"])
    with pytest.raises(StoreError, match=r"WRONGTYPE"):
        tier.get_many("t", u64(4))  # or at the next read


@pytest.mark.integration
def test_redis_writes_on_a_dropped_connection_are_resent(
    tier_and_admin: tuple[RedisTier, redis.Redis],
) -> None:
    tier, admin = tier_and_admin
    tier.put_many("t", u64(1000), [b"y"])  # the layout is known from here on
    assert tier.get_many("t", u64(1000)) == [b"y"]  # leaves an idle connection
    admin.client_kill_filter(_type="normal", skipme=True)
    keys = np.arange(100, dtype=np.uint64)
    tier.put_many("t", keys, [b"x"] * 100)  # sent on the dead connection
    tier.sync()  # no replies there: resent on a fresh one
    assert tier.get_many("t", keys) == [b"x"] * 100
    assert tier.count("t") == 101


@pytest.mark.integration
def test_redis_read_ahead_on_a_dropped_connection_reads_the_rest_afresh(
    tier_and_admin: tuple[RedisTier, redis.Redis],
) -> None:
    tier, admin = tier_and_admin
    codec = RowCodec(TableConfig(name="r", dim=4))
    keys = np.arange(1, 201, dtype=np.uint64)
    for name in ("a", "b", "c"):
        tier.put_rows(name, keys, codec.new_rows(keys, 1))
    tier.sync()
    ahead = tier.get_rows_ahead([(name, keys, codec) for name in ("a", "b", "c")])
    rows, found = next(ahead)  # "b" was sent before this came back
    assert found.all()
    admin.client_kill_filter(_type="normal", skipme=True)
    # "b"'s replies were already on their way; "c" is read again with get_rows.
    for rows, found in ahead:
        assert found.all()
        assert rows.tobytes() == codec.new_rows(keys, 1).tobytes()
    broken = tier.get_rows_ahead([("a", keys, codec), ("b", keys, codec)])
    next(broken)
    broken.close()  # abandoned with a reply unread: that connection is not reused
    assert tier.get_rows("c", keys, codec)[1].all()


@pytest.mark.integration
def test_redis_cluster_spreads_rows_over_every_master(clean_redis_cluster: str) -> None:
    tier = RedisTier(clean_redis_cluster, buckets=64)
    other = RedisTier(clean_redis_cluster, buckets=64)
    try:
        assert tier.cluster and len(tier._nodes) == 3
        assert REGISTRY.get_sample_value("streamrec_store_redis_masters") == 3
        keys = np.arange(1, 3001, dtype=np.uint64) * np.uint64(104729)
        codec = RowCodec(TableConfig(name="r", dim=4))
        rows = codec.new_rows(keys, 1)
        tier.put_rows("t", keys, rows)
        tier.sync()
        masters = cluster_masters(clean_redis_cluster)
        # Every master holds some of the 64 bucket hashes (and nothing unroutable).
        held = [m.dbsize() for m in masters]
        assert all(n >= 10 for n in held), held
        got, found = other.get_rows("t", keys, codec)
        assert found.all() and got.tobytes() == rows.tobytes()
        assert other.count("t") == 3000
        for m in masters:
            m.close()
    finally:
        tier.close()
        other.close()


@pytest.mark.integration
def test_redis_cluster_read_on_a_dropped_connection_is_read_again(
    clean_redis_cluster: str,
) -> None:
    tier = RedisTier(clean_redis_cluster, buckets=64)
    masters = cluster_masters(clean_redis_cluster)
    try:
        keys = np.arange(1, 1001, dtype=np.uint64)
        values = [b"v%d" % k for k in keys.tolist()]
        tier.put_many("t", keys, values)
        assert tier.get_many("t", keys) == values  # leaves an idle connection per master
        masters[1].client_kill_filter(_type="normal", skipme=True)
        assert tier.get_tables({"t": keys})["t"] == values  # that master's read again
    finally:
        for m in masters:
            m.close()
        tier.close()


@pytest.mark.integration
def test_redis_cluster_follows_a_failover(services: None, tmp_path: Path) -> None:
    """A master dies and its replica takes its slots over: the call that finds the
    master gone raises ``StoreUnavailable`` (a trainer rewinds) and reads the slot map
    again, and the next one reaches the promoted replica, rows intact."""
    cluster = LocalRedisCluster(tmp_path / "cluster")  # its own: this one loses a master
    tier = RedisTier(cluster.url, buckets=64)
    try:
        keys = np.arange(1, 2001, dtype=np.uint64)
        values = [b"v%d" % k for k in keys.tolist()]
        tier.put_many("t", keys, values)
        tier.sync()
        replica = cluster.add_replica(2)
        cluster.fail_over(2, replica)
        with pytest.raises(StoreUnavailable, match="unreachable"):
            tier.get_many("t", keys)
        assert tier.get_many("t", keys) == values
        tier.put_many("t", keys[:10], [b"new"] * 10)
        assert tier.get_many("t", keys[:11]) == [b"new"] * 10 + [values[10]]
        assert any(n.address.endswith(f":{replica}/0") for n in tier._nodes)
    finally:
        tier.close()
        cluster.stop()


@pytest.mark.integration
def test_redis_cluster_replica_reads(services: None, tmp_path: Path) -> None:
    """``replica_reads`` (serving): rows are read from the masters' replicas (their
    HMGET and HGET counts grow, the masters' do not); a replica that dies leaves its
    master's rows to the master, in the same call. A writer's ``min_replicas`` wait
    asks every master, and fails naming the one whose replica died."""
    cluster = LocalRedisCluster(tmp_path / "cluster")  # its own: with replicas
    replicas = [cluster.add_replica(i) for i in range(3)]
    with redis.Redis.from_url(cluster.url) as seed:  # until it has heard of all of them
        deadline = time.monotonic() + 10
        while not all(len(r) > 3 for r in redis_command(seed, "CLUSTER", "SLOTS")):
            assert time.monotonic() < deadline, "replicas never announced"
            time.sleep(0.05)
    writer = RedisTier(cluster.url, buckets=64, min_replicas=1, replica_timeout_s=0.3)
    reader = RedisTier(cluster.url, buckets=64, replica_reads=True)
    nodes = {port: redis.Redis(port=port) for port in [*cluster.ports, *replicas]}
    try:
        keys = np.arange(1, 3001, dtype=np.uint64)
        values = [b"v%d" % k for k in keys.tolist()]
        writer.put_many("t", keys, values)
        writer.wait_for_replicas()
        for master, replica in zip(cluster.ports, replicas, strict=True):
            offset = nodes[master].info("replication")["master_repl_offset"]
            deadline = time.monotonic() + 10
            while nodes[replica].info("replication")["slave_repl_offset"] < offset:
                assert time.monotonic() < deadline, "replica never caught up"
                time.sleep(0.02)

        def reads() -> dict[int, int]:
            return {port: row_reads(port) for port in nodes}

        before = reads()
        assert reader.get_many("t", keys) == values
        assert reader.get_tables({"t": keys[::-1]})["t"] == values[::-1]
        after = reads()
        assert all(after[port] >= before[port] + 2 for port in replicas), (before, after)
        assert all(after[port] == before[port] for port in cluster.ports), (before, after)

        del nodes[replicas[0]]
        cluster.kill(replicas[0])
        assert reader.get_many("t", keys) == values  # retried at once on its master
        assert reader.get_tables({"t": keys})["t"] == values
        assert reads()[cluster.ports[0]] > after[cluster.ports[0]]
        assert writer.get_many("t", keys[:5]) == values[:5]  # a writer reads masters
        with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{cluster.ports[0]}/0: 0 of the 1"):
            writer.wait_for_replicas()
    finally:
        for node in nodes.values():
            node.close()
        reader.close()
        writer.close()
        cluster.stop()


@pytest.mark.integration
def test_only_read_only_stores_read_replicas(redis_cluster_url: str, tmp_path: Path) -> None:
    cfg = StoreConfig(
        hot="redis", redis_url=redis_cluster_url, redis_replica_reads=True, data_dir=tmp_path
    )
    tables = [TableConfig(name="t", dim=4)]
    writer = open_store(cfg, tables)
    reader = open_store(cfg, tables, read_only=True)
    try:
        assert isinstance(writer.hot, RedisTier) and isinstance(reader.hot, RedisTier)
        assert not writer.hot.replica_reads and reader.hot.replica_reads
        assert writer.hot.min_replicas == reader.hot.min_replicas == 0
    finally:
        reader.close()
        writer.close()
    cfg = cfg.model_copy(update={"redis_min_replicas": 1})
    writer = open_store(cfg, tables)
    reader = open_store(cfg, tables, read_only=True)
    try:  # a reader writes nothing to wait for
        assert isinstance(writer.hot, RedisTier) and isinstance(reader.hot, RedisTier)
        assert (writer.hot.min_replicas, reader.hot.min_replicas) == (1, 0)
    finally:
        reader.close()
        writer.close()


def serving_reads(table: str, tier: str, side: str) -> float:
    labels = {"table": table, "tier": tier, "side": side}
    return REGISTRY.get_sample_value("streamrec_store_serving_reads_total", labels) or 0.0


@pytest.mark.integration
def test_serving_asks_the_writer_to_promote_cold_rows(clean_redis: str, tmp_path: Path) -> None:
    """A read-only store (serving) that finds rows only in the cold tier asks the
    writer to promote them (both read paths: several tables at once, one table); the
    writer's ``take_serving_reads`` puts them in Redis, bit for bit, and the next
    serving read finds them hot. Rows already hot are never overwritten; malformed
    reports are skipped. A writer without a capacity does not ask for hot reads."""
    cfg = StoreConfig(hot="redis", redis_url=clean_redis, redis_prefix="promo", data_dir=tmp_path)
    tables = [TableConfig(name="t", dim=4), TableConfig(name="u", dim=4)]
    writer = open_store(cfg, tables)
    keys = np.arange(1, 101, dtype=np.uint64)
    for table in ("t", "u"):
        writer.update(table, keys, np.ones((100, 4), dtype=np.float32))
    writer.flush({"p": 1})
    reader = open_store(cfg, tables, read_only=True)  # its RocksDB view: as of the flush
    try:
        flushed = writer.hot.get_many("t", keys)
        for table in ("t", "u"):  # as if Redis had lost them: in RocksDB only
            writer.hot.delete_many(table, keys[:60])
        sent = serving_reads("t", "cold", "sent")
        cold_hits = reader.stats()["cold_hits"]
        served = reader.lookup_tables({"t": keys, "u": keys[:10]})
        assert served["t"].found.all() and served["u"].found.all()
        assert reader.stats()["cold_hits"] == cold_hits + 70
        assert serving_reads("t", "cold", "sent") == sent + 60
        writer.update("u", keys[:1], np.ones((1, 4), dtype=np.float32))  # hot: newer than cold
        newer = writer.hot.get_many("u", keys[:1])
        assert writer.take_serving_reads() == 60 + 9
        assert writer.hot.get_many("t", keys) == flushed
        assert writer.hot.get_many("u", keys[:1]) == newer
        again = reader.lookup_tables({"t": keys})["t"]
        assert reader.stats()["cold_hits"] == cold_hits + 70  # all hot now
        np.testing.assert_array_equal(again.rows, served["t"].rows)
        assert writer.take_serving_reads() == 0  # nothing asked: no capacity, no hot reads
        assert serving_reads("t", "hot", "sent") == 0

        writer.hot.delete_many("t", keys[:5])
        with redis.Redis.from_url(clean_redis) as client:  # malformed ones are skipped
            client.rpush("promo:reads", b"no table end", b"ct\0\xff\xff\xff\xff", b"xt\0\0\0\0\0")
        assert reader.lookup("t", keys[:10]).found.all()
        assert writer.take_serving_reads() == 5
        assert writer.hot.get_many("t", keys[:10]) == flushed[:10]
    finally:
        reader.close()
        writer.close()


@pytest.mark.integration
def test_serving_reads_keep_rows_hot_in_a_writer_with_a_capacity(
    clean_redis: str, tmp_path: Path
) -> None:
    """A writer with a capacity asks for serving's hot reads: a separate read-only
    store's reads of rows count as uses, so training that pushes other rows out of a
    full hot tier leaves the served rows hot and demotes rows nobody read."""
    table = TableConfig(name="t", dim=4)
    eviction = EvictionConfig(max_rows=30, max_evict_fraction=1.0, protect_steps=1)
    writer = TieredStore(
        [table],
        RedisTier(clean_redis, prefix="hr", buckets=16),
        RocksDBTier(tmp_path / "db"),
        eviction=eviction,
        spill=MemoryTier.scratch(tmp_path / "spill"),
    )
    reader = TieredStore(
        [table],
        RedisTier(clean_redis, prefix="hr", buckets=16),
        RocksDBTier(tmp_path / "db", read_only=True, secondary_path=tmp_path / "secondary"),
        read_only=True,
    )

    def train(keys: Keys) -> None:
        writer.lookup("t", keys, create=True)
        writer.update("t", keys, np.full((len(keys), 4), 0.1, dtype=np.float32))

    try:
        served, unread = np.arange(1, 6, dtype=np.uint64), np.arange(6, 11, dtype=np.uint64)
        train(np.concatenate([served, unread]))
        sent = serving_reads("t", "hot", "sent")
        for step in range(10):
            assert reader.lookup("t", served).found.all()
            writer.take_serving_reads()
            train(np.arange(1000 + 10 * step, 1010 + 10 * step, dtype=np.uint64))
        assert serving_reads("t", "hot", "sent") == sent + 50
        assert writer.hot.get_many("t", served).count(None) == 0
        assert writer.hot.get_many("t", unread).count(None) == len(unread)
    finally:
        reader.close()
        writer.close()
    # A writer gone (its request not refreshed for minutes): readers stop reporting.
    hot = RedisTier(clean_redis, prefix="hr", buckets=16)
    hot.put_blob(HOT_READS_BLOB, repr(time.time() - 600).encode())
    late = TieredStore([table], hot, None, read_only=True)
    try:
        assert late.lookup("t", served).found.all()
        assert serving_reads("t", "hot", "sent") == sent + 50
    finally:
        late.close()


def replicas_caught_up(group: LocalSentinel, timeout_s: float = 30.0) -> None:
    """Wait until the master has replicas and each has applied everything the master
    had when called (replica reads lag the master: the link being up is not enough)."""
    deadline = time.monotonic() + timeout_s
    with group.master() as master:
        offset = master.info("replication")["master_repl_offset"]

    def applied(port: int) -> int:
        """What the replica has applied; -1 while its link is down or a full sync is
        in progress (it then reports the offset it syncs to, serving its old data)."""
        with redis.Redis(port=port) as replica:
            info = replica.info("replication")
        if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
            return -1
        return int(info.get("slave_repl_offset", -1))

    while not group.replica_ports() or min(map(applied, group.replica_ports())) < offset:
        assert time.monotonic() < deadline, "the replicas never caught up with the master"
        time.sleep(0.05)


def row_reads(port: int) -> int:
    """HMGET and HGET calls the server on ``port`` has answered."""
    with redis.Redis(port=port) as server:
        stats = server.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("hmget", "hget"))


def replica_waits_short() -> float:
    return REGISTRY.get_sample_value("streamrec_store_redis_replica_waits_short_total") or 0.0


@pytest.mark.integration
def test_redis_sentinel_reaches_the_master_through_failovers(
    services: None, tmp_path: Path
) -> None:
    """``redis+sentinel://``: the store reaches the master the sentinels name. With
    ``min_replicas`` a wait fails while the replicas are stopped (``StoreUnavailable``,
    counted) and passes once they run. A planned switchover (``SENTINEL FAILOVER``:
    the sentinels close the old master's client connections) is followed without an
    error; a store still writing to the demoted master (here: a plain URL) gets
    ``StoreUnavailable`` naming it a replica. The master killed, the promoted replica
    serves the rows last waited for."""
    group = LocalSentinel(tmp_path / "sentinel", replicas=2)
    tier = RedisTier(group.url, buckets=64, min_replicas=1, replica_timeout_s=0.3)
    keys = np.arange(1, 1001, dtype=np.uint64)
    try:
        with group.master() as master:
            assert f"(master 127.0.0.1:{master.connection_pool.connection_kwargs['port']})" in (
                tier.address
            )
        tier.put_many("t", keys, [b"a"] * 1000)
        tier.wait_for_replicas()
        assert tier.get_many("t", keys[:2]) == [b"a", b"a"] and tier.count("t") == 1000

        # Replica reads (serving): rows come from the replicas, never the master.
        replicas_caught_up(group)
        with group.master() as master:
            ports = [master.connection_pool.connection_kwargs["port"], *group.replica_ports()]
        before = {port: row_reads(port) for port in ports}
        reader = RedisTier(group.url, buckets=64, replica_reads=True)
        try:
            assert reader.get_many("t", keys) == [b"a"] * 1000
            assert reader.get_tables({"t": keys[::-1]})["t"] == [b"a"] * 1000
        finally:
            reader.close()
        after = {port: row_reads(port) for port in ports}
        assert after[ports[0]] == before[ports[0]], (before, after)
        assert sum(after.values()) >= sum(before.values()) + 2, (before, after)

        store = TieredStore(
            TABLES,
            RedisTier(group.url, prefix="ts", buckets=64, min_replicas=1, replica_timeout_s=0.3),
            RocksDBTier(tmp_path / "cold"),
        )
        grads = np.ones((10, TABLES[0].dim), dtype=np.float32)
        store.update("user", keys[:10], grads)
        store.flush({"p": 1})
        pids, short = group.replica_pids(), replica_waits_short()
        assert len(pids) == 2
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            tier.put_many("t", keys, [b"b"] * 1000)
            with pytest.raises(StoreUnavailable, match="0 of the 1 replicas"):
                tier.wait_for_replicas()
            # A flush records nothing its rows' replicas do not hold.
            store.update("user", keys[:10], grads)
            with pytest.raises(StoreUnavailable, match="0 of the 1 replicas"):
                store.flush({"p": 2})
            assert store.position() == {"p": 1}
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert replica_waits_short() == short + 2
        tier.wait_for_replicas()
        store.flush({"p": 2})
        assert store.position() == {"p": 2}
        store.close()

        with group.master() as old, group.sentinel() as sentinel:
            redis_command(sentinel, "SENTINEL", "FAILOVER", "streamrec")
            deadline = time.monotonic() + 30
            while old.info("replication")["role"] != "slave":
                assert time.monotonic() < deadline, "no switchover"
                time.sleep(0.05)
            old_url = f"redis://127.0.0.1:{old.connection_pool.connection_kwargs['port']}/0"
        tier.put_many("t", keys, [b"c"] * 1000)
        deadline = time.monotonic() + 30
        while True:  # until the sentinels have a replica following the new master
            try:
                tier.wait_for_replicas()
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "no replica follows the new master"
        assert tier.get_many("t", keys[:2]) == [b"c", b"c"]
        assert old_url.removesuffix("/0") not in tier.address
        stale = RedisTier(old_url, buckets=64)
        try:
            with pytest.raises(StoreUnavailable, match=r"is a replica now.*READONLY"):
                stale.put_many("u", keys[:1], [b"x"])
                stale.sync()
        finally:
            with contextlib.suppress(StoreUnavailable):
                stale.close()

        promoted = group.kill_master()
        deadline = time.monotonic() + 30
        while True:  # the first calls may find no master the sentinels agree on yet
            try:
                assert tier.get_many("t", keys) == [b"c"] * 1000
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the promoted replica never answered"
                time.sleep(0.1)
        assert f"(master 127.0.0.1:{promoted})" in tier.address

        # A replica reader whose last replica dies reads the master, in the same call.
        replicas_caught_up(group)
        reader = RedisTier(group.url, buckets=64, replica_reads=True)
        try:
            assert reader.get_many("t", keys[:5]) == [b"c"] * 5
            for pid in group.replica_pids():
                os.kill(pid, signal.SIGKILL)
            assert reader.get_many("t", keys) == [b"c"] * 1000
        finally:
            reader.close()
    finally:
        tier.close()
        group.stop()


def test_sentinel_urls_are_checked(services: None) -> None:
    for url in ("redis+sentinel://127.0.0.1:26379", "redis+sentinel:///streamrec"):
        with pytest.raises(ValueError, match="sentinel addresses and a service name"):
            RedisTier(url)
    with pytest.raises(ValueError, match="bad sentinel address"):
        RedisTier("redis+sentinel://127.0.0.1:x/streamrec")
    port = free_port()
    url = f"redis+sentinel://127.0.0.1:{port}/streamrec"
    with pytest.raises(StoreUnavailable, match=re.escape(url)):
        RedisTier(url)


@pytest.mark.integration
def test_redis_cluster_reads_a_slot_in_mid_migration(services: None, tmp_path: Path) -> None:
    """Keys already moved out of a slot still being migrated: the old master answers
    ``ASK``, and reads (HMGET, HGET, GET) follow it to the new one."""
    cluster = LocalRedisCluster(tmp_path / "cluster")  # its own: left mid-migration
    tier = RedisTier(cluster.url, buckets=64)
    masters = cluster_masters(cluster.url)
    try:
        keys = np.arange(0, 640, dtype=np.uint64)
        values = [b"v%d" % k for k in keys.tolist()]
        tier.put_many("t", keys, values)
        tier.put_blob("pos", b"5")
        tier.sync()
        layout = tier.layout("t")
        assert layout is not None
        for name in (layout.bucket_name(5), b"sr:blob:pos"):
            slot = int(redis_command(masters[0], "CLUSTER", "KEYSLOT", name))
            source = next(
                m for m in masters if redis_command(m, "CLUSTER", "COUNTKEYSINSLOT", slot)
            )
            migrate_slot(masters, slot, source, finish=False)
        assert tier.get_many("t", keys) == values
        assert tier.get_tables({"t": keys[::-1]})["t"] == values[::-1]
        assert tier.get_blob("pos") == b"5"
        # Writes to the moved bucket: ASK, sent again to the importing master.
        asked = redis_redirects("write", "ask")
        tier.put_many("t", u64(5, 69), [b"new", b"new69"])
        tier.delete_many("t", u64(133))
        tier.put_many("t", u64(5), [b"newer"])
        tier.sync()
        assert redis_redirects("write", "ask") == asked + 4
        assert tier.get_many("t", u64(5, 69, 133, 197)) == [b"newer", b"new69", None, b"v197"]
        assert tier.count("t") == 639
    finally:
        for m in masters:
            m.close()
        tier.close()
        cluster.stop()


@pytest.mark.integration
def test_redis_cluster_reads_on_after_a_slot_moves(clean_redis_cluster: str) -> None:
    """Resharding under an open store: reads follow the slot (the map is refreshed
    on a MOVED reply); a write sent to the old master is sent again to the new one
    when its reply is read, in order with the writes after it."""
    tier = RedisTier(clean_redis_cluster, buckets=64)
    masters = cluster_masters(clean_redis_cluster)
    try:
        keys = np.arange(0, 640, dtype=np.uint64)  # 10 keys in each of the 64 buckets
        values = [b"v%d" % k for k in keys.tolist()]
        tier.put_many("t", keys, values)
        layout = tier.layout("t")
        assert layout is not None
        name = layout.bucket_name(5)  # keys 5, 69, 133, ...
        slot = int(redis_command(masters[0], "CLUSTER", "KEYSLOT", name))

        def held(m: redis.Redis) -> int:
            return int(redis_command(m, "CLUSTER", "COUNTKEYSINSLOT", slot))

        source = next(m for m in masters if held(m))
        target = migrate_slot(masters, slot, source)
        assert held(target) and not held(source)
        refreshes = REGISTRY.get_sample_value("streamrec_store_redis_slot_map_refreshes_total")
        assert tier.get_many("t", keys) == values  # MOVED, map refreshed, read again
        assert (
            REGISTRY.get_sample_value("streamrec_store_redis_slot_map_refreshes_total")
            == (refreshes or 0) + 1
        )
        # A second store with the old map: its write to the old master fails clearly.
        stale = RedisTier(clean_redis_cluster, buckets=64)
        try:
            assert stale.get_many("t", u64(4)) == [b"v4"]
            migrate_slot(masters, slot, target)
            moved = redis_redirects("write", "moved")
            stale.put_many("t", u64(5), [b"new"])
            stale.put_many("t", u64(1000005), [b"added"])  # a new field: counted
            stale.delete_many("t", u64(133))
            stale.sync()  # MOVED: map read again, the three writes sent again
            assert redis_redirects("write", "moved") == moved + 3
            stale.put_many("t", u64(5), [b"newer"])  # routed by the new map
            assert stale.get_many("t", u64(5, 69, 133, 1000005)) == [
                b"newer", b"v69", None, b"added"
            ]  # fmt: skip
            # Keys of their own (row counter, blobs) follow their slot too.
            stale.put_blob("pos", b"7")
            for name in (b"sr:rows:t", b"sr:blob:pos"):
                key_slot = int(redis_command(masters[0], "CLUSTER", "KEYSLOT", name))
                owner = next(
                    m for m in masters
                    if redis_command(m, "CLUSTER", "COUNTKEYSINSLOT", key_slot)
                )  # fmt: skip
                migrate_slot(masters, key_slot, owner)
            assert (stale.count("t"), stale.get_blob("pos")) == (640, b"7")
            assert stale.recount("t") == 640
        finally:
            stale.close()
    finally:
        for m in masters:
            m.close()
        tier.close()


def test_rocksdb_secondary_of_missing_db_names_path(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match=str(tmp_path / "nothing")):
        RocksDBTier(tmp_path / "nothing", read_only=True)


def test_rocksdb_second_primary_is_unavailable(tmp_path: Path) -> None:
    first = RocksDBTier(tmp_path / "db")
    try:
        with pytest.raises(StoreUnavailable, match="db"):
            RocksDBTier(tmp_path / "db")
    finally:
        first.close()


def test_rocksdb_secondary_follows_primary(tmp_path: Path) -> None:
    primary = RocksDBTier(tmp_path / "db")
    primary.put_many("t", u64(1), [b"old"])
    secondary = RocksDBTier(tmp_path / "db", read_only=True, catch_up_interval=0.05)
    try:
        assert secondary.get_many("t", u64(1)) == [b"old"]
        primary.commit({"t": (u64(1, 2), [b"new", b"two"])}, {"pos": b"9"})
        time.sleep(0.06)  # past the catch-up interval, the next read catches up
        assert secondary.get_many("t", u64(1, 2)) == [b"new", b"two"]
        assert secondary.get_blob("pos") == b"9"
        assert secondary.count("t") == 2
        with pytest.raises(ReadOnlyStore):
            secondary.put_many("t", u64(3), [b"x"])
        with pytest.raises(ReadOnlyStore):
            secondary.commit({}, {"pos": b"1"})
    finally:
        secondary.close()
        primary.close()
    primary.close()  # idempotent


def test_mapped_scratch_keeps_rows_through_growth_and_leaves_no_files(tmp_path: Path) -> None:
    """Rows live in mapped, already unlinked files: growing and widening the arena keeps
    every row, the directory stays empty, and a new scratch tier starts empty."""
    tier = MemoryTier.scratch(tmp_path / "spill")
    keys = np.arange(1, 5001, dtype=np.uint64)  # several doublings past the first arena
    values = [int(k).to_bytes(8, "little") * 2 for k in keys]
    for part in range(0, 5000, 700):
        tier.put_many("t", keys[part : part + 700], values[part : part + 700])
    tier.put_many("t", keys[:1], [b"w" * 40])  # a longer value widens every slot
    assert tier.get_many("t", keys[:3]) == [b"w" * 40, values[1], values[2]]
    assert tier.get_many("t", keys[1:]) == values[1:]
    assert tier.count("t") == 5000
    assert list((tmp_path / "spill").iterdir()) == []
    (tmp_path / "spill" / "left-by-a-crash.rows").write_bytes(b"x")
    again = MemoryTier.scratch(tmp_path / "spill")
    assert again.count("t") == 0 and list((tmp_path / "spill").iterdir()) == []
    assert _open_row_files(tmp_path) == 1  # one file per arena, grown in place
    tier.close()
    again.close()
    del tier, again
    gc.collect()
    assert _open_row_files(tmp_path) == 0  # dropped arenas close their files


def _open_row_files(under: Path) -> int:
    """Files under ``under`` (deleted ones too) that this process holds open: by a
    descriptor, or through a mapping's own duplicate of one."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(1 for p in paths if p.startswith(str(under)))


def test_rocksdb_scratch_starts_empty_and_counts_by_scanning(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    keys = keys_of(rng, 40)
    tier = RocksDBTier.scratch(tmp_path / "scratch")
    tier.put_many("t", keys, blobs_of(rng, 40))
    tier.put_many("t", keys[:10], blobs_of(rng, 10))  # overwrites are not new rows
    tier.delete_many("t", keys[30:])
    assert tier.count("t") == 30
    tier.close()
    reopened = RocksDBTier.scratch(tmp_path / "scratch")
    assert reopened.count("t") == 0 and reopened.get_many("t", keys[:1]) == [None]
    reopened.close()


def test_rocksdb_reopened_keeps_its_block_cache(tmp_path: Path) -> None:
    """A database that exists is opened with the tier's options, not the ones rocksdict
    reads back from its OPTIONS file (which dropped the block cache to RocksDB's 8 MB)."""
    size = 64 << 20
    RocksDBTier(tmp_path / "db", block_cache_bytes=size).close()
    for read_only in (False, True):
        db = RocksDBTier(tmp_path / "db", read_only=read_only, block_cache_bytes=size)
        try:
            assert db._db.property_int_value("rocksdb.block-cache-capacity") == size
        finally:
            db.close()


def test_rocksdb_count_survives_reopen(tmp_path: Path) -> None:
    db = RocksDBTier(tmp_path / "db")
    db.put_many("t", u64(1, 2, 3), [b"a", b"b", b"c"])
    db.delete_many("t", u64(3))
    db.close()
    db = RocksDBTier(tmp_path / "db")
    try:
        assert db.count("t") == 2
        db.put_many("t", u64(2, 4), [b"B", b"d"])
        assert db.count("t") == 3
    finally:
        db.close()


# -- TieredStore ------------------------------------------------------------------------

TABLES = [
    TableConfig(name="user", dim=8, optimizer="rowwise_adagrad"),
    TableConfig(name="item", dim=4, optimizer="adagrad", initial_accumulator=0.1),
    TableConfig(name="tag", dim=3, optimizer="sgd", learning_rate=0.5),
]

StoreFactory = Callable[..., TieredStore]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=STORE_KINDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """``make_store(hot_name=..., read_only=..., cold=True)``: a TieredStore over the
    test's RocksDB path. Stores with another ``hot_name`` get an empty hot tier of the
    same kind (a fresh MemoryTier, or another Redis prefix); memory stores with the same
    ``hot_name`` share the MemoryTier."""
    fixture = REDIS_FIXTURES.get(request.param)
    redis_url = request.getfixturevalue(fixture) if fixture else None
    memory_hots: dict[str, MemoryTier] = {}
    opened: list[TieredStore] = []

    def factory(
        hot_name: str = "main",
        *,
        read_only: bool = False,
        cold: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> TieredStore:
        hot: RowTier
        if redis_url is not None:
            hot = RedisTier(redis_url, prefix=f"test-{hot_name}", buckets=32)
        else:
            hot = memory_hots.setdefault(hot_name, MemoryTier())
        cold_tier = RocksDBTier(tmp_path / "db", read_only=read_only) if cold else None
        store = TieredStore(TABLES, hot, cold_tier, read_only=read_only, clock=clock or Clock())
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


def test_unknown_keys_read_zeros_and_write_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    keys = feature_keys("user", [1, 2, 1])
    result = store.lookup("user", keys)
    assert result.rows.shape == (3, 8) and result.rows.dtype == np.float32
    assert not result.rows.any()
    assert not result.found.any()
    stats = store.stats()
    assert stats["hot_rows.user"] == 0 and stats["cold_rows.user"] == 0
    assert stats["misses"] == 2 and stats["created_rows"] == 0
    empty = store.lookup("user", u64())
    assert empty.rows.shape == (0, 8) and empty.found.shape == (0,)


def test_lookup_create_is_deterministic_and_idempotent(make_store: StoreFactory) -> None:
    store = make_store()
    keys = feature_keys("user", [10, 11, 10, 12])
    created = store.lookup("user", keys, create=True)
    assert created.found.all()
    assert np.array_equal(created.rows[0], created.rows[2])
    assert np.abs(created.rows).max() <= TABLES[0].init_scale
    assert len(np.unique(created.rows, axis=0)) == 3
    again = store.lookup("user", keys)
    assert again.found.all() and np.array_equal(again.rows, created.rows)
    assert store.stats()["hot_rows.user"] == 3
    assert store.stats()["created_rows"] == 3
    # Another store (another process) creates the same rows for the same keys.
    other = make_store("other", cold=False)
    assert np.array_equal(other.lookup("user", keys, create=True).rows, created.rows)


def test_update_changes_only_touched_rows(make_store: StoreFactory) -> None:
    clock = Clock()
    store = make_store(clock=clock)
    keys = feature_keys("item", list(range(10)))
    before = store.lookup("item", keys, create=True).rows
    touched = keys[[1, 4, 7]]
    grads = np.full((3, 4), 0.5, dtype=np.float32)
    clock.now += 60
    store.update("item", touched, grads)
    after = store.lookup("item", keys).rows
    changed = np.flatnonzero((after != before).any(axis=1))
    assert changed.tolist() == [1, 4, 7]
    # AdaGrad: acc = 0.1 + 0.25, w -= 0.05 * 0.5 / (sqrt(acc) + eps)
    step = np.float32(0.05) * (np.float32(0.5) / (np.sqrt(np.float32(0.35)) + np.float32(1e-8)))
    np.testing.assert_allclose(after[[1, 4, 7]], before[[1, 4, 7]] - step, rtol=1e-6)
    codec = RowCodec(TABLES[1])
    raw = store.hot.get_many("item", keys[[1, 2]])
    assert raw[0] is not None and raw[1] is not None
    rows = codec.unpack(keys[[1, 2]], [raw[0], raw[1]])
    assert rows["count"].tolist() == [1, 0]
    assert rows["updated_at"].tolist() == [int(clock.now), int(clock.now) - 60]
    np.testing.assert_allclose(rows["state"][0], 0.35, rtol=1e-6)
    np.testing.assert_allclose(rows["state"][1], 0.1, rtol=1e-6)


def test_update_of_new_keys_creates_rows(make_store: StoreFactory) -> None:
    store = make_store()
    keys = feature_keys("tag", ["a", "b"])
    store.update("tag", keys, np.ones((2, 3), dtype=np.float32))
    init = RowCodec(TABLES[2]).new_rows(keys, 0)["emb"]
    np.testing.assert_allclose(store.lookup("tag", keys).rows, init - 0.5, rtol=1e-6)


def test_update_argument_checks(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="unique"):
        store.update("tag", u64(1, 1), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        store.update("tag", u64(1, 2), np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(KeyError, match="nope"):
        store.lookup("nope", u64(1))
    store.update("tag", u64(), np.zeros((0, 3), dtype=np.float32))


def test_nan_gradients_are_rejected(make_store: StoreFactory) -> None:
    store = make_store()
    keys = feature_keys("user", [1, 2, 3])
    before = store.lookup("user", keys, create=True).rows
    grads = np.ones((3, 8), dtype=np.float32)
    grads[0, 3] = np.nan
    grads[2, 0] = np.inf
    store.update("user", keys, grads)
    after = store.lookup("user", keys).rows
    assert np.array_equal(after[[0, 2]], before[[0, 2]])
    assert not np.array_equal(after[1], before[1])
    assert store.stats()["rejected_gradients"] == 2


def test_flush_and_reopen_restore_rows_bit_exact(make_store: StoreFactory) -> None:
    store = make_store()
    rng = np.random.default_rng(3)
    packed: dict[str, list[bytes | None]] = {}
    all_keys: dict[str, Keys] = {}
    for cfg in TABLES:
        keys = feature_keys(cfg.name, list(range(50)))
        all_keys[cfg.name] = keys
        store.lookup(cfg.name, keys, create=True)
        for _ in range(3):
            touched = np.unique(rng.choice(keys, 20))
            grads = rng.normal(size=(len(touched), cfg.dim)).astype(np.float32)
            store.update(cfg.name, touched, grads)
        packed[cfg.name] = store.hot.get_many(cfg.name, keys)
    assert store.stats()["dirty_rows"] > 0
    store.flush({"events-0": 120, "events-1": 7})
    assert store.stats()["dirty_rows"] == 0
    assert store.position() == {"events-0": 120, "events-1": 7}
    store.close()

    reopened = make_store("fresh")
    assert reopened.position() == {"events-0": 120, "events-1": 7}
    assert reopened.stats()["hot_rows.user"] == 0
    for cfg in TABLES:
        keys = all_keys[cfg.name]
        assert reopened.cold is not None
        assert reopened.cold.get_many(cfg.name, keys) == packed[cfg.name]
        result = reopened.lookup(cfg.name, keys)
        assert result.found.all()
        codec = RowCodec(cfg)
        rows = codec.unpack(keys, [v for v in packed[cfg.name] if v is not None])
        assert np.array_equal(result.rows.view(np.uint32), rows["emb"].view(np.uint32))
        # Promoted into the new hot tier unchanged, optimizer state included.
        assert reopened.hot.get_many(cfg.name, keys) == packed[cfg.name]
    stats = reopened.stats()
    assert stats["cold_hits"] == 150 and stats["misses"] == 0


def test_written_rows_read_back_bit_exact_and_flush_with_the_position(
    make_store: StoreFactory,
) -> None:
    store = make_store()
    cfg = TABLES[1]
    codec = RowCodec(cfg)
    keys = feature_keys(cfg.name, list(range(40)))
    rows, found = store.lookup_rows(cfg.name, keys, create=True)
    assert found.all() and rows.dtype == codec.dtype
    rng = np.random.default_rng(5)
    rows["emb"] = rng.normal(size=rows["emb"].shape)
    rows["state"] = rng.random(size=rows["state"].shape)
    rows["count"] = 3
    store.write_rows(cfg.name, keys[:30], rows[:30])
    again, found = store.lookup_rows(cfg.name, keys)
    assert found.all()
    assert again[:30].tobytes() == rows[:30].tobytes()
    assert store.lookup(cfg.name, keys[:30]).rows.tobytes() == rows["emb"][:30].tobytes()
    store.flush({"events-0": 9})
    assert store.cold is not None
    assert store.cold.get_many(cfg.name, keys[:30]) == codec.pack(rows[:30])
    # Rows handed to flush are committed as given, with the other dirty rows.
    rows["count"] = 4
    store.update(cfg.name, keys[:1], np.ones((1, cfg.dim), dtype=np.float32))
    store.flush({"events-0": 10}, rows={cfg.name: (keys[30:], rows[30:])})
    assert store.position() == {"events-0": 10}
    assert store.stats()["dirty_rows"] == 0
    assert store.cold.get_many(cfg.name, keys[30:]) == codec.pack(rows[30:])
    assert store.cold.get_many(cfg.name, keys[:1]) == store.hot.get_many(cfg.name, keys[:1])
    assert store.hot.get_many(cfg.name, keys[30:]) == codec.pack(rows[30:])
    with pytest.raises(ValueError, match="unique"):
        store.lookup_rows(cfg.name, keys[[0, 0]])
    with pytest.raises(ValueError, match="write_rows needs 2 rows"):
        store.write_rows(cfg.name, keys[:2], RowCodec(TABLES[0]).zeros(2))


def test_flush_is_incremental_and_position_optional(make_store: StoreFactory) -> None:
    store = make_store()
    keys = feature_keys("tag", [1, 2])
    store.lookup("tag", keys, create=True)
    store.flush({"p": 1})
    store.update("tag", keys[:1], np.ones((1, 3), dtype=np.float32))
    store.flush()  # rows only; the recorded position stays
    assert store.position() == {"p": 1}
    assert store.cold is not None
    assert store.cold.get_many("tag", keys[:1]) == store.hot.get_many("tag", keys[:1])
    store.flush({"p": 2})
    assert store.position() == {"p": 2}


def test_position_without_cold_tier_lives_in_hot(make_store: StoreFactory) -> None:
    store = make_store(cold=False)
    assert store.position() is None
    store.lookup("tag", u64(1), create=True)
    store.flush({"p": 3})
    assert store.position() == {"p": 3}
    assert store.hot.get_blob(POSITION_BLOB) is not None
    assert store.stats()["dirty_rows"] == 0


def test_blobs_go_to_both_tiers(make_store: StoreFactory) -> None:
    store = make_store()
    store.put_blob("model/m/latest", b"3")
    assert store.get_blob("model/m/latest") == b"3"
    assert store.hot.get_blob("model/m/latest") == b"3"
    assert store.cold is not None and store.cold.get_blob("model/m/latest") == b"3"
    store.close()
    reopened = make_store("fresh")
    assert reopened.get_blob("model/m/latest") == b"3"
    reopened.delete_blob("model/m/latest")
    assert reopened.get_blob("model/m/latest") is None
    assert reopened.cold is not None and reopened.cold.get_blob("model/m/latest") is None


def test_read_only_secondary_sees_rows_after_primary_flushes(make_store: StoreFactory) -> None:
    primary = make_store()
    keys = feature_keys("user", ["u1", "u2"])
    primary.lookup("user", keys, create=True)
    primary.flush({"p": 1})
    reader = make_store("reader", read_only=True)
    assert reader.lookup("user", keys).found.all()

    primary.update("user", keys, np.ones((2, 8), dtype=np.float32))
    fresh = feature_keys("user", ["u3"])
    primary.lookup("user", fresh, create=True)
    primary.flush({"p": 2})
    expected = primary.lookup("user", np.concatenate([keys, fresh])).rows
    assert reader.cold is not None and isinstance(reader.cold, RocksDBTier)
    reader.cold.catch_up()
    got = reader.lookup("user", np.concatenate([keys, fresh]))
    assert got.found.all()
    assert np.array_equal(got.rows, expected)
    assert reader.position() == {"p": 2}
    # A read-only store never writes: no promotion into its own hot tier.
    assert reader.stats()["hot_rows.user"] == 0
    with pytest.raises(ReadOnlyStore):
        reader.lookup("user", keys, create=True)
    with pytest.raises(ReadOnlyStore):
        reader.update("user", keys, np.ones((2, 8), dtype=np.float32))
    with pytest.raises(ReadOnlyStore):
        reader.flush({"p": 3})
    with pytest.raises(ReadOnlyStore):
        reader.put_blob("x", b"y")


def test_read_only_lookup_tables_matches_lookup(make_store: StoreFactory) -> None:
    primary = make_store()
    users = feature_keys("user", [f"u{i}" for i in range(30)])
    items = feature_keys("item", [f"i{i}" for i in range(20)])
    primary.lookup("user", users, create=True)
    primary.lookup("item", items, create=True)
    primary.flush({"p": 1})
    reader = make_store("reader", read_only=True)
    asked = {
        "user": np.concatenate([users[::-1], feature_keys("user", ["new"]), users[:3]]),
        "item": np.sort(np.concatenate([items[::2], feature_keys("item", ["x", "y"])])),
        "tag": u64(),
    }
    got = reader.lookup_tables(asked)
    assert list(got) == list(asked)
    for table, keys in asked.items():
        one = reader.lookup(table, keys)
        assert np.array_equal(got[table].rows, one.rows), table
        assert np.array_equal(got[table].found, one.found), table
    assert got["user"].found.sum() == 33 and got["item"].found.sum() == 10
    assert got["tag"].rows.shape == (0, 3)
    with pytest.raises(KeyError):
        reader.lookup_tables({"nope": u64(1)})


def test_wrong_size_value_names_table_and_key(make_store: StoreFactory) -> None:
    store = make_store()
    keys = feature_keys("user", [1, 2])
    store.lookup("user", keys[:1], create=True)
    store.hot.put_many("user", keys[1:], [b"\x00" * 12])
    with pytest.raises(RowFormatError, match=rf"'user'.*key {int(keys[1])}\b"):
        store.lookup("user", keys)


def test_read_only_lookup_tables_names_the_table_of_a_wrong_size_value(
    make_store: StoreFactory,
) -> None:
    """Tables of one row layout are read as one array; a bad value still names its own
    table and key."""
    twins = [TableConfig(name=n, dim=4, optimizer="rowwise_adagrad") for n in ("a", "b")]
    base = make_store()
    primary = TieredStore(twins, base.hot, base.cold)
    a, b = feature_keys("a", [1, 2]), feature_keys("b", [1, 2, 3])
    primary.lookup("a", a, create=True)
    primary.lookup("b", b, create=True)
    primary.flush({"p": 1})
    shared = make_store(read_only=True)  # the writer's hot tier, RocksDB as a secondary
    reader = TieredStore(twins, shared.hot, shared.cold, read_only=True)
    got = reader.lookup_tables({"a": a, "b": b})
    assert got["a"].found.all() and got["b"].found.all()
    primary.hot.put_many("b", b[2:], [b"\x00" * 12])
    with pytest.raises(RowFormatError, match=rf"'b'.*key {int(b[2])}\b"):
        reader.lookup_tables({"a": a, "b": b})


def test_readers_never_see_half_written_rows(make_store: StoreFactory) -> None:
    """The embedded mode: one trainer thread, reader threads on the same store."""
    sgd = TableConfig(name="flat", dim=16, optimizer="sgd", learning_rate=1.0, init_scale=0)
    store = make_store()
    store = TieredStore([sgd], store.hot, store.cold)  # same tiers, a table of flat rows
    keys = np.arange(1, 201, dtype=np.uint64)
    store.lookup("flat", keys, create=True)
    store.flush()
    stop = threading.Event()
    problems: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            rows = store.lookup("flat", keys).rows
            # Every update adds 1 to a whole row: a row with unequal entries is torn.
            if not (rows == rows[:, :1]).all():
                problems.append("torn row")
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        rng = np.random.default_rng(4)
        for step in range(60):
            touched = np.unique(rng.choice(keys, 64))
            store.update("flat", touched, -np.ones((len(touched), 16), dtype=np.float32))
            if step % 20 == 0:
                store.flush({"p": step})
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert problems == []
    rows = store.lookup("flat", keys).rows
    assert (rows == rows[:, :1]).all() and rows.max() > 0


def test_flush_after_dirty_list_dedupe(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage.tiered

    monkeypatch.setattr(storage.tiered, "_DIRTY_COMPACT", 8)
    store = make_store()
    keys = np.arange(1, 41, dtype=np.uint64)
    for start in range(0, 40, 5):
        batch = keys[start : start + 10]
        store.update("tag", batch, np.ones((len(batch), 3), dtype=np.float32))
    assert store.stats()["dirty_rows"] <= 70
    store.flush({"p": 1})
    assert store.cold is not None
    assert store.cold.get_many("tag", keys) == store.hot.get_many("tag", keys)
    assert store.stats()["cold_rows.tag"] == 40
