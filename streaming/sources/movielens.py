"""MovieLens-100k as a time-ordered click stream.

Each rating is one event: label = rating >= 4; features are the user, the item,
user demographics (age bucket, gender, occupation, 3-digit zip prefix), item
metadata (genres as multi_hot, release year) and the hour and weekday (UTC) of
the rating. Events are sorted by timestamp; ties keep file order (the official
and RecBole files list ratings in the same order, so both give one stream).

Two on-disk formats are read:

* official GroupLens ``ml-100k.zip`` content: ``u.data`` (tab-separated
  ``user item rating timestamp``), ``u.user`` (``id|age|gender|occupation|zip``),
  ``u.item`` (``id|title|release date|video release|url|19 genre flags``,
  latin-1), optional ``u.genre`` (``name|index``);
* RecBole atomic files: ``ml-100k.inter``, ``ml-100k.user``, ``ml-100k.item``,
  tab-separated with a typed header such as ``user_id:token``.

The data set is not redistributed with this project: ``fetch_movielens_100k``
extracts it from the ``recbole==1.2.1`` wheel on PyPI (the CLI's
``streamrec fetch movielens-100k``) or copies a user-supplied ``ml-100k.zip``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from streaming.events import Event, SparseValue
from streaming.sources.base import EventSource, check_max_events
from streaming.spec import FeatureSpec, SparseFeature

log = logging.getLogger(__name__)

DATASET_DIRNAME = "ml-100k"
FETCH_HINT = "run `streamrec fetch movielens-100k` to download it"

OFFICIAL_FILES = ("u.data", "u.user", "u.item")
ATOMIC_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")

RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
# Pinned so a tampered or different wheel is refused rather than silently loaded.
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"

# u.genre order; the 19 flags in u.item follow it.
GENRES: tuple[str, ...] = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
SPARSE_FIELDS = (
    "user",
    "item",
    "age",
    "gender",
    "occupation",
    "zip",
    "genres",
    "year",
    "hour",
    "weekday",
)

Format = Literal["official", "atomic"]
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)")


def movielens_spec(dim: int = 16) -> FeatureSpec:
    """The feature spec of MovieLens events: ten sparse fields, no dense ones."""
    return FeatureSpec(
        sparse=[
            SparseFeature(
                name=name,
                kind="multi_hot" if name == "genres" else "categorical",
                dim=dim,
                pooling="mean",
            )
            for name in SPARSE_FIELDS
        ],
        dense=[],
    )


def age_bucket(age: int) -> str:
    """The MovieLens-1M age groups: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+."""
    for upper, label in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49")):
        if age < upper:
            return label
    return "50-55" if age < 56 else "56+"


@dataclass(frozen=True, slots=True)
class _User:
    age: str
    gender: str
    occupation: str
    zip: str


@dataclass(frozen=True, slots=True)
class _Item:
    genres: tuple[str, ...]
    year: str


@dataclass(frozen=True, slots=True)
class _Rating:
    user: int
    item: int
    rating: float
    timestamp: int  # epoch seconds


def detect_format(directory: Path) -> Format | None:
    """Which complete file set ``directory`` holds (official wins if both)."""
    if all((directory / f).is_file() for f in OFFICIAL_FILES):
        return "official"
    if all((directory / f).is_file() for f in ATOMIC_FILES):
        return "atomic"
    return None


def resolve_dir(data_dir: Path) -> Path:
    """The folder with the ML-100k files: ``data_dir`` itself or ``data_dir/ml-100k``.

    Raises ``FileNotFoundError`` naming the fetch command when neither holds them.
    """
    for candidate in (data_dir, data_dir / DATASET_DIRNAME):
        if detect_format(candidate) is not None:
            return candidate
    raise FileNotFoundError(
        f"MovieLens-100k not found in {data_dir} or {data_dir / DATASET_DIRNAME} "
        f"(expected {', '.join(OFFICIAL_FILES)} or {', '.join(ATOMIC_FILES)}); {FETCH_HINT}"
    )


def _year(date_or_year: str, title: str) -> str:
    """Release year from a date ("01-Jan-1995") or year field, else from a
    "(1995)" in the title (RecBole has a few broken years), else "unknown"."""
    text = date_or_year.strip()
    if len(text) >= 4 and text[-4:].isdigit():
        return text[-4:]
    match = _YEAR_IN_TITLE.search(title)
    return match.group(1) if match else "unknown"


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    with path.open(encoding=encoding, newline="") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield lineno, line


def _bad(path: Path, lineno: int, why: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {why}")


def _parse_user(path: Path, lineno: int, cols: Sequence[str]) -> tuple[int, _User]:
    try:
        uid, age = int(cols[0]), int(cols[1])
    except (ValueError, IndexError):
        raise _bad(path, lineno, f"expected a user row, got {cols!r}") from None
    gender, occupation, zip_code = (c.strip() for c in cols[2:5])
    return uid, _User(age_bucket(age), gender, occupation, zip_code[:3] or "unknown")


def _read_official(
    directory: Path,
) -> tuple[list[_Rating], dict[int, _User], dict[int, _Item]]:
    genres = list(GENRES)
    genre_file = directory / "u.genre"
    if genre_file.is_file():
        by_index = {}
        for _, line in _lines(genre_file, "latin-1"):
            name, _, index = line.rpartition("|")
            by_index[int(index)] = name
        genres = [by_index[i] for i in sorted(by_index)]
    users: dict[int, _User] = {}
    path = directory / "u.user"
    for lineno, line in _lines(path, "latin-1"):
        cols = line.split("|")
        if len(cols) != 5:
            raise _bad(path, lineno, f"expected 5 '|'-separated columns, got {len(cols)}")
        uid, user = _parse_user(path, lineno, cols)
        users[uid] = user
    items: dict[int, _Item] = {}
    path = directory / "u.item"
    for lineno, line in _lines(path, "latin-1"):
        cols = line.split("|")
        if len(cols) != 5 + len(genres):
            raise _bad(path, lineno, f"expected {5 + len(genres)} columns, got {len(cols)}")
        flags = cols[5:]
        try:
            iid = int(cols[0])
            names = tuple(g for g, flag in zip(genres, flags, strict=True) if int(flag))
        except ValueError:
            raise _bad(path, lineno, "item id and genre flags must be integers") from None
        items[iid] = _Item(names, _year(cols[2], cols[1]))
    ratings: list[_Rating] = []
    path = directory / "u.data"
    for lineno, line in _lines(path, "latin-1"):
        cols = line.split("\t")
        try:
            ratings.append(_Rating(int(cols[0]), int(cols[1]), float(cols[2]), int(cols[3])))
        except (ValueError, IndexError):
            raise _bad(path, lineno, "expected 'user<TAB>item<TAB>rating<TAB>timestamp'") from None
    return ratings, users, items


def _atomic_rows(path: Path, wanted: Sequence[str]) -> Iterator[tuple[int, list[str]]]:
    """Rows of a RecBole atomic file as the ``wanted`` columns, in that order."""
    lines = _lines(path, "utf-8")
    try:
        _, header = next(lines)
    except StopIteration:
        raise ValueError(f"{path}: empty file, expected a typed header") from None
    names = [col.split(":", 1)[0] for col in header.split("\t")]
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"{path}: header {header!r} lacks columns {missing}")
    index = [names.index(w) for w in wanted]
    for lineno, line in lines:
        cols = line.split("\t")
        if len(cols) != len(names):
            raise _bad(
                path, lineno, f"expected {len(names)} tab-separated columns, got {len(cols)}"
            )
        yield lineno, [cols[i] for i in index]


def _read_atomic(
    directory: Path,
) -> tuple[list[_Rating], dict[int, _User], dict[int, _Item]]:
    users: dict[int, _User] = {}
    path = directory / "ml-100k.user"
    for lineno, cols in _atomic_rows(path, ("user_id", "age", "gender", "occupation", "zip_code")):
        user_id, user = _parse_user(path, lineno, cols)
        users[user_id] = user
    items: dict[int, _Item] = {}
    path = directory / "ml-100k.item"
    for lineno, (iid, title, year, classes) in _atomic_rows(
        path, ("item_id", "movie_title", "release_year", "class")
    ):
        try:
            key = int(iid)
        except ValueError:
            raise _bad(path, lineno, f"item id must be an integer, got {iid!r}") from None
        # Genre names hold no spaces ("Children's", "Sci-Fi"), so token_seq splits on them.
        items[key] = _Item(tuple(classes.split()), _year(year, title))
    ratings: list[_Rating] = []
    path = directory / "ml-100k.inter"
    for lineno, (uid, iid, rating, ts) in _atomic_rows(
        path, ("user_id", "item_id", "rating", "timestamp")
    ):
        try:
            ratings.append(_Rating(int(uid), int(iid), float(rating), int(float(ts))))
        except ValueError:
            raise _bad(
                path, lineno, "user/item must be integers, rating/timestamp numbers"
            ) from None
    return ratings, users, items


class MovieLensSource(EventSource):
    """MovieLens-100k ratings as events in timestamp order (100,000 of them).

    ``data_dir`` is the folder holding the files or its parent (``data_dir/ml-100k``);
    construction parses the files (about 0.3 s) and raises ``FileNotFoundError``
    with the fetch command when they are absent, ``ValueError`` naming file and
    line when one is malformed or a rating names an unknown user or item.
    Events are built on the fly at each iteration, so memory stays small.
    """

    name = "movielens-100k"

    def __init__(self, data_dir: Path, max_events: int | None = None) -> None:
        self.max_events = check_max_events(max_events)
        self.directory = resolve_dir(Path(data_dir))
        self.format: Format = detect_format(self.directory) or "official"
        self.spec = movielens_spec()
        reader = _read_official if self.format == "official" else _read_atomic
        ratings, self._users, self._items = reader(self.directory)
        for r in ratings:
            if r.user not in self._users or r.item not in self._items:
                raise ValueError(
                    f"{self.directory}: rating ({r.user}, {r.item}) names an unknown "
                    f"{'user' if r.user not in self._users else 'item'}"
                )
        # list.sort is stable: equal timestamps keep file order.
        ratings.sort(key=lambda r: r.timestamp)
        self._ratings = ratings

    @property
    def total(self) -> int:
        n = len(self._ratings)
        return n if self.max_events is None else min(n, self.max_events)

    def __iter__(self) -> Iterator[Event]:
        for r in self._ratings[: self.total]:
            user, item = self._users[r.user], self._items[r.item]
            ts_ms = r.timestamp * 1000
            features: dict[str, SparseValue] = {
                "user": r.user,
                "item": r.item,
                "age": user.age,
                "gender": user.gender,
                "occupation": user.occupation,
                "zip": user.zip,
                "genres": list(item.genres),
                "year": item.year,
                "hour": (r.timestamp // 3600) % 24,
                # 1970-01-01 was a Thursday (index 3 with Monday = 0).
                "weekday": WEEKDAYS[(r.timestamp // 86400 + 3) % 7],
            }
            yield Event(
                event_id=f"{r.user}-{r.item}-{ts_ms}",
                ts=ts_ms,
                label=int(r.rating >= 4),
                features=features,
                dense={},
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_recbole_wheel(into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        RECBOLE_REQUIREMENT,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(into),
    ]
    log.info("downloading %s from PyPI (about 2 MB)", RECBOLE_REQUIREMENT)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = into / RECBOLE_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download {RECBOLE_REQUIREMENT} with pip (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout)[-2000:]}\n"
            "Alternatively pass the official ml-100k.zip from GroupLens as the source."
        )
    actual = _sha256(wheel)
    if actual != RECBOLE_WHEEL_SHA256:
        raise RuntimeError(
            f"{wheel.name} has sha256 {actual}, expected {RECBOLE_WHEEL_SHA256}; refusing it"
        )
    return wheel


def _extract_members(archive: Path, names: Sequence[str], into: Path) -> list[str]:
    """Copy the archive members whose basename is in ``names`` into ``into``;
    returns the basenames found."""
    found: list[str] = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or base not in names or base in found:
                continue
            # Read and write by basename only, so a crafted member path cannot escape.
            with zf.open(info) as src, (into / base).open("wb") as dst:
                shutil.copyfileobj(src, dst)
            found.append(base)
    return found


def fetch_movielens_100k(data_dir: Path, source: Path | None = None) -> Path:
    """Put MovieLens-100k under ``data_dir/ml-100k`` and return that folder.

    With no ``source``: a no-op when a complete copy is already there; otherwise
    runs ``pip download recbole==1.2.1 --no-deps`` (the wheel ships the full
    ML-100k as RecBole atomic files), checks the wheel's pinned sha256 and
    extracts ``ml-100k.inter/.user/.item`` with ``zipfile`` (RecBole is neither
    imported nor installed). With ``source``: the official ``ml-100k.zip`` (or
    any zip holding either file set) or a directory holding either file set,
    directly or in ``ml-100k/``; its files replace what is there.

    Files are staged in a temporary folder and moved in only once complete and
    parsed, so an interrupted fetch never leaves a half data set. Raises
    ``FileNotFoundError`` for a missing source, ``ValueError`` for a source
    without the files, ``RuntimeError`` when the download fails.
    """
    data_dir = Path(data_dir)
    target = data_dir / DATASET_DIRNAME
    if source is None and detect_format(target) is not None:
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    wanted = (*OFFICIAL_FILES, "u.genre", *ATOMIC_FILES)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".ml-100k-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        if source is None:
            wheel = _download_recbole_wheel(Path(tmp))
            _extract_members(wheel, ATOMIC_FILES, staging)
        else:
            source = Path(source)
            if not source.exists():
                raise FileNotFoundError(f"MovieLens source {source} does not exist")
            if source.is_dir():
                try:
                    found_dir = resolve_dir(source)
                except FileNotFoundError:
                    raise ValueError(
                        f"{source} holds neither {', '.join(OFFICIAL_FILES)} "
                        f"nor {', '.join(ATOMIC_FILES)}"
                    ) from None
                for name in wanted:
                    if (found_dir / name).is_file():
                        shutil.copyfile(found_dir / name, staging / name)
            elif zipfile.is_zipfile(source):
                _extract_members(source, wanted, staging)
            else:
                raise ValueError(f"{source} is neither a directory nor a zip archive")
        if detect_format(staging) is None:
            raise ValueError(
                f"{source or RECBOLE_WHEEL} holds neither {', '.join(OFFICIAL_FILES)} "
                f"nor {', '.join(ATOMIC_FILES)}"
            )
        MovieLensSource(staging)  # parse once: refuse a corrupt copy before installing it
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    log.info("MovieLens-100k stored in %s", target)
    return target
