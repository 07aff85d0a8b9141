"""``streamrec check``: what a configuration names, checked against the real services
(Kafka and Redis on loopback), every problem reported at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import free_port, new_topic

from streamrec.cli import main
from streamrec.config import load_settings
from streamrec.wiring import build_store, resolve_spec


def findings(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, str]]]:
    capsys.readouterr()
    code = main(["check", "--json", *args])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_an_embedded_setup_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, found = findings(capsys, "--data-dir", str(tmp_path / "data"))
    assert code == 0
    assert [(f["component"], f["status"]) for f in found] == [
        ("features", "ok"),
        ("kafka", "ok"),
        ("redis", "ok"),
        ("rocksdb", "ok"),
    ]
    assert "creates it" in found[3]["detail"]


def test_an_experiment_is_checked_with_each_arms_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ab.toml"
    experiment = '[experiment]\nname = "e"\nunit = "{unit}"\n[experiment.arms.b]\nshare = 0.1\n'
    config.write_text(f'[store]\ndata_dir = "{tmp_path}"\n' + experiment.format(unit="c1"))
    # The arm's store has rows and a position, as its trainer leaves it.
    settings = load_settings(config).for_arm("b")
    store = build_store(settings, resolve_spec(settings))
    store.flush({"t:0": 9})
    store.close()
    code, found = findings(capsys, "--config", str(config))
    assert code == 0
    by_component = {f["component"]: f for f in found}
    assert "'e' on unit 'c1': b 10.0% of the units" in by_component["experiment"]["detail"]
    arm = by_component["arm:b"]
    assert arm["status"] == "ok" and str(tmp_path / "arms" / "b") in arm["detail"]
    assert "offsets summing to 9" in arm["detail"]

    config.write_text(f'[store]\ndata_dir = "{tmp_path}"\n' + experiment.format(unit="i1"))
    code, found = findings(capsys, "--config", str(config))
    assert code == 1
    assert [f["status"] for f in found if f["component"] == "experiment"] == ["fail"]


@pytest.mark.integration
def test_check_reports_the_topics_redis_and_the_recorded_position(
    kafka_bootstrap: str,
    clean_redis: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = new_topic(kafka_bootstrap, "check", 3)
    env = {
        "LOG__KIND": "kafka",
        "LOG__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LOG__TOPIC": topic,
        "LOG__DEAD_LETTER_TOPIC": f"{topic}-missing",
        "STORE__HOT": "redis",
        "STORE__REDIS_URL": clean_redis,
        "STORE__DATA_DIR": str(tmp_path / "data"),
    }
    for name, value in env.items():
        monkeypatch.setenv(f"STREAMREC_{name}", value)
    settings = load_settings()
    store = build_store(settings, resolve_spec(settings))
    store.flush({f"{topic}:0": 5, f"{topic}:1": 7})
    store.close()

    code, found = findings(capsys)
    assert code == 0
    by = {(f["component"], f["status"]): f["detail"] for f in found}
    assert f"events topic '{topic}': 3 partitions" in by["kafka", "ok"]
    assert f"'{topic}-missing' does not exist" in by["kafka", "warn"]
    assert by["redis", "ok"].startswith("Redis at redis://127.0.0.1")
    assert "a stream position over 2 partitions (offsets summing to 12)" in by["rocksdb", "ok"]


@pytest.mark.integration
def test_check_names_every_failure_at_once(
    clean_redis: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreachable broker, a Redis without the replicas the config wants, and a
    data dir that cannot hold RocksDB: one run names all three, and exits 1."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    kafka = f"127.0.0.1:{free_port()}"
    env = {
        "LOG__KIND": "kafka",
        "LOG__BOOTSTRAP_SERVERS": kafka,
        "STORE__HOT": "redis",
        "STORE__REDIS_URL": clean_redis,
        "STORE__REDIS_MIN_REPLICAS": "1",
        "STORE__REDIS_REPLICA_TIMEOUT_S": "0.2",
        "STORE__DATA_DIR": str(blocker / "data"),
    }
    for name, value in env.items():
        monkeypatch.setenv(f"STREAMREC_{name}", value)
    code, found = findings(capsys)
    assert code == 1
    failed = {f["component"]: f["detail"] for f in found if f["status"] == "fail"}
    assert set(failed) == {"kafka", "redis", "rocksdb"}
    assert kafka in failed["kafka"]
    assert "replica" in failed["redis"]
    assert "not writable" in failed["rocksdb"]
