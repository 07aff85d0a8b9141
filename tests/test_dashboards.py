"""The Grafana dashboards' queries return data from a real Prometheus scraping a real
``streamrec run`` (trainer, store with a capacity, service), with predicts coming in;
the alerting rules load, evaluate and only name series that exist. The experiment
dashboard and its rules likewise, over a real experiment: the default model's and two
arms' ``streamrec train`` processes on Kafka and Redis, and ``streamrec serve``
routing by arm.

Prometheus is Debian's (``deploy/local/services.sh start`` installs it); this test starts
its own on a free port. A missing binary fails the test: CI runs it on every build.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import free_port, kafka_redis_toml, new_topic, produce, wait_ready

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
DASHBOARD = DASHBOARDS / "streamrec.json"
EXPERIMENT_DASHBOARD = DASHBOARDS / "streamrec-experiment.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
EXPERIMENT_ALERTS = ROOT / "deploy" / "prometheus" / "alerts-experiment.yml"

pytestmark = pytest.mark.integration


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard."""
    out = []
    for panel in json.loads(path.read_text())["panels"]:
        out += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return out


def test_every_shipped_dashboard_is_checked() -> None:
    assert sorted(DASHBOARDS.glob("*.json")) == sorted([DASHBOARD, EXPERIMENT_DASHBOARD])


@pytest.fixture(scope="module")
def streamrec_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``streamrec run`` with a small hot-tier capacity (evictions happen), publishing
    and reporting every second, and a thread posting predicts and, through
    ``/v1/events``, events; yields its base URL."""
    tmp = tmp_path_factory.mktemp("dashboards")
    config = tmp / "streamrec.toml"
    config.write_text(
        f"""
source = "synthetic"
[store]
data_dir = "{tmp / "data"}"
[store.eviction]
max_rows = 20000
[trainer]
progress_every_s = 1
publish_every_s = 1
"""
    )
    port = free_port()
    log = tmp / "run.log"
    output = log.open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamrec.cli",
            "run",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()

    def predicts() -> None:
        bodies = [
            {"instances": [{"c1": (i * 7 + j) % 50, "c2": j, "i1": 0.5} for j in range(16)]}
            for i in range(20)
        ]
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                client.post(f"{base}/v1/models/streamrec:predict", json=bodies[i % 20])
                if i % 10 == 0:  # feedback through the service: the freshness panel
                    event = {
                        "event_id": f"dash-{i}",
                        "ts": int(time.time() * 1000),
                        "label": 1,
                        "features": {"c1": f"dash-{i}"},
                    }
                    client.post(f"{base}/v1/events", json={"events": [event]})
                i += 1
                stop.wait(0.05)

    try:
        # Ready once the first version is published: slow while the machine is busy.
        if not wait_ready(base, timeout_s=180):
            pytest.fail(f"streamrec run never became ready:\n{log.read_text()[-3000:]}")
        thread = threading.Thread(target=predicts, daemon=True)
        thread.start()
        yield base
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output.close()


@pytest.fixture(scope="module")
def prometheus(streamrec_run: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus scraping ``streamrec_run`` every second; yields its base URL."""
    tmp = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(tmp, [streamrec_run.removeprefix("http://")], ALERTS) as url:
        yield url


@contextlib.contextmanager
def running_prometheus(tmp: Path, targets: list[str], rules: Path) -> Iterator[str]:
    """A Prometheus scraping ``targets`` every second with ``rules``; its base URL."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run `bash deploy/local/services.sh start`"
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: ['{rules}']\n"
        "scrape_configs:\n  - job_name: streamrec\n"
        f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(tmp)},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _api(prometheus: str, path: str, **params: str) -> Any:
    """The ``data`` of a Prometheus API answer; None while Prometheus is not up (it
    refuses connections, then answers 503 while its storage opens)."""
    try:
        response = httpx.get(f"{prometheus}/api/v1/{path}", params=params, timeout=10)
    except httpx.TransportError:
        return None
    if response.status_code == 400:  # the query itself is wrong
        pytest.fail(f"{params}: {response.json().get('error')}")
    if response.status_code != 200:
        return None
    return response.json()["data"]


def _values(prometheus: str, expr: str) -> list[float]:
    """The sample values ``expr`` evaluates to now (none while Prometheus is not up)."""
    data = _api(prometheus, "query", query=expr)
    return [] if data is None else [float(sample["value"][1]) for sample in data["result"]]


def test_dashboard_queries_are_valid_and_return_data(prometheus: str) -> None:
    queries = dashboard_queries(DASHBOARD)
    assert len(queries) >= 10
    assert_return_data(prometheus, queries)


def assert_return_data(prometheus: str, queries: list[tuple[str, str]]) -> None:
    missing = list(queries)
    deadline = time.monotonic() + 120
    while missing and time.monotonic() < deadline:
        missing = [
            (title, expr)
            for title, expr in missing
            if not any(math.isfinite(v) for v in _values(prometheus, expr))
        ]
        if missing:
            time.sleep(2)
    assert not missing, f"panels without data after 120 s: {missing}"


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `bash deploy/local/services.sh start`"
    proc = subprocess.run(
        [promtool, "check", "rules", str(ALERTS), str(EXPERIMENT_ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _rules(prometheus: str) -> list[dict[str, Any]]:
    data = _api(prometheus, "rules")
    return [] if data is None else [r for group in data["groups"] for r in group["rules"]]


def test_alert_rules_evaluate_and_name_series_that_exist(prometheus: str) -> None:
    """A misspelt metric in an alert evaluates fine and never fires: every series an
    alert names must have data in a healthy run."""
    assert_rules_healthy(prometheus, at_least=10)


def assert_rules_healthy(prometheus: str, at_least: int) -> None:
    deadline = time.monotonic() + 120
    rules = _rules(prometheus)
    while time.monotonic() < deadline and (
        not rules or any(r["health"] != "ok" or not r.get("lastEvaluation") for r in rules)
    ):
        time.sleep(2)
        rules = _rules(prometheus)
    assert len(rules) >= at_least, rules
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
    names = {name for r in rules for name in re.findall(r"\b(?:streamrec_\w+|up)\b", r["query"])}
    missing = set(names)
    while missing and time.monotonic() < deadline:
        missing = {name for name in missing if not _values(prometheus, f"count({name})")}
        if missing:
            time.sleep(2)
    assert not missing, f"alerts name series without data: {sorted(missing)}"
    assert not [r["name"] for r in rules if r["state"] == "firing"], rules


# -- the experiment dashboard ----------------------------------------------------------


@pytest.fixture(scope="module")
def experiment_prometheus(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An experiment deployed as in production: ``streamrec train`` for the default
    model and for each of two arms (``--arm``), ``streamrec serve`` routing by arm, a
    thread posting predicts and events; a Prometheus scraping all four processes."""
    from streaming.sources.synthetic import SyntheticConfig, SyntheticSource

    tmp = tmp_path_factory.mktemp("experiment")
    run = uuid.uuid4().hex[:8]
    topic = new_topic(kafka_bootstrap, "abdash", partitions=1)
    config = tmp / "ab.toml"
    deployment = kafka_redis_toml(kafka_bootstrap, redis_url, topic, f"abdash{run}", tmp / "data")
    config.write_text(
        deployment
        + f"""
[trainer]
decode_workers = 0
flush_every_s = 1
publish_every_s = 1
progress_every_s = 1
[service]
lookup_processes = 0
[experiment]
name = "dash-{run}"
unit = "c1"
[experiment.arms.control]
share = 0.25
[experiment.arms.treatment]
share = 0.25
trainer = {{ dense_learning_rate = 0.003 }}
"""
    )
    produce(kafka_bootstrap, topic, SyntheticSource(SyntheticConfig(), 10_000))

    cli = [sys.executable, "-m", "streamrec.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    targets: list[str] = []

    def start(args: list[str], metrics_port: int, name: str) -> None:
        log = tmp / f"{name}.log"
        logs.append(log)
        env = {**os.environ, "STREAMREC_METRICS_PORT": str(metrics_port)}
        with log.open("w") as output:
            procs.append(
                subprocess.Popen(
                    [*cli, *args, "--config", str(config)],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        targets.append(f"127.0.0.1:{metrics_port}")

    def failed(why: str) -> None:
        pytest.fail("\n".join([why, *(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs)]))

    stop = threading.Event()
    try:
        for arm in (None, "control", "treatment"):
            start(["train"] + (["--arm", arm] if arm else []), free_port(), arm or "default")
        # `streamrec serve` needs the stores the trainers create (else it exits 1).
        deadline = time.monotonic() + 240
        while not all(published(target) for target in targets):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                failed("the trainers did not all publish a version")
            time.sleep(0.5)
        serve_port = free_port()
        start(["serve", "--port", str(serve_port)], serve_port, "serve")
        base = f"http://127.0.0.1:{serve_port}"
        if not wait_ready(base, timeout_s=120):  # every arm's version loaded
            failed("streamrec serve never became ready")

        def traffic() -> None:
            with httpx.Client(timeout=10) as client:
                i = 0
                while not stop.is_set():
                    instances = [{"c1": (i * 7 + j) % 400, "c2": j, "i1": 0.5} for j in range(8)]
                    client.post(
                        f"{base}/v1/models/streamrec:predict", json={"instances": instances}
                    )
                    events = [
                        {
                            "event_id": f"dash-{i}-{j}",
                            "ts": int(time.time() * 1000),
                            "label": (i + j) % 2,
                            "features": {"c1": (i * 7 + j) % 400},
                        }
                        for j in range(8)
                    ]
                    client.post(f"{base}/v1/events", json={"events": events})
                    i += 1
                    stop.wait(0.05)

        threading.Thread(target=traffic, daemon=True).start()
        with running_prometheus(tmp, targets, EXPERIMENT_ALERTS) as url:
            yield url
    finally:
        stop.set()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def published(target: str) -> bool:
    """Whether the trainer whose /metrics is at ``target`` has published a version."""
    try:
        text = httpx.get(f"http://{target}/metrics", timeout=5).text
    except httpx.TransportError:
        return False
    return any(
        line.startswith("streamrec_trainer_published_version ") and float(line.split()[1]) >= 1
        for line in text.splitlines()
    )


def test_experiment_dashboard_queries_return_data(experiment_prometheus: str) -> None:
    queries = dashboard_queries(EXPERIMENT_DASHBOARD)
    assert len(queries) >= 8
    assert_return_data(experiment_prometheus, queries)
    # Every arm and the default model show up in the per-arm panels.
    auc = f"max by (arm) (streamrec_trainer_window_auc {ARM_JOIN})"
    arms = {s["metric"]["arm"] for s in _api(experiment_prometheus, "query", query=auc)["result"]}
    assert arms == {"default", "control", "treatment"}


ARM_JOIN = "* on (instance, job) group_left (arm) streamrec_trainer_experiment_arm"


def test_experiment_alert_rules_evaluate_and_name_series_that_exist(
    experiment_prometheus: str,
) -> None:
    assert_rules_healthy(experiment_prometheus, at_least=2)
