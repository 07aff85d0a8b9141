"""Progressive validation: every event is scored before the model trains on it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from streaming.auc import roc_auc

_BINS = 10_000


@dataclass(frozen=True)
class EvalReport:
    events: int
    auc: float  # since the start (binned, exact to ~1e-4)
    window_auc: float  # over the last `window` events (exact)
    window_logloss: float
    window_calibration: float  # mean predicted CTR / observed CTR


class ProgressiveEvaluator:
    """Cumulative AUC from a fixed histogram (bounded memory on an endless stream)
    plus exact windowed AUC, logloss and calibration."""

    def __init__(self, window: int = 50_000) -> None:
        self._pos = np.zeros(_BINS, dtype=np.int64)
        self._neg = np.zeros(_BINS, dtype=np.int64)
        self._window = window
        self._labels: deque[npt.NDArray[np.float32]] = deque()
        self._preds: deque[npt.NDArray[np.float32]] = deque()
        self._held = 0
        self.events = 0

    def add(self, labels: npt.NDArray[np.float32], preds: npt.NDArray[np.float32]) -> None:
        bins = np.clip((preds * _BINS).astype(np.int64), 0, _BINS - 1)
        positive = labels > 0.5
        self._pos += np.bincount(bins[positive], minlength=_BINS)
        self._neg += np.bincount(bins[~positive], minlength=_BINS)
        self.events += len(labels)
        self._labels.append(labels)
        self._preds.append(preds)
        self._held += len(labels)
        while self._held - len(self._labels[0]) >= self._window:
            self._held -= len(self._labels.popleft())
            self._preds.popleft()

    def copy(self) -> ProgressiveEvaluator:
        """An independent copy (window arrays are never modified, so they are shared)."""
        other = ProgressiveEvaluator(self._window)
        other._pos, other._neg = self._pos.copy(), self._neg.copy()
        other._labels, other._preds = self._labels.copy(), self._preds.copy()
        other._held, other.events = self._held, self.events
        return other

    def cumulative_auc(self) -> float:
        pos, neg = self._pos, self._neg
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos == 0 or total_neg == 0:
            return float("nan")
        # P(score_pos > score_neg) + 0.5 P(tie), ties being the same bin.
        neg_below = np.cumsum(neg) - neg
        return float((pos * (neg_below + 0.5 * neg)).sum() / (total_pos * total_neg))

    def report(self) -> EvalReport:
        if not self._labels:
            return EvalReport(0, float("nan"), float("nan"), float("nan"), float("nan"))
        labels = np.concatenate(self._labels)[-self._window :]
        preds = np.concatenate(self._preds)[-self._window :]
        clipped = np.clip(preds, 1e-7, 1 - 1e-7)
        logloss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
        observed = float(labels.mean())
        calibration = float(preds.mean() / observed) if observed > 0 else float("nan")
        return EvalReport(
            events=self.events,
            auc=self.cumulative_auc(),
            window_auc=roc_auc(labels, preds),
            window_logloss=logloss,
            window_calibration=calibration,
        )
