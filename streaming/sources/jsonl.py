"""A JSON-lines file of wire-format events as a source, and a writer for one.

One event per line, exactly the Kafka message schema (``streaming.events``).
The spec comes from a sidecar ``PATH.spec.json`` (a ``FeatureSpec`` as JSON)
when present, else it is inferred from the first lines of the file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import orjson

from streaming.events import BadEvent, Event, decode_event
from streaming.sources.base import EventSource, check_max_events
from streaming.spec import FeatureSpec, SparseFeature

log = logging.getLogger(__name__)

INFER_LINES = 1000
# Past this many warnings per pass, bad lines are only counted (a broken file
# must not flood the log).
MAX_WARNINGS = 20


def sidecar_path(path: Path) -> Path:
    """Where the spec of ``path`` lives: ``PATH.spec.json`` next to it."""
    return path.with_name(path.name + ".spec.json")


def infer_spec(path: Path, max_lines: int = INFER_LINES, dim: int = 16) -> FeatureSpec:
    """A spec guessed from the first ``max_lines`` non-blank lines of ``path``.

    A feature whose value is a list in any line is multi_hot, otherwise
    categorical; dense names are the keys seen under ``dense``. Fields keep the
    order they are first seen in. Lines that are not JSON objects are ignored.
    Raises ``ValueError`` when no sparse feature is found (a spec needs one).
    Features first seen after ``max_lines`` are unknown to the spec, so events
    carrying them count as bad lines: write a sidecar spec for such files.
    """
    kinds: dict[str, Literal["categorical", "multi_hot"]] = {}
    dense: dict[str, None] = {}  # an ordered set
    seen = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.strip():
                continue
            seen += 1
            if seen > max_lines:
                break
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            features = obj.get("features")
            if isinstance(features, dict):
                for name, value in features.items():
                    if isinstance(value, list):
                        kinds[name] = "multi_hot"
                    else:
                        kinds.setdefault(name, "categorical")
            values = obj.get("dense")
            if isinstance(values, dict):
                for name in values:
                    dense[name] = None
    # A name used on both sides would make an invalid spec; the sparse side wins and
    # the lines with it as dense count as bad.
    dense_names = [n for n in dense if n not in kinds]
    if not kinds:
        raise ValueError(
            f"cannot infer a feature spec from {path}: no sparse features in its first "
            f"{max_lines} lines; write one to {sidecar_path(path)}"
        )
    return FeatureSpec(
        sparse=[
            SparseFeature(name=name, kind=kind, dim=dim, pooling="mean")
            for name, kind in kinds.items()
        ],
        dense=dense_names,
    )


def load_spec(path: Path) -> FeatureSpec:
    """The sidecar spec of ``path`` if it exists, else ``infer_spec(path)``."""
    side = sidecar_path(path)
    if side.is_file():
        return FeatureSpec.model_validate_json(side.read_bytes())
    return infer_spec(path)


class JsonlSource(EventSource):
    """Events read from a JSON-lines file, validated against ``spec``.

    ``spec`` defaults to ``load_spec(path)``. Lines that fail
    ``decode_event`` are skipped, never raised: each pass counts them in
    ``bad_lines`` (by reason in ``bad_reasons``) and logs a warning with the
    line number and reason for the first ``MAX_WARNINGS``. Blank lines are
    ignored. ``total`` is the number of non-blank lines (bad ones included,
    so an upper bound), computed on first access.
    """

    name = "jsonl"

    def __init__(
        self, path: Path, spec: FeatureSpec | None = None, max_events: int | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL event file {self.path} does not exist")
        self.max_events = check_max_events(max_events)
        self.spec = spec if spec is not None else load_spec(self.path)
        self.bad_lines = 0
        self.bad_reasons: Counter[str] = Counter()
        self._lines: int | None = None

    @property
    def total(self) -> int:
        if self._lines is None:
            with self.path.open("rb") as fh:
                self._lines = sum(1 for raw in fh if raw.strip())
        return self._lines if self.max_events is None else min(self._lines, self.max_events)

    def __iter__(self) -> Iterator[Event]:
        self.bad_lines = 0
        self.bad_reasons = Counter()
        yielded = 0
        if self.max_events == 0:
            return
        with self.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                try:
                    event = decode_event(raw, self.spec)
                except BadEvent as exc:
                    self._skip(lineno, exc)
                    continue
                yield event
                yielded += 1
                if self.max_events is not None and yielded >= self.max_events:
                    return

    def _skip(self, lineno: int, exc: BadEvent) -> None:
        self.bad_lines += 1
        self.bad_reasons[exc.reason] += 1
        if self.bad_lines <= MAX_WARNINGS:
            log.warning("%s:%d: skipping bad event (%s)", self.path, lineno, exc)
            if self.bad_lines == MAX_WARNINGS:
                log.warning("%s: further bad lines are counted but not logged", self.path)


def write_jsonl(events: Iterable[Event], path: Path, spec: FeatureSpec | None = None) -> int:
    """Write ``events`` to ``path``, one ``Event.to_json`` per line; returns the count.

    With ``spec``, also writes it to the sidecar ``PATH.spec.json`` so the file
    reads back with exactly that spec. Both files are written to a temporary
    name and renamed, so a reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("wb") as fh:
        for event in events:
            fh.write(event.to_json())
            fh.write(b"\n")
            count += 1
    if spec is not None:
        side = sidecar_path(path)
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(spec.model_dump_json(indent=2))
        os.replace(side_tmp, side)
    os.replace(tmp, path)
    return count
