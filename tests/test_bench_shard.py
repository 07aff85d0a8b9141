"""Smoke run of ``bench/shard.py --quick``: it finishes, reports every figure, and the
plan it applies leaves the masters' measured load no less even than it found it."""

from __future__ import annotations

import shutil

import pytest
from support import assert_positive, quick_bench

POSITIVE = [
    f"{kind}_imbalance_{phase}"
    for kind in ("load", "time", "cpu", "planned")
    for phase in ("before", "after", "drift_before", "drift_after")
] + ["after_over_before", "drift_after_over_before"]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_bench_reports_every_figure() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (the benchmark starts its own)")
    result = quick_bench("shard.py", timeout_s=230)
    assert_positive(result, POSITIVE)
    # Rows read per master are counted by Redis: exact, not timed.
    assert result["load_imbalance_after"] <= result["load_imbalance_before"]
    assert result["load_imbalance_drift_after"] <= result["load_imbalance_drift_before"]
    assert result["moved_slots"] >= 0 and len(result["load_share_after"]) == result["masters"]
