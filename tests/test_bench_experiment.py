"""Smoke run of ``bench/experiment.py --quick``: it reports every figure, and its A/A
comparison finds the unfair setup's bias."""

from __future__ import annotations

import pytest
from support import assert_positive, quick_bench

SETUPS = ["fair_auc_gap", "fair_logloss_gap", "unfair_auc_gap", "unfair_logloss_gap"]


@pytest.mark.timeout(240)
def test_quick_bench_reports_every_figure() -> None:
    result = quick_bench("experiment.py", "--resamples", "50", timeout_s=230)
    gaps = [*SETUPS, "unfair_bias_auc", "unfair_bias_logloss"]
    assert_positive(result, [f"{key}_se" for key in gaps])
    for key in gaps:
        assert isinstance(result[key], float), key
    # The production model learnt from ten times the events: on the very same control
    # events it scores many standard errors better than the control arm's model.
    assert result["unfair_bias_auc"] > 4 * result["unfair_bias_auc_se"]
    assert result["fair"]["control_events"] == result["unfair"]["control_events"] > 0
