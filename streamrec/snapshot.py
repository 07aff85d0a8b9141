"""``streamrec snapshot DIR`` / ``streamrec restore DIR``: a consistent export of a trained
model and its import into another store.

A snapshot is the state as of the stream position the store recorded last: every row of
every table (embedding, optimizer state and metadata, bit for bit), the dense weights
and Adam state the trainer stored for that position, the newest published version, the
feature spec and the table settings. It is read from the cold tier (RocksDB) alone,
opened as a read-only secondary that is never caught up after it opens: a frozen,
point-in-time view, so a trainer may keep running (the primary writes the position in
the same WriteBatch as the rows it covers, and the checkpoint blob before it). Rows the
trainer has not flushed yet (in the hot tier, or spilled) are past that position and
are not part of it. (With ``store.eviction.write_back = "direct"`` the cold tier may run
ahead of its position: such a snapshot holds those rows' newer values.)

Layout of ``DIR`` (written to ``DIR.partial-<pid>`` and renamed when complete)::

    manifest.json        format, position, spec, tables, model, files with sizes and sha256
    rows/<n>.keys        the keys of table n, uint64 little-endian, in key order
    rows/<n>.rows        their packed rows, ``row_bytes`` each, in the same order
    dense/checkpoint.pt  dense weights + Adam state as of the position (absent if the
                         store has none, e.g. another ``trainer.model_name``)
    dense/published.json, dense/published.pt   the newest published version, if any

``restore`` checks every file against the manifest and the snapshot against the target
settings (feature spec, row layout of every table, model architecture), then writes the
rows and blobs into an empty store (``force``: the store's rows are deleted first) and
records the position last, so a trainer started on it resumes exactly where the
snapshot was taken. Rows go to the cold tier only; the hot tier fills by promotion.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from storage.base import Keys, TableConfig
from storage.memory_tier import MemoryTier
from storage.rocksdb_tier import RocksDBTier
from storage.rows import RowCodec
from storage.tiered import TieredStore
from streaming.spec import FeatureSpec
from streamrec.config import Settings
from streamrec.wiring import build_store, resolve_spec, table_configs
from trainer.model import ModelConfig
from trainer.trainer import checkpoint_name
from trainer.versions import VersionMeta, latest_version

log = logging.getLogger(__name__)

FORMAT = "streamrec-snapshot/1"
MANIFEST = "manifest.json"
_CHUNK_ROWS = 65_536
_HASH_BLOCK = 1 << 20


class SnapshotError(Exception):
    """A snapshot cannot be taken or restored; the message says why and what to do."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # relative to the snapshot directory
    bytes: int
    sha256: str


class TableEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: TableConfig
    rows: int
    row_bytes: int
    keys: FileEntry
    values: FileEntry


class PublishedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    meta: FileEntry
    dense: FileEntry


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    created_at: float
    position: dict[str, int]
    model_name: str
    spec: FeatureSpec
    model: ModelConfig
    tables: list[TableEntry]
    checkpoint: FileEntry | None
    published: PublishedEntry | None

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def files(self) -> list[FileEntry]:
        out = [f for t in self.tables for f in (t.keys, t.values)]
        if self.checkpoint is not None:
            out.append(self.checkpoint)
        if self.published is not None:
            out += [self.published.meta, self.published.dense]
        return out


class _Progress:
    """A log line every ``every_s`` with rows done, rate and ETA."""

    def __init__(self, what: str, total: int, every_s: float) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.started = self._last = time.monotonic()
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            log.info(
                "%s: %d/%d rows (%.0f%%) %.0f rows/s eta %.0fs",
                self.what,
                self.done,
                self.total,
                100 * self.done / max(self.total, 1),
                rate,
                eta,
            )

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)


class _HashingWriter:
    def __init__(self, root: Path, path: str) -> None:
        self.path = path
        self._file: BinaryIO = (root / path).open("wb")
        self._hash = hashlib.sha256()
        self._bytes = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def close(self) -> FileEntry:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return FileEntry(path=self.path, bytes=self._bytes, sha256=self._hash.hexdigest())


def _write_file(root: Path, path: str, data: bytes) -> FileEntry:
    writer = _HashingWriter(root, path)
    writer.write(data)
    return writer.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- snapshot ---------------------------------------------------------------------------


def snapshot(settings: Settings, directory: Path, *, progress_every_s: float = 5.0) -> Manifest:
    """Export the store of ``settings`` into ``directory`` (which must not exist); see the
    module docstring. Safe while a trainer writes the store."""
    directory = Path(directory)
    if directory.exists():
        raise SnapshotError(f"{directory} already exists; snapshot into a new directory")
    rocksdb = settings.store.rocksdb_path
    if not rocksdb.is_dir():
        raise SnapshotError(f"no store at {rocksdb} (check --config / --data-dir)")
    spec = resolve_spec(settings)
    tables = table_configs(spec, settings)
    # A secondary never caught up after it opens: a point-in-time view of the primary.
    cold = RocksDBTier(rocksdb, read_only=True, catch_up_interval=math.inf)
    view = TieredStore(tables, MemoryTier(), cold, read_only=True)
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    try:
        manifest = _export(settings, spec, tables, view, cold, partial, progress_every_s)
        partial.rename(directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        view.close()
    return manifest


def _export(
    settings: Settings,
    spec: FeatureSpec,
    tables: list[TableConfig],
    view: TieredStore,
    cold: RocksDBTier,
    root: Path,
    progress_every_s: float,
) -> Manifest:
    position = view.position()
    if position is None:
        raise SnapshotError(
            f"the store at {settings.store.data_dir} has no recorded position yet: "
            "nothing has been trained and flushed"
        )
    name = settings.trainer.model_name
    root.mkdir(parents=True)
    (root / "rows").mkdir()
    (root / "dense").mkdir()

    checkpoint = None
    raw = view.get_blob(checkpoint_name(name, position))
    if raw is None:
        log.warning(
            "no dense checkpoint for position %s under model %r (another trainer.model_name?); "
            "a trainer restored from this snapshot starts from the published weights",
            position,
            name,
        )
    else:
        _check_checkpoint(raw, spec, settings.trainer.model)
        checkpoint = _write_file(root, "dense/checkpoint.pt", raw)

    published = None
    version = latest_version(view, name)
    if version is not None:
        meta = view.get_blob(f"model/{name}/v{version}/meta")
        dense = view.get_blob(f"model/{name}/v{version}/dense")
        if meta is not None and dense is not None:
            published = PublishedEntry(
                version=version,
                meta=_write_file(root, "dense/published.json", meta),
                dense=_write_file(root, "dense/published.pt", dense),
            )

    total = sum(cold.count(t.name) for t in tables)
    progress = _Progress("snapshot", total, progress_every_s)
    entries = []
    for i, cfg in enumerate(tables):
        entries.append(_export_table(cfg, cold, root, f"rows/{i}", progress))
    manifest = Manifest(
        format=FORMAT,
        created_at=time.time(),
        position=position,
        model_name=name,
        spec=spec,
        model=settings.trainer.model,
        tables=entries,
        checkpoint=checkpoint,
        published=published,
    )
    _write_file(root, MANIFEST, manifest.model_dump_json(indent=2).encode())
    log.info(
        "snapshot of %s: %d rows in %d tables at %.0f rows/s, position %s, dense %s, "
        "published version %s",
        settings.store.data_dir,
        manifest.rows,
        len(entries),
        progress.rate(),
        position,
        "checkpoint" if checkpoint is not None else "none",
        version if published is not None else None,
    )
    return manifest


def _check_checkpoint(raw: bytes, spec: FeatureSpec, model: ModelConfig) -> None:
    state = torch.load(io.BytesIO(raw), weights_only=True)
    if state["spec"] != spec.model_dump_json():
        raise SnapshotError(
            "feature spec mismatch: the store was trained with another spec than the "
            "settings give (pass the trainer's --config)"
        )
    if state["arch"] != model.model_dump_json():
        raise SnapshotError(
            "model architecture mismatch: the store's dense checkpoint has another "
            "trainer.model than the settings give (pass the trainer's --config)"
        )


def _export_table(
    cfg: TableConfig, cold: RocksDBTier, root: Path, stem: str, progress: _Progress
) -> TableEntry:
    row_bytes = RowCodec(cfg).nbytes
    keys_out = _HashingWriter(root, f"{stem}.keys")
    rows_out = _HashingWriter(root, f"{stem}.rows")
    n = 0
    for keys, values in cold.scan(cfg.name, _CHUNK_ROWS):
        blob = b"".join(values)
        if len(blob) != len(values) * row_bytes:
            raise SnapshotError(
                f"table {cfg.name!r}: stored rows are not {row_bytes} bytes each "
                "(the settings' table config differs from the store's)"
            )
        keys_out.write(keys.astype("<u8").tobytes())
        rows_out.write(blob)
        n += len(keys)
        progress.add(len(keys))
    return TableEntry(
        config=cfg, rows=n, row_bytes=row_bytes, keys=keys_out.close(), values=rows_out.close()
    )


# -- restore ----------------------------------------------------------------------------


def read_manifest(directory: Path) -> Manifest:
    """The manifest of the snapshot in ``directory``; ``SnapshotError`` if it is none."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise SnapshotError(f"{directory} is not a streamrec snapshot (no {MANIFEST})")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:
        raise SnapshotError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise SnapshotError(f"{path}: format {found!r} is not {FORMAT!r}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise SnapshotError(f"{path} is not a valid manifest: {e}") from None


def verify(directory: Path, manifest: Manifest) -> None:
    """Check every file's size and sha256 against the manifest."""
    for entry in manifest.files():
        path = Path(directory) / entry.path
        if not path.is_file():
            raise SnapshotError(f"{path} is missing")
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while block := f.read(_HASH_BLOCK):
                digest.update(block)
                size += len(block)
        if size != entry.bytes or digest.hexdigest() != entry.sha256:
            raise SnapshotError(f"{path} is corrupt: size or sha256 differs from {MANIFEST}")


def check_compatible(manifest: Manifest, settings: Settings, *, dense: bool = True) -> None:
    """The snapshot fits the target settings: same feature spec, row layout of every table
    and (``dense``) model architecture (else the rows or the dense checkpoint would not
    load)."""
    spec = resolve_spec(settings)
    if spec != manifest.spec:
        ours = spec.model_dump_json()
        theirs = manifest.spec.model_dump_json()
        raise SnapshotError(
            f"feature spec mismatch: the snapshot has {theirs}, the settings {ours}"
        )
    target = {t.name: t for t in table_configs(spec, settings)}
    for entry in manifest.tables:
        cfg = target[entry.config.name]
        if (cfg.dim, cfg.optimizer) != (entry.config.dim, entry.config.optimizer):
            raise SnapshotError(
                f"table {cfg.name!r}: the snapshot's rows are {entry.config.optimizer} at dim "
                f"{entry.config.dim}, the settings say {cfg.optimizer} at dim {cfg.dim}"
            )
        if cfg != entry.config:
            log.warning(
                "table %r: settings differ from the snapshot's (%s); rows are restored as "
                "they are and trained on with the new settings",
                cfg.name,
                ", ".join(
                    k for k, v in cfg.model_dump().items() if entry.config.model_dump().get(k) != v
                ),
            )
    if dense and settings.trainer.model != manifest.model:
        raise SnapshotError(
            "model architecture mismatch: the snapshot's trainer.model is "
            f"{manifest.model.model_dump_json()}, the settings' "
            f"{settings.trainer.model.model_dump_json()} (--rows-only restores the rows "
            "alone, and the trainer starts its dense weights afresh)"
        )


def restore(
    settings: Settings,
    directory: Path,
    *,
    force: bool = False,
    rows_only: bool = False,
    progress_every_s: float = 5.0,
) -> Manifest:
    """Load the snapshot in ``directory`` into the store of ``settings``; see the module
    docstring. The store must be empty unless ``force`` (its rows are deleted first).
    ``rows_only``: the rows and the position, not the dense checkpoint or the published
    version (for settings with another ``trainer.model``: an experiment arm trying
    another architecture on the production model's embeddings)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    check_compatible(manifest, settings, dense=not rows_only)
    verify(directory, manifest)
    if rows_only:
        manifest = manifest.model_copy(update={"checkpoint": None, "published": None})
    spec = resolve_spec(settings)
    store = build_store(settings, spec)  # a writer: fails while a trainer holds the store
    try:
        _prepare_target(store, settings, force)
        _import(store, manifest, directory, settings.trainer.model_name, progress_every_s)
    finally:
        store.close()
    return manifest


def _prepare_target(store: TieredStore, settings: Settings, force: bool) -> None:
    assert store.cold is not None
    cold = store.cold
    rows = {t: cold.count(t) + store.hot.count(t) for t in store.tables()}
    position = store.position()
    if position is None and not any(rows.values()):
        return
    if not force:
        what = f"position {position}" if position is not None else "no position"
        raise SnapshotError(
            f"the store at {settings.store.data_dir} is not empty ({sum(rows.values())} rows, "
            f"{what}{'; an interrupted restore?' if position is None else ''}): restore into "
            "an empty store, or pass --force to replace its rows"
        )
    log.warning(
        "--force: deleting %d rows of the store at %s",
        sum(rows.values()),
        settings.store.data_dir,
    )
    for table in store.tables():
        for tier in (store.hot, cold):
            for keys, _ in tier.scan(table, _CHUNK_ROWS):
                tier.delete_many(table, keys)


def _chunks(directory: Path, entry: TableEntry) -> Iterator[tuple[Keys, list[bytes]]]:
    size = entry.row_bytes
    with (
        (directory / entry.keys.path).open("rb") as keys_in,
        (directory / entry.values.path).open("rb") as rows_in,
    ):
        while raw := keys_in.read(8 * _CHUNK_ROWS):
            keys: Keys = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
            blob = rows_in.read(size * len(keys))
            if len(blob) != size * len(keys):
                raise SnapshotError(f"{entry.values.path}: fewer rows than keys")
            yield keys, [blob[i : i + size] for i in range(0, len(blob), size)]


def _import(
    store: TieredStore, manifest: Manifest, directory: Path, name: str, progress_every_s: float
) -> None:
    progress = _Progress("restore", manifest.rows, progress_every_s)
    for entry in manifest.tables:
        for keys, values in _chunks(directory, entry):
            store.import_cold(entry.config.name, keys, values)
            progress.add(len(keys))
    if manifest.checkpoint is not None:
        raw = (directory / manifest.checkpoint.path).read_bytes()
        store.put_blob(checkpoint_name(name, manifest.position), raw)
    if manifest.published is not None:
        version = manifest.published.version
        meta = VersionMeta.model_validate_json(
            (directory / manifest.published.meta.path).read_bytes()
        )
        meta = meta.model_copy(update={"name": name})
        store.put_blob(
            f"model/{name}/v{version}/dense",
            (directory / manifest.published.dense.path).read_bytes(),
        )
        store.put_blob(f"model/{name}/v{version}/meta", meta.model_dump_json().encode())
        store.put_blob(f"model/{name}/latest", str(version).encode())
    # Last, in a synced commit: a store with a position is a complete restore.
    store.flush(manifest.position)
    log.info(
        "restored %d rows at %.0f rows/s; position %s; a trainer started on this store "
        "resumes from there",
        manifest.rows,
        progress.rate(),
        manifest.position,
    )
