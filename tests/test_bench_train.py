"""Smoke run of ``bench/train.py --quick``: it finishes against the real Kafka and a
private Redis and reports every tracked figure. No thresholds: the targets are the
benchmark's business (its ``targets`` object)."""

from __future__ import annotations

import pytest
from support import quick_bench

RATES = [
    "streamrec_redis_events_per_s",
    "streamrec_embedded_events_per_s",
    "naive_redis_events_per_s",
    "streamrec_redis_sync_events_per_s",
]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_bench_reports_every_figure(kafka_bootstrap: str) -> None:
    result = quick_bench("train.py", "--no-torchrec", "--bootstrap", kafka_bootstrap, timeout_s=580)
    for key in RATES:
        assert isinstance(result[key], int) and result[key] > 0, (key, result[key])
    # The keys the team tracks are present even when the baseline is skipped.
    assert "torchrec_events_per_s" in result and result["torchrec_events_per_s"] is None
    assert 0 <= result["store_traffic_reduction"] < 1
    # Every distinct row is read once and pushed once whatever the cache does.
    assert result["store_traffic_reduction"] <= result["store_traffic_reduction_bound"] < 1
    rows = result["store_rows"]["naive_redis"]
    assert rows["read"] == rows["demand_read"] > 0  # no cache: every lookup reaches Redis
    assert set(result["targets"]) == {
        "redis_ge_5x_naive",
        "redis_ge_0.5x_torchrec",
        "embedded_ge_1x_torchrec",
        "traffic_reduction_ge_0.80",
    }
