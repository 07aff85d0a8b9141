"""Smoke run of ``bench/serve.py --quick``: it finishes and reports every tracked figure.

No thresholds here: the targets are the benchmark's business (its ``targets`` object).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

POSITIVE = ["p50_ms", "p99_ms", "rps", "noop_rps", "fixed_rate", "instances", "train_events"]
TARGETS = ["p99_le_15ms_at_300rps", "rps_ge_half_noop"]


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_quick_bench_reports_every_figure() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (the benchmark starts a private one)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-4000:]
    result = json.loads(lines[-1])
    for key in POSITIVE:
        value = result.get(key)
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert value > 0, (key, value)
    assert result["errors"] == 0
    assert all(isinstance(result["targets"][t], bool) for t in TARGETS)
