"""A hot tier in Redis, shared by the trainer and service processes.

Key layout (``prefix`` defaults to ``sr``):

* rows: hash ``{prefix}:{<table>:<bucket hex>}`` (e.g. ``sr:{user:1f3a}``), field = the
  8-byte little-endian key, value = the packed row. ``bucket = key % buckets``.
  The braces are a Redis Cluster hash tag: a bucket is one key, so tagging table and
  bucket spreads the buckets of a table over all slots.
* row count of a table: string ``{prefix}:rows:<table>`` (an integer), kept by adding
  the replies of HSET/HDEL (new / removed fields), so ``count`` is one GET. It can drift
  only if a writer dies between a batch and its counter update, or a batch is resent
  after its connection broke mid-reply (batches are retried once on a fresh connection,
  for stale pooled connections); ``recount`` rebuilds it.
* blobs: string ``{prefix}:blob:<name>``.

Small per-bucket hashes let Redis keep them listpack-encoded (compact, no per-key
overhead) while a hash has at most ``hash-max-listpack-entries`` fields (default 128/512)
whose values are all at most ``hash-max-listpack-value`` bytes. That default is 64 bytes,
smaller than most rows (dim 16 with row-wise AdaGrad is 76 bytes), so the server should
run with e.g. ``hash-max-listpack-value 1024``; pick ``buckets`` around expected rows
per table / 100. Both only affect memory, never results.

Batches are sent as raw pipelines (one packed write per ~``chunk`` commands, then the
replies read back) on one pooled connection: redis-py's ``Pipeline`` costs ~3x more
client CPU per command. ``commit`` wraps its commands in MULTI/EXEC, so it is atomic on a
single Redis server. Cluster mode is not supported yet (the key layout is ready for it).

Any connection failure raises ``StoreUnavailable`` naming the server's address.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import hiredis
import numpy as np
import numpy.typing as npt
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from storage.base import Keys, RowTier, StoreError, StoreUnavailable

_Command = tuple[bytes, ...]
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


# hiredis' stub types pack_command's argument as a 1-tuple; it takes any arity.
_hiredis_pack = cast(Callable[[_Command], bytes], hiredis.pack_command)


def _pack(commands: Sequence[_Command]) -> list[bytes]:
    """The RESP bytes of ``commands`` as one buffer (one send per chunk). Packed with
    hiredis directly: redis-py's packer re-checks every argument, ours are all bytes."""
    return [b"".join(map(_hiredis_pack, commands))]


def _address(pool: redis.ConnectionPool) -> str:
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisTier(RowTier):
    """Rows in bucketed Redis hashes (see the module docstring for the key layout)."""

    def __init__(
        self,
        url: str,
        prefix: str = "sr",
        buckets: int = 1 << 16,
        *,
        chunk: int = 1000,
        socket_timeout: float = 10.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.prefix = prefix
        self.buckets = buckets
        self.chunk = chunk
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            decode_responses=False,  # rows are raw bytes
        )
        self._pool = self._client.connection_pool
        self.address = _address(self._pool)
        self._names: dict[str, dict[int, bytes]] = {}
        self._names_lock = threading.Lock()
        try:
            self._execute([(b"PING",)])  # fail fast, naming the address
        except BaseException:
            self._client.close()
            raise

    # -- key layout ---------------------------------------------------------------------

    def _bucket_names(self, table: str) -> dict[int, bytes]:
        names = self._names.get(table)
        if names is None:
            with self._names_lock:
                names = self._names.setdefault(table, {})
        return names

    def _bucket_name(self, names: dict[int, bytes], table: str, bucket: int) -> bytes:
        name = names.get(bucket)
        if name is None:
            name = names[bucket] = f"{self.prefix}:{{{table}:{bucket:x}}}".encode()
        return name

    def _count_key(self, table: str) -> bytes:
        return f"{self.prefix}:rows:{table}".encode()

    def _blob_key(self, name: str) -> bytes:
        return f"{self.prefix}:blob:{name}".encode()

    def _grouped(
        self, table: str, keys: Keys
    ) -> tuple[npt.NDArray[np.intp], list[bytes], list[tuple[bytes, int, int]]]:
        """Keys sorted by bucket (stable): the order, the 8-byte fields in that order and
        one (bucket name, start, end) per bucket."""
        order = np.argsort(keys % np.uint64(self.buckets), kind="stable")
        sorted_keys = keys[order]
        buckets = sorted_keys % np.uint64(self.buckets)
        n = len(keys)
        bounds = np.flatnonzero(buckets[1:] != buckets[:-1]) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), n]
        raw = sorted_keys.astype("<u8").tobytes()
        fields = [raw[i : i + 8] for i in range(0, 8 * n, 8)]
        names = self._bucket_names(table)
        groups = [
            (self._bucket_name(names, table, b), s, e)
            for b, s, e in zip(buckets[starts].tolist(), starts, ends, strict=True)
        ]
        return order, fields, groups

    # -- wire ---------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection (typed Any: redis-py leaves its wire methods untyped)."""
        try:
            conn: Any = self._pool.get_connection()
        except _UNREACHABLE as e:
            raise StoreUnavailable(f"Redis at {self.address} is unreachable: {e}") from e
        try:
            yield conn
        except BaseException:
            # Replies may be left unread: never hand a desynchronised connection back.
            conn.disconnect()
            raise
        finally:
            self._pool.release(conn)

    def _execute_once(self, commands: Sequence[_Command]) -> list[Any]:
        replies: list[Any] = []
        with self._connection() as conn:
            for i in range(0, len(commands), self.chunk):
                part = commands[i : i + self.chunk]
                conn.send_packed_command(_pack(part), check_health=i == 0)
                replies.extend(conn.read_response() for _ in part)
        return replies

    def _execute(self, commands: Sequence[_Command], *, retry: bool = True) -> list[Any]:
        """Send ``commands`` pipelined on one connection; their replies, in order."""
        if not commands:
            return []
        try:
            try:
                return self._execute_once(commands)
            except _UNREACHABLE:
                if not retry:
                    raise
                # A pooled connection may have gone stale (server restart, idle timeout).
                return self._execute_once(commands)
        except _UNREACHABLE as e:
            raise StoreUnavailable(f"Redis at {self.address} is unreachable: {e}") from e
        except RedisError as e:
            raise StoreError(f"Redis at {self.address}: {e}") from e

    # -- RowTier ------------------------------------------------------------------------

    def get_many(self, table: str, keys: Keys) -> list[bytes | None]:
        n = len(keys)
        if n == 0:
            return []
        order, fields, groups = self._grouped(table, keys)
        replies = self._execute([(b"HMGET", name, *fields[s:e]) for name, s, e in groups])
        flat: list[bytes | None] = [v for reply in replies for v in reply]
        inverse = np.empty(n, dtype=np.intp)
        inverse[order] = np.arange(n)
        return list(map(flat.__getitem__, inverse.tolist()))

    def _put_commands(self, table: str, keys: Keys, values: list[bytes]) -> list[_Command]:
        if len(keys) != len(values):
            raise ValueError(f"table {table!r}: {len(keys)} keys but {len(values)} values")
        if len(keys) == 0:
            return []
        order, fields, groups = self._grouped(table, keys)
        ordered = list(map(values.__getitem__, order.tolist()))
        pairs = [x for pair in zip(fields, ordered, strict=True) for x in pair]
        return [(b"HSET", name, *pairs[2 * s : 2 * e]) for name, s, e in groups]

    def put_many(self, table: str, keys: Keys, values: list[bytes]) -> None:
        added = sum(self._execute(self._put_commands(table, keys, values)))
        if added:
            self._execute([(b"INCRBY", self._count_key(table), str(added).encode())])

    def delete_many(self, table: str, keys: Keys) -> None:
        if len(keys) == 0:
            return
        _, fields, groups = self._grouped(table, keys)
        removed = sum(self._execute([(b"HDEL", name, *fields[s:e]) for name, s, e in groups]))
        if removed:
            self._execute([(b"DECRBY", self._count_key(table), str(removed).encode())])

    def count(self, table: str) -> int:
        (reply,) = self._execute([(b"GET", self._count_key(table))])
        return int(reply) if reply is not None else 0

    def recount(self, table: str) -> int:
        """Rebuild the row counter of ``table`` from HLEN of every bucket (O(buckets))."""
        names = self._bucket_names(table)
        lens = self._execute(
            [(b"HLEN", self._bucket_name(names, table, b)) for b in range(self.buckets)]
        )
        total = int(sum(lens))
        self._execute([(b"SET", self._count_key(table), str(total).encode())])
        return total

    def put_blob(self, name: str, data: bytes) -> None:
        self._execute([(b"SET", self._blob_key(name), bytes(data))])

    def delete_blob(self, name: str) -> None:
        self._execute([(b"DEL", self._blob_key(name))])

    def get_blob(self, name: str) -> bytes | None:
        (reply,) = self._execute([(b"GET", self._blob_key(name))])
        return bytes(reply) if reply is not None else None

    def commit(
        self,
        rows: Mapping[str, tuple[Keys, list[bytes]]],
        blobs: Mapping[str, bytes],
    ) -> None:
        """Rows and blobs in one MULTI/EXEC (atomic on one server); counters after."""
        per_table: dict[str, int] = {}
        body: list[_Command] = []
        for table, (keys, values) in rows.items():
            commands = self._put_commands(table, keys, values)
            per_table[table] = len(commands)
            body.extend(commands)
        body.extend((b"SET", self._blob_key(name), bytes(data)) for name, data in blobs.items())
        if not body:
            return
        # Not retried: a half-read EXEC reply would double-count rows on a retry.
        replies = self._execute([(b"MULTI",), *body, (b"EXEC",)], retry=False)
        results = replies[-1]
        if not isinstance(results, list):
            raise StoreError(f"Redis at {self.address}: commit aborted ({results!r})")
        counters: list[_Command] = []
        at = 0
        for table, n in per_table.items():
            added = sum(results[at : at + n])
            at += n
            if added:
                counters.append((b"INCRBY", self._count_key(table), str(added).encode()))
        self._execute(counters)

    def close(self) -> None:
        self._client.close()
