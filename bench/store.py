"""Tiered-store benchmark: Redis bytes per row and lookup+update throughput.

    python bench/store.py [--quick] [--redis-url URL] [--rows-per-bucket N]

Prints progress to stderr and one JSON object as the last line of stdout.

* Memory: Redis ``used_memory`` delta per row after writing ``memory_rows`` rows of one
  dim-16 table through ``RedisTier`` (hinted with that row count): row-wise AdaGrad
  (76-byte rows), then lazy Adam (204 bytes), against the baseline of one Redis string
  key per row (``MSET``; key ``bench-kv-<id>:`` + the 8-byte key) with the same rows.
  A row's payload is what any key/value layout must hold for it: its 8-byte key and its
  packed row (``*_row_bytes``; ``*_redis_bytes_over_row`` leaves the key out).
  ``OBJECT ENCODING`` of every bucket hash is tallied (all should be ``listpack``).
* Throughput: per batch, one ``TieredStore.lookup_tables(create=True)`` of every table's
  4096 keys (a training step's lookup), then ``update`` of each table's unique keys
  (``np.unique``) with ``N(0, 1) * 0.01`` gradients. 26 tables, Zipf(1.1) ids over a
  10M universe (hashed with ``feature_keys``), dim 16, row-wise AdaGrad, RocksDB cold
  tier. Keys per second count the lookup keys as they appear in the batches, duplicates
  included, over the batches after the warm-up; only the store calls are timed. The
  hot tier (memory: embedded, or Redis) holds 20% of the run's distinct rows, if
  ``TieredStore`` takes a capacity (``hot_capacity_rows`` is null otherwise); the
  ``*_unbounded_*`` figures repeat the run without one. The Redis tier gets the rows it
  is to hold as its ``expected_rows``.

Without ``--redis-url`` it starts a private ``redis-server`` on a free loopback port
(no persistence, ``hash-max-listpack-entries 512``, ``hash-max-listpack-value 1024``:
the settings ``storage.redis_tier`` asks for) and stops it at the end. With
``--redis-url`` it uses fresh key prefixes on that server; its ``used_memory`` deltas then
include whatever other clients do meanwhile.

``tiered_redis_cluster_keys_per_s``: the Redis run at 20% again, over a private Redis
Cluster of ``--cluster-masters`` masters (default 3, all on this machine;
``deploy/local/redis_cluster.py``), the rows spread over them by bucket.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from common import private_redis, private_redis_cluster

from storage.allocator import tune_malloc
from storage.base import Keys, RowTier, TableConfig
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.redis_tier import RedisTier
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import TieredStore

DIM = 16
TABLES = 26
BATCH = 4096
UNIVERSE = 10_000_000
ZIPF = 1.1
HOT_FRACTION = 0.2
KEY_BYTES = 8


def log(msg: str) -> None:
    print(f"[bench/store] {msg}", file=sys.stderr, flush=True)


def used_memory(client: redis.Redis) -> int:
    """``used_memory`` once it stops moving (Redis grows its key table incrementally)."""
    last = int(client.info("memory")["used_memory"])
    for _ in range(20):
        time.sleep(0.05)
        now = int(client.info("memory")["used_memory"])
        if now == last:
            break
        last = now
    return last


# -- memory -----------------------------------------------------------------------------


def random_keys(rng: np.random.Generator, n: int) -> Keys:
    """``n`` distinct random 64-bit keys (like ``feature_keys`` hashes)."""
    keys: Keys = np.unique(rng.integers(0, 2**64, size=n + n // 100 + 16, dtype=np.uint64))
    return rng.permutation(keys)[:n]


def redis_bytes_per_row(
    url: str, client: redis.Redis, optimizer: str, rows: int, tier_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Write ``rows`` rows of a fresh table; used_memory delta per row and hash shapes."""
    cfg = TableConfig.model_validate({"name": "mem", "dim": DIM, "optimizer": optimizer})
    codec = RowCodec(cfg)
    keys = random_keys(np.random.default_rng(1), rows)
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    # Measured without the writer's connection: its buffers are not row memory.
    before = used_memory(client)
    tier = RedisTier(url, prefix=prefix, expected_rows=rows, **tier_kwargs)
    step = 20_000
    for i in range(0, rows, step):
        part = keys[i : i + step]
        tier.put_many(cfg.name, part, codec.pack(codec.new_rows(part, 1_700_000_000)))
    stored = tier.count(cfg.name)
    tier.close()
    after = used_memory(client)
    if stored != rows:
        raise SystemExit(f"RedisTier counts {stored} rows, wrote {rows}")
    # Every bucket hash should be listpack-encoded (the compact encoding).
    names = list(client.scan_iter(match=f"{prefix}:{{*", count=1000))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.object("encoding", name)
        pipe.hlen(name)
    replies = pipe.execute()
    encodings: dict[str, int] = {}
    for enc in replies[::2]:
        text = enc.decode() if isinstance(enc, bytes) else str(enc)
        encodings[text] = encodings.get(text, 0) + 1
    lens = [int(n) for n in replies[1::2]]
    for i in range(0, len(names), 1000):
        client.delete(*names[i : i + 1000])
    client.delete(f"{prefix}:rows:{cfg.name}", f"{prefix}:layout:{cfg.name}")
    return {
        # What any key/value layout must hold per row: the 8-byte key and the packed row.
        "payload_bytes": KEY_BYTES + codec.nbytes,
        "row_bytes": codec.nbytes,
        "bytes_per_row": (after - before) / rows,
        "buckets": len(names),
        "rows_per_bucket_mean": float(np.mean(lens)),
        "rows_per_bucket_max": int(np.max(lens)),
        "encodings": encodings,
    }


def one_key_per_row_bytes(url: str, client: redis.Redis, rows: int) -> float:
    """The baseline: one string key per row (``bench-kv-<id>:`` + the 8-byte key), same
    rows as the row-wise AdaGrad run."""
    cfg = TableConfig(name="mem", dim=DIM, optimizer="rowwise_adagrad")
    codec = RowCodec(cfg)
    keys = random_keys(np.random.default_rng(1), rows)
    prefix = f"bench-kv-{uuid.uuid4().hex[:8]}:".encode()
    before = used_memory(client)
    writer = redis.Redis.from_url(url)  # closed before measuring, like the tier above
    step = 20_000
    names: list[bytes] = []
    for i in range(0, rows, step):
        part = keys[i : i + step]
        raw = part.astype("<u8").tobytes()
        chunk = [prefix + raw[j : j + 8] for j in range(0, len(raw), 8)]
        writer.mset(dict(zip(chunk, codec.pack(codec.new_rows(part, 1_700_000_000)), strict=True)))
        names += chunk
    writer.close()
    after = used_memory(client)
    for i in range(0, len(names), 10_000):
        client.delete(*names[i : i + 10_000])
    return (after - before) / rows


# -- throughput -------------------------------------------------------------------------


def zipf_ids(rng: np.random.Generator, n: int) -> npt.NDArray[np.int64]:
    """``n`` Zipf(ZIPF) ranks truncated to [1, UNIVERSE] (rejection sampling)."""
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        draw = rng.zipf(ZIPF, size=int((n - len(out)) * 1.3) + 64)
        out = np.concatenate([out, draw[draw <= UNIVERSE]])
    return out[:n]


def make_batches(n_batches: int, seed: int) -> list[list[Keys]]:
    """``n_batches`` x TABLES key arrays of BATCH keys each."""
    rng = np.random.default_rng(seed)
    names = table_names()
    return [[feature_keys(name, zipf_ids(rng, BATCH)) for name in names] for _ in range(n_batches)]


def table_names() -> list[str]:
    return [f"C{i + 1}" for i in range(TABLES)]


def capacity_kwargs(capacity: int | None) -> tuple[dict[str, Any], str]:
    """The hot-capacity keyword of ``TieredStore`` (found by signature: the API is new)
    for ``capacity`` rows, all tables together, and a note on what was passed."""
    if capacity is None:
        return {}, "unbounded (no capacity passed)"
    params = inspect.signature(TieredStore.__init__).parameters
    names = [name for name in params if "capacity" in name]
    if not names:
        return {}, "TieredStore takes no hot capacity: ran unbounded"
    return {names[0]: capacity}, f"{names[0]}={capacity}"


def run_store(
    label: str,
    hot: RowTier,
    cold_dir: Path,
    batches: list[list[Keys]],
    warmup: int,
    capacity: int | None,
) -> dict[str, Any]:
    """Lookup + update every batch through a TieredStore; keys/s over the timed batches."""
    names = table_names()
    tables = [TableConfig(name=n, dim=DIM, optimizer="rowwise_adagrad") for n in names]
    kwargs, note = capacity_kwargs(capacity)
    spill = MemoryTier.scratch(cold_dir / "spill") if kwargs else None  # as build_store
    store = TieredStore(
        tables, hot, RocksDBTier(cold_dir / "cold", sync_commits=False), spill=spill, **kwargs
    )
    rng = np.random.default_rng(7)
    timed_keys = 0
    elapsed = 0.0
    try:
        for b, batch in enumerate(batches):
            uniques = [np.unique(keys) for keys in batch]
            grads = [
                rng.standard_normal((len(u), DIM), dtype=np.float32) * np.float32(0.01)
                for u in uniques
            ]
            started = time.perf_counter()
            store.lookup_tables(dict(zip(names, batch, strict=True)), create=True)
            for name, u, g in zip(names, uniques, grads, strict=True):
                store.update(name, u, g)
            took = time.perf_counter() - started
            if b >= warmup:
                elapsed += took
                timed_keys += sum(len(k) for k in batch)
            if b % 10 == 9 or b == len(batches) - 1:
                rate = sum(map(len, batch)) / took
                log(f"{label}: batch {b + 1}/{len(batches)}: {rate:,.0f} keys/s")
        started = time.perf_counter()
        store.flush()
        flush_s = time.perf_counter() - started
        stats = store.stats()
    finally:
        store.close()
    rate = timed_keys / elapsed
    hot_rows = sum(v for k, v in stats.items() if k.startswith("hot_rows."))
    log(
        f"{label}: {rate:,.0f} keys/s over {len(batches) - warmup} timed batches, "
        f"{hot_rows:,} hot rows at the end"
    )
    return {
        "keys_per_s": rate,
        "flush_s": flush_s,
        "capacity_applied": bool(kwargs),
        "capacity_note": note,
        "hot_rows_end": hot_rows,
    }


# -- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (CI smoke, < 60 s)")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument(
        "--rows-per-bucket", type=int, default=None, help="RedisTier's (default: its own)"
    )
    parser.add_argument(
        "--cluster-masters",
        type=int,
        default=3,
        help="masters of the private Redis Cluster of the cluster run (0: no cluster run)",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc malloc as it is (streamrec processes tune it: malloc_tuning)",
    )
    args = parser.parse_args()
    # As a streamrec process does at start (Settings.malloc_tuning), in this process
    # only: the private redis-server is started from here.
    malloc_tuned = not args.no_malloc_tuning and tune_malloc(children=False)
    mem_rows = 100_000 if args.quick else 1_000_000
    n_batches = 8 if args.quick else 60
    warmup = 2 if args.quick else 5
    tier_kwargs: dict[str, Any] = {}
    if args.rows_per_bucket is not None:
        tier_kwargs["rows_per_bucket"] = args.rows_per_bucket
    started = time.perf_counter()

    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(private_redis(log))
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        version = str(client.info("server")["redis_version"])
        listpack = {k: str(v) for k, v in client.config_get("hash-max-listpack-*").items()}
        log(f"redis {version}, {listpack}")

        log(f"memory: {mem_rows:,} rows per layout")
        adagrad = redis_bytes_per_row(url, client, "rowwise_adagrad", mem_rows, tier_kwargs)
        log(f"rowwise_adagrad: {adagrad}")
        adam = redis_bytes_per_row(url, client, "lazy_adam", mem_rows, tier_kwargs)
        log(f"lazy_adam: {adam}")
        baseline = one_key_per_row_bytes(url, client, mem_rows)
        log(f"one key per row: {baseline:.1f} bytes/row")

        log(f"generating {n_batches} batches of {TABLES} x {BATCH} keys")
        batches = make_batches(n_batches, seed=3)
        distinct = {
            name: len(np.unique(np.concatenate([b[t] for b in batches])))
            for t, name in enumerate(table_names())
        }
        per_table = {name: max(1, int(d * HOT_FRACTION)) for name, d in distinct.items()}
        capacity = sum(per_table.values())
        log(f"distinct rows: {sum(distinct.values()):,}; hot capacity {capacity:,}")

        runs: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            for label, cap in (("", capacity), ("_unbounded", None)):
                runs[f"embedded{label}"] = run_store(
                    f"embedded{label}", MemoryTier(), Path(tmp) / f"e{label}", batches, warmup, cap
                )
                # The bucket hint: the rows the hot tier is to hold per table.
                hot = RedisTier(
                    url,
                    prefix=f"bench-{uuid.uuid4().hex[:8]}",
                    expected_rows=per_table if cap is not None else distinct,
                    **tier_kwargs,
                )
                runs[f"redis{label}"] = run_store(
                    f"redis{label}", hot, Path(tmp) / f"r{label}", batches, warmup, cap
                )
            if args.cluster_masters:
                with private_redis_cluster(log, args.cluster_masters) as cluster_url:
                    hot = RedisTier(cluster_url, expected_rows=per_table, **tier_kwargs)
                    runs["redis_cluster"] = run_store(
                        "redis_cluster", hot, Path(tmp) / "rc", batches, warmup, capacity
                    )

    payload = adagrad["payload_bytes"]
    embedded, tiered_redis = runs["embedded"], runs["redis"]
    result: dict[str, Any] = {
        "rowwise_adagrad_payload_bytes": payload,
        "rowwise_adagrad_redis_bytes_per_row": round(adagrad["bytes_per_row"], 2),
        "rowwise_adagrad_redis_bytes_ratio": round(adagrad["bytes_per_row"] / payload, 3),
        "rowwise_adagrad_row_bytes": adagrad["row_bytes"],
        "rowwise_adagrad_redis_bytes_over_row": round(
            adagrad["bytes_per_row"] / adagrad["row_bytes"], 3
        ),
        "adam_payload_bytes": adam["payload_bytes"],
        "adam_redis_bytes_per_row": round(adam["bytes_per_row"], 2),
        "adam_over_rowwise_bytes_ratio": round(adam["bytes_per_row"] / adagrad["bytes_per_row"], 3),
        "one_key_per_row_redis_bytes_per_row": round(baseline, 2),
        "one_key_per_row_over_rowwise_ratio": round(baseline / adagrad["bytes_per_row"], 3),
        "memory_rows": mem_rows,
        "redis_buckets": adagrad["buckets"],
        "redis_rows_per_bucket_mean": round(adagrad["rows_per_bucket_mean"], 1),
        "redis_rows_per_bucket_max": adagrad["rows_per_bucket_max"],
        "redis_hash_encodings": {
            "rowwise_adagrad": adagrad["encodings"],
            "lazy_adam": adam["encodings"],
        },
        "tiered_embedded_keys_per_s": round(embedded["keys_per_s"]),
        "tiered_redis_keys_per_s": round(tiered_redis["keys_per_s"]),
        "tiered_embedded_unbounded_keys_per_s": round(runs["embedded_unbounded"]["keys_per_s"]),
        "tiered_redis_unbounded_keys_per_s": round(runs["redis_unbounded"]["keys_per_s"]),
        "tiered_redis_cluster_keys_per_s": (
            round(runs["redis_cluster"]["keys_per_s"]) if "redis_cluster" in runs else None
        ),
        "redis_cluster_masters": args.cluster_masters or None,
        "hot_capacity_rows": capacity if embedded["capacity_applied"] else None,
        "hot_capacity_note": embedded["capacity_note"],
        "hot_rows_end": {k: v["hot_rows_end"] for k, v in runs.items()},
        "distinct_rows": sum(distinct.values()),
        "flush_s": {k: round(v["flush_s"], 2) for k, v in runs.items()},
        "batches": n_batches,
        "warmup_batches": warmup,
        "batch_keys_per_table": BATCH,
        "tables": TABLES,
        "universe": UNIVERSE,
        "zipf": ZIPF,
        "dim": DIM,
        "cpu_count": os.cpu_count(),
        "malloc_tuning": malloc_tuned,
        "redis_version": version,
        "redis_listpack_settings": listpack,
        "private_redis": args.redis_url is None,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    result["targets"] = {
        "redis_bytes_le_1.25x_payload": adagrad["bytes_per_row"] <= 1.25 * payload,
        "adam_ge_2.5x_rowwise": adam["bytes_per_row"] >= 2.5 * adagrad["bytes_per_row"],
        "embedded_ge_2M_keys_per_s": embedded["keys_per_s"] >= 2_000_000,
        "redis_ge_500k_keys_per_s": tiered_redis["keys_per_s"] >= 500_000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
