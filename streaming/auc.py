"""Rank-based ROC AUC in numpy, shared by the data sources (best achievable AUC
of a synthetic stream) and the trainer's progressive evaluation.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels``.

    Contract: ``labels`` holds 0/1 (any numeric or bool dtype, nonzero means
    positive) and ``scores`` any finite floats, both 1-D of the same length.
    Tied scores count one half (the Mann-Whitney statistic with average ranks),
    so a constant scorer gets exactly 0.5. Returns ``nan`` when either class is
    absent, because AUC is undefined there and a progressive evaluator should
    not crash on a window that happens to hold one class.
    O(n log n) time, O(n) memory.
    """
    y = np.asarray(labels).ravel() != 0
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    n_pos = int(np.count_nonzero(y))
    n_neg = int(y.shape[0]) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    # Average 1-based rank of each group of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [s.shape[0]]))
    group_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(s.shape[0], dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    pos_rank_sum = float(ranks[y].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
