"""Redis Cluster rebalancing benchmark: how evenly the masters carry the store's load as
hashing alone places the slots, after ``streamrec rebalance``'s plan, and after the
traffic drifts.

    python bench/shard.py [--quick]

Starts a private Redis Cluster (``--masters``, default 6; ``deploy/local/redis_cluster.py``
gives each master an even share of the slots, as ``redis-cli --cluster create`` does),
writes 76-byte rows (a dim-16 row-wise AdaGrad row) into 26 tables through a
``RedisTier`` (``--tables criteo``, the default: as many ids as the Criteo dataset's
fields have, 3 to 10M, capped at ``ids``; ``uniform``: ``ids`` each), then reads them
as serving does with its near cache off: requests of 64 instances x 26 fields, ids
drawn Zipf 1.1 (each table its own popularity order), each request's distinct keys
read with one ``get_tables``. Four phases of ``requests``
requests each:

1. ``before``: the slots as created (the baseline, measured in the same run);
2. ``after``: the plan of ``plan_moves`` over the traffic the store reported (the same
   requests again), applied with ``ClusterAdmin``;
3. ``drift_before``: every table's popularity order reshuffled (new hot ids), on the
   phase-2 placement;
4. ``drift_after``: planned again (the store's traffic half-life is 2 s here, so the
   old traffic has faded) and applied; the drifted requests again.

Each master's load is measured by Redis itself, per phase: the rows it served (HGET
calls: what the planner's cost model counts), the microseconds its commands took
(``INFO commandstats``) and its CPU seconds (``INFO cpu``). Imbalance: the busiest
master's load over the mean (1.0: even). Progress goes to stderr; the last line of
stdout is one JSON object with ``load_imbalance_{before,after,drift_before,
drift_after}`` (rows; ``cpu_imbalance_*`` and ``time_imbalance_*`` likewise),
``after_over_before`` (rows imbalance after over before), ``drift_after_over_before``,
the planner's own estimates (``planned_imbalance_*``), ``moved_slots``, ``moved_keys``
and ``rebalance_s``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from common import private_redis_cluster

from storage.rebalance import ClusterAdmin, Plan, imbalance, plan_moves
from storage.redis_tier import RedisTier

TABLES = [f"C{i}" for i in range(1, 27)]
# The ids per field of the Criteo Kaggle dataset (as in DLRM's and TorchRec's
# examples): tables from 3 rows to 10M; ``--tables criteo`` caps them at ``ids``.
CRITEO_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
ROW_BYTES = 76
INSTANCES = 64
ZIPF = 1.1


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def served(client: redis.Redis) -> npt.NDArray[np.float64]:
    """The rows this server has read (HGET calls), the microseconds it spent in
    commands, and its CPU seconds (user + system), so far."""
    stats = client.info("commandstats")
    usec = sum(entry.get("usec", 0) for entry in stats.values())
    cpu = client.info("cpu")
    return np.array(
        [
            stats.get("cmdstat_hget", {}).get("calls", 0),
            usec,
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        ],
        dtype=np.float64,
    )


def popularity(ids: int) -> npt.NDArray[np.float64]:
    p = np.power(np.arange(1, ids + 1, dtype=np.float64), -ZIPF)
    out: npt.NDArray[np.float64] = p / p.sum()
    return out


def requests_of(
    rng: np.random.Generator, count: int, orders: list[npt.NDArray[np.uint64]]
) -> list[dict[str, npt.NDArray[np.uint64]]]:
    """``count`` requests: per table, the distinct keys of 64 Zipf draws (``orders``:
    each table's keys, most popular first)."""
    draws = [
        order[rng.choice(len(order), size=(count, INSTANCES), p=popularity(len(order)))]
        for order in orders
    ]
    return [
        {table: np.unique(d[i]) for table, d in zip(TABLES, draws, strict=True)}
        for i in range(count)
    ]


def serve(
    tier: RedisTier, requests: list[dict[str, npt.NDArray[np.uint64]]], admin: ClusterAdmin
) -> dict[str, Any]:
    """Read every request; the phase's imbalance of rows read and of time in commands,
    and each master's share of the rows."""
    clients = [admin.client(m) for m in admin.masters]
    before = [served(c) for c in clients]
    started = time.perf_counter()
    for i, request in enumerate(requests, 1):
        tier.get_tables(request)
        if i % 1000 == 0:
            rate = i / (time.perf_counter() - started)
            log(f"  {i}/{len(requests)} requests, {rate:,.0f}/s")
    rows, usec, cpu = np.array([served(c) - b for c, b in zip(clients, before, strict=True)]).T
    return {
        "rows": round(imbalance(rows), 4),
        "usec": round(imbalance(usec), 4),
        "cpu": round(imbalance(cpu), 4),
        "share": [round(float(x), 4) for x in rows / rows.sum()],
    }


def rebalance(
    tier: RedisTier, admin: ClusterAdmin, max_moves: int, tolerance: float
) -> tuple[Plan, int, float]:
    tier.report_traffic()
    tier.sync()
    rates, reporters = admin.traffic()
    assert reporters >= 1, "the store reported no traffic"
    plan = plan_moves(
        rates[0] + rates[1],
        admin.memory(),
        admin.owner,
        len(admin.masters),
        max_moves=max_moves,
        tolerance=tolerance,
    )
    started = time.perf_counter()
    keys = admin.apply(plan.moves)
    elapsed = time.perf_counter() - started
    log(
        f"  moved {len(plan.moves)} slots ({keys} keys) in {elapsed:.2f} s; planned "
        f"imbalance {plan.imbalance_before:.3f} -> {plan.imbalance_after:.3f}"
    )
    return plan, keys, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (CI)")
    parser.add_argument("--masters", type=int, default=6)
    parser.add_argument("--max-moves", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument(
        "--tables",
        choices=["criteo", "uniform"],
        default="criteo",
        help="criteo: each table as many ids as its Criteo field (at most ids); uniform: ids each",
    )
    args = parser.parse_args()
    ids, requests = (20_000, 800) if args.quick else (100_000, 6_000)
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {
        "masters": args.masters,
        "tables": args.tables,
        "ids_per_table": ids,
        "requests_per_phase": requests,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    with private_redis_cluster(log, masters=args.masters) as url:
        sizes = {
            table: min(ids, n) if args.tables == "criteo" else ids
            for table, n in zip(TABLES, CRITEO_CARDINALITIES, strict=True)
        }
        tier = RedisTier(url, "bench", expected_rows=sizes, traffic_half_life_s=2.0)
        admin = ClusterAdmin(url, "bench")
        try:
            keys = {t: rng.integers(1, 2**63, size=n, dtype=np.uint64) for t, n in sizes.items()}
            row = bytes(ROW_BYTES)
            started = time.perf_counter()
            for table, table_keys in keys.items():
                tier.put_many(table, table_keys, [row] * len(table_keys))
            tier.sync()
            elapsed = time.perf_counter() - started
            log(f"wrote {sum(sizes.values()):,} rows in {len(TABLES)} tables in {elapsed:.1f} s")
            phase = requests_of(rng, requests, [rng.permutation(k) for k in keys.values()])
            phases: dict[str, dict[str, Any]] = {}
            log("before: slots as created")
            phases["before"] = serve(tier, phase, admin)
            plan, moved_keys, seconds = rebalance(tier, admin, args.max_moves, args.tolerance)
            log("after: the same requests on the plan's placement")
            phases["after"] = serve(tier, phase, admin)
            drifted = requests_of(rng, requests, [rng.permutation(k) for k in keys.values()])
            time.sleep(10 * tier.traffic_half_life_s)  # the old traffic fades from the rates
            log("drift: new hot ids, on the first plan's placement")
            phases["drift_before"] = serve(tier, drifted, admin)
            plan2, keys2, seconds2 = rebalance(tier, admin, args.max_moves, args.tolerance)
            log("drift, replanned")
            phases["drift_after"] = serve(tier, drifted, admin)
        finally:
            admin.close()
            tier.close()
    for name, measured in phases.items():
        result[f"load_imbalance_{name}"] = measured["rows"]
        result[f"time_imbalance_{name}"] = measured["usec"]
        result[f"cpu_imbalance_{name}"] = measured["cpu"]
        result[f"load_share_{name}"] = measured["share"]
    for name, planned in (("", plan), ("drift_", plan2)):
        result[f"planned_imbalance_{name}before"] = round(planned.imbalance_before, 4)
        result[f"planned_imbalance_{name}after"] = round(planned.imbalance_after, 4)
    result["moved_slots"] = len(plan.moves) + len(plan2.moves)
    result["moved_keys"] = moved_keys + keys2
    result["rebalance_s"] = round(seconds + seconds2, 3)
    result["after_over_before"] = round(
        result["load_imbalance_after"] / result["load_imbalance_before"], 4
    )
    result["drift_after_over_before"] = round(
        result["load_imbalance_drift_after"] / result["load_imbalance_drift_before"], 4
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
