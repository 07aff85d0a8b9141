"""Smoke run of ``bench/serve.py --quick --experiment``: it finishes and reports every
tracked figure, the experiment's too.

No thresholds here: the targets are the benchmark's business (its ``targets`` object).
"""

from __future__ import annotations

import shutil

import pytest
from support import assert_positive, quick_bench

POSITIVE = ["p50_ms", "p99_ms", "rps", "noop_rps", "fixed_rate", "instances", "train_events"]
POSITIVE += [
    f"{kind}_{figure}"
    for kind in ("experiment", "experiment_one_unit", "one_unit")
    for figure in ("p50_ms", "p99_ms", "rps")
] + ["experiment_over_plain_rps", "experiment_one_unit_over_plain_rps"]
TARGETS = ["p99_le_15ms_at_300rps", "rps_ge_half_noop"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_quick_bench_reports_every_figure() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH (the benchmark starts a private one)")
    result = quick_bench("serve.py", "--experiment", timeout_s=580)
    assert_positive(result, POSITIVE)
    assert result["errors"] == 0
    assert all(isinstance(result["targets"][t], bool) for t in TARGETS)
