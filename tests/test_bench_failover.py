"""Smoke run of ``bench/failover.py --quick``: it finishes, reports every figure, and
loses no row that a replica confirmed before the master died."""

from __future__ import annotations

import shutil

import pytest
from support import assert_positive, quick_bench

POSITIVE = [
    "write_ms_p50",
    "replica_wait_ms_p50",
    "replica_wait_ms_p99",
    "replica_wait_over_write",
    "failover_read_s",
    "failover_confirmed_write_s",
    "rows_confirmed",
]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_bench_reports_every_figure() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (the benchmark starts its own)")
    result = quick_bench("failover.py", timeout_s=230)
    assert_positive(result, POSITIVE)
    assert result["failover_rows_lost"] == 0
    assert result["rows_confirmed"] == result["rounds"] * result["rows_per_round"]
