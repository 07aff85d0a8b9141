from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import free_port, wait_ready

from streamrec.cli import build_parser
from streamrec.config import ConfigError, load_settings

CLI = [sys.executable, "-m", "streamrec.cli"]


@pytest.mark.parametrize(
    "command",
    ["run", "train", "serve", "replay", "fetch", "snapshot", "restore", "check", "rebalance"],
)
def test_every_subcommand_has_help(command: str) -> None:
    result = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--config" in result.stdout


def test_settings_layering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "s.toml"
    config.write_text("[trainer]\nbatch_size = 64\n[service]\nport = 9000\n")
    monkeypatch.setenv("STREAMREC_SERVICE__PORT", "9001")
    settings = load_settings(config, store={"data_dir": str(tmp_path)})
    assert settings.trainer.batch_size == 64  # file
    assert settings.service.port == 9001  # env beats file
    assert settings.store.data_dir == tmp_path  # flags beat both
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")
    assert build_parser().parse_args(["run"]).command == "run"


def test_unreachable_redis_at_start_is_one_clear_line(tmp_path: Path) -> None:
    """A store that cannot be opened ends the command with exit code 1 and one error
    line naming the address (no traceback)."""
    result = subprocess.run(
        [*CLI, "train", "--data-dir", str(tmp_path), "--max-events", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "STREAMREC_METRICS_PORT": "0",
            "STREAMREC_STORE__HOT": "redis",
            "STREAMREC_STORE__REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        },
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "StoreUnavailable" in errors[0] and "unreachable" in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_embedded_run_trains_serves_and_stops_cleanly(tmp_path: Path, stop: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            *CLI,
            "run",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--source",
            "synthetic",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "STREAMREC_TRAINER__PROGRESS_EVERY_S": "1",
            "STREAMREC_TRAINER__PUBLISH_EVERY_S": "1",
        },
        process_group=0,  # its own group, as a shell gives a command it runs
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_ready(base), "embedded run never became ready"
        info = httpx.get(f"{base}/v1/models/streamrec").json()
        response = httpx.post(
            f"{base}/v1/models/streamrec:predict",
            json={"instances": [{"c1": 1, "c2": 2, "i1": 0.1}]},
        )
        assert response.status_code == 200 and info["version"] >= 1
        assert "streamrec_trainer_events_total" in httpx.get(f"{base}/metrics").text
        time.sleep(1.5)  # at least one progress line
    finally:
        if stop == "ctrl-c":  # a terminal sends SIGINT to the whole foreground group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - started < 15
    assert "rate=" in output and "window_auc=" in output
    # No child (decode worker) killed mid-answer: no traceback, no restart warning.
    assert "Traceback" not in output and "died" not in output, output[-3000:]
    assert (tmp_path / "data" / "rocksdb").is_dir()


def test_table_settings_default_then_override(tmp_path: Path) -> None:
    from streaming.sources.synthetic import SyntheticConfig
    from streamrec.wiring import table_configs

    config = tmp_path / "s.toml"
    config.write_text(
        "[store]\noptimizer = 'adagrad'\nttl_s = 3600\n"
        "[store.admission]\npolicy = 'count_min'\nthreshold = 3\n"
        "[store.tables.c2]\noptimizer = 'ftrl'\nftrl_l1 = 0.5\n"
        "[store.tables.c2.admission]\npolicy = 'always'\n"
    )
    spec = SyntheticConfig(num_sparse=2, num_dense=1, interaction_pairs=[(1, 2)]).feature_spec()
    c1, c2 = table_configs(spec, load_settings(config))
    assert (c1.optimizer, c1.ttl_s, c1.admission.policy, c1.admission.threshold) == (
        "adagrad",
        3600,
        "count_min",
        3,
    )
    assert (c2.optimizer, c2.ftrl_l1, c2.admission.policy, c2.ttl_s) == (
        "ftrl",
        0.5,
        "always",
        3600,
    )
    config.write_text("[store.tables.c1]\nlearning_rat = 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        table_configs(spec, load_settings(config))


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).parents[1] / "deploy" / "config").glob("*.toml")), ids=str
)
def test_example_configs_load(config: Path) -> None:
    settings = load_settings(config)
    assert settings.log.kind == "kafka" and settings.store.hot == "redis"


def test_shared_hot_tier_refuses_eviction() -> None:
    with pytest.raises(ValueError, match=r"remove store\.eviction"):
        load_settings(store={"hot": "redis", "shared_hot": True, "eviction": {"max_rows": 1000}})
    with pytest.raises(ValueError, match=r"needs store\.hot"):
        load_settings(store={"shared_hot": True})
