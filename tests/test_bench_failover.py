"""Smoke run of ``bench/failover.py --quick``: it finishes, reports every figure, and
loses no row that a replica confirmed before the master died."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "failover.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    result = json.loads(lines[-1])
    for key in POSITIVE:
        value = result.get(key)
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)
    assert result["failover_rows_lost"] == 0
    assert result["rows_confirmed"] == result["rounds"] * result["rows_per_round"]
