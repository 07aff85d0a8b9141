"""Prometheus metrics of the embedding store (default registry, process-wide).

Labels are low-cardinality: ``tier`` in {hot, cold}, ``result`` in {hit, miss},
``table`` from the configured tables, ``op`` in {lookup, update, flush}.
Lookup hits and misses count distinct keys of a batch, per tier consulted.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LOOKUPS = Counter(
    "streamrec_store_lookups",
    "Distinct keys looked up, by tier and result.",
    ["tier", "result"],
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
UPDATE_SECONDS = OP_SECONDS.labels(op="update")
FLUSH_OP_SECONDS = OP_SECONDS.labels(op="flush")
