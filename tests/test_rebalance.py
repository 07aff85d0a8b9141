"""Traffic-aware slot placement (``storage.rebalance``, ``streamrec rebalance``): the
planner's guarantees as properties, the decayed slot traffic, and a real Redis Cluster
whose hot slots move off the master they overloaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from support import LocalRedisCluster, free_port

from storage.base import StoreError
from storage.rebalance import (
    SLOTS,
    ClusterAdmin,
    SlotTraffic,
    decode_report,
    encode_report,
    imbalance,
    plan_moves,
    sum_reports,
)
from storage.redis_tier import RedisTier, key_slot
from streamrec.cli import main


def contiguous_owners(slots: int, masters: int) -> np.ndarray:
    return np.arange(slots) * masters // slots


def test_the_plan_moves_hot_slots_off_the_busiest_master() -> None:
    load = np.ones(SLOTS)
    load[[5, 17, 300, 4000]] = 2000.0  # all on master 0 of 3
    owner = contiguous_owners(SLOTS, 3)
    plan = plan_moves(load, np.ones(SLOTS), owner, 3, tolerance=0.05)
    assert plan.imbalance_before > 1.6
    # The hot slots go first, one to each other master; then the cold ones (1 each)
    # close the gap as far as 64 moves go.
    assert [(m.slot, m.source, m.target) for m in plan.moves[:2]] == [(5, 0, 1), (17, 0, 2)]
    assert len(plan.moves) == 64 and plan.imbalance_after < 1.16
    unbounded = plan_moves(load, np.ones(SLOTS), owner, 3, tolerance=0.05, max_moves=SLOTS)
    assert unbounded.imbalance_after <= 1.05
    # Balanced already: nothing to do.
    even = plan_moves(np.ones(SLOTS), np.ones(SLOTS), owner, 3)
    assert even.moves == [] and even.imbalance_before == pytest.approx(1.0, abs=1e-3)


def test_memory_bounds_the_moves() -> None:
    load = np.ones(12)
    load[0] = 30.0
    memory = np.ones(12)
    memory[0] = 100.0  # the hot slot is big: no master may take it
    owner = contiguous_owners(12, 3)
    plan = plan_moves(load, memory, owner, 3, memory_slack=0.1)
    assert 0 not in [m.slot for m in plan.moves]
    assert plan.memory_after.max() <= max(plan.memory_before.max(), 1.1 * memory.sum() / 3)


@settings(max_examples=200, deadline=None)
@given(
    masters=st.integers(1, 6),
    slots=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    max_moves=st.integers(0, 20),
    tolerance=st.floats(0, 0.5),
    slack=st.floats(0, 1),
)
def test_plan_properties(
    masters: int, slots: int, seed: int, max_moves: int, tolerance: float, slack: float
) -> None:
    """Whatever the load: the total is kept, the largest master's load never grows, no
    master's memory passes the cap, a slot moves once, from its owner."""
    rng = np.random.default_rng(seed)
    load = rng.pareto(1.1, slots) * rng.integers(0, 2, slots)
    memory = rng.uniform(0, 10, slots)
    owner = rng.integers(0, masters, slots)
    plan = plan_moves(
        load, memory, owner, masters, max_moves=max_moves, tolerance=tolerance, memory_slack=slack
    )
    assert len(plan.moves) <= max_moves
    assert len({m.slot for m in plan.moves}) == len(plan.moves)
    final = owner.copy()
    for move in plan.moves:
        assert owner[move.slot] == move.source != move.target
        final[move.slot] = move.target
    assert np.allclose(plan.load_after, np.bincount(final, weights=load, minlength=masters))
    assert plan.load_after.sum() == pytest.approx(load.sum())
    assert plan.load_after.max() <= plan.load_before.max() + 1e-9
    cap = max(plan.memory_before.max(), (1 + slack) * plan.memory_before.mean())
    assert plan.memory_after.max() <= cap + 1e-9
    if plan.moves:
        assert imbalance(plan.load_after) < imbalance(plan.load_before)


def test_plan_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="differ"):
        plan_moves(np.ones(3), np.ones(2), [0, 0, 0], 1)
    with pytest.raises(ValueError, match="masters 0 to 1"):
        plan_moves(np.ones(2), np.ones(2), [0, 2], 2)
    with pytest.raises(ValueError, match=">= 0"):
        plan_moves(-np.ones(2), np.ones(2), [0, 1], 2)


def test_slot_traffic_rates_follow_the_traffic_as_it_drifts() -> None:
    now = [0.0]
    traffic = SlotTraffic(half_life_s=60, every_s=10, clock=lambda: now[0])
    slots = np.full(1000, 7)
    for _ in range(6):  # 1000 rows of slot 7 a second, one minute
        now[0] += 10
        for _ in range(10):
            traffic.count(slots, write=False)
        traffic.rates()
    rates = traffic.rates()
    # A young process reads its true rate (no start-up bias), writes none.
    assert rates[0, 7] == pytest.approx(1000, rel=1e-6)
    assert rates[1].sum() == 0 and rates[0].sum() == pytest.approx(1000, rel=1e-6)
    for _ in range(18):  # the traffic moves to slot 9 (written) for three half-lives
        now[0] += 10
        for _ in range(10):
            traffic.count(np.full(1000, 9), write=True)
        traffic.rates()
    rates = traffic.rates()
    # Each minute's share of the four so far: 1/2, 1/4, 1/8, 1/16 back in time.
    history = 1 - 0.5**4
    assert rates[1, 9] == pytest.approx(1000 * (1 - 0.5**3) / history, rel=1e-6)
    assert rates[0, 7] == pytest.approx(1000 * (0.5**3 - 0.5**4) / history, rel=1e-6)
    assert not traffic.due()
    now[0] += 10
    assert traffic.due()


def test_slot_traffic_counts_every_row_past_a_fold() -> None:
    """Routed slot arrays are summed in bulk; rows past the bulk threshold count too."""
    now = [0.0]
    traffic = SlotTraffic(half_life_s=60, clock=lambda: now[0])
    for _ in range(1100):  # 1.1M rows: past one fold
        traffic.count(np.arange(1000) % 4, write=True)
    now[0] += 1
    rates = traffic.rates()
    assert rates[1, :4].tolist() == [275_000.0] * 4 and rates[1].sum() == 1_100_000
    assert rates[0].sum() == 0


def test_reports_round_trip_and_stale_or_malformed_ones_are_dropped() -> None:
    rates = np.zeros((2, SLOTS))
    rates[0, 3], rates[1, 4] = 5.0, 2.5
    at, decoded = decode_report(encode_report(100.0, rates))
    assert at == 100.0 and np.array_equal(decoded, rates)
    with pytest.raises(ValueError):
        decode_report(b"short")
    entries = {
        b"fresh": encode_report(100.0, rates),
        b"also": encode_report(90.0, rates),
        b"stale": encode_report(0.0, rates),
        b"junk": b"\0" * 12,
    }
    total, fresh, dropped = sum_reports(entries, now=101.0, max_age_s=60)
    assert fresh == 2 and sorted(dropped) == [b"junk", b"stale"]
    assert total[0, 3] == 10.0 and total[1, 4] == 5.0


def test_only_a_cluster_can_be_rebalanced(clean_redis: str) -> None:
    with pytest.raises(StoreError, match="not a Redis Cluster"):
        ClusterAdmin(clean_redis)
    with pytest.raises(StoreError, match="Sentinel"):
        ClusterAdmin("redis+sentinel://127.0.0.1:1/mymaster")


def test_rebalance_refuses_what_it_cannot_do(
    clean_redis: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Redis hot tier, bad flags (exit 2), or a Redis that is not a cluster (exit 1,
    the store error's one line)."""
    monkeypatch.setenv("STREAMREC_STORE__DATA_DIR", str(tmp_path))
    assert main(["rebalance"]) == 2
    monkeypatch.setenv("STREAMREC_STORE__HOT", "redis")
    monkeypatch.setenv("STREAMREC_STORE__REDIS_URL", clean_redis)
    assert main(["rebalance", "--tolerance", "-1"]) == 2
    assert main(["rebalance"]) == 1


def keys_on_first_master(
    tier: RedisTier, admin: ClusterAdmin, keys: np.ndarray
) -> tuple[list[int], np.ndarray]:
    """Six slots of table ``t`` that master 0 serves, and the ``keys`` in them."""
    layout = tier.layout("t")
    assert layout is not None
    slot_of = np.array(
        [key_slot(layout.bucket_name(int(k % np.uint64(layout.buckets)))) for k in keys]
    )
    hot_slots = sorted(set(slot_of[admin.owner[slot_of] == 0].tolist()))[:6]
    return hot_slots, keys[np.isin(slot_of, hot_slots)]


def hmget_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_hmget", {})
    return int(stats.get("calls", 0))


def test_rebalance_moves_hot_slots_off_the_master_they_overload(
    services: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Rows read and written through ``RedisTier``s, a few keys of master 0's slots read
    far more than the rest: the stores report the traffic, ``streamrec rebalance``
    plans moves of those slots only, and ``--apply`` moves them. The same read load
    then spreads over the masters as Redis itself counts it, every row reads back bit
    for bit through the open store (``MOVED``) and a new one, and a store that closes
    takes its report with it. A slot left half-migrated is named by a plan and finished
    by ``--apply``; a master added empty gets slots, and reads, from the next plan."""
    cluster = LocalRedisCluster(tmp_path / "cluster")  # its own: slots move
    prefix = "rb"
    writer = reader = None
    try:
        writer = RedisTier(cluster.url, prefix, expected_rows=20_000)
        reader = RedisTier(cluster.url, prefix)
        keys = np.arange(1, 20_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        values = [int(k).to_bytes(8, "little") * 4 for k in keys]
        writer.put_many("t", keys, values)
        writer.sync()
        admin = ClusterAdmin(cluster.url, prefix)
        hot_slots, hot = keys_on_first_master(writer, admin, keys)
        masters = [admin.client(m) for m in admin.masters]

        def hot_reads() -> list[int]:
            before = [hmget_calls(m) for m in masters]
            for _ in range(200):
                reader.get_many("t", hot)
            return [hmget_calls(m) - b for m, b in zip(masters, before, strict=True)]

        served = hot_reads()
        assert served[0] >= 200 and served[1] == served[2] == 0
        reader.get_many("t", keys)  # every row once: the rest of the load
        writer.report_traffic()
        reader.report_traffic()
        writer.sync()
        reader.sync()
        skewed = REGISTRY.get_sample_value("streamrec_store_redis_load_imbalance")
        assert skewed is not None and skewed > 1.5  # the reader's own view, as exported

        monkeypatch.setenv("STREAMREC_STORE__HOT", "redis")
        monkeypatch.setenv("STREAMREC_STORE__REDIS_URL", cluster.url)
        monkeypatch.setenv("STREAMREC_STORE__REDIS_PREFIX", prefix)
        monkeypatch.setenv("STREAMREC_STORE__DATA_DIR", str(tmp_path / "data"))
        capsys.readouterr()
        assert main(["rebalance"]) == 0
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert plan["reporters"] == 2
        assert plan["imbalance_before"] > 1.5 and plan["imbalance_after"] < 1.1
        first = plan["moves"][0]
        assert first["slot"] in hot_slots and first["from"] == admin.masters[0].address
        admin.refresh()
        assert (admin.owner[hot_slots] == 0).all()  # a plan moves nothing
        assert main(["check", "--json"]) == 0  # which names the imbalance too
        found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        (uneven,) = [f for f in found if "run `streamrec rebalance`" in f["detail"]]
        assert uneven["status"] == "warn" and "serves 2." in uneven["detail"]

        assert main(["rebalance", "--apply"]) == 0
        capsys.readouterr()
        admin.refresh()
        assert set(admin.owner[hot_slots].tolist()) != {0}
        spread = hot_reads()  # the hot keys' reads, as the masters count them
        assert spread[0] < 0.7 * served[0] and spread[1] + spread[2] > 0
        reader.report_traffic()
        evened = REGISTRY.get_sample_value("streamrec_store_redis_load_imbalance")
        assert evened is not None and evened < skewed
        assert reader.get_many("t", keys) == values
        fresh = RedisTier(cluster.url, prefix)
        assert fresh.get_many("t", keys) == values
        fresh.close()
        writer.close()
        writer = None
        _, reporters = admin.traffic()
        assert reporters == 1
        # The reader's report expires by itself should its process die unclosed.
        reports = [(m, k) for m in masters for k in m.scan_iter(match=b"{rb:slot-load}:*")]
        assert len(reports) == 1
        assert 0 < reports[0][0].pttl(reports[0][1]) <= 60_000

        # A move left half done (as a failed one leaves it): a plan names it, and
        # --apply finishes it before it plans.
        slot = hot_slots[0]
        source = admin.masters[int(admin.owner[slot])]
        target = next(m for m in admin.masters if m != source)
        admin.migrate(slot, source, target, finish=False)
        admin.refresh()
        assert admin.open_migrations == [(slot, source, target)]
        assert reader.get_many("t", keys) == values  # ASK replies followed
        assert main(["rebalance"]) == 0
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        half_done = {"slot": slot, "from": source.address, "to": target.address}
        assert plan["open_migrations"] == [half_done]
        main(["check", "--json"])
        found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert any(f"slot {slot} is left half-migrated" in f["detail"] for f in found)
        assert main(["rebalance", "--apply"]) == 0
        capsys.readouterr()
        admin.refresh()
        assert admin.open_migrations == [] and admin.masters[int(admin.owner[slot])] == target
        assert reader.get_many("t", keys) == values

        # Scale-out: a master joins empty; the next plan moves load onto it.
        port = cluster.add_master()
        admin.refresh()
        assert admin.masters[-1].port == port and not (admin.owner == len(masters)).any()
        hot_reads()
        reader.report_traffic()
        reader.sync()
        assert main(["rebalance", "--apply"]) == 0
        plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert plan["moves"][0]["to"] == f"127.0.0.1:{port}"
        admin.refresh()
        newcomer = admin.client(admin.masters[-1])
        calls = hmget_calls(newcomer)
        reader.get_many("t", keys)
        assert hmget_calls(newcomer) > calls
        assert reader.get_many("t", keys) == values
        admin.close()
    finally:
        for store in (writer, reader):
            if store is not None:
                store.close()
        cluster.stop()


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (labels included) in a /metrics page; 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.integration
def test_rebalance_every_moves_slots_as_traffic_comes(services: None, tmp_path: Path) -> None:
    """``streamrec rebalance --apply --every 1``: a process that plans each second,
    moves the hot slots once a store reports them, then finds nothing to do; its
    /metrics count the rounds and moves; SIGTERM stops it cleanly."""
    cluster = LocalRedisCluster(tmp_path / "cluster")
    tier = proc = None
    try:
        tier = RedisTier(cluster.url, "rv", expected_rows=20_000)
        keys = np.arange(1, 20_001, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        tier.put_many("t", keys, [b"v" * 32] * len(keys))
        tier.sync()
        admin = ClusterAdmin(cluster.url, "rv")
        hot_slots, hot = keys_on_first_master(tier, admin, keys)
        port = free_port()
        env = {
            **os.environ,
            "STREAMREC_STORE__HOT": "redis",
            "STREAMREC_STORE__REDIS_URL": cluster.url,
            "STREAMREC_STORE__REDIS_PREFIX": "rv",
            "STREAMREC_STORE__DATA_DIR": str(tmp_path / "data"),
            "STREAMREC_METRICS_PORT": str(port),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamrec.cli", "rebalance", "--apply", "--every", "1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        page = ""
        while metric(page, 'streamrec_rebalance_rounds_total{result="no_reports"}') < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.2)
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except httpx.TransportError:
                continue  # not listening yet
        for _ in range(200):  # the traffic comes: hot keys on master 0
            tier.get_many("t", hot)
        tier.report_traffic()
        tier.sync()
        while metric(page, 'streamrec_rebalance_rounds_total{result="planned"}') < 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.2)
            page = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        assert metric(page, 'streamrec_rebalance_rounds_total{result="applied"}') >= 1
        assert metric(page, "streamrec_rebalance_slots_moved_total") >= 1
        assert metric(page, 'streamrec_rebalance_load_imbalance{when="after"}') < 1.1
        admin.refresh()
        assert set(admin.owner[hot_slots].tolist()) != {0}
        admin.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if tier is not None:
            tier.close()
        cluster.stop()
