"""A hot tier in Redis, shared by the trainer and service processes.

Key layout (``prefix`` defaults to ``sr``):

* rows of a table with ``B`` buckets: hash ``{prefix}:{<table>:<B>:<bucket hex>}``
  (e.g. ``sr:{user:65536:1f3a}``; the bucket is zero-padded to the hex width of
  ``B - 1``), ``bucket = key % B``, field = ``key // B`` little-endian in
  ``field_bytes(B)`` bytes (the bucket already holds the rest of the key: 7 bytes for
  256 <= B < 65536, 6 bytes up to 2**24), value = the packed row. The braces are a Redis
  Cluster hash tag: a bucket is one key, so tagging table and bucket spreads the
  buckets of a table over all slots. ``B`` is in the name, so two layouts of one table
  can never read each other's fields as rows.
* layout of a table: string ``{prefix}:layout:<table>`` = ``buckets=<B>``. The first
  writer of a table sets it (``SET NX``) from its own hint; every later reader and writer
  uses the stored one, whatever its own hint says. Every write re-asserts it (so a
  ``FLUSHDB`` does not leave readers without it) and raises ``StoreError`` if another
  writer stored a different one meanwhile. A reader that finds none reads the table as
  empty.
* row count of a table: string ``{prefix}:rows:<table>`` (an integer), kept by adding
  the replies of HSET/HDEL (new / removed fields), so ``count`` is one GET. It can drift
  only if a writer dies between a batch and its counter update (or with writes in
  flight: see Wire below), or a batch is resent after its connection broke mid-reply
  (batches are retried once on a fresh connection, for stale pooled connections);
  ``recount`` rebuilds it.
* blobs: string ``{prefix}:blob:<name>``.

Memory. A Redis key costs ~90 bytes of its own (dict entry, object, name, allocator
rounding), so one key per row roughly doubles a 76-byte row. Here rows sit about
``rows_per_bucket`` (default 64) to a hash, ``B = ceil(expected_rows / rows_per_bucket)``
per table, from the ``expected_rows`` hint (one number for all tables or one per table;
default ``DEFAULT_EXPECTED_ROWS``: 65536 buckets, like the old fixed layout); ``buckets``
fixes ``B`` for every table instead. Hints only matter for tables this client creates.
While a hash is *listpack* encoded a row costs its value plus ~12 bytes (the field,
entry headers) plus its share of the hash (~1.5 bytes at 64 rows), and jemalloc rounds
each listpack up to its next size class (+~9% on average). Measured (``bench/store.py``,
Redis 7.0, 1M rows, dim 16): 97.7 bytes per 76-byte row-wise AdaGrad row and 236 per
204-byte lazy Adam row, against 168 for one key per row. Larger buckets save little
memory (~1 byte a row at 128) and cost speed: a field lookup scans its listpack.

**The server must keep the hashes listpack encoded**: Redis converts a hash to its
hashtable encoding (~2x the memory per row; results unchanged, and it never converts
back) once it has more than ``hash-max-listpack-entries`` fields or one value longer
than ``hash-max-listpack-value`` bytes. The defaults, 128 and 64, are too small (a dim-16
row-wise AdaGrad row is 76 bytes), so run it with ``hash-max-listpack-entries 512`` and
``hash-max-listpack-value 1024`` (``deploy/local`` does; raise the value limit for rows
over 1024 bytes, e.g. lazy Adam at dim 64 is 780 bytes, at dim 128 1548). At 64 rows
per bucket on average a table can grow to ~6x its hint before buckets pass 512 fields.
Check with ``OBJECT ENCODING <bucket>`` (``listpack``; ``ziplist`` before Redis 7).
Settings and hints only affect memory and speed, never results.

Wire: every batch is one pipeline on one pooled connection. The RESP bytes of all its
commands (an HMGET/HSET/HDEL per bucket touched) are built with numpy in one go, with no
Python loop per key (``_build``), and sent in chunks of ``chunk`` commands; the replies
of each chunk are parsed by hiredis straight off the socket while Redis works on the
next one (redis-py's per-reply machinery costs ~2 us a reply). Writes (``put_*``,
``delete_many``) do not wait for their replies: they stay in flight on one connection,
and Redis applies them while the caller goes on, until ``sync`` (which every read,
``count``, ``commit`` and ``close`` run first, and ``TieredStore.flush`` at its end)
reads and checks them. So this client's reads always see its writes, other clients see
them once Redis has read them off the socket (at the latest after ``sync``), and a
failed write raises ``StoreError``/``StoreUnavailable`` from the next call instead of
its own. On 2 cores that lets client and server work at once: +30-43% keys/s on
``bench/store.py``'s Redis run at 20% capacity (``BENCHMARKS.md``). For the same reason
``get_rows_ahead`` (a training step's lookup of every table) sends each table's HMGETs
before the caller gets the rows of the table before. ``commit`` wraps
its commands in MULTI/EXEC, so it is atomic on a single Redis server. Replies are read
as RESP2 or RESP3 alike (redis-py 8 connects with RESP3 unless ``protocol=2`` is in the
URL).

Redis Cluster: the URL may name any master; ``INFO cluster`` tells, and ``CLUSTER SLOTS``
maps each of the 16384 hash slots to its master. A bucket's slot is the CRC16 of its
hash tag (``<table>:<B>:<bucket hex>``), computed for every bucket of a table at once
(``_bucket_slots``), so a batch's keys are split by master with numpy and each master
gets the commands of its buckets: reads as one pipeline per master, all masters sent
to before any is read (``_roundtrip_nodes``), writes in flight per master. The other
keys (layout, row counter, blob) go to the master of their own slot. Every master needs
the listpack settings above. Slots that move while the store is open (resharding): a
command redirected with ``MOVED`` (the map is then read again) or ``ASK`` (a slot half
migrated, the key moved already; sent after ``ASKING``) is sent again to the master the
reply names, only it, 5 rounds at most (``_follow_redirections``), then
``StoreUnavailable``. A write in flight that comes back redirected is sent again the
same way when its replies are read (in ``sync``); writes routed by a newer slot map
wait until those of the older one are settled, so a row's writes stay in order. A
master that stops answering makes the store read the map again from the others
(``_lost``): after a failover the next call reaches the promoted replica.
``put_marker`` leaves a copy on every master (a hash tag of one of its slots each), so
a master that lost its data is noticed; ``has_marker`` looks for the copies where a
reshard moved them. ``commit`` cannot be one transaction across masters: rows go
first, then the blobs. The rows read and written per slot are counted as they are
routed, and every ``REPORT_EVERY_S`` published for ``streamrec rebalance``
(``storage.rebalance``; deleted at ``close``).

``replica_reads`` (for read-only clients: a writer must read its own writes) reads rows
(HMGET, HGET) from a replica of each slot's master instead (``READONLY`` on its
connections; one replica per master and process, chosen by pid), with the replication
lag; a replica that fails is avoided for ``_AVOID_REPLICA_S`` and the read is sent to
the masters at once. Metadata (layout, counters, blobs) is always read from masters.

Redis Sentinel: a ``redis+sentinel://`` URL (``_client_of``) gives a connection pool
that asks the sentinels for the master on every new connection. A failed call closes
the node's idle connections (``_lost``), so the next one reaches the promoted replica;
a demoted master's ``READONLY`` reply counts as the master lost. ``replica_reads``
reads rows (HMGET, HGET) through a pool of the replicas the sentinels list
(``_reader``).

``min_replicas``: ``wait_for_replicas`` (the tiered store calls it before a flush
records its position) blocks until that many replicas of every master hold every write
so far (``WAIT``), so a failover cannot bring back rows older than the recorded ones.

Any connection failure raises ``StoreUnavailable`` naming the server's address.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, pairwise
from typing import TYPE_CHECKING, Any, cast

import hiredis
import numpy as np
import numpy.typing as npt
import redis
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.sentinel import Sentinel, SentinelConnectionPool

from storage import metrics
from storage.base import Keys, Mask, Rows, RowTier, StoreError, StoreUnavailable, present_mask
from storage.rebalance import (
    HALF_LIFE_S,
    MAX_REPORT_AGE_S,
    SLOTS,
    SlotTraffic,
    encode_report,
    imbalance,
    report_key,
)

if TYPE_CHECKING:
    from storage.rows import RowCodec

log = logging.getLogger(__name__)

DEFAULT_EXPECTED_ROWS = 1 << 22
"""Rows per table assumed without a hint: 65536 buckets at 64 rows per bucket."""

_Command = tuple[bytes, ...]
_Chunk = tuple[bytes | memoryview, int]  # RESP bytes to send in one go, commands in them
# Checks a write's replies; returns the follow-up commands to send (row counters).
_ReplyHandler = Callable[[list[Any]], list[_Command]]
_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]
_Void = npt.NDArray[np.void]
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_I32 = npt.NDArray[np.int32]
_U64_MAX = (1 << 64) - 1
# Error replies of a server that cannot serve for now (a cluster without all its slots
# covered, e.g. while a master restarts; a server loading its data): unavailable, not
# broken, so a trainer waits and rewinds, serving answers 503.
_TRANSIENT_ERRORS = ("CLUSTERDOWN", "TRYAGAIN", "LOADING", "MASTERDOWN")
_SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
_SENTINEL_PORT = 26379
_AVOID_REPLICA_S = 30.0  # a replica that failed a read is left alone this long
# A replica reader reads the slot map again this often (replicas added or back).
_REPLICA_MAP_EVERY_S = 30.0
_MAX_REDIRECTIONS = 5  # times a redirected command is sent again before it raises
_MAX_READ_REPORTS = 10_000  # readers' reports kept for the writer (the newest)
_MAX_MAPPED_BUCKETS = 1 << 20  # tables with more buckets map their buckets' slots per batch
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_RECV_BYTES = 1 << 18
_MAX_UNACKED_BYTES = 32 << 20  # writes in flight before a writer waits for their replies
_FEED_BYTES = 1 << 14
_MORE = object()  # what hiredis' gets() returns until a whole reply is buffered


@dataclass
class _Unacked:
    """Writes sent on ``conn`` (kept checked out) whose replies are not read yet:
    ``chunks`` kept for one resend, ``handlers`` with the number of replies each takes."""

    node: _Node
    conn: Any
    chunks: list[_Chunk] = field(default_factory=list)
    handlers: list[tuple[int, _ReplyHandler]] = field(default_factory=list)
    replies: int = 0
    nbytes: int = 0
    broken: bool = False  # a send failed: the rest are not sent, all resent in ``sync``
    slot_map: int = 0  # the ``RedisTier._slot_map_epoch`` the writes were routed by


# hiredis' stub types pack_command's argument as a 1-tuple; it takes any arity.
_hiredis_pack = cast(Callable[[_Command], bytes], hiredis.pack_command)


def _pack(commands: Sequence[_Command]) -> bytes:
    """The RESP bytes of ``commands`` (hiredis directly: redis-py's packer re-checks
    every argument, ours are all bytes)."""
    return b"".join(map(_hiredis_pack, commands))


def _address(pool: redis.ConnectionPool, **changes: Any) -> str:
    """The address a connection pool connects to (``changes``: another host or port),
    for errors; no credentials."""
    kw = {**pool.connection_kwargs, **changes}
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ",".join(
            "{host}:{port}".format(**s.connection_pool.connection_kwargs)
            for s in pool.sentinel_manager.sentinels
        )
        scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
        where = f"{scheme}+sentinel://{sentinels}/{pool.service_name}/{kw.get('db', 0)}"
        master = pool.master_address
        return f"{where} (master {master[0]}:{master[1]})" if master else where
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _client_of(
    url: str, *, replica_reads: bool = False, **options: Any
) -> tuple[redis.Redis, Sentinel | None, redis.Redis | None]:
    """A redis-py client for ``url``, its ``Sentinel`` if it names one, and then with
    ``replica_reads`` a client of the master's replicas too (redis-py rotates its new
    connections over the replicas the sentinels list, the master when none answers).

    ``redis://``, ``rediss://`` and ``unix://`` URLs are read as redis-py reads them.
    ``redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB][?QUERY]``
    reaches the master of ``SERVICE`` as the Redis Sentinels at the ``HOST:PORT``s
    (port 26379 by default) name it, asking them again on every new connection (so
    after a failover new connections reach the promoted replica). ``USER``,
    ``PASSWORD``, ``DB`` and the query's redis-py options are the Redis servers'; the
    query's ``sentinel_password`` (and ``sentinel_username``) are the sentinels'.
    ``rediss+sentinel://`` reaches servers and sentinels over TLS (``ssl_*`` options in
    the query, e.g. ``ssl_ca_certs=CA.pem``, apply to both).
    """
    if not url.lower().startswith(_SENTINEL_SCHEMES):
        return redis.Redis.from_url(url, **options), None, None
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    credentials, _, hosts = netloc.rpartition("@")
    service, _, db = path.partition("/")
    if not hosts or not service:
        raise ValueError(
            f"a Sentinel URL needs sentinel addresses and a service name: "
            f"redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB], got {url!r}"
        )
    sentinels = []
    for address in hosts.split(","):
        host, colon, port = address.rpartition(":")
        if not colon or "]" in port:  # no port (or a bare IPv6 address)
            host, port = address, str(_SENTINEL_PORT)
        if not port.isdigit():
            raise ValueError(f"bad sentinel address {address!r} in the Sentinel URL")
        sentinels.append((host.strip("[]"), int(port)))
    # Credentials, db and options as redis-py reads them from a plain URL.
    tls = url.lower().startswith("rediss+")
    at = f"{credentials}@" if credentials else ""
    plain = f"{'rediss' if tls else 'redis'}://{at}localhost/{db or 0}"
    plain += f"?{query}" if query else ""
    kwargs: dict[str, Any] = parse_url(plain)  # type: ignore[no-untyped-call]
    for name in ("host", "port", "connection_class"):
        kwargs.pop(name, None)
    if tls:  # the servers' pools pick their TLS connection class from this
        kwargs["ssl"] = True
    sentinel_auth = {
        name.removeprefix("sentinel_"): kwargs.pop(name)
        for name in ("sentinel_username", "sentinel_password")
        if name in kwargs
    }
    # The sentinels are reached the way the servers are: same socket and TLS options.
    reach = {k: v for k, v in {**options, **kwargs}.items() if k.startswith(("socket_", "ssl"))}
    sentinel = Sentinel(sentinels, sentinel_kwargs={**reach, **sentinel_auth})
    replicas = sentinel.slave_for(service, **kwargs, **options) if replica_reads else None
    return sentinel.master_for(service, **kwargs, **options), sentinel, replicas


def _read_report(entry: bytes) -> Iterator[tuple[bytes, str, Keys]]:
    """The sections of one ``report_reads`` entry: tier (``c``/``h``), table, keys."""
    at = 0
    while at < len(entry):
        end = entry.index(b"\0", at)
        count = int.from_bytes(entry[end + 1 : end + 5], "little")
        keys = np.frombuffer(entry, "<u8", count, end + 5).astype(np.uint64)
        yield entry[at : at + 1], entry[at + 1 : end].decode(), keys
        at = end + 5 + 8 * count


def _unpack(chunks: Sequence[_Chunk]) -> list[_Command]:
    """The commands in the RESP bytes of ``chunks`` (a request is an array of bulk
    strings, which hiredis parses like a reply)."""
    reader = hiredis.Reader(notEnoughData=_MORE)
    for data, _ in chunks:
        reader.feed(bytes(data))
    return [tuple(c) for c in iter(reader.gets, _MORE)]


def _redirection(reply: Any) -> str | None:
    """``"MOVED"`` or ``"ASK"`` if ``reply`` sends its command to another master."""
    if isinstance(reply, hiredis.ReplyError):
        kind = str(reply).partition(" ")[0]
        if kind in ("MOVED", "ASK"):
            return kind
    return None


def _read_only_on_connect(conn: Any) -> None:
    """A replica connection's handshake: redis-py's, then ``READONLY`` (a cluster
    replica answers reads of its master's slots only after it)."""
    conn.on_connect()
    conn.send_command("READONLY")
    if (reply := conn.read_response()) not in (b"OK", "OK"):
        raise RedisConnectionError(f"READONLY failed: {reply!r}")


def _crc16_table() -> list[int]:
    """CRC16-CCITT (XMODEM, polynomial 0x1021): what Redis Cluster hashes keys with."""
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return table


_CRC16 = _crc16_table()
_CRC16_NP = np.array(_CRC16, dtype=np.uint32)


def _crc16(data: bytes, crc: int = 0) -> int:
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def _hash_tag(key: bytes) -> bytes:
    """What Redis Cluster hashes of ``key``: the text between its first ``{`` and the
    next ``}`` if that is not empty, else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of ``key``."""
    return _crc16(_hash_tag(key)) % SLOTS


class _Node:
    """One Redis server: its connection pool, the idle connections of this process, and
    the writes in flight to it (see ``RedisTier._send_writes``)."""

    def __init__(self, pool: redis.ConnectionPool, *, replica: bool = False) -> None:
        self.pool = pool
        self.replica = replica  # a replica read from (on a cluster: connections send READONLY)
        self.failed_at = -math.inf  # a replica that failed: its master is read for a while
        self.unacked: _Unacked | None = None
        self._idle: list[Any] = []
        self._idle_pid = os.getpid()
        self._idle_lock = threading.Lock()
        # Fixed, but behind Sentinel (the master changes).
        self._address: str | None = None
        if not isinstance(pool, SentinelConnectionPool):
            self._address = _address(pool) + (" (replica)" if replica else "")

    @property
    def address(self) -> str:
        """Where this node is, for errors (behind Sentinel: the master it names now)."""
        if self._address is not None:
            return self._address
        return _address(self.pool) + (" (replica)" if self.replica else "")

    def drop_idle(self) -> None:
        """Close the idle connections: after a failure they may all lead to a server
        that is gone or demoted; new ones go where the server is now (behind Sentinel,
        each new connection asks the sentinels for the master)."""
        with self._idle_lock:
            for conn in self._idle:
                conn.disconnect()

    def checkout(self) -> Any:
        """A connection of this process (typed Any: redis-py leaves its wire methods
        untyped), connected. Idle ones wait in a list of our own: redis-py's pool
        checks each one it hands out with a poll, ~5% of a batch's time."""
        conn: Any = None
        with self._idle_lock:
            if self._idle and self._idle_pid == os.getpid():
                conn = self._idle.pop()
        try:
            if conn is None:
                conn = self.pool.get_connection()
            if conn._sock is None:
                conn.connect()
        except AuthenticationError as e:  # a ConnectionError, but no retry will help
            if conn is not None:
                self.checkin(conn)
            raise StoreError(
                f"Redis at {self.address} refused this client's credentials: {e} (user "
                "and password come from the URL: redis://USER:PASSWORD@HOST:PORT/DB)"
            ) from e
        except _UNREACHABLE as e:
            if conn is not None:
                self.checkin(conn)
            raise StoreUnavailable(f"Redis at {self.address} is unreachable: {e}") from e
        return conn

    def checkin(self, conn: Any) -> None:
        with self._idle_lock:
            if self._idle_pid == os.getpid():
                self._idle.append(conn)
                return
        self.pool.release(conn)  # a forked child's: never shared with the parent

    @contextmanager
    def connection(self) -> Iterator[Any]:
        conn = self.checkout()
        try:
            yield conn
        except BaseException:
            # Replies may be left unread: never hand a desynchronised connection back.
            conn.disconnect()
            raise
        finally:
            self.checkin(conn)

    def roundtrip_once(self, chunks: Sequence[_Chunk]) -> list[Any]:
        out: list[Any] = []
        with self.connection() as conn:  # connected by ``checkout``
            sock = conn._sock
            reader = hiredis.Reader(notEnoughData=_MORE)
            sent = 0
            for data, commands in chunks:
                sock.sendall(data)
                # Parse the previous chunk's replies while Redis works on this one: both
                # sides busy, and Redis never buffers more than ~2 chunks of replies.
                read_replies(sock, reader, out, sent)
                sent += commands
            read_replies(sock, reader, out, sent)
        return out

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            self.pool.release(conn)
        self.pool.disconnect()


def read_replies(sock: Any, reader: hiredis.Reader, out: list[Any], replies: int) -> None:
    """Read replies off ``sock`` into ``out`` until it holds ``replies``."""
    while len(out) < replies:
        data = sock.recv(_RECV_BYTES)
        if not data:
            raise RedisConnectionError("connection closed by server")
        # Small feeds: hiredis moves its unread buffer down every ~1 KiB parsed.
        for at in range(0, len(data), _FEED_BYTES):
            reader.feed(data, at, min(_FEED_BYTES, len(data) - at))
            out.extend(iter(reader.gets, _MORE))


def field_bytes(buckets: int) -> int:
    """Bytes of a field (``key // buckets``, little-endian) with ``buckets`` buckets."""
    return max(1, ((_U64_MAX // buckets).bit_length() + 7) // 8)


@lru_cache(maxsize=4)
def _hex_table(digits: int) -> _Void:
    """Zero-padded lowercase hex of 0 .. 16**digits - 1, one ``V<digits>`` item each."""
    x = np.arange(16**digits, dtype=np.uint32)
    shifts = np.arange(4 * (digits - 1), -1, -4, dtype=np.uint32)
    table = np.ascontiguousarray(_HEX[(x[:, None] >> shifts) & np.uint32(15)])
    return table.view(f"V{digits}").ravel()


def _hex(values: npt.NDArray[np.uint64], digits: int) -> _Void:
    """Zero-padded hex of each value (< 16**digits, digits <= 8) as ``V<digits>`` items."""
    if digits <= 4:
        return _hex_table(digits)[values]
    out = np.empty(len(values), dtype=[("hi", f"V{digits - 4}"), ("lo", "V4")])
    out["hi"] = _hex_table(digits - 4)[values >> np.uint64(16)]
    out["lo"] = _hex_table(4)[values & np.uint64(0xFFFF)]
    return out.view(f"V{digits}")


@dataclass(frozen=True)
class BucketLayout:
    """Where the rows of one table live (see the module docstring)."""

    table: str
    buckets: int
    field_bytes: int
    name_head: bytes
    hex_digits: int

    @classmethod
    def of(cls, prefix: str, table: str, buckets: int) -> BucketLayout:
        if not 1 <= buckets <= 1 << 32:
            raise ValueError(f"table {table!r}: buckets must be in [1, 2**32], got {buckets}")
        return cls(
            table=table,
            buckets=buckets,
            field_bytes=field_bytes(buckets),
            name_head=f"{prefix}:{{{table}:{buckets}:".encode(),
            hex_digits=max(1, len(f"{buckets - 1:x}")),
        )

    @property
    def tag(self) -> bytes:
        """The value of the table's layout key."""
        return b"buckets=%d" % self.buckets

    def bucket_name(self, bucket: int) -> bytes:
        return self.name_head + f"{bucket:0{self.hex_digits}x}}}".encode()

    def fields(self, keys: Keys) -> _U8:
        """The fields of ``keys`` as rows of a (n, field_bytes) byte matrix."""
        q = keys // np.uint64(self.buckets) if self.buckets > 1 else keys
        raw = np.ascontiguousarray(q, dtype="<u8").view(np.uint8).reshape(-1, 8)
        return np.ascontiguousarray(raw[:, : self.field_bytes])

    def keys_of(self, bucket: int, fields: Sequence[bytes]) -> Keys:
        """The keys whose fields in ``bucket`` are ``fields`` (the inverse of the above)."""
        raw = np.zeros((len(fields), 8), dtype=np.uint8)
        if fields:
            raw[:, : self.field_bytes] = np.frombuffer(b"".join(fields), np.uint8).reshape(
                len(fields), self.field_bytes
            )
        q = raw.view("<u8").reshape(-1).astype(np.uint64)
        keys: Keys = q * np.uint64(self.buckets) + np.uint64(bucket)
        return keys


_ASKING = _pack([(b"ASKING",)])


def _command_rows(parts: Sequence[_U8]) -> Callable[[int], bytes]:
    """The RESP bytes of command ``i`` of byte matrices of one command a row, laid end
    to end (what a pipeline sent)."""
    ends = np.cumsum([len(part) for part in parts])

    def command(i: int) -> bytes:
        p = int(np.searchsorted(ends, i, side="right"))
        row: bytes = parts[p][i - (int(ends[p - 1]) if p else 0)].tobytes()
        return row

    return command


def _bucket_slots(layout: BucketLayout, buckets: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
    """The cluster hash slot of each bucket's hash (``key_slot`` of ``bucket_name``),
    vectorised: the CRC16 of the tag's fixed head once, then one step per hex digit."""
    head = layout.name_head
    tag_head = head[head.index(b"{") + 1 :]
    if b"}" in tag_head or not buckets.size:  # a prefix with braces: name by name
        return np.array([key_slot(layout.bucket_name(int(b))) for b in buckets], dtype=np.intp)
    crc = np.full(len(buckets), _crc16(tag_head), dtype=np.uint32)
    digits = _hex(buckets, layout.hex_digits).view(np.uint8).reshape(len(buckets), -1)
    for j in range(layout.hex_digits):
        index = ((crc >> np.uint32(8)) ^ digits[:, j]) & np.uint32(0xFF)
        crc = ((crc << np.uint32(8)) & np.uint32(0xFFFF)) ^ _CRC16_NP[index]
    return (crc % np.uint32(SLOTS)).astype(np.intp)


@lru_cache(maxsize=64)
def _void(data: bytes) -> np.void:
    return np.void(data)


@lru_cache(maxsize=64)
def _items_dtype(field_size: int, value_size: int) -> np.dtype[np.void]:
    """One key's arguments: ``$w\\r\\n<field>\\r\\n`` [+ ``$V\\r\\n<value>\\r\\n``]."""
    spec = [("fh", f"V{len(b'$%d' % field_size) + 2}"), ("f", f"V{field_size}")]
    if value_size:
        spec += [("mid", f"V{len(b'$%d' % value_size) + 4}"), ("v", f"V{value_size}")]
    return np.dtype([*spec, ("end", "V2")])


@lru_cache(maxsize=256)
def _part_dtype(head: int, hex_digits: int, item_size: int, items: int) -> np.dtype[np.void]:
    """One command: head (through the bucket name's prefix), hex bucket, ``}\\r\\n``,
    ``items`` keys' arguments."""
    return np.dtype(
        [
            ("head", f"V{head}"),
            ("hex", f"V{hex_digits}"),
            ("tail", "V3"),
            ("items", f"V{item_size}", (items,)),
        ]
    )


@lru_cache(maxsize=64)
def _hget_dtype(head: int, hex_digits: int, field_size: int) -> np.dtype[np.void]:
    """One ``HGET <bucket> <field>``: head (through the bucket name's prefix), hex
    bucket, ``}\\r\\n$w\\r\\n``, field, ``\\r\\n``."""
    mid = len(b"}\r\n$%d\r\n" % field_size)
    return np.dtype(
        [
            ("head", f"V{head}"),
            ("hex", f"V{hex_digits}"),
            ("mid", f"V{mid}"),
            ("f", f"V{field_size}"),
            ("end", "V2"),
        ]
    )


def _build_hgets(layouts: Sequence[BucketLayout], keys: Sequence[Keys]) -> _U8:
    """One ``HGET`` per key of every ``(layout, keys)`` pair, in order, as one byte
    matrix (a row per command). The layouts must share one command shape (name length,
    hex width, field size): each table's name head is then one item of a lookup table,
    so tables are built together, with no Python loop per table or key."""
    first = layouts[0]
    w = first.field_bytes
    name_len = len(first.name_head) + first.hex_digits + 1
    heads = np.array(
        [_void(b"*3\r\n$4\r\nHGET\r\n$%d\r\n%s" % (name_len, lay.name_head)) for lay in layouts]
    )
    counts = [len(k) for k in keys]
    which = np.repeat(np.arange(len(layouts)), counts)
    flat = np.concatenate(keys).astype(np.uint64, copy=False)
    buckets = np.repeat(np.array([lay.buckets for lay in layouts], dtype=np.uint64), counts)
    cmds = np.empty(len(flat), dtype=_hget_dtype(heads.dtype.itemsize, first.hex_digits, w))
    cmds["head"] = heads[which]
    cmds["hex"] = _hex(flat % buckets, first.hex_digits)
    cmds["mid"] = _void(b"}\r\n$%d\r\n" % w)
    raw = np.ascontiguousarray(flat // buckets, dtype="<u8").view(np.uint8).reshape(-1, 8)
    cmds["f"] = np.ascontiguousarray(raw[:, :w]).view(f"V{w}").ravel()
    cmds["end"] = _void(b"\r\n")
    return cmds.view(np.uint8).reshape(len(flat), -1)


@dataclass(frozen=True)
class _Batch:
    """The RESP bytes of the commands for a batch of keys, one or more per bucket.

    ``parts`` are byte matrices, one command per row, to send in order; ``positions``
    are the batch positions of the keys in the order the commands name them (so the
    concatenated HMGET replies are the values of ``keys[positions]``).
    """

    parts: list[_U8]
    commands: int
    positions: npt.NDArray[np.intp]


def _build(command: bytes, layout: BucketLayout, keys: Keys, values: _U8 | None) -> _Batch:
    """``command <bucket> <field> [<value>] ...`` for every bucket that ``keys`` touch.

    Vectorised (no Python loop per key or bucket): keys are sorted by bucket (stable), and
    a bucket with ``c`` keys gets one command per set bit of ``c`` (24 keys: one with 16,
    one with 8), so the commands of one size class all have one shape and are built as
    one record array. Classes go out largest first, which keeps each bucket's keys in
    batch order (the last write of a repeated key wins, as in a single HSET).
    """
    n = len(keys)
    bucket = keys % np.uint64(layout.buckets)
    # Both sorts are stable; 16-bit ids get numpy's radix sort.
    order = np.argsort(
        bucket.astype(np.uint16 if layout.buckets <= 1 << 16 else np.uint32), kind="stable"
    )
    sorted_buckets = bucket[order]
    first_of_bucket = np.empty(n, dtype=np.bool_)
    first_of_bucket[0] = True
    np.not_equal(sorted_buckets[1:], sorted_buckets[:-1], out=first_of_bucket[1:])
    starts = np.flatnonzero(first_of_bucket)
    counts = np.diff(starts, append=n)
    hexes = _hex(sorted_buckets[starts], layout.hex_digits)

    # Each key's arguments as one opaque record: "$w\r\n<field>\r\n[$V\r\n<value>\r\n]".
    w = layout.field_bytes
    value_size = 0 if values is None else values.shape[1]
    items = np.empty(n, dtype=_items_dtype(w, value_size))
    items["fh"] = _void(b"$%d\r\n" % w)
    items["f"] = layout.fields(keys[order]).view(f"V{w}").ravel()
    if values is not None:
        items["mid"] = _void(b"\r\n$%d\r\n" % value_size)
        items["v"] = np.ascontiguousarray(values).view(f"V{value_size}").ravel()[order]
    items["end"] = _void(b"\r\n")
    flat = items.view(f"V{items.dtype.itemsize}")

    args = 1 if values is None else 2
    name_len = len(layout.name_head) + layout.hex_digits + 1
    parts: list[_U8] = []
    positions: list[npt.NDArray[np.intp]] = []
    top = int(counts.max())
    for bit in range(top.bit_length() - 1, -1, -1):
        size = 1 << bit
        if top == 1:  # every bucket has one key (big tables): no selection
            hex_sel, first = hexes, starts
        else:
            sel = np.flatnonzero(counts & size)
            if len(sel) == 0:
                continue
            # This piece's keys follow those of the bucket's larger pieces.
            hex_sel = hexes[sel]
            first = starts[sel] + ((counts[sel] >> (bit + 1)) << (bit + 1))
        idx = first[:, None] + np.arange(size)
        head = b"*%d\r\n$%d\r\n%s\r\n$%d\r\n" % (
            2 + args * size,
            len(command),
            command,
            name_len,
        )
        head += layout.name_head
        part = np.empty(
            len(first), dtype=_part_dtype(len(head), layout.hex_digits, flat.dtype.itemsize, size)
        )
        part["head"] = _void(head)
        part["hex"] = hex_sel
        part["tail"] = _void(b"}\r\n")
        part["items"] = flat[idx]
        parts.append(part.view(np.uint8).reshape(len(first), -1))
        positions.append(order[idx].ravel())
    return _Batch(parts, sum(len(p) for p in parts), np.concatenate(positions))


class RedisTier(RowTier):
    """Rows in bucketed Redis hashes (see the module docstring for the key layout).

    ``buckets`` fixes the bucket count of every table this client creates; otherwise it
    is ``ceil(expected_rows / rows_per_bucket)`` per table, ``expected_rows`` being one
    number for every table or a mapping by table name (missing tables, and ``None``:
    ``DEFAULT_EXPECTED_ROWS``). ``chunk`` is the number of commands per socket send.
    ``traffic_half_life_s``: how fast the slot traffic reported for rebalancing
    forgets (on a cluster; ``storage.rebalance``).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "sr",
        buckets: int | None = None,
        *,
        rows_per_bucket: int = 64,
        expected_rows: int | Mapping[str, int] | None = None,
        chunk: int = 1000,
        socket_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        replica_reads: bool = False,
        min_replicas: int = 0,
        replica_timeout_s: float = 1.0,
        traffic_half_life_s: float = HALF_LIFE_S,
    ) -> None:
        if buckets is not None and not 1 <= buckets <= 1 << 32:
            raise ValueError(f"buckets must be in [1, 2**32], got {buckets}")
        if buckets is not None and expected_rows is not None:
            raise ValueError("pass buckets or expected_rows, not both")
        if rows_per_bucket < 1:
            raise ValueError(f"rows_per_bucket must be >= 1, got {rows_per_bucket}")
        hints = expected_rows.values() if isinstance(expected_rows, Mapping) else [expected_rows]
        if any(n is not None and n < 0 for n in hints):
            raise ValueError(f"expected_rows must be >= 0, got {expected_rows}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        if traffic_half_life_s <= 0:
            raise ValueError(f"traffic_half_life_s must be > 0, got {traffic_half_life_s}")
        if min_replicas < 0 or replica_timeout_s <= 0:
            raise ValueError(
                f"min_replicas must be >= 0 and replica_timeout_s > 0, got {min_replicas} "
                f"and {replica_timeout_s}"
            )
        self.prefix = prefix
        self.buckets = buckets
        self.rows_per_bucket = rows_per_bucket
        self.expected_rows = expected_rows
        self.chunk = chunk
        self.replica_reads = replica_reads
        self.min_replicas = min_replicas
        self.replica_timeout_s = replica_timeout_s
        self.traffic_half_life_s = traffic_half_life_s
        self._client, self._sentinel, self._replicas = _client_of(
            url,
            replica_reads=replica_reads,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            decode_responses=False,  # rows are raw bytes
        )
        self._seed = _Node(self._client.connection_pool)
        # Where a single server's rows are read: behind Sentinel with ``replica_reads``,
        # its replicas (a cluster has a replica map of its own: ``_read_slots``).
        self._reader = self._seed
        if self._replicas is not None:
            self._reader = _Node(self._replicas.connection_pool, replica=True)
        self._layouts: dict[str, BucketLayout] = {}
        self._layouts_lock = threading.Lock()
        # Writes go out without waiting for their replies (see ``_send_writes``).
        self._unacked_lock = threading.RLock()
        # A cluster's masters (the seed first) and the one serving each hash slot;
        # ``_slots`` is None on a single server (see ``_discover``).
        self._nodes: list[_Node] = [self._seed]
        self._slots: npt.NDArray[np.int32] | None = None
        # With ``replica_reads``: the node rows are read from for each slot (a replica
        # of its master, or the master where it has none).
        self._read_slots: npt.NDArray[np.int32] | None = None
        self._slot_map_read_at = 0.0
        # Each bucket's hash slot, per table (fixed by its name, whoever serves it).
        self._bucket_slots: dict[BucketLayout, npt.NDArray[np.uint16]] = {}
        # On a cluster: the rows read and written per slot, reported for ``rebalance``.
        self._traffic: SlotTraffic | None = None
        self._traffic_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}".encode()
        self._master_tags: dict[int, bytes] | None = None  # a hash tag on each master
        self._markers: dict[str, list[bytes]] = {}  # the copies of each marker put here
        self._listpack_checked: set[str] = set()  # tables whose listpack limits were checked
        self._policy_checked: set[str] = set()  # masters whose eviction policy was checked
        self._refreshing = False  # in ``_lost``: no second refresh from within the first
        self._slot_map_epoch = 0  # slot maps read so far (see ``_settle_earlier_routes``)
        self._refresh_lock = threading.Lock()
        try:
            self._execute([(b"PING",)])  # fail fast, naming the address
            self._discover()
        except BaseException:
            self._close_clients()
            raise

    # -- key layout ---------------------------------------------------------------------

    def _count_key(self, table: str) -> bytes:
        return f"{self.prefix}:rows:{table}".encode()

    def _blob_key(self, name: str) -> bytes:
        return f"{self.prefix}:blob:{name}".encode()

    def _layout_key(self, table: str) -> bytes:
        return f"{self.prefix}:layout:{table}".encode()

    def planned_buckets(self, table: str) -> int:
        """The bucket count this client gives ``table`` if it is the first to write it."""
        if self.buckets is not None:
            return self.buckets
        hint = self.expected_rows
        rows = hint.get(table) if isinstance(hint, Mapping) else hint
        if rows is None:
            rows = DEFAULT_EXPECTED_ROWS
        return min(max(1, math.ceil(rows / self.rows_per_bucket)), 1 << 32)

    def _parse_layout(self, table: str, raw: object) -> BucketLayout:
        try:
            assert isinstance(raw, bytes)
            key, _, value = raw.partition(b"=")
            assert key == b"buckets"
            return BucketLayout.of(self.prefix, table, int(value))
        except (AssertionError, ValueError) as e:
            raise StoreError(
                f"Redis at {self.address}: bad layout {raw!r} at {self._layout_key(table)!r}"
            ) from e

    def layout(self, table: str, *, create: bool = False) -> BucketLayout | None:
        """The table's layout as stored in Redis (cached once known). Without one: None,
        or with ``create`` this client's plan, stored unless another writer won the race.
        """
        layout = self._layouts.get(table)
        if layout is not None:
            return layout
        key = self._layout_key(table)
        if create:
            plan = BucketLayout.of(self.prefix, table, self.planned_buckets(table))
            _, raw = self._execute([(b"SET", key, plan.tag, b"NX"), (b"GET", key)])
        else:
            (raw,) = self._execute([(b"GET", key)])
            if raw is None:
                return None
        layout = self._parse_layout(table, raw)
        with self._layouts_lock:
            return self._layouts.setdefault(table, layout)

    def _assert_layout(self, layout: BucketLayout) -> list[_Command]:
        """Commands that re-store the layout if it is gone (their 2 replies: see
        ``_check_layout``)."""
        key = self._layout_key(layout.table)
        return [(b"SET", key, layout.tag, b"NX"), (b"GET", key)]

    def _check_layout(self, layout: BucketLayout, stored: object) -> None:
        if stored != layout.tag:
            raise StoreError(
                f"Redis at {self.address}: table {layout.table!r} is stored with layout "
                f"{stored!r} but this client wrote {layout.tag!r} (another writer re-created "
                "the table with other buckets?); the rows just written are unreachable"
            )

    # -- cluster ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The server (or on a cluster, the master) this store was opened at."""
        return self._seed.address

    @property
    def cluster(self) -> bool:
        """Whether the server is a Redis Cluster (rows spread over its masters)."""
        return self._slots is not None

    @property
    def masters(self) -> int:
        """The masters the rows are spread over (1: a single server)."""
        return 1 if self._slots is None else len(np.unique(self._slots))

    def _discover(self) -> None:
        """On a Redis Cluster, learn which master serves each hash slot."""
        (info,) = self._roundtrip_on(self._seed, self._packed([(b"INFO", b"cluster")]))
        if isinstance(info, bytes) and b"cluster_enabled:1" in info:
            self._refresh_slots()
            self._traffic = SlotTraffic(half_life_s=self.traffic_half_life_s)
        else:
            metrics.REDIS_MASTERS.set(1)

    def _refresh_slots(self) -> None:
        """Read the slot map (``CLUSTER SLOTS``) from the first master that answers.
        Under the writes' lock (taken first, always in this order), so no row write is
        routed while the map changes."""
        with self._unacked_lock, self._refresh_lock:
            self._read_slot_map()

    def _read_slot_map(self) -> None:
        errors = []
        self._refreshing = True
        try:
            for node in list(self._nodes):
                try:
                    (reply,) = self._roundtrip_on(node, self._packed([(b"CLUSTER", b"SLOTS")]))
                except StoreUnavailable as e:
                    errors.append(str(e))
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    raise StoreError(f"Redis at {node.address}: CLUSTER SLOTS: {reply}")
                break
            else:
                raise StoreUnavailable("; ".join(errors))
        finally:
            self._refreshing = False
        slots = np.full(SLOTS, -1, dtype=np.int32)
        read_slots = slots.copy() if self.replica_reads else None
        now = time.monotonic()
        for i, (first, last, master, *replicas) in enumerate(reply):
            owner = self._node_at(master[0].decode(), int(master[1]))
            slots[int(first) : int(last) + 1] = owner
            if read_slots is not None:
                readable = [self._node_at(r[0].decode(), int(r[1]), replica=True) for r in replicas]
                readable = [
                    r for r in readable if self._nodes[r].failed_at < now - _AVOID_REPLICA_S
                ]
                # Processes spread over a master's replicas, each sticking to one.
                pick = readable[(os.getpid() + i) % len(readable)] if readable else owner
                read_slots[int(first) : int(last) + 1] = pick
        if (slots < 0).any():
            raise StoreUnavailable(
                f"Redis Cluster at {self.address}: {int((slots < 0).sum())} of {SLOTS} hash "
                "slots have no master (cluster_state not ok?)"
            )
        if self._slots is not None:
            metrics.REDIS_SLOT_MAP_REFRESHES.inc()
        metrics.REDIS_MASTERS.set(len(np.unique(slots)))
        self._slots = slots
        self._read_slots = read_slots
        self._slot_map_read_at = now
        self._slot_map_epoch += 1
        self._master_tags = None

    def _node_at(self, host: str, port: int, *, replica: bool = False) -> int:
        """The index in ``_nodes`` of the server at ``host:port`` (added if new; an
        empty host: the one this client reached the cluster at), as a master, or as a
        replica to read from (its connections send ``READONLY`` first)."""
        seed = self._seed.pool.connection_kwargs
        kwargs = {**seed, "host": host or seed["host"], "port": port}
        address = _address(self._seed.pool, **kwargs) + (" (replica)" if replica else "")
        for i, node in enumerate(self._nodes):
            if node.address == address:
                return i
        if replica:
            kwargs["redis_connect_func"] = _read_only_on_connect
        pool = redis.ConnectionPool(connection_class=self._seed.pool.connection_class, **kwargs)
        self._nodes.append(_Node(pool, replica=replica))
        return len(self._nodes) - 1

    def _redirected_to(self, reply: Any) -> int:
        """The master a ``MOVED``/``ASK`` reply names (index in ``_nodes``)."""
        host, _, port = str(reply).split()[2].rpartition(":")
        return self._node_at(host, int(port))

    def _follow_redirections(
        self,
        replies: list[Any],
        command: Callable[[int], bytes],
        op: str,
        *,
        key: Callable[[int], bytes] | None = None,
    ) -> None:
        """Replace each reply that sends its command elsewhere (``MOVED``: its slot has
        moved, and the slot map is read again; ``ASK``: its slot is being migrated and
        the key has moved already) by the reply of that command (``command(i)``: the
        RESP bytes of reply ``i``'s) sent again to the master the reply names, after
        ``ASKING`` for ``ASK``; in place. Only those commands go again, so a read meets
        another move rarely even while many slots move; ``_MAX_REDIRECTIONS`` rounds at
        most (what is still redirected is left for the caller's error check).

        ``key`` (writes in flight, from ``sync``: ``key(i)`` is command ``i``'s key): a
        redirected write was not applied, and a row's writes all went to one master in
        order, so a key's writes go to one master a round, in order, and none overtakes
        another; the masters are sent to one after another (``_roundtrip_nodes`` would
        sync from within ``sync``)."""
        if hiredis.ReplyError not in map(type, replies):  # the usual: a C-speed scan
            return
        again = [i for i, reply in enumerate(replies) if _redirection(reply)]
        for _ in range(_MAX_REDIRECTIONS):
            if not again:
                return
            kinds = [_redirection(replies[i]) for i in again]
            if "MOVED" in kinds:
                self._refresh_slots()
            by_node: dict[int, list[tuple[int, bool]]] = {}
            target: dict[bytes, int] = {}  # of each key this round (with ``key``)
            for i, kind in zip(again, kinds, strict=True):
                node = self._redirected_to(replies[i])
                if key is not None:
                    if target.setdefault(key(i), node) != node:
                        target[key(i)] = -1  # its later writes wait for the next round
                    if target[key(i)] != node:
                        continue
                by_node.setdefault(node, []).append((i, kind == "ASK"))
                metrics.REDIS_REDIRECTS.labels(str(kind).lower(), op).inc()
            chunks = {
                node: [
                    (
                        b"".join((_ASKING if asking else b"") + command(i) for i, asking in sent),
                        len(sent) + sum(asking for _, asking in sent),
                    )
                ]
                for node, sent in by_node.items()
            }
            if key is None:
                answered = self._roundtrip_nodes(chunks)
            else:
                answered = {n: self._roundtrip_on(self._nodes[n], c) for n, c in chunks.items()}
            for node, answers in answered.items():
                got = iter(answers)
                for i, asking in by_node[node]:
                    if asking:
                        next(got)  # ASKING's OK
                    replies[i] = next(got)
            again = [i for i in again if _redirection(replies[i])]

    def _node_of(self, key: bytes) -> int:
        return 0 if self._slots is None else int(self._slots[key_slot(key)])

    def _nodes_of_buckets(
        self, layout: BucketLayout, buckets: npt.NDArray[np.uint64], *, read: bool = False
    ) -> _I32:
        """The master (index in ``_nodes``) of each bucket, from a per-table map of every
        bucket's slot (one vectorised CRC16 pass over the bucket names' hash tags);
        ``read``: the node to read its rows from (a replica with ``replica_reads``)."""
        write = not read
        read = read and self._read_slots is not None  # else the masters' map serves both
        slots = self._read_slots if read else self._slots
        assert slots is not None
        bucket_slots: npt.NDArray[np.integer[Any]]
        if layout.buckets > _MAX_MAPPED_BUCKETS:  # too many to map them all: these only
            bucket_slots = _bucket_slots(layout, buckets)
        else:
            every = self._bucket_slots.get(layout)
            if every is None:
                all_buckets = np.arange(layout.buckets, dtype=np.uint64)
                every = _bucket_slots(layout, all_buckets).astype(np.uint16)
                self._bucket_slots[layout] = every
            bucket_slots = every[buckets]
        if self._traffic is not None:
            self._traffic.count(bucket_slots, write=write)
        return slots[bucket_slots]

    def report_traffic(self) -> None:
        """On a cluster, publish this client's slot traffic (``storage.rebalance``)
        now; sent without waiting, a refusal logged. Reads and writes do it every
        ``REPORT_EVERY_S`` by themselves."""
        if self._traffic is None or self._slots is None:
            return
        rates = self._traffic.rates()
        load = np.bincount(self._slots, weights=rates.sum(axis=0), minlength=len(self._nodes))
        metrics.REDIS_LOAD_IMBALANCE.set(imbalance(load[np.unique(self._slots)]))
        report = encode_report(time.time(), rates)
        with self._unacked_lock:
            key = report_key(self.prefix, self._traffic_id)
            expiry = b"%d" % (MAX_REPORT_AGE_S * 1000)
            self._send_commands([(b"SET", key, report, b"PX", expiry)], self._logged)

    def _report_traffic_when_due(self) -> None:
        if self._traffic is not None and self._traffic.due():
            self.report_traffic()

    def _split(
        self, layout: BucketLayout, keys: Keys, *, read: bool = False
    ) -> list[tuple[int, npt.NDArray[np.intp] | None]]:
        """The masters ``keys`` live on (``read``: the nodes to read them from), each
        with the positions of its keys (None: all)."""
        if self._slots is None:
            return [(0, None)]
        nodes = self._nodes_of_buckets(layout, keys % np.uint64(layout.buckets), read=read)
        present = np.unique(nodes)
        if len(present) == 1:
            return [(int(present[0]), None)]
        return [(int(n), np.flatnonzero(nodes == n)) for n in present]

    def _fresh_read_map(self) -> float:
        """Before a read of rows: a replica reader's slot map read again once it is
        ``_REPLICA_MAP_EVERY_S`` old. The time the read starts."""
        now = time.monotonic()
        if self._read_slots is not None and now - self._slot_map_read_at > _REPLICA_MAP_EVERY_S:
            self._refresh_slots()
        return now

    def _replica_failed(self, since: float) -> bool:
        """Whether a replica failed a read since ``since`` (its masters are read instead
        now: the read can be sent again at once)."""
        return any(node.replica and node.failed_at >= since for node in self._nodes)

    # -- wire ---------------------------------------------------------------------------

    def _roundtrip_on(
        self, node: _Node, chunks: Sequence[_Chunk], *, retry: bool = True
    ) -> list[Any]:
        """Send ``chunks`` (RESP bytes, number of commands) pipelined on one connection
        to ``node``; the replies in order (error replies as ``hiredis.ReplyError``
        objects)."""
        if not chunks:
            return []
        try:
            try:
                return node.roundtrip_once(chunks)
            except _UNREACHABLE:
                if not retry:
                    raise
                # A pooled connection may have gone stale (server restart, idle timeout).
                return node.roundtrip_once(chunks)
        except _UNREACHABLE as e:
            self._lost(node)
            raise StoreUnavailable(f"Redis at {node.address} is unreachable: {e}") from e
        except StoreUnavailable:  # no connection to be had
            self._lost(node)
            raise
        except (RedisError, hiredis.HiredisError) as e:
            raise StoreError(f"Redis at {node.address}: {e}") from e

    def _lost(self, node: _Node) -> None:
        """A master stopped answering: on a cluster, read the slot map again from the
        others (best effort), so once a replica has taken its slots over (failover),
        the next call goes there. A replica read from: its masters are read instead
        for ``_AVOID_REPLICA_S``. The node's idle connections are closed (they may lead
        to a server gone or demoted)."""
        if node.replica:
            node.failed_at = time.monotonic()
        node.drop_idle()
        if self._slots is None or self._refreshing:  # not from within a refresh
            return
        try:
            self._refresh_slots()
            log.warning("Redis Cluster node %s unreachable; slot map read again", node.address)
        except StoreError as e:
            log.warning("Redis Cluster node %s unreachable, and no slot map: %s", node.address, e)

    def _roundtrip(
        self, chunks: Sequence[_Chunk], *, retry: bool = True, rows: bool = False
    ) -> list[Any]:
        """``_roundtrip_on`` the seed server (``rows``: reads of rows, on the server
        they are read from, ``_reader``), writes in flight acknowledged first (so every
        read sees them)."""
        self.sync()
        return self._roundtrip_on(self._reader if rows else self._seed, chunks, retry=retry)

    def _roundtrip_nodes(self, chunks: Mapping[int, Sequence[_Chunk]]) -> dict[int, list[Any]]:
        """``_roundtrip_on`` several masters at once (writes in flight acknowledged
        first): each round sends every master its next chunk, then parses the replies
        to the chunks before, so the masters work side by side. A connection that fails
        on the way leaves its master to ``_roundtrip_on`` (which retries once)."""
        self.sync()
        if not chunks:
            return {}
        if len(chunks) == 1:
            ((node, only),) = chunks.items()
            return {node: self._roundtrip_on(self._nodes[node], only)}
        out: dict[int, list[Any]] = {node: [] for node in chunks}
        conns: dict[int, Any] = {}
        failed: set[int] = set()
        done = False
        try:
            for node in chunks:
                with contextlib.suppress(StoreUnavailable):  # retried on its own below
                    conns[node] = self._nodes[node].checkout()
            readers = {node: hiredis.Reader(notEnoughData=_MORE) for node in conns}
            sent = dict.fromkeys(conns, 0)
            for i in range(max(len(c) for c in chunks.values()) + 1):
                for node, conn in conns.items():
                    if node in failed:
                        continue
                    try:
                        if i < len(chunks[node]):
                            conn._sock.sendall(chunks[node][i][0])
                        read_replies(conn._sock, readers[node], out[node], sent[node])
                        if i < len(chunks[node]):
                            sent[node] += chunks[node][i][1]
                    except _UNREACHABLE:
                        failed.add(node)
            for node, conn in conns.items():
                if node not in failed:
                    read_replies(conn._sock, readers[node], out[node], sent[node])
            done = True
        except (RedisError, hiredis.HiredisError) as e:
            raise StoreError(f"Redis Cluster at {self.address}: {e}") from e
        finally:
            for node, conn in conns.items():
                if node in failed or not done:  # replies may be left unread
                    conn.disconnect()
                self._nodes[node].checkin(conn)
        for node in chunks:
            if node in failed or node not in conns:
                out[node] = self._roundtrip_on(self._nodes[node], chunks[node])
        return out

    def _raise_errors(self, replies: Sequence[Any], node: _Node | None = None) -> None:
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                address = (node or self._seed).address
                if self._slots is not None and str(reply).startswith(("MOVED ", "ASK ")):
                    # Resharding: later calls go where the slots live now. Unavailable,
                    # not broken: a trainer rewinds and replays, serving answers 503.
                    self._refresh_slots()
                    raise StoreUnavailable(
                        f"Redis Cluster at {address}: {reply} (hash slots moving while this "
                        "store is open; the slot map is refreshed, retry)"
                    )
                if str(reply).startswith("READONLY"):
                    # Demoted by a failover (Sentinel): new connections find the master.
                    self._lost(node or self._seed)
                    raise StoreUnavailable(f"Redis at {address} is a replica now: {reply}")
                if str(reply).startswith(_TRANSIENT_ERRORS):
                    raise StoreUnavailable(f"Redis at {address}: {reply}")
                raise StoreError(f"Redis at {address}: {reply}")

    def _send_writes(
        self, chunks: list[_Chunk], handler: _ReplyHandler, node: _Node | None = None
    ) -> None:
        """Send write ``chunks`` to ``node`` (default: the seed server) without waiting
        for their replies, so Redis applies them while this process goes on (on 2 cores
        the client and the server then work at once instead of in turns). ``handler``
        checks their replies later, in ``sync``, which every read, ``close`` and this
        method past ``_MAX_UNACKED_BYTES`` call first: a read always sees earlier writes
        (one connection per server, applied in order), and a failed write raises from
        the next call instead of its own."""
        if not chunks:
            return
        node = node or self._seed
        with self._unacked_lock:
            unacked = node.unacked
            if unacked is None:
                try:
                    conn = node.checkout()
                except StoreUnavailable:
                    self._lost(node)
                    raise
                node.unacked = unacked = _Unacked(node, conn, slot_map=self._slot_map_epoch)
            try:
                for data, _ in chunks:
                    if not unacked.broken:
                        unacked.conn._sock.sendall(data)
            except _UNREACHABLE:
                unacked.broken = True
            unacked.chunks += chunks
            count = sum(n for _, n in chunks)
            unacked.handlers.append((count, handler))
            unacked.replies += count
            unacked.nbytes += sum(len(data) for data, _ in chunks)
            if unacked.nbytes > _MAX_UNACKED_BYTES:
                self.sync()

    def sync(self) -> None:
        """Wait for every write in flight to be acknowledged and check its replies
        (``StoreError``/``StoreUnavailable`` as a waited-for write would raise). A write
        whose connection broke is resent once on a fresh one, like any batch."""
        with self._unacked_lock:
            while pending := [n.unacked for n in self._nodes if n.unacked is not None]:
                follow_ups: list[_Command] = []
                try:
                    for unacked in pending:
                        unacked.node.unacked = None
                        replies = self._acknowledge(unacked)
                        # Resharding: writes sent where a slot used to be go again
                        # (``in map(type, ...)``: a C-speed scan of ~50k replies a step).
                        if self._slots is not None and hiredis.ReplyError in map(type, replies):
                            self._follow_write_redirections(unacked, replies)
                        at = 0
                        for count, handler in unacked.handlers:
                            follow_ups += handler(replies[at : at + count])
                            at += count
                finally:  # the counters of the writes checked before a failed one too
                    if follow_ups:
                        self._send_commands(follow_ups, self._checked)

    def _follow_write_redirections(self, unacked: _Unacked, replies: list[Any]) -> None:
        """``_follow_redirections`` of writes in flight, their commands read back from
        the RESP bytes sent."""
        sent = _unpack(unacked.chunks)
        self._follow_redirections(
            replies, lambda i: _hiredis_pack(sent[i]), "write", key=lambda i: sent[i][1]
        )

    def _settle_earlier_routes(self) -> None:
        """Wait for the writes in flight that were routed by an earlier slot map before
        routing any by this one: a write redirected by a master that lost the slot is
        sent again from ``sync``, and must not overtake a later write of the same row
        sent to the new master meanwhile."""
        if any(
            n.unacked is not None and n.unacked.slot_map != self._slot_map_epoch
            for n in self._nodes
        ):
            self.sync()

    def _send_commands(self, commands: Sequence[_Command], handler: _ReplyHandler) -> None:
        """``_send_writes`` of ``commands``, each to the server of its key."""
        for node, mine in self._route(commands).items():
            self._send_writes(self._packed(mine), handler, self._nodes[node])

    def _route(self, commands: Sequence[_Command]) -> dict[int, list[_Command]]:
        """``commands`` by the master of their key (the first argument)."""
        by_node: dict[int, list[_Command]] = {}
        for node, command in zip(self._nodes_of_commands(commands), commands, strict=True):
            by_node.setdefault(node, []).append(command)
        return by_node

    def _nodes_of_commands(self, commands: Sequence[_Command]) -> list[int]:
        """The master of each command's key (the first argument; none: the seed)."""
        return [self._node_of(c[1]) if len(c) > 1 else 0 for c in commands]

    def _acknowledge(self, unacked: _Unacked) -> list[Any]:
        """The replies of ``unacked``'s writes, resent once if the connection broke."""
        node, conn = unacked.node, unacked.conn
        replies: list[Any] = []
        try:
            try:
                if unacked.broken:
                    raise RedisConnectionError("a send failed")
                reader = hiredis.Reader(notEnoughData=_MORE)
                read_replies(conn._sock, reader, replies, unacked.replies)
            except _UNREACHABLE:
                conn.disconnect()
                # A stale pooled connection: the writes are idempotent, bar the row
                # counters (see the module docstring), so resend them all.
                replies = node.roundtrip_once(unacked.chunks)
            except BaseException:
                conn.disconnect()  # replies may be left unread
                raise
            finally:
                node.checkin(conn)
        except _UNREACHABLE as e:
            self._lost(node)
            raise StoreUnavailable(f"Redis at {node.address} is unreachable: {e}") from e
        except StoreUnavailable:  # no connection for the resend
            self._lost(node)
            raise
        except (RedisError, hiredis.HiredisError) as e:
            raise StoreError(f"Redis at {node.address}: {e}") from e
        return replies

    def _checked(self, replies: list[Any]) -> list[_Command]:
        self._raise_errors(replies)
        return []

    def _execute(self, commands: Sequence[_Command], *, retry: bool = True) -> list[Any]:
        """Send ``commands`` pipelined, one connection per server; their replies, in
        order. ``retry``: once more on a fresh connection if a pooled one failed."""
        if self._slots is None:
            replies = self._roundtrip(self._packed(commands), retry=retry)
        else:
            replies = self._execute_routed(commands, retry=retry)
        self._raise_errors(replies)
        return replies

    def _execute_routed(self, commands: Sequence[_Command], *, retry: bool) -> list[Any]:
        """``_execute`` on a cluster, each command to the master of its key; those
        redirected (resharding) are sent again where they belong now."""
        nodes = self._nodes_of_commands(commands)
        if len(set(nodes)) == 1:  # the usual: one key, or keys of one server
            self.sync()
            replies = self._roundtrip_on(self._nodes[nodes[0]], self._packed(commands), retry=retry)
        else:
            routed: dict[int, list[_Command]] = {}
            for node, command in zip(nodes, commands, strict=True):
                routed.setdefault(node, []).append(command)
            by_node = self._roundtrip_nodes({n: self._packed(c) for n, c in routed.items()})
            # Back in the order asked: each server's replies follow its commands' order.
            taken = dict.fromkeys(by_node, 0)
            replies = []
            for node in nodes:
                replies.append(by_node[node][taken[node]])
                taken[node] += 1
        self._follow_redirections(replies, lambda i: _pack([commands[i]]), "other")
        return replies

    def _packed(self, commands: Sequence[_Command]) -> list[_Chunk]:
        """``commands`` packed in chunks of ``chunk``."""
        return [
            (_pack(commands[i : i + self.chunk]), len(commands[i : i + self.chunk]))
            for i in range(0, len(commands), self.chunk)
        ]

    def _chunks(self, batch: _Batch) -> list[_Chunk]:
        """The commands of ``batch`` as one buffer, cut into sends of ``chunk`` commands
        (one send per part would cost a syscall each)."""
        buf = np.concatenate([part.ravel() for part in batch.parts])
        cuts = [0]
        offset = done = 0
        for part in batch.parts:
            rows, width = part.shape
            # Cut after every chunk-th command that falls in this part.
            first = -done % self.chunk or self.chunk
            cuts += range(offset + first * width, offset + rows * width + 1, self.chunk * width)
            offset += rows * width
            done += rows
        if cuts[-1] != len(buf):
            cuts.append(len(buf))
        view = buf.data.cast("B")
        sizes = [self.chunk] * (len(cuts) - 2) + [batch.commands - self.chunk * (len(cuts) - 2)]
        return [(view[a:b], n) for (a, b), n in zip(pairwise(cuts), sizes, strict=True)]

    def _sum_replies(self, replies: Sequence[Any], node: _Node | None = None) -> int:
        try:
            return int(sum(replies))
        except TypeError:  # an error reply among the integers
            self._raise_errors(replies, node)
            raise

    # -- RowTier ------------------------------------------------------------------------

    def _fetch(self, table: str, keys: Keys) -> tuple[list[bytes | None], npt.NDArray[np.intp]]:
        """HMGET of ``keys`` (not empty): the values in command order and the batch
        positions they belong to."""
        if self._slots is not None:
            return self._fetch_many([(table, keys)])[0]
        batch = self._hmget(table, keys)
        if batch is None:  # nobody ever wrote the table
            return [None] * len(keys), np.arange(len(keys))
        return self._values(self._roundtrip(self._chunks(batch), rows=True)), batch.positions

    def _fetch_many(
        self, requests: Sequence[tuple[str, Keys]], *, retries: int = 0
    ) -> list[tuple[list[bytes | None], npt.NDArray[np.intp]]]:
        """``_fetch`` of several tables on a cluster: each master's HMGETs of every
        table in one pipeline; commands redirected by a reshard are sent again where they
        belong now, and the whole read once more if a replica read from failed."""
        self._report_traffic_when_due()
        started = self._fresh_read_map()
        sent: dict[int, list[tuple[int, _Batch, npt.NDArray[np.intp] | None]]] = {}
        for r, (table, keys) in enumerate(requests):
            layout = self.layout(table) if len(keys) else None
            if layout is None:
                continue
            keys = np.asarray(keys, dtype=np.uint64)
            for node, at in self._split(layout, keys, read=True):
                batch = _build(b"HMGET", layout, keys if at is None else keys[at], None)
                sent.setdefault(node, []).append((r, batch, at))
        try:
            replies = self._roundtrip_nodes(
                {
                    node: [c for _, b, _ in parts for c in self._chunks(b)]
                    for node, parts in sent.items()
                }
            )
        except StoreUnavailable:
            if retries < _MAX_REDIRECTIONS and self._replica_failed(started):
                return self._fetch_many(requests, retries=retries + 1)
            raise
        for node, parts in sent.items():
            rows = [part for _, batch, _ in parts for part in batch.parts]
            self._follow_redirections(replies[node], _command_rows(rows), "read")
        values: list[list[bytes | None]] = [[None] * len(k) for _, k in requests]
        positions = [np.arange(len(k)) for _, k in requests]
        got: dict[int, list[tuple[list[bytes | None], npt.NDArray[np.intp]]]] = {}
        for node, parts in sent.items():
            node_replies, at_reply = replies[node], 0
            for r, batch, at in parts:
                mine = node_replies[at_reply : at_reply + batch.commands]
                at_reply += batch.commands
                self._raise_errors(mine, self._nodes[node])
                where = batch.positions if at is None else at[batch.positions]
                got.setdefault(r, []).append((self._values(mine), where))
        for r, pieces in got.items():
            values[r] = [v for vals, _ in pieces for v in vals]
            positions[r] = np.concatenate([where for _, where in pieces])
        return list(zip(values, positions, strict=True))

    def _hmget(self, table: str, keys: Keys) -> _Batch | None:
        """The HMGETs of ``keys`` (None: no keys, or the table has no layout: all absent)."""
        layout = self.layout(table) if len(keys) else None
        if layout is None:
            return None
        return _build(b"HMGET", layout, np.asarray(keys, dtype=np.uint64), None)

    def _values(self, replies: list[Any]) -> list[bytes | None]:
        """The values of HMGET ``replies``, in command order."""
        try:
            return list(chain.from_iterable(replies))
        except TypeError:  # an error reply is not a list
            self._raise_errors(replies)
            raise

    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        n = len(keys)
        if n == 0:
            return []
        flat, positions = self._fetch(table, keys)
        inverse = np.empty(n, dtype=np.intp)
        inverse[positions] = np.arange(n)
        return list(map(flat.__getitem__, inverse.tolist()))

    def get_rows(self, table: str, keys: Keys, codec: RowCodec) -> tuple[Rows, Mask]:
        """Rows straight from the replies in command order (no reordered value list)."""
        if len(keys) == 0:
            return codec.zeros(0), np.zeros(0, dtype=np.bool_)
        flat, positions = self._fetch(table, keys)
        return self._rows(keys, codec, flat, positions)

    @staticmethod
    def _rows(
        keys: Keys, codec: RowCodec, flat: list[bytes | None], positions: npt.NDArray[np.intp]
    ) -> tuple[Rows, Mask]:
        """``get_rows``' result from the values ``flat`` of ``keys[positions]``."""
        n = len(keys)
        found = np.zeros(n, dtype=np.bool_)
        hit = present_mask(flat)
        at = positions[hit]
        got = codec.unpack(keys[at], [v for v in flat if v is not None])
        rows = codec.zeros(n) if len(at) < n else np.empty(n, dtype=codec.dtype)
        rows[at] = got
        found[at] = True
        return rows, found

    def get_rows_ahead(
        self, requests: Sequence[tuple[str, Keys, RowCodec]]
    ) -> Generator[tuple[Rows, Mask], None, None]:
        """``get_rows`` of each request in turn on one connection, the next request's
        HMGETs sent before this one's rows are handed out: Redis reads them while the
        caller works on these (a writer's lookup of many tables: on 2 cores client and
        server then run at once). Writes in flight are acknowledged first, as for every
        read. A connection that fails on the way leaves the rest to ``get_rows`` (which
        retries once on a fresh one). On a cluster: every request's HMGETs at once, one
        pipeline per master."""
        if self._slots is not None:
            fetched = self._fetch_many([(table, keys) for table, keys, _ in requests])
            for (_, keys, codec), (flat, positions) in zip(requests, fetched, strict=True):
                if len(keys) == 0:
                    yield codec.zeros(0), np.zeros(0, dtype=np.bool_)
                else:
                    yield self._rows(keys, codec, flat, positions)
            return
        self.sync()
        reader = hiredis.Reader(notEnoughData=_MORE)
        replies: list[Any] = []  # of the requests sent and not yet handed out
        sent: list[_Batch | None] = []
        conn = self._seed.checkout()
        done = False
        try:
            for i, (table, keys, codec) in enumerate(requests):
                if conn is not None:
                    try:
                        while len(sent) <= min(i + 1, len(requests) - 1):
                            sent.append(self._send_read(conn._sock, *requests[len(sent)][:2]))
                        batch = sent[i]
                        if batch is not None:
                            read_replies(conn._sock, reader, replies, batch.commands)
                    except _UNREACHABLE:
                        conn.disconnect()
                        self._seed.checkin(conn)
                        conn = None
                if conn is None:  # the connection failed: the rest one at a time
                    yield self.get_rows(table, keys, codec)
                    continue
                if batch is None:
                    yield codec.zeros(len(keys)), np.zeros(len(keys), dtype=np.bool_)
                    continue
                mine = replies[: batch.commands]
                del replies[: batch.commands]
                yield self._rows(keys, codec, self._values(mine), batch.positions)
            done = True
        except (RedisError, hiredis.HiredisError) as e:
            raise StoreError(f"Redis at {self.address}: {e}") from e
        finally:
            if conn is not None:
                if not done:  # replies may be left unread
                    conn.disconnect()
                self._seed.checkin(conn)

    def _send_read(self, sock: Any, table: str, keys: Keys) -> _Batch | None:
        """Send the HMGETs of ``keys`` (None: nothing to read, all absent)."""
        batch = self._hmget(table, keys)
        if batch is not None:
            for data, _ in self._chunks(batch):
                sock.sendall(data)
        return batch

    def get_tables(self, keys: Mapping[str, Keys]) -> dict[str, list[bytes | None]]:
        """``get_many`` of several tables in one pipeline on one connection (on a
        cluster: one per master, all at once): an ``HGET`` per key (a serving read
        touches ~1 key per bucket, so grouping keys by bucket would save Redis nothing),
        built for all tables at once."""
        return self._get_tables(keys, retries=0)

    def _get_tables(
        self, keys: Mapping[str, Keys], *, retries: int
    ) -> dict[str, list[bytes | None]]:
        started = self._fresh_read_map()
        # Nothing asked, or nobody ever wrote the table: all None (in the order asked).
        out: dict[str, list[bytes | None]] = {t: [None] * len(k) for t, k in keys.items()}
        shapes: dict[tuple[int, int, int], list[tuple[str, BucketLayout, Keys]]] = {}
        for table, table_keys in keys.items():
            layout = self.layout(table) if len(table_keys) else None
            if layout is None:
                continue
            shape = (len(layout.name_head), layout.hex_digits, layout.field_bytes)
            shapes.setdefault(shape, []).append((table, layout, table_keys))
        matrices = [
            _build_hgets([g[1] for g in group], [g[2] for g in group]) for group in shapes.values()
        ]
        if self._slots is None:
            chunks = [c for cmds in matrices for c in self._rows_chunks(cmds)]
            replies = self._roundtrip(chunks, rows=True)
        else:
            self._report_traffic_when_due()
            try:
                replies = self._hgets_by_master(list(shapes.values()), matrices)
            except StoreUnavailable:
                if retries < _MAX_REDIRECTIONS and self._replica_failed(started):
                    return self._get_tables(keys, retries=retries + 1)
                raise
        self._raise_errors(replies)
        at = 0
        for group in shapes.values():
            for table, _, table_keys in group:
                out[table] = replies[at : at + len(table_keys)]
                at += len(table_keys)
        return out

    def _rows_chunks(self, cmds: _U8) -> list[_Chunk]:
        """A byte matrix of one command per row, cut into sends of ``chunk`` commands."""
        view = cmds.data.cast("B")
        step = self.chunk * cmds.shape[1]
        return [
            (view[a : a + step], min(self.chunk, len(cmds) - a // cmds.shape[1]))
            for a in range(0, cmds.size, step)
        ]

    def _hgets_by_master(
        self, groups: list[list[tuple[str, BucketLayout, Keys]]], matrices: list[_U8]
    ) -> list[Any]:
        """The replies of ``_build_hgets`` matrices (one per group of tables), each
        command sent to the master of its bucket; in the matrices' order."""
        chunks: dict[int, list[_Chunk]] = {}
        sent: dict[int, list[_U8]] = {}  # each master's commands, a row each
        rows: dict[int, list[npt.NDArray[np.intp]]] = {}
        offset = 0
        for group, cmds in zip(groups, matrices, strict=True):
            nodes = np.concatenate(
                [
                    self._nodes_of_buckets(
                        layout,
                        np.asarray(k, dtype=np.uint64) % np.uint64(layout.buckets),
                        read=True,
                    )
                    for _, layout, k in group
                ]
            )
            for node in np.unique(nodes).tolist():
                mine = np.flatnonzero(nodes == node)
                sent.setdefault(node, []).append(cmds[mine])
                chunks.setdefault(node, []).extend(self._rows_chunks(sent[node][-1]))
                rows.setdefault(node, []).append(mine + offset)
            offset += len(cmds)
        replies: list[Any] = [None] * offset
        by_node = self._roundtrip_nodes(chunks)
        for node, node_replies in by_node.items():
            self._follow_redirections(node_replies, _command_rows(sent[node]), "read")
        for node, node_replies in by_node.items():
            for at, reply in zip(np.concatenate(rows[node]).tolist(), node_replies, strict=True):
                replies[at] = reply
        return replies

    def _put_chunks(self, layout: BucketLayout, keys: Keys, values: list[bytes]) -> list[_Chunk]:
        """The HSETs of a batch, packed."""
        keys = np.asarray(keys, dtype=np.uint64)
        n = len(keys)
        size = len(values[0])
        joined = b"".join(values)
        # No value longer than the first and n of them in all: all of one (nonzero) size.
        if size and len(joined) == n * size and max(map(len, values)) == size:
            rows = np.frombuffer(joined, dtype=np.uint8).reshape(n, size)
            return self._chunks(_build(b"HSET", layout, keys, rows))
        # Values of several sizes (not rows of one table): the generic packer.
        order = np.argsort(keys % np.uint64(layout.buckets), kind="stable")
        buckets = (keys[order] % np.uint64(layout.buckets)).tolist()
        raw = layout.fields(keys[order]).tobytes()
        w = layout.field_bytes
        commands: list[_Command] = []
        for i, bucket in zip(order.tolist(), buckets, strict=True):
            name = raw[len(commands) * w : (len(commands) + 1) * w]
            commands.append((b"HSET", layout.bucket_name(bucket), name, values[i]))
        return self._packed(commands)

    def put_many(self, table: str, keys: Keys, values: list[bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        if len(keys) == 0:
            return
        layout = self.layout(table, create=True)
        assert layout is not None
        if table not in self._listpack_checked:
            self._check_config(table, max(map(len, values)))
        keys = np.asarray(keys, dtype=np.uint64)
        self._store(
            layout,
            keys,
            lambda at: self._put_chunks(
                layout, keys if at is None else keys[at], values if at is None else
                [values[i] for i in at.tolist()]
            ),
        )  # fmt: skip

    def put_rows(self, table: str, keys: Keys, rows: Rows) -> None:
        """The HSETs built from the rows' bytes (no ``bytes`` object per row)."""
        if len(keys) == 0:
            return
        layout = self.layout(table, create=True)
        assert layout is not None
        if table not in self._listpack_checked:
            self._check_config(table, rows.dtype.itemsize)
        keys = np.asarray(keys, dtype=np.uint64)
        data = np.ascontiguousarray(rows).view(np.uint8).reshape(len(rows), -1)
        self._store(
            layout,
            keys,
            lambda at: self._chunks(
                _build(b"HSET", layout, keys, data)
                if at is None
                else _build(b"HSET", layout, keys[at], data[at])
            ),
        )

    def _check_config(self, table: str, value_bytes: int) -> None:
        """Once per table and process, at its first write: log ``config_warnings``
        (those about eviction once per master)."""
        self._listpack_checked.add(table)
        try:
            warnings = self.config_warnings({table: value_bytes})
        except StoreError:
            return  # the write that follows raises
        for kind, address, message in warnings:
            if kind == "eviction":
                if address in self._policy_checked:
                    continue
                self._policy_checked.add(address)
                metrics.REDIS_EVICTION_POLICY_WARNINGS.inc()
            else:
                metrics.REDIS_LISTPACK_WARNINGS.inc()
            log.warning("%s", message)

    def config_warnings(self, row_bytes: Mapping[str, int]) -> list[tuple[str, str, str]]:
        """What each master's settings would cost tables of these row sizes, as
        (kind, master address, message):

        - ``listpack``: Redis would keep a table's buckets as hashtables, about twice
          the memory a row (see Memory in the module docstring): rows longer than
          ``hash-max-listpack-value``, or ``hash-max-listpack-entries`` under 4x
          ``rows_per_bucket`` (a table past ~3x its ``expected_rows`` would cross it).
        - ``eviction``: it evicts any key under ``maxmemory`` (an ``allkeys-*``
          policy): a bucket it drops takes rows the trainer wrote since its last flush,
          so every flush then finds them gone and rewinds.

        A master that refuses ``CONFIG`` (managed Redis) is not checked."""
        masters = [self._seed]
        if self._slots is not None:
            masters = [self._nodes[i] for i in np.unique(self._slots).tolist()]
        out = []
        for node in masters:
            get = (b"CONFIG", b"GET", b"hash-max-listpack-*", b"maxmemory", b"maxmemory-policy")
            (reply,) = self._roundtrip_on(node, self._packed([get]))
            if isinstance(reply, hiredis.ReplyError) or not reply:
                log.debug("Redis at %s: no CONFIG GET (%s); its settings not checked",
                          node.address, reply)  # fmt: skip
                continue
            pairs = (  # RESP3 (redis-py 8 by default) answers a map, RESP2 a list
                reply.items()
                if isinstance(reply, dict)
                else zip(reply[::2], reply[1::2], strict=True)
            )
            config = dict(pairs)
            policy = config.get(b"maxmemory-policy", b"noeviction").decode()
            if policy.startswith("allkeys-") and int(config.get(b"maxmemory", 0)):
                out.append((
                    "eviction",
                    node.address,
                    f"Redis at {node.address} evicts any key when it reaches maxmemory "
                    f"(maxmemory-policy {policy}): a bucket it drops takes rows written "
                    "since the last flush, and the trainer rewinds at every flush that "
                    "finds them gone. Set maxmemory-policy noeviction (writes then fail "
                    "loudly when Redis is full) and size the hot tier with "
                    "store.eviction.max_rows",
                ))  # fmt: skip
            value_limit = int(config.get(b"hash-max-listpack-value", 0))
            entries_limit = int(config.get(b"hash-max-listpack-entries", 0))
            entries_needed = 4 * self.rows_per_bucket
            for table, value_bytes in row_bytes.items():
                if value_bytes > value_limit or entries_limit < entries_needed:
                    out.append((
                        "listpack",
                        node.address,
                        f"Redis at {node.address} keeps hashes of more than {entries_limit} "
                        f"fields or with values over {value_limit} bytes as hashtables: "
                        f"table {table!r} ({value_bytes}-byte rows, ~{self.rows_per_bucket} "
                        "rows a bucket) will take about twice the memory. Set "
                        f"hash-max-listpack-entries >= {entries_needed} and "
                        f"hash-max-listpack-value >= {max(value_bytes, 1024)} on every "
                        "master (CONFIG SET, or redis.conf)",
                    ))  # fmt: skip
        return out

    def _store(
        self,
        layout: BucketLayout,
        keys: Keys,
        hsets: Callable[[npt.NDArray[np.intp] | None], list[_Chunk]],
    ) -> None:
        """Send a batch's HSETs (``hsets`` of the positions of the keys of one server,
        None: all) with the layout assertion; count the new fields (both once
        acknowledged: see ``_send_writes``)."""
        if self._slots is None:

            def counted(replies: list[Any]) -> list[_Command]:
                self._raise_errors(replies[:2])
                self._check_layout(layout, replies[1])
                return self._counter(b"INCRBY", layout.table, self._sum_replies(replies[2:]))

            self._send_writes([*self._packed(self._assert_layout(layout)), *hsets(None)], counted)
            return

        def asserted(replies: list[Any]) -> list[_Command]:
            self._raise_errors(replies)
            self._check_layout(layout, replies[1])
            return []

        self._report_traffic_when_due()
        with self._unacked_lock:  # the slot map stays as it is while these are routed
            self._settle_earlier_routes()
            self._send_commands(self._assert_layout(layout), asserted)
            for node, at in self._split(layout, keys):
                self._send_writes(
                    hsets(at), self._counting(b"INCRBY", layout.table, node), self._nodes[node]
                )

    def _counter(self, command: bytes, table: str, delta: int) -> list[_Command]:
        return [(command, self._count_key(table), str(delta).encode())] if delta else []

    def _counting(self, command: bytes, table: str, node: int) -> _ReplyHandler:
        """A handler that moves ``table``'s row counter by the sum of the replies of
        writes to master ``node``."""
        return lambda replies: self._counter(
            command, table, self._sum_replies(replies, self._nodes[node])
        )

    def delete_many(self, table: str, keys: Keys) -> None:
        if len(keys) == 0:
            return
        layout = self.layout(table)
        if layout is None:
            return
        keys = np.asarray(keys, dtype=np.uint64)
        with self._unacked_lock:  # the slot map stays as it is while these are routed
            if self._slots is not None:
                self._settle_earlier_routes()
            for node, at in self._split(layout, keys):
                batch = _build(b"HDEL", layout, keys if at is None else keys[at], None)
                self._send_writes(
                    self._chunks(batch), self._counting(b"DECRBY", table, node), self._nodes[node]
                )

    def count(self, table: str) -> int:
        (reply,) = self._execute([(b"GET", self._count_key(table))])
        return int(reply) if reply is not None else 0

    def recount(self, table: str) -> int:
        """Rebuild the row counter of ``table`` from HLEN of every bucket (O(buckets))."""
        layout = self.layout(table)
        total = 0
        if layout is not None:
            lens = self._execute([(b"HLEN", layout.bucket_name(b)) for b in range(layout.buckets)])
            total = int(sum(lens))
        self._execute([(b"SET", self._count_key(table), str(total).encode())])
        return total

    def clear(self, table: str) -> None:
        """Every row deleted, and the row counter reset: it may have drifted (e.g. a
        cluster master that lost its data took part of the rows, or the counter, with
        it)."""
        layout = self.layout(table)
        if layout is None:
            return
        for keys, _ in self.scan(table):
            self.delete_many(table, keys)
        self.sync()
        self._execute([(b"SET", self._count_key(table), b"0")])

    def put_blob(self, name: str, data: bytes) -> None:
        self._execute([(b"SET", self._blob_key(name), bytes(data))])

    def delete_blob(self, name: str) -> None:
        self._execute([(b"DEL", self._blob_key(name))])

    def report_reads(self, cold: Mapping[str, Keys], hot: Mapping[str, Keys]) -> None:
        """One entry per call on the list ``{prefix}:reads``; a section per tier and
        table: ``c`` or ``h``, the table's name, a NUL, the key count (little-endian
        uint32), the keys (little-endian uint64). Sent without waiting (like row
        writes); the list keeps the newest ``_MAX_READ_REPORTS`` entries, so it stays
        bounded while no writer takes them. A refused report is logged: it never fails
        the reader's next read."""
        entry = b"".join(
            tier
            + table.encode()
            + b"\0"
            + len(k).to_bytes(4, "little")
            + np.asarray(k, "<u8").tobytes()
            for tier, keys in ((b"c", cold), (b"h", hot))
            for table, k in keys.items()
            if len(k)
        )
        if entry:
            key = self._reads_key()
            trim = (b"LTRIM", key, b"-%d" % _MAX_READ_REPORTS, b"-1")
            self._send_commands([(b"RPUSH", key, entry), trim], self._logged)

    def _logged(self, replies: list[Any]) -> list[_Command]:
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                log.warning("Redis at %s refused a report: %s", self.address, reply)
        return []

    def take_read_reports(self, max_reports: int) -> tuple[dict[str, Keys], dict[str, Keys]]:
        (entries,) = self._execute([(b"LPOP", self._reads_key(), b"%d" % max_reports)])
        parts: dict[bytes, dict[str, list[Keys]]] = {b"c": {}, b"h": {}}
        for entry in entries or ():
            try:
                for tier, table, keys in _read_report(bytes(entry)):
                    parts[tier].setdefault(table, []).append(keys)
            except (KeyError, ValueError, UnicodeDecodeError) as e:  # never worth a crash
                log.warning("Redis at %s: a malformed read report skipped: %r", self.address, e)
        cold, hot = (
            {table: np.unique(np.concatenate(k)) for table, k in parts[tier].items()}
            for tier in (b"c", b"h")
        )
        return cold, hot

    def _reads_key(self) -> bytes:
        return f"{self.prefix}:reads".encode()

    def get_blob(self, name: str) -> bytes | None:
        (reply,) = self._execute([(b"GET", self._blob_key(name))])
        return bytes(reply) if reply is not None else None

    def put_marker(self, name: str, value: bytes) -> None:
        """On a cluster, one copy on every master (any of them losing its data loses
        the marker)."""
        if self._slots is None:
            self.put_blob(name, value)
            return
        copies = self._marker_keys(name)
        self._execute([(b"SET", key, value) for key in copies.values()])
        self._markers[name] = list(copies.values())

    def has_marker(self, name: str, value: bytes) -> bool:
        """On a cluster: every copy this client left is still there, wherever its slot
        has moved since (a reshard carries keys along); a master that holds none of
        them now (slots moved to it, or a new one) gets a copy of its own, so it is
        watched from now on."""
        if self._slots is None:
            return self.get_blob(name) == value
        fresh = self._marker_keys(name)
        copies = self._markers.get(name) or list(fresh.values())  # another client's
        replies = self._execute([(b"GET", key) for key in copies])
        if not all(reply == value for reply in replies):
            return False
        held = {self._node_of(key) for key in copies}
        missing = [key for master, key in fresh.items() if master not in held]
        if missing:
            self._execute([(b"SET", key, value) for key in missing])
            self._markers[name] = copies + missing
        return True

    def delete_marker(self, name: str) -> None:
        if self._slots is None:
            self.delete_blob(name)
            return
        copies = {*self._markers.pop(name, []), *self._marker_keys(name).values()}
        self._execute([(b"DEL", key) for key in sorted(copies)])

    def _marker_keys(self, name: str) -> dict[int, bytes]:
        """A key of the marker ``name`` for each master that serves slots (by index in
        ``_nodes``)."""
        return self._master_keys(b"marker:" + name.encode())

    def _master_keys(self, suffix: bytes) -> dict[int, bytes]:
        """A key ending in ``suffix`` for each master that serves slots (by index in
        ``_nodes``), each under a hash tag of a slot of that master."""
        assert self._slots is not None
        tags = self._master_tags
        if tags is None:
            masters = set(self._slots.tolist())
            tags = {}
            for i in range(1 << 20):
                tag = b"m%d" % i
                tags.setdefault(int(self._slots[key_slot(tag)]), tag)
                if masters <= tags.keys():
                    break
            self._master_tags = tags
        prefix = self.prefix.encode()
        return {master: b"{%s}:%s:%s" % (tag, prefix, suffix) for master, tag in tags.items()}

    def wait_for_replicas(self) -> None:
        """With ``min_replicas``: wait until every write so far is on that many replicas
        of its master (``WAIT``, after a write of our own on each master: ``WAIT``
        counts a connection's own writes, ours went out on others), so a failover to
        a replica cannot lose them. Raises ``StoreUnavailable`` if fewer confirm within
        ``replica_timeout_s``."""
        if not self.min_replicas:
            return
        start = time.perf_counter()
        suffix = b"replicated"
        keys = {0: b"%s:%s" % (self.prefix.encode(), suffix)}
        if self._slots is not None:
            keys = self._master_keys(suffix)
        wait = (b"WAIT", b"%d" % self.min_replicas, b"%d" % (self.replica_timeout_s * 1000))
        chunks = {node: self._packed([(b"INCR", key), wait]) for node, key in keys.items()}
        for node, replies in self._roundtrip_nodes(chunks).items():
            self._raise_errors(replies, self._nodes[node])
            if replies[1] < self.min_replicas:
                metrics.REDIS_REPLICA_WAITS_SHORT.inc()
                raise StoreUnavailable(
                    f"Redis at {self._nodes[node].address}: {replies[1]} of the "
                    f"{self.min_replicas} replicas asked for (store.redis_min_replicas) "
                    f"confirmed the writes within {self.replica_timeout_s} s"
                )
        metrics.REDIS_REPLICA_WAIT_SECONDS.observe(time.perf_counter() - start)

    def commit(
        self,
        rows: Mapping[str, tuple[Keys, list[bytes]]],
        blobs: Mapping[str, bytes],
        *,
        absent: Mapping[str, Keys] | None = None,
    ) -> None:
        """Rows and blobs in one MULTI/EXEC (atomic on one server); counters after. On
        a cluster a transaction cannot span masters: the rows go first and the blobs
        once every row is acknowledged, so a reader never sees a blob ahead of its rows
        (a crash in between leaves rows ahead of the blobs)."""
        for table, (keys, values) in rows.items():
            if len(keys) != len(values):
                raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        if self._slots is not None:
            for table, (keys, values) in rows.items():
                self.put_many(table, keys, values)
            self.sync()
            if blobs:
                self._execute(
                    [(b"SET", self._blob_key(name), bytes(data)) for name, data in blobs.items()]
                )
            return
        # (layout, HSET count) per table; the body is layout asserts, HSETs, blob SETs.
        parts: list[tuple[BucketLayout, int]] = []
        chunks: list[_Chunk] = []
        for table, (keys, values) in rows.items():
            if len(keys) == 0:
                continue
            layout = self.layout(table, create=True)
            assert layout is not None
            table_chunks = self._put_chunks(layout, keys, values)
            chunks += [*self._packed(self._assert_layout(layout)), *table_chunks]
            parts.append((layout, sum(n for _, n in table_chunks)))
        sets = [(b"SET", self._blob_key(name), bytes(data)) for name, data in blobs.items()]
        chunks += self._packed(sets)
        if not chunks:
            return
        chunks = [*self._packed([(b"MULTI",)]), *chunks, *self._packed([(b"EXEC",)])]
        # Not retried: a half-read EXEC reply would double-count rows on a retry.
        replies = self._roundtrip(chunks, retry=False)
        results = replies[-1]
        if not isinstance(results, list):
            self._raise_errors(replies)
            raise StoreError(f"Redis at {self.address}: commit aborted ({results!r})")
        self._raise_errors(results)
        counters: list[_Command] = []
        stored: list[tuple[BucketLayout, object]] = []
        at = 0
        for layout, count in parts:
            stored.append((layout, results[at + 1]))
            added = int(sum(results[at + 2 : at + 2 + count]))
            at += 2 + count
            if added:
                counters.append((b"INCRBY", self._count_key(layout.table), str(added).encode()))
        if counters:
            self._execute(counters)
        for layout, tag in stored:  # after the counters: the rows are in Redis either way
            self._check_layout(layout, tag)

    def close(self) -> None:
        try:
            if self._traffic is not None:  # a stopped client's traffic leaves the sum now
                forget = (b"DEL", report_key(self.prefix, self._traffic_id))
                with self._unacked_lock:
                    self._send_commands([forget], self._logged)
            self.sync()
        finally:
            for node in self._nodes:
                node.close()
            self._close_clients()

    def _close_clients(self) -> None:
        if self._reader is not self._seed:
            self._reader.close()
        if self._replicas is not None:
            self._replicas.close()
        self._client.close()
        if self._sentinel is not None:
            self._sentinel.close()

    def scan(self, table: str, batch: int = 4096) -> Iterator[tuple[Keys, list[bytes]]]:
        """HSCAN over every bucket hash of ``table`` (its stored layout; none: no rows),
        pipelined ``chunk`` buckets a round; a bucket whose cursor is not done goes again
        in a later round. Listpack buckets answer whole in one call; a key may repeat if
        Redis rehashes a big bucket meanwhile."""
        layout = self.layout(table)
        if layout is None:
            return
        step = max(1, batch)
        count = str(min(step, 1000)).encode()
        todo = [(b, b"0") for b in range(layout.buckets)]
        keys: list[Keys] = []
        values: list[bytes] = []
        while todo:
            group, todo = todo[: self.chunk], todo[self.chunk :]
            replies = self._execute(
                [(b"HSCAN", layout.bucket_name(b), c, b"COUNT", count) for b, c in group]
            )
            for (bucket, _), (cursor, flat) in zip(group, replies, strict=True):
                if flat:
                    keys.append(layout.keys_of(bucket, flat[0::2]))
                    values.extend(flat[1::2])
                if bytes(cursor) != b"0":
                    todo.append((bucket, bytes(cursor)))
            if len(values) >= step or (values and not todo):
                joined = np.concatenate(keys)
                for i in range(0, len(values), step):
                    yield joined[i : i + step], values[i : i + step]
                keys, values = [], []
