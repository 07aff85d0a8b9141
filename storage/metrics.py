"""Prometheus metrics of the embedding store (default registry, process-wide).

Labels are low-cardinality: ``tier`` in {hot, cold, spill}, ``table`` from the
configured tables, ``result`` in {hit, miss} (lookups) or {admitted, rejected, forced}
(admissions), ``reason`` in ``EVICTION_REASONS``, ``op`` in ``OPS``.
Lookup hits and misses count distinct keys of a batch, per tier consulted. Row and byte
gauges are set at ``flush`` and ``stats`` time, not per lookup.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVICTION_REASONS = ("capacity", "ttl", "l2_norm", "manual")
OPS = ("lookup", "update", "admit", "flush", "expire", "evict", "demote")

LOOKUPS = Counter(
    "streamrec_store_lookups",
    "Distinct keys looked up, by tier and result.",
    ["tier", "result"],
)
COLD_READS_SKIPPED = Counter(
    "streamrec_store_cold_reads_skipped",
    "Hot misses not read from the cold tier: its key filter shows they were never written there.",
)
ROWS_CREATED = Counter(
    "streamrec_store_rows_created",
    "Rows initialised because their key had no row yet.",
    ["table"],
)
REJECTED_GRADIENTS = Counter(
    "streamrec_store_rejected_gradients",
    "Row updates skipped because their gradient held NaN or inf.",
    ["table"],
)
FLUSH_SECONDS = Histogram(
    "streamrec_store_flush_seconds",
    "Time to write dirty rows and the stream position to the cold tier.",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ADMISSIONS = Counter(
    "streamrec_store_admissions",
    "Distinct ids without a row in a training call, by the admission policy's answer "
    "(admitted, rejected), or given a row by admit() (forced).",
    ["table", "result"],
)
DROPPED_GRADIENTS = Counter(
    "streamrec_store_dropped_gradients",
    "Row updates dropped because the key has no row (not admitted, or removed).",
    ["table"],
)
EVICTIONS = Counter(
    "streamrec_store_evictions",
    "Rows evicted, by reason: capacity (out of the hot tier: demoted to the cold tier, or "
    "deleted without one); ttl, l2_norm, manual (out of every tier).",
    ["table", "reason"],
)
PROMOTIONS = Counter(
    "streamrec_store_promotions",
    "Rows copied from the cold tier into the hot tier by a lookup or update.",
    ["table"],
)
SERVING_READS = Counter(
    "streamrec_store_serving_reads",
    "Rows a read-only store (serving) reported reading to the writer, by the tier it found "
    "them in: cold (for the writer to promote) or hot (uses for its eviction; sent only "
    "while a writer with a capacity asks for them); side: sent by the reader, taken by "
    "the writer.",
    ["table", "tier", "side"],
)
DEMOTIONS = Counter(
    "streamrec_store_demotions",
    "Rows moved out of the hot tier into the cold tier for capacity (dirty ones written "
    "back whole, optimizer state and metadata included).",
    ["table"],
)
REDIS_MASTERS = Gauge(
    "streamrec_store_redis_masters",
    "Redis masters the hot tier's rows are spread over (1: a single server; set at open).",
)
REDIS_SLOT_MAP_REFRESHES = Counter(
    "streamrec_store_redis_slot_map_refreshes",
    "Redis Cluster slot maps read again because a reply said a slot had moved (resharding).",
)
REDIS_REDIRECTS = Counter(
    "streamrec_store_redis_redirects",
    "Commands a Redis Cluster master redirected and that were sent again where the slot "
    "lives now: MOVED (the slot has moved) or ASK (the slot is being migrated); op: rows "
    "read, rows written, other (layout, counters, blobs, markers).",
    ["kind", "op"],
)
for _kind in ("moved", "ask"):  # every series exists from the start, at 0
    for _op in ("read", "write", "other"):
        REDIS_REDIRECTS.labels(_kind, _op)
REDIS_LOAD_IMBALANCE = Gauge(
    "streamrec_store_redis_load_imbalance",
    "On a Redis Cluster: the share of this process's row reads and writes that its "
    "busiest master serves, over the mean share (1: even; over the rates reported for "
    "`streamrec rebalance`, set every 10 s; 0: not a cluster).",
)
REDIS_LISTPACK_WARNINGS = Counter(
    "streamrec_store_redis_listpack_warnings",
    "Tables whose first write found a Redis master set to keep their bucket hashes as "
    "hashtables (hash-max-listpack-entries / -value too small: about twice the memory).",
)
REDIS_EVICTION_POLICY_WARNINGS = Counter(
    "streamrec_store_redis_eviction_policy_warnings",
    "Redis masters a writer found set to evict any key under maxmemory (an allkeys-* "
    "maxmemory-policy): rows written since the last flush can vanish (the trainer then "
    "rewinds).",
)
REDIS_REPLICA_WAIT_SECONDS = Histogram(
    "streamrec_store_redis_replica_wait_seconds",
    "Time a flush waited for the Redis replicas to confirm its writes (WAIT; "
    "store.redis_min_replicas > 0).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
)
REDIS_REPLICA_WAITS_SHORT = Counter(
    "streamrec_store_redis_replica_waits_short",
    "Flushes refused because fewer Redis replicas than store.redis_min_replicas confirmed "
    "their writes in time (nothing was committed; the trainer rewinds).",
)
REBALANCE_ROUNDS = Counter(
    "streamrec_rebalance_rounds",
    "`streamrec rebalance` rounds, by result: planned (within tolerance, or without "
    "--apply), applied (slots moved), no_reports (no store reported traffic), failed.",
    ["result"],
)
REBALANCE_SLOTS_MOVED = Counter(
    "streamrec_rebalance_slots_moved", "Hash slots `streamrec rebalance --apply` moved."
)
REBALANCE_IMBALANCE = Gauge(
    "streamrec_rebalance_load_imbalance",
    "The cluster's busiest master's load over the mean at the last `streamrec rebalance` "
    "round, as measured (before) and as planned (after).",
    ["when"],
)
ROWS = Gauge("streamrec_store_rows", "Rows per tier and table.", ["tier", "table"])
BYTES = Gauge(
    "streamrec_store_bytes",
    "Packed row bytes per tier and table (rows x row size; backend overhead excluded).",
    ["tier", "table"],
)
OP_SECONDS = Histogram(
    "streamrec_store_op_seconds",
    "Time of one store call, by operation.",
    ["op"],
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
)

HOT_HIT = LOOKUPS.labels(tier="hot", result="hit")
HOT_MISS = LOOKUPS.labels(tier="hot", result="miss")
COLD_HIT = LOOKUPS.labels(tier="cold", result="hit")
COLD_MISS = LOOKUPS.labels(tier="cold", result="miss")
LOOKUP_SECONDS = OP_SECONDS.labels(op="lookup")
LOOKUP_TABLES_SECONDS = OP_SECONDS.labels(op="lookup_tables")
UPDATE_SECONDS = OP_SECONDS.labels(op="update")
PREFETCH_SECONDS = OP_SECONDS.labels(op="prefetch")
FLUSH_OP_SECONDS = OP_SECONDS.labels(op="flush")
ADMIT_SECONDS = OP_SECONDS.labels(op="admit")
EXPIRE_SECONDS = OP_SECONDS.labels(op="expire")
EVICT_SECONDS = OP_SECONDS.labels(op="evict")
DEMOTE_SECONDS = OP_SECONDS.labels(op="demote")
"""One capacity eviction pass (choosing victims and moving them)."""
