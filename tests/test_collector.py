"""The service's garbage-collector watch: startup objects frozen, passes timed."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from service import collector
from service.collector import CollectorWatch


def full_passes() -> float:
    name = "streamrec_service_gc_pause_seconds_count"
    return REGISTRY.get_sample_value(name, {"generation": "2"}) or 0.0


def test_watchers_share_one_callback_and_the_last_freezer_unfreezes() -> None:
    assert collector._running == 0 and gc.get_freeze_count() == 0  # no app left running
    freezing, plain = CollectorWatch(freeze=True), CollectorWatch(freeze=False)
    freezing.start()
    assert gc.get_freeze_count() > 1000  # every object this process holds
    plain.start()
    plain.start()  # idempotent
    assert gc.callbacks.count(collector._observe) == 1
    before = full_passes()
    gc.collect()
    assert full_passes() == before + 1  # observed once, however many watchers run
    freezing.stop()
    assert gc.get_freeze_count() == 0
    assert collector._observe in gc.callbacks  # ``plain`` still runs
    plain.stop()
    plain.stop()
    assert collector._observe not in gc.callbacks
    gc.collect()
    assert full_passes() == before + 1
