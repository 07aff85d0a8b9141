"""Event sources: where the training stream comes from.

``open_source`` turns a name from the CLI or config into a source:

* ``synthetic``: the Criteo-like generator with a known best AUC;
* ``movielens-100k``: MovieLens-100k in time order, read from ``data_dir``;
* ``jsonl:PATH``: a JSON-lines file of wire-format events.
"""

from __future__ import annotations

from pathlib import Path

from streaming.sources.base import EventSource
from streaming.sources.jsonl import JsonlSource, write_jsonl
from streaming.sources.movielens import MovieLensSource, fetch_movielens_100k
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource

__all__ = [
    "SOURCE_FORMS",
    "EventSource",
    "JsonlSource",
    "MovieLensSource",
    "SyntheticConfig",
    "SyntheticSource",
    "fetch_movielens_100k",
    "open_source",
    "write_jsonl",
]

SOURCE_FORMS = ("synthetic", "movielens-100k", "jsonl:PATH")


def open_source(
    name: str, *, data_dir: Path, seed: int = 0, max_events: int | None = None
) -> EventSource:
    """The source called ``name``, capped at ``max_events`` events when given.

    ``synthetic`` uses ``seed`` (and is endless without ``max_events``);
    ``movielens-100k`` reads ``data_dir/ml-100k`` (or ``data_dir`` itself) and
    raises ``FileNotFoundError`` saying to run ``streamrec fetch movielens-100k``
    when the files are absent; ``jsonl:PATH`` reads PATH (relative to the
    working directory) and raises ``FileNotFoundError`` when it does not exist.
    Any other name raises ``ValueError`` listing the accepted forms.
    """
    if name == "synthetic":
        return SyntheticSource(SyntheticConfig(seed=seed), max_events=max_events)
    if name == "movielens-100k":
        return MovieLensSource(Path(data_dir), max_events=max_events)
    if name.startswith("jsonl:"):
        path = name.removeprefix("jsonl:")
        if not path:
            raise ValueError("jsonl source needs a path: jsonl:PATH")
        return JsonlSource(Path(path), max_events=max_events)
    raise ValueError(f"unknown event source {name!r}; expected one of: {', '.join(SOURCE_FORMS)}")
