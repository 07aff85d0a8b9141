"""Python's garbage collector in the service: startup objects frozen, passes timed.

A full (generation 2) pass walks every object the process holds: torch, the model,
FastAPI and the store's clients, hundreds of thousands of objects, 100-170 ms on the
development machine, during which no request moves (``bench/serve.py`` met one every
5-10 s, among its slowest requests). Almost all of those objects live as long as the
process, so after startup they are moved out of the collector's reach (``gc.freeze``)
and a full pass walks only what came later (~3 ms). It costs one collection at startup;
frozen objects that later become cyclic garbage (the model version loaded at startup,
once swapped out) stay until the freeze ends: a bounded, one-time cost.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from service import metrics

_lock = threading.Lock()
_running = 0  # started watchers: the process has one callback and one freeze among them
_frozen = 0
_pass_started = 0.0


def _observe(phase: str, info: dict[str, Any]) -> None:
    global _pass_started
    if phase == "start":
        _pass_started = time.perf_counter()
    else:
        metrics.GC_PAUSE.labels(generation=str(info["generation"])).observe(
            time.perf_counter() - _pass_started
        )


class CollectorWatch:
    """While started: startup objects frozen (``freeze``) and every collector pass timed
    into ``streamrec_service_gc_pause_seconds``. Both are process-wide: apps started
    side by side (tests, ``streamrec run``) share them until the last one stops."""

    def __init__(self, *, freeze: bool) -> None:
        self.freeze = freeze
        self._started = False

    def start(self) -> None:
        global _running, _frozen
        with _lock:
            if self._started:
                return
            self._started = True
            if self.freeze:  # the collection before serving is not a pause of it
                _frozen += 1
                gc.collect()
                gc.freeze()
            _running += 1
            if _running == 1:
                gc.callbacks.append(_observe)

    def stop(self) -> None:
        global _running, _frozen
        with _lock:
            if not self._started:
                return
            self._started = False
            _running -= 1
            if _running == 0:
                gc.callbacks.remove(_observe)
            if self.freeze:
                _frozen -= 1
                if _frozen == 0:
                    gc.unfreeze()
