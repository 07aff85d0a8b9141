"""Redis failover benchmark: what replica-confirmed flushes and a Sentinel failover cost.

    python bench/failover.py [--quick]

Starts a private Redis under Sentinel (a master, 2 replicas, 3 sentinels on free
loopback ports: ``deploy/local/redis_sentinel.py``) and a ``RedisTier`` on it with
``min_replicas=1``, as a trainer with ``store.redis_min_replicas = 1`` opens it. Then:

1. ``rounds`` times: write a flush's worth of rows (``rows`` 76-byte rows, a dim-16
   row-wise AdaGrad row, then ``sync``), then ``wait_for_replicas``, each timed. The
   write is the baseline the wait is compared with, measured in the same run.
2. SIGKILLs the master, then retries every 20 ms, as a trainer's recovery does: the
   time until a read answers again (the sentinels have promoted a replica and the
   store reached it), and until a write is confirmed by a replica again (the other
   replica has resynced with the promoted one). Every row confirmed before the kill
   is read back from the promoted replica.

Progress goes to stderr; the last line of stdout is one JSON object with
``write_ms_p50``, ``replica_wait_ms_p50``, ``replica_wait_ms_p99``,
``replica_wait_over_write`` (p50 over p50), ``failover_read_s``,
``failover_confirmed_write_s`` and ``failover_rows_lost`` (rows confirmed before the
kill that the promoted replica lacks or holds older: 0 is the promise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.base import StoreUnavailable
from storage.redis_tier import RedisTier

ROW_BYTES = 76  # a dim-16 row-wise AdaGrad row


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def launcher() -> Any:
    path = Path(__file__).resolve().parents[1] / "deploy" / "local" / "redis_sentinel.py"
    spec = importlib.util.spec_from_file_location("redis_sentinel", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def until_ok(action: Any, timeout_s: float = 120.0) -> float:
    """Seconds until ``action`` stops raising ``StoreUnavailable`` (tried every 20 ms)."""
    start = time.perf_counter()
    while True:
        try:
            action()
            return time.perf_counter() - start
        except StoreUnavailable:
            if time.perf_counter() - start > timeout_s:
                raise
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds (CI)")
    args = parser.parse_args()
    rounds, rows = (20, 2_000) if args.quick else (100, 10_000)
    sentinel = launcher()
    workdir = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    rng = np.random.default_rng(0)
    try:
        url = sentinel.start(workdir, replicas=2, sentinels=3)
        log(f"Redis under Sentinel at {url}")
        tier = RedisTier(url, buckets=max(rows // 64, 1), min_replicas=1, replica_timeout_s=5)
        writes, waits = [], []
        values: dict[int, bytes] = {}
        for i in range(rounds):
            keys = rng.integers(0, 1 << 62, rows, dtype=np.uint64)
            data = [rng.bytes(ROW_BYTES) for _ in range(rows)]
            start = time.perf_counter()
            tier.put_many("t", keys, data)
            tier.sync()
            middle = time.perf_counter()
            tier.wait_for_replicas()
            writes.append(middle - start)
            waits.append(time.perf_counter() - middle)
            values.update(zip(keys.tolist(), data, strict=True))
            if (i + 1) % max(rounds // 5, 1) == 0:
                log(f"round {i + 1}/{rounds}: write {writes[-1] * 1e3:.1f} ms, "
                    f"wait {waits[-1] * 1e3:.2f} ms")  # fmt: skip
        confirmed = np.fromiter(values, dtype=np.uint64, count=len(values))
        probe = confirmed[:1]

        killed = sentinel.master_port(workdir)
        sentinel.kill(workdir, killed, hard=True)
        log(f"master on {killed} killed; waiting for the store to reach a promoted replica")
        start = time.perf_counter()
        read_s = until_ok(lambda: tier.get_many("t", probe))

        def confirmed_write() -> None:
            tier.put_many("t", probe, [values[int(probe[0])]])
            tier.wait_for_replicas()

        confirmed_s = read_s + until_ok(confirmed_write)
        log(f"reads answer after {read_s:.2f} s, confirmed writes after {confirmed_s:.2f} s "
            f"(from the kill: {time.perf_counter() - start:.2f} s)")  # fmt: skip
        got = tier.get_many("t", confirmed)
        lost = sum(v != values[k] for k, v in zip(confirmed.tolist(), got, strict=True))
        tier.close()
    finally:
        sentinel.stop(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
    write_p50, wait_p50 = float(np.median(writes)), float(np.median(waits))
    result = {
        "rounds": rounds,
        "rows_per_round": rows,
        "write_ms_p50": round(write_p50 * 1e3, 3),
        "replica_wait_ms_p50": round(wait_p50 * 1e3, 3),
        "replica_wait_ms_p99": round(float(np.percentile(waits, 99)) * 1e3, 3),
        "replica_wait_over_write": round(wait_p50 / write_p50, 4),
        "failover_read_s": round(read_s, 3),
        "failover_confirmed_write_s": round(confirmed_s, 3),
        "failover_rows_lost": int(lost),
        "rows_confirmed": len(values),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
