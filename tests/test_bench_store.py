"""Smoke run of ``bench/store.py --quick``: it finishes and reports every tracked figure.

No thresholds here: the targets are the benchmark's business (its ``targets`` object).
"""

from __future__ import annotations

import shutil

import pytest
from support import assert_positive, quick_bench

POSITIVE = [
    "rowwise_adagrad_payload_bytes",
    "rowwise_adagrad_redis_bytes_per_row",
    "rowwise_adagrad_redis_bytes_ratio",
    "adam_redis_bytes_per_row",
    "adam_over_rowwise_bytes_ratio",
    "one_key_per_row_redis_bytes_per_row",
    "tiered_embedded_keys_per_s",
    "tiered_redis_keys_per_s",
    "batches",
    "universe",
    "zipf",
    "dim",
    "cpu_count",
]
TARGETS = [
    "redis_bytes_le_1.25x_payload",
    "adam_ge_2.5x_rowwise",
    "embedded_ge_2M_keys_per_s",
    "redis_ge_500k_keys_per_s",
]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_quick_bench_reports_every_figure() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (the benchmark starts a private one)")
    result = quick_bench("store.py", timeout_s=170)
    assert_positive(result, POSITIVE)
    assert isinstance(result["redis_version"], str) and result["redis_version"]
    capacity = result["hot_capacity_rows"]  # null while TieredStore takes no capacity
    assert capacity is None or (isinstance(capacity, int) and capacity > 0)
    assert set(TARGETS) <= set(result["targets"])
    assert all(isinstance(result["targets"][t], bool) for t in TARGETS)
