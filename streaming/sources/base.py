"""The contract every event source meets: a spec and an iterable of events."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from streaming.events import Event
from streaming.spec import FeatureSpec


class EventSource(ABC):
    """A finite or endless stream of events, all valid under ``spec``.

    Contract for implementations:

    * ``spec`` is set in ``__init__`` and never changes; every event yielded
      round-trips through ``Event.to_json`` -> ``decode_event(..., spec)``.
    * ``total`` is the number of events one full iteration yields when known in
      advance (``None`` for an endless or unknown-length stream). It is meant for
      progress bars and may be an upper bound where documented (JSONL counts
      lines, bad ones included).
    * Each call to ``__iter__`` starts the stream again from the beginning and
      yields the same events in the same order (sources are deterministic).
    """

    spec: FeatureSpec
    name: str = "source"

    @property
    @abstractmethod
    def total(self) -> int | None:
        """Number of events in one pass, if finite and known."""

    @abstractmethod
    def __iter__(self) -> Iterator[Event]:
        """Yield events in stream (time) order, from the beginning."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, total={self.total})"


def check_max_events(max_events: int | None) -> int | None:
    """Validate a ``max_events`` argument: ``None`` (no cap) or a count >= 0."""
    if max_events is not None and (isinstance(max_events, bool) or max_events < 0):
        raise ValueError(f"max_events must be None or a non-negative integer, got {max_events!r}")
    return max_events
