"""`streamrec snapshot` / `restore`: a snapshot taken while a trainer runs restores into
a fresh store from which a trainer resumes bit-exactly."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import store_rows

from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streamrec.cli import main
from streamrec.config import Settings, load_settings
from streamrec.snapshot import SnapshotError, TableEntry, read_manifest, restore, snapshot
from streamrec.wiring import build_store
from trainer.trainer import StreamingTrainer
from trainer.versions import latest_version, load_version

TOPIC = "events"
SLOT = f"{TOPIC}:0"
BATCH = 128
EVENTS = 32 * BATCH
SOURCE = SyntheticSource(SyntheticConfig(num_sparse=4, num_dense=2, universe=3000), EVENTS)
VALUES = [event.to_json() for event in SOURCE]


def write_config(path: Path, dim: int = 16) -> Path:
    path.mkdir(parents=True)
    sparse = ", ".join(f'{{name = "{f.name}", dim = {dim}}}' for f in SOURCE.spec.sparse)
    dense = ", ".join(f'"{name}"' for name in SOURCE.spec.dense)
    config = path / "streamrec.toml"
    config.write_text(
        f"""
features = {{sparse = [{sparse}], dense = [{dense}]}}
[store]
data_dir = "{path / "data"}"
[trainer]
batch_size = {BATCH}
max_batch_wait_s = 60
flush_every_s = 0.05
publish_every_s = 0.2
"""
    )
    return config


def trainer_on(settings: Settings, start: int = 0) -> StreamingTrainer:
    """A trainer over the settings' store, reading the events from offset ``start``."""
    store = build_store(settings, SOURCE.spec)
    log = InMemoryLog(start={SLOT: start})
    for value in VALUES[start:]:
        log.append(TOPIC, value)
    return StreamingTrainer(
        SOURCE.spec, store, log.consumer(TOPIC, store.position()), settings.trainer
    )


def snapshot_table(directory: Path, table: TableEntry) -> dict[int, bytes]:
    keys = np.fromfile(directory / table.keys.path, dtype="<u8").tolist()
    raw = (directory / table.values.path).read_bytes()
    n = table.row_bytes
    return dict(zip(keys, [raw[i : i + n] for i in range(0, len(raw), n)], strict=True))


@pytest.mark.slow
def test_snapshot_while_training_restores_and_resumes_bit_exact(tmp_path: Path) -> None:
    reference = trainer_on(load_settings(write_config(tmp_path / "reference")))
    reference.run(threading.Event(), max_events=EVENTS)

    config = write_config(tmp_path / "live")
    live = trainer_on(load_settings(config))
    thread = threading.Thread(target=live.run, args=(threading.Event(), EVENTS))
    thread.start()
    deadline = time.monotonic() + 60
    while (live.store.position() or {}).get(SLOT, 0) < EVENTS // 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The trainer keeps writing the store while the snapshot reads it.
    assert main(["snapshot", str(tmp_path / "snap"), "--config", str(config)]) == 0
    thread.join(120)
    live.store.close()

    manifest = read_manifest(tmp_path / "snap")
    taken = manifest.position[SLOT]
    assert 0 < taken <= EVENTS and taken % BATCH == 0
    assert manifest.checkpoint is not None  # a published version only if one was due yet
    assert manifest.rows == sum(t.rows for t in manifest.tables) > 1000

    restored_dir = tmp_path / "restored"
    restore_cli = ["restore", str(tmp_path / "snap"), "--config", str(config)]
    assert main([*restore_cli, "--data-dir", str(restored_dir)]) == 0
    settings = load_settings(config, store={"data_dir": restored_dir})
    resumed = trainer_on(settings, start=taken)
    # Restored bit for bit: every row as the snapshot holds it.
    snapshot_rows = {t.config.name: snapshot_table(tmp_path / "snap", t) for t in manifest.tables}
    assert store_rows(resumed.store, metadata=True) == snapshot_rows
    assert resumed.store.position() == manifest.position

    # A trainer resumed on the restored store continues exactly as the uninterrupted one.
    report = resumed.run(threading.Event(), max_events=EVENTS - taken)
    assert report.events == EVENTS - taken
    assert resumed.store.position() == reference.store.position() == {SLOT: EVENTS}
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert store_rows(resumed.store, metadata=False) == store_rows(reference.store, metadata=False)
    resumed.store.close()
    reference.store.close()


def test_snapshot_and_restore_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "a")
    settings = load_settings(config)
    with pytest.raises(SnapshotError, match="no store at"):
        snapshot(settings, tmp_path / "snap")
    build_store(settings, SOURCE.spec).close()
    with pytest.raises(SnapshotError, match="no recorded position"):
        snapshot(settings, tmp_path / "snap")
    assert not list(tmp_path.glob("snap*")), "a failed snapshot leaves nothing behind"

    trainer = trainer_on(settings)
    trainer.run(threading.Event(), max_events=4 * BATCH)
    trainer.store.close()
    snapshot(settings, tmp_path / "snap")
    with pytest.raises(SnapshotError, match="already exists"):
        snapshot(settings, tmp_path / "snap")
    assert main(["snapshot", str(tmp_path / "snap"), "--config", str(config)]) == 1

    with pytest.raises(SnapshotError, match="not a streamrec snapshot"):
        restore(settings, tmp_path / "a")
    other = load_settings(write_config(tmp_path / "b", dim=8))
    with pytest.raises(SnapshotError, match="feature spec mismatch"):
        restore(other, tmp_path / "snap")
    with pytest.raises(SnapshotError, match="not empty"):
        restore(settings, tmp_path / "snap")  # the store it was taken from

    target = load_settings(config, store={"data_dir": tmp_path / "c"})
    restore(target, tmp_path / "snap")
    with pytest.raises(SnapshotError, match="not empty"):
        restore(target, tmp_path / "snap")
    restore(target, tmp_path / "snap", force=True)
    store, source = build_store(target, SOURCE.spec), build_store(settings, SOURCE.spec)
    assert store.position() == source.position() == {SLOT: 4 * BATCH}
    name = settings.trainer.model_name
    version = latest_version(source, name)
    assert version is not None and latest_version(store, name) == version
    assert load_version(store, name, version)[0] == load_version(source, name, version)[0]
    assert store_rows(store, metadata=True) == store_rows(source, metadata=True)
    store.close()
    source.close()

    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    rows_file = tmp_path / "snap" / manifest["tables"][0]["values"]["path"]
    data = bytearray(rows_file.read_bytes())
    data[0] ^= 1
    rows_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupt"):
        restore(load_settings(config, store={"data_dir": tmp_path / "d"}), tmp_path / "snap")
