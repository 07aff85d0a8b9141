"""Faults the trainer survives in-process, by going back to its last recorded position.

The store's recorded position is the trainer's only acknowledgement: the rows, the dense
checkpoint named after it and the Kafka offsets all follow it. Whatever the trainer has
done since (updates in the hot tier, dense steps, events buffered or read ahead) is
discarded on a fault and learned again from the log, so an event is never lost and,
with the deterministic replay of one partition, never counted twice.

Faults handled here (everything else ends the trainer):

* ``StoreUnavailable``: Redis unreachable. A batch may have been half applied (some
  tables updated, not others), so the trainer waits until the store answers, then
  rewinds.
* ``HotTierLost``: Redis came back empty (restarted without persistence), noticed by
  ``flush`` before it committed anything. The hot tier is rebuilt from the cold tier
  by promotion on demand, as of the recorded position.
* ``LogUnavailable`` while rewinding (Kafka down at the same time): retried the same way.

A Kafka broker restart needs no rewind: the consumer reconnects by itself, offset
commits are best effort, and a checkpoint whose dead letters cannot be stored yet is
put off (``StreamingTrainer.checkpoint`` returns False).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from storage.base import HotTierLost, StoreUnavailable
from streaming.log import LogUnavailable
from trainer import metrics
from trainer.evaluation import ProgressiveEvaluator

if TYPE_CHECKING:
    from trainer.trainer import StreamingTrainer

log = logging.getLogger(__name__)

RECOVERABLE: tuple[type[Exception], ...] = (StoreUnavailable, HotTierLost)
"""Errors of the training loop that ``recover`` handles."""
for _fault in RECOVERABLE:  # a series per reason from the start, for rates and alerts
    metrics.REWINDS.labels(reason=_fault.__name__)

_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Mark:
    """The trainer's bookkeeping as of a recorded position, to go back to it."""

    position: dict[str, int]
    evaluator: ProgressiveEvaluator
    bad_events: int

    @classmethod
    def of(cls, trainer: StreamingTrainer, position: dict[str, int]) -> Mark:
        return cls(dict(position), trainer.evaluator.copy(), trainer.bad_events)


class StoreFaultTimeout(RuntimeError):
    """The store stayed unreachable for longer than ``trainer.recover_timeout_s``."""


def recover(
    trainer: StreamingTrainer, fault: Exception, stop: threading.Event, timeout_s: float
) -> None:
    """Rewind ``trainer`` to the store's recorded position, retrying (with backoff) while
    the store or the log is unreachable. Raises ``fault`` when ``stop`` is set first (the
    store keeps its recorded position; a restart resumes from it) and
    ``StoreFaultTimeout`` after ``timeout_s``."""
    reason = type(fault).__name__
    metrics.REWINDS.labels(reason=reason).inc()
    log.warning("store fault (%s: %s); rewinding to the recorded position", reason, fault)
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        if stop.is_set():
            raise fault
        try:
            replay = trainer.rewind()
        except (StoreUnavailable, LogUnavailable) as e:
            if time.monotonic() >= deadline:
                raise StoreFaultTimeout(
                    f"still failing after {timeout_s:.0f} s: {type(e).__name__}: {e}"
                ) from e
            wait = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
            attempt += 1
            log.info("rewind failed (%s); retrying in %.1f s", e, wait)
            stop.wait(wait)
            continue
        log.warning(
            "rewound to position %s; %d events trained since are replayed",
            trainer.position,
            replay,
        )
        return
