"""Experiments: fair A/B tests with online training. Assignment, the arm trainer's
filter, the settings each arm's processes see, and the service routing by arm."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import ValidationError

from service.app import ArmBackend, EventSink, ServedExperiment, ServiceConfig, create_app
from storage.keys import feature_keys
from storage.memory_tier import MemoryTier
from storage.tiered import TieredStore
from streaming.log import InMemoryLog
from streaming.sources.synthetic import SyntheticConfig, SyntheticSource
from streaming.spec import FeatureSpec, SparseFeature
from streamrec.cli import _settings, build_parser, main
from streamrec.config import ConfigError, Settings, load_settings
from streamrec.wiring import check_experiment, table_configs
from trainer.encoding import encode, select_examples
from trainer.experiment import (
    ArmFilter,
    ExperimentConfig,
    arms_of_batch,
    arms_of_values,
)
from trainer.trainer import StreamingTrainer, TrainerConfig

EXPERIMENT = ExperimentConfig(
    name="ab1",
    unit="c1",
    arms={"control": {"share": 0.25}, "treatment": {"share": 0.25}},
)
SOURCE = SyntheticSource(
    SyntheticConfig(num_sparse=3, num_dense=2, universe=400, interaction_pairs=[(1, 2)]), 6_000
)
SPEC = SOURCE.spec
EVENTS = list(SOURCE)


def binomial_bound(n: int, p: float) -> float:
    """Five standard deviations of a share of n draws: a bound no fair split misses."""
    return 5 * math.sqrt(p * (1 - p) / n)


# -- assignment ------------------------------------------------------------------------


def test_each_arm_gets_its_share_of_the_units() -> None:
    split = EXPERIMENT.split()
    units = 200_000
    of = split.of_keys(feature_keys("c1", np.arange(units)))
    for index, arm in enumerate(split.arms):
        share = float(np.mean(of == index))
        assert abs(share - 0.25) < binomial_bound(units, 0.25), arm
    assert abs(float(np.mean(of == -1)) - 0.5) < binomial_bound(units, 0.5)
    # Deterministic: another process computes the same split.
    assert np.array_equal(
        of,
        ExperimentConfig(**EXPERIMENT.model_dump())
        .split()
        .of_keys(feature_keys("c1", np.arange(units))),
    )


@settings(max_examples=30, deadline=None)
@given(
    before=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    grow=st.tuples(st.integers(0, 5000), st.integers(0, 5000)),
)
def test_raising_a_share_keeps_every_unit_of_every_arm(
    before: tuple[int, int], grow: tuple[int, int]
) -> None:
    def split(shares: tuple[int, int]) -> np.ndarray:
        config = ExperimentConfig(
            name="ramp",
            unit="c1",
            arms={"a": {"share": shares[0] / 10_000}, "b": {"share": shares[1] / 10_000}},
        )
        return config.split().of_keys(feature_keys("c1", np.arange(20_000)))

    after = tuple(min(b + g, 5000) for b, g in zip(before, grow, strict=True))
    old, new = split(before), split(after)  # type: ignore[arg-type]
    assert np.array_equal(new[old >= 0], old[old >= 0])


def test_a_new_experiment_name_reshuffles_the_units() -> None:
    keys = feature_keys("c1", np.arange(100_000))
    first = EXPERIMENT.split().of_keys(keys) == 0
    renamed = EXPERIMENT.model_copy(update={"name": "ab2"}).split().of_keys(keys) == 0
    # Independent assignments: a quarter of the first control is control again.
    assert abs(float(np.mean(renamed[first])) - 0.25) < binomial_bound(int(first.sum()), 0.25)


def test_trainer_and_service_assign_a_unit_alike() -> None:
    values: list[Any] = [*range(300), *(f"user-{i}" for i in range(300)), "17", None, -5]
    features = [{} if v is None else {"c1": v} for v in values]
    batch = encode(features, [{} for _ in values], SPEC)
    split = EXPERIMENT.split()
    by_batch = arms_of_batch(split, batch)
    assert np.array_equal(by_batch, arms_of_values(split, values))
    assert by_batch[values.index(None)] == -1
    assert by_batch[values.index("17")] == by_batch[17]  # "17" and 17 are one id
    assert set(by_batch.tolist()) == {-1, 0, 1}


MULTI = FeatureSpec(
    sparse=[SparseFeature(name="u"), SparseFeature(name="tags", kind="multi_hot")],
    dense=["x"],
)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 50)),
            st.lists(st.integers(0, 20), max_size=4),
            st.floats(-10, 10),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_selecting_examples_equals_encoding_only_those(
    rows: list[tuple[int | None, list[int], float, bool]],
) -> None:
    features = [{"tags": tags} | ({} if u is None else {"u": u}) for u, tags, _, _ in rows]
    dense = [{"x": x} for _, _, x, _ in rows]
    keep = np.array([k for *_, k in rows], dtype=bool)
    selected = select_examples(encode(features, dense, MULTI), keep)
    kept = [i for i, k in enumerate(keep) if k]
    direct = encode([features[i] for i in kept], [dense[i] for i in kept], MULTI)
    assert np.array_equal(selected.dense, direct.dense)
    for name in ("u", "tags"):
        assert np.array_equal(selected.fields[name].keys, direct.fields[name].keys), name
        assert np.array_equal(selected.fields[name].offsets, direct.fields[name].offsets), name


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arms", "needle"),
    [
        ({"default": {"share": 0.1}}, "arm name 'default'"),
        ({"Bad Name": {"share": 0.1}}, "arm name 'Bad Name'"),
        ({"a": {"share": 0.6}, "b": {"share": 0.1}}, "more than one lane"),
        ({"a": {"share": 0.00001}}, "rounds to no bucket"),
        ({"a": {"share": 0.1, "colour": 1}}, "colour"),
        ({}, "arms"),
    ],
)
def test_a_bad_experiment_is_refused_with_the_reason(arms: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        ExperimentConfig(name="x", unit="c1", arms=arms)


def test_an_arm_sees_its_own_store_trainer_and_consumer_group(tmp_path: Path) -> None:
    settings = Settings(
        store={"data_dir": tmp_path, "redis_prefix": "p", "tables": {"c2": {"ttl_s": 60}}},
        trainer={"batch_size": 512, "model": {"bottom_mlp": [32]}},
        experiment={
            "name": "e",
            "unit": "c1",
            "arms": {
                "control": {"share": 0.1},
                "wide": {
                    "share": 0.1,
                    "store": {"tables": {"c2": {"learning_rate": 0.5}}},
                    "trainer": {"model": {"top_mlp": [256, 64]}},
                },
            },
        },
    )
    control = settings.for_arm("control")
    assert control.arm == "control"
    assert control.store.redis_prefix == "p-control"
    assert control.store.data_dir == tmp_path / "arms" / "control"
    assert control.log.group_id == "streamrec-trainer-control"
    assert control.trainer == settings.trainer
    wide = settings.for_arm("wide")
    # Nested tables merge key by key: the arm's learning rate beside the shared TTL.
    assert wide.store.tables["c2"] == {"ttl_s": 60, "learning_rate": 0.5}
    assert wide.trainer.model.top_mlp == [256, 64] and wide.trainer.model.bottom_mlp == [32]
    assert wide.trainer.batch_size == 512
    assert settings.for_arm(None).store == settings.store
    with pytest.raises(ValueError, match="already arm 'wide'"):
        wide.for_arm("control")


def test_arm_settings_errors_name_the_arm(tmp_path: Path) -> None:
    experiment = {"name": "e", "unit": "c1", "arms": {"fast": {"share": 0.1}}}
    with pytest.raises(ValidationError, match="arm 'slow' is not an arm"):
        Settings(experiment=experiment, arm="slow")
    with pytest.raises(ValidationError, match="arm 'x' is not an arm"):
        Settings(arm="x")
    bad = {**experiment, "arms": {"fast": {"share": 0.1, "trainer": {"batch_size": 0}}}}
    with pytest.raises(ValidationError, match=r"(?s)experiment arm 'fast'.*batch_size"):
        Settings(experiment=bad)
    spec = SyntheticConfig().feature_spec()
    for unit in ("nope", "i1"):
        with pytest.raises(ConfigError, match=f"experiment.unit '{unit}'"):
            check_experiment(Settings(experiment={**experiment, "unit": unit}), spec)
    multi = FeatureSpec(sparse=[SparseFeature(name="c1", kind="multi_hot")])
    with pytest.raises(ConfigError, match="categorical"):
        check_experiment(Settings(experiment=experiment), multi)


def test_streamrec_run_refuses_an_experiment_and_arm_selects_the_arm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ab.toml"
    config.write_text(
        f'[store]\ndata_dir = "{tmp_path}"\n'
        '[experiment]\nname = "e"\nunit = "c1"\n[experiment.arms.b]\nshare = 0.1\n'
    )
    assert main(["run", "--config", str(config)]) == 2
    assert "needs a trainer per arm" in caplog.text
    assert main(["train", "--config", str(config), "--arm", "c"]) == 2
    assert "arm 'c' is not an arm" in caplog.text
    assert load_settings(config, arm="b").arm == "b"
    # `--arm` (or STREAMREC_ARM) makes any command the arm's process.
    for argv, env in ((["--arm", "b"], None), ([], "b")):
        if env is not None:
            monkeypatch.setenv("STREAMREC_ARM", env)
        args = build_parser().parse_args(
            ["snapshot", str(tmp_path / "s"), "--config", str(config), *argv]
        )
        arm = _settings(args)
        assert arm.arm == "b" and arm.store.data_dir == tmp_path / "arms" / "b"
        assert arm.store.redis_prefix == "sr-b" and arm.log.group_id == "streamrec-trainer-b"


# -- the arm's trainer -----------------------------------------------------------------


def new_store() -> TieredStore:
    return TieredStore(table_configs(SPEC, Settings()), MemoryTier())


def train(store: TieredStore, arm: str | None, default_trains_on: str = "all") -> StreamingTrainer:
    log = InMemoryLog()
    for event in EVENTS:
        log.append("t", event.to_json())
    experiment = EXPERIMENT.model_copy(update={"default_trains_on": default_trains_on})
    trainer = StreamingTrainer(
        SPEC,
        store,
        log.consumer("t"),
        TrainerConfig(batch_size=200, max_batch_wait_s=0.05),
        arm=ArmFilter.of(experiment, arm),
    )
    stop = threading.Event()
    thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        # Until every record is read and what it covers recorded.
        deadline = time.monotonic() + 60
        while trainer.store.position() != {"t:0": len(EVENTS)} and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
    return trainer


def unit_arms() -> np.ndarray:
    return arms_of_values(EXPERIMENT.split(), [e.features["c1"] for e in EVENTS])


def test_an_arm_trainer_learns_from_its_units_only() -> None:
    other_before = REGISTRY.get_sample_value("streamrec_trainer_other_arm_events_total") or 0.0
    store = new_store()
    trainer = train(store, "control")
    arms = unit_arms()
    mine = int(np.sum(arms == 0))
    assert 0 < mine < len(EVENTS)
    assert trainer.evaluator.events == mine
    assert store.position() == {"t:0": len(EVENTS)}  # read everything, learnt from its share
    skipped = REGISTRY.get_sample_value("streamrec_trainer_other_arm_events_total")
    assert skipped == other_before + len(EVENTS) - mine
    # Rows of the unit field: only the arm's units ever reached the store.
    values = [str(e.features["c1"]) for e in EVENTS]
    units = {v for v, a in zip(values, arms, strict=True) if a == 0}
    others = set(values) - units
    assert store.lookup("c1", feature_keys("c1", sorted(units))).found.any()
    assert not store.lookup("c1", feature_keys("c1", sorted(others))).found.any()
    # A batch is about batch_size of its own events: it reads batch_size / share records.
    assert trainer._batch_records == 800


def test_the_default_model_learns_from_the_rest_when_asked() -> None:
    trainer = train(new_store(), None, default_trains_on="rest")
    assert trainer.evaluator.events == int(np.sum(unit_arms() == -1))
    assert ArmFilter.of(EXPERIMENT, None) is None  # "all": every event, no filter


# -- serving ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores() -> dict[str, TieredStore]:
    trained = {arm: new_store() for arm in ("default", "control", "treatment")}
    for arm, store in trained.items():
        train(store, None if arm == "default" else arm)
    return trained


def instance(unit: int) -> dict[str, object]:
    return {"c1": unit, "c2": 3, "c3": 5, "i1": 0.5, "i2": 1.0}


def units_by_arm() -> dict[int, list[int]]:
    values = list(range(400))
    of = arms_of_values(EXPERIMENT.split(), values)
    return {
        index: [v for v, a in zip(values, of, strict=True) if a == index] for index in (-1, 0, 1)
    }


@pytest.fixture(scope="module")
def client(stores: dict[str, TieredStore]) -> Iterator[TestClient]:
    experiment = ServedExperiment(
        EXPERIMENT, {arm: ArmBackend(stores[arm]) for arm in ("control", "treatment")}
    )
    log = InMemoryLog()
    sink = EventSink(log.producer(), "t", SPEC)
    app = create_app(stores["default"], CONFIG, events=sink, experiment=experiment)
    with TestClient(app) as test_client:
        yield test_client


CONFIG = ServiceConfig(lookup_budget_ms=10_000, near_cache_ttl_s=0)


def alone(store: TieredStore, instances: list[dict[str, object]]) -> list[float]:
    """What the model in ``store`` predicts served by itself."""
    with TestClient(create_app(store, CONFIG)) as plain:
        body = plain.post("/v1/models/streamrec:predict", json={"instances": instances}).json()
    return list(body["predictions"])


def test_each_instance_is_scored_by_its_arms_model(
    client: TestClient, stores: dict[str, TieredStore]
) -> None:
    units = units_by_arm()
    picked = [units[0][0], units[-1][0], units[1][0], units[0][1], units[1][1], units[-1][1]]
    arm_names = ["control", "default", "treatment", "control", "treatment", "default"]
    instances = [instance(u) for u in picked]
    before = {
        arm: REGISTRY.get_sample_value("streamrec_service_experiment_instances_total", {"arm": arm})
        or 0.0
        for arm in ("control", "treatment", "default")
    }
    body = client.post("/v1/models/streamrec:predict", json={"instances": instances}).json()
    assert body["arms"] == arm_names
    assert set(body["model_versions"]) == {"control", "treatment", "default"}
    for arm in ("control", "treatment", "default"):
        rows = [i for i, a in enumerate(arm_names) if a == arm]
        expected = alone(stores[arm], [instances[i] for i in rows])
        got = [body["predictions"][i] for i in rows]
        assert got == pytest.approx(expected, abs=1e-6), arm
        after = REGISTRY.get_sample_value(
            "streamrec_service_experiment_instances_total", {"arm": arm}
        )
        assert after == before[arm] + len(rows)
    # The arms learnt from different events: their models differ.
    one = [instance(units[0][0])]
    assert alone(stores["control"], one) != pytest.approx(alone(stores["treatment"], one))


def test_a_single_arm_request_names_that_arms_version(
    client: TestClient, stores: dict[str, TieredStore]
) -> None:
    unit = units_by_arm()[1][2]
    body = client.post(
        "/v1/models/streamrec:predict", json={"instances": [instance(unit)] * 3}
    ).json()
    info = client.get("/v1/models/streamrec").json()
    treatment = next(a for a in info["experiment"]["arms"] if a["name"] == "treatment")
    assert body["arms"] == ["treatment"] * 3
    assert body["model_version"] == treatment["version"] == body["model_versions"]["treatment"]
    assert body["predictions"] == pytest.approx(alone(stores["treatment"], [instance(unit)] * 3))
    # No unit value: the default model.
    no_unit = {"c2": 3, "i1": 0.5}
    body = client.post("/v1/models/streamrec:predict", json={"instances": [no_unit]}).json()
    assert body["arms"] == ["default"]
    # A pinned version is the default model's, for every instance.
    version = client.get("/v1/models/streamrec").json()["version"]
    body = client.post(
        "/v1/models/streamrec:predict",
        json={"instances": [instance(unit)], "parameters": {"version": version}},
    ).json()
    assert "arms" not in body and body["model_version"] == version
    assert body["predictions"] == pytest.approx(alone(stores["default"], [instance(unit)]))


def test_model_info_describes_the_experiment(client: TestClient) -> None:
    info = client.get("/v1/models/streamrec").json()
    experiment = info["experiment"]
    assert experiment["name"] == "ab1" and experiment["unit"] == "c1"
    assert experiment["default_trains_on"] == "all"
    assert [a["name"] for a in experiment["arms"]] == ["control", "treatment"]
    for arm in experiment["arms"]:
        assert arm["share"] == 0.25 and arm["ready"] and arm["version"] >= 1
        assert arm["events_trained"] < info["events_trained"]
    assert client.get("/readyz").status_code == 200


def test_posted_events_are_counted_per_arm_and_label(client: TestClient) -> None:
    units = units_by_arm()

    def count(arm: str, label: str) -> float:
        value = REGISTRY.get_sample_value(
            "streamrec_service_experiment_events_total", {"arm": arm, "label": label}
        )
        return value or 0.0

    before = {(a, lab): count(a, lab) for a in ("control", "default") for lab in ("0", "1")}
    events = [
        {"event_id": f"x{i}", "ts": 1, "label": label, "features": {"c1": unit}}
        for i, (unit, label) in enumerate(
            [(units[0][0], 1), (units[0][1], 0), (units[0][2], 0), (units[-1][0], 1)]
        )
    ]
    assert client.post("/v1/events", json={"events": events}).status_code == 202
    assert count("control", "1") == before["control", "1"] + 1
    assert count("control", "0") == before["control", "0"] + 2
    assert count("default", "1") == before["default", "1"] + 1


def test_an_arm_without_a_version_is_not_ready_and_falls_back(
    stores: dict[str, TieredStore],
) -> None:
    experiment = ServedExperiment(
        EXPERIMENT,
        {"control": ArmBackend(new_store()), "treatment": ArmBackend(stores["treatment"])},
    )
    unit = units_by_arm()[0][0]
    fallback = ("streamrec_service_experiment_fallback_instances_total", {"arm": "control"})
    before = REGISTRY.get_sample_value(*fallback) or 0.0
    with TestClient(create_app(stores["default"], CONFIG, experiment=experiment)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "arm 'control'" in ready.json()["detail"]
        body = client.post(
            "/v1/models/streamrec:predict", json={"instances": [instance(unit)]}
        ).json()
    assert body["arms"] == ["control"]
    assert body["predictions"] == pytest.approx(alone(stores["default"], [instance(unit)]))
    assert REGISTRY.get_sample_value(*fallback) == before + 1


# -- against the real services ---------------------------------------------------------


@pytest.mark.integration
def test_an_experiment_through_kafka_and_redis(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    """Three trainers read one topic in their own consumer groups, each into its own
    Redis prefix; ``build_serving`` routes each predict to its unit's arm."""
    import redis
    from support import kafka_redis_toml, new_topic, produce, wait_for_report

    from streamrec.runtime import TrainerRuntime
    from streamrec.serving import build_serving

    run = uuid.uuid4().hex[:8]
    topic = new_topic(kafka_bootstrap, "ab", partitions=2)
    config = tmp_path / "ab.toml"
    deployment = kafka_redis_toml(kafka_bootstrap, redis_url, topic, f"ab{run}", tmp_path / "data")
    config.write_text(
        deployment
        + f"""
[trainer]
batch_size = 512
flush_every_s = 1.0
publish_every_s = 1.0
[experiment]
name = "ab-{run}"
unit = "c1"
[experiment.arms.control]
share = 0.2
[experiment.arms.treatment]
share = 0.2
trainer = {{ dense_learning_rate = 0.01 }}
"""
    )
    settings = load_settings(config)
    events = list(SyntheticSource(SyntheticConfig(), 8_000))
    produce(kafka_bootstrap, topic, events)
    assert settings.experiment is not None
    of = arms_of_values(settings.experiment.split(), [e.features["c1"] for e in events])
    expected = {
        None: len(events),
        "control": int(np.sum(of == 0)),
        "treatment": int(np.sum(of == 1)),
    }
    assert 0 < expected["control"] < len(events) and 0 < expected["treatment"] < len(events)

    for arm, count in expected.items():
        runtime = TrainerRuntime.start(settings.for_arm(arm), max_events=count)
        try:
            report = wait_for_report(runtime, 300)
            assert report.events == count, arm
            assert runtime.trainer.version is not None, arm
            gauge = ("streamrec_trainer_experiment_arm", {"arm": arm or "default"})
            assert REGISTRY.get_sample_value(*gauge) == 1
        finally:
            assert runtime.stop() == 0
    with redis.Redis.from_url(redis_url) as client:
        for prefix in (f"ab{run}", f"ab{run}-control", f"ab{run}-treatment"):
            assert client.exists(f"{prefix}:rows:c1"), prefix
    assert (tmp_path / "data" / "arms" / "treatment" / "rocksdb").is_dir()

    control_unit = next(e.features["c1"] for e, a in zip(events, of, strict=True) if a == 0)
    app, close = build_serving(settings)
    try:
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200
            info = client.get("/v1/models/streamrec").json()
            arms = {a["name"]: a for a in info["experiment"]["arms"]}
            assert arms["control"]["events_trained"] == expected["control"]
            assert info["events_trained"] == len(events)
            body = client.post(
                "/v1/models/streamrec:predict",
                json={"instances": [{"c1": control_unit, "c2": 1, "i1": 0.5}]},
            ).json()
            assert body["arms"] == ["control"]
            assert body["model_version"] == arms["control"]["version"]
    finally:
        close()


CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "config"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_the_example_configs_load(path: Path) -> None:
    settings = load_settings(path)
    if settings.experiment is not None:
        for arm in settings.experiment.arms:
            assert (
                settings.for_arm(arm).store.redis_prefix == f"{settings.store.redis_prefix}-{arm}"
            )


def test_arms_start_from_a_snapshot_of_the_production_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The equal start the README recommends: snapshot production, restore it into an
    arm (``--arm``), and the arm's trainer goes on from there on its units only."""
    from support import store_rows

    from streamrec.wiring import build_store

    sparse = ", ".join(f'{{name = "{f.name}"}}' for f in SPEC.sparse)
    dense = ", ".join(f'"{name}"' for name in SPEC.dense)
    config = tmp_path / "ab.toml"
    config.write_text(
        f"""
features = {{sparse = [{sparse}], dense = [{dense}]}}
[store]
data_dir = "{tmp_path / "data"}"
[trainer]
batch_size = 200
publish_every_s = 0.1
[experiment]
name = "ab1"
unit = "c1"
[experiment.arms.control]
share = 0.25
trainer = {{ dense_learning_rate = 0.01 }}
[experiment.arms.wide]
share = 0.25
trainer = {{ model = {{ top_mlp = [256, 64] }} }}
"""
    )
    settings = load_settings(config)
    half = len(EVENTS) // 2

    def trainer_on(view: Settings, start: int) -> StreamingTrainer:
        log = InMemoryLog(start={"t:0": start})
        for event in EVENTS[start:]:
            log.append("t", event.to_json())
        store = build_store(view, SPEC)
        arm = ArmFilter.of(view.experiment, view.arm)
        return StreamingTrainer(
            SPEC, store, log.consumer("t", store.position()), view.trainer, arm=arm
        )

    production = trainer_on(settings, 0)
    production.run(threading.Event(), max_events=half)
    production.store.close()
    assert main(["snapshot", str(tmp_path / "snap"), "--config", str(config)]) == 0
    assert (
        main(["restore", str(tmp_path / "snap"), "--config", str(config), "--arm", "control"]) == 0
    )
    # An arm with another architecture cannot take the production model's weights...
    wide_cli = ["restore", str(tmp_path / "snap"), "--config", str(config), "--arm", "wide"]
    assert main(wide_cli) == 1
    assert "architecture" in caplog.text
    # ... but it can take its rows: embeddings and their optimizer state.
    assert main([*wide_cli, "--rows-only"]) == 0

    control = trainer_on(settings.for_arm("control"), half)
    production_store = build_store(settings, SPEC, read_only=True)
    assert control.store.position() == production_store.position() == {"t:0": half}
    assert store_rows(control.store, metadata=True) == store_rows(production_store, metadata=True)
    production_store.close()
    assert control.version is not None  # serving has the production model for the arm
    mine = int(np.sum(unit_arms()[half:] == 0))
    control.run(threading.Event(), max_events=mine)
    assert control.evaluator.events == mine
    control.store.close()

    wide = trainer_on(settings.for_arm("wide"), half)
    production_store = build_store(settings, SPEC, read_only=True)
    assert wide.store.position() == {"t:0": half}
    assert store_rows(wide.store, metadata=True) == store_rows(production_store, metadata=True)
    production_store.close()
    assert wide.version is None  # no dense weights of another architecture to serve
    wide.run(threading.Event(), max_events=int(np.sum(unit_arms()[half:] == 1)))
    assert wide.version is not None  # its own architecture, published
    assert wide.model.top[0].out_features == 256
    wide.store.close()
