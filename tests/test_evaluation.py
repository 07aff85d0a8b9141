from __future__ import annotations

import numpy as np

from streaming.auc import roc_auc
from trainer.evaluation import ProgressiveEvaluator


def test_cumulative_auc_matches_exact_auc() -> None:
    rng = np.random.default_rng(0)
    evaluator = ProgressiveEvaluator(window=1_000)
    labels_all, preds_all = [], []
    for _ in range(20):
        preds = rng.random(500).astype(np.float32)
        labels = (rng.random(500) < preds).astype(np.float32)
        evaluator.add(labels, preds)
        labels_all.append(labels)
        preds_all.append(preds)
    exact = roc_auc(np.concatenate(labels_all), np.concatenate(preds_all))
    assert abs(evaluator.cumulative_auc() - exact) < 1e-3
    report = evaluator.report()
    assert report.events == 10_000
    window_exact = roc_auc(np.concatenate(labels_all)[-1000:], np.concatenate(preds_all)[-1000:])
    assert abs(report.window_auc - window_exact) < 1e-9
    assert 0.8 < report.window_calibration < 1.2


def test_empty_evaluator_reports_nan() -> None:
    report = ProgressiveEvaluator().report()
    assert report.events == 0 and np.isnan(report.auc)
