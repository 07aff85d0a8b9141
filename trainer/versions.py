"""Model versions: the dense weights and the feature spec, published through the
store so every reader (the service, a restarted trainer) sees the same thing.

Blobs: ``model/{name}/latest`` holds the newest version number;
``model/{name}/v{N}/meta`` (JSON) and ``model/{name}/v{N}/dense`` (torch state).
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from storage.base import EmbeddingStore
from streaming.spec import FeatureSpec
from trainer.model import DLRM, ModelConfig, dump_state, load_state


class VersionMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: int
    created_at: float  # epoch seconds
    spec: FeatureSpec
    model: ModelConfig
    events_trained: int
    position: dict[str, int]


def _key(name: str, version: int, part: str) -> str:
    return f"model/{name}/v{version}/{part}"


def latest_version(store: EmbeddingStore, name: str) -> int | None:
    raw = store.get_blob(f"model/{name}/latest")
    return int(raw) if raw is not None else None


def stored_versions(store: EmbeddingStore, name: str) -> list[int]:
    """The versions still stored, oldest first. Pruning drops the oldest, so they are
    the unbroken run below ``latest``."""
    latest = latest_version(store, name)
    if latest is None:
        return []
    versions = []
    for version in range(latest, 0, -1):
        if store.get_blob(_key(name, version, "meta")) is None:
            break
        versions.append(version)
    return versions[::-1]


def publish(
    store: EmbeddingStore,
    model: DLRM,
    *,
    name: str,
    spec: FeatureSpec,
    config: ModelConfig,
    events_trained: int,
    position: dict[str, int],
    keep: int = 10,
) -> VersionMeta:
    """Write a new version and drop the one ``keep`` versions older.

    The ``latest`` pointer moves last, so a reader never sees a version whose
    weights are not there yet."""
    version = (latest_version(store, name) or 0) + 1
    meta = VersionMeta(
        name=name,
        version=version,
        created_at=time.time(),
        spec=spec,
        model=config,
        events_trained=events_trained,
        position=position,
    )
    store.put_blob(_key(name, version, "dense"), dump_state(model))
    store.put_blob(_key(name, version, "meta"), meta.model_dump_json().encode())
    store.put_blob(f"model/{name}/latest", str(version).encode())
    if version > keep:
        for part in ("meta", "dense"):
            store.delete_blob(_key(name, version - keep, part))
    return meta


def load_version(store: EmbeddingStore, name: str, version: int) -> tuple[VersionMeta, DLRM]:
    """Rebuild a published model. Raises KeyError when the version is not stored."""
    raw_meta = store.get_blob(_key(name, version, "meta"))
    raw_dense = store.get_blob(_key(name, version, "dense"))
    if raw_meta is None or raw_dense is None:
        raise KeyError(f"model {name!r} has no version {version}")
    meta = VersionMeta.model_validate_json(raw_meta)
    model = DLRM(meta.spec, meta.model)
    load_state(model, raw_dense)
    model.eval()
    return meta, model
