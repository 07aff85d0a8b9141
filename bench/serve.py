"""Serving benchmark: predict latency at a fixed rate and throughput at saturation.

    python bench/serve.py [--quick] [--redis-url URL | --cluster-masters N] [--workers N]
                          [--experiment]

Prints progress to stderr and one JSON object as the last line of stdout.

1. Trains on the synthetic stream (26 sparse fields, 13 dense) into a Redis hot tier
   over RocksDB, through the real trainer, which publishes a model version.
2. Serves that store like ``streamrec serve`` does (``streamrec.serving.build_serving``:
   read-only store, near cache, read process, one uvicorn process; ``--workers N``:
   ``streamrec serve --workers N`` itself) in a subprocess. The ``noop`` server is the
   same app with the predict route replaced by one that parses the same body and
   returns constant predictions, in as many uvicorn processes.
3. A second process generates the load over keep-alive HTTP/1.1 connections, with
   64-instance predict bodies of the events that follow the trained ones on the same
   stream (known ids at the stream's popularity, plus new ones). ``p50_ms``/``p99_ms``:
   open loop at a fixed ``--rate`` (300/s), latency counted from each request's
   scheduled send time, so a stalled server is not hidden by the client waiting (no
   coordinated omission); requests still unanswered ``duration`` after the last one
   was due count with their wait so far (``fixed_unanswered``). ``rps``/``noop_rps``:
   closed loop with ``--connections`` requests in flight. ``gc_full_passes`` /
   ``gc_full_passes_over_50ms``: the real server's full garbage collections over its
   whole run (``streamrec_service_gc_pause_seconds``), and those that took over 50 ms.

``--experiment`` also trains two experiment arms (25% of the units each, on their own
units' events, into their own stores) and serves the same load through a server routing
each instance to its unit's arm (``experiment_*``; the synthetic bodies' 64 instances
have different units, so a request is split three ways: the worst case).

Without ``--redis-url`` it starts a private ``redis-server`` (see ``bench/store.py``), or
with ``--cluster-masters N`` a private Redis Cluster of N masters on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from common import private_redis, private_redis_cluster, stop

from service.schemas import PredictRequest, PredictResponse

ROOT = Path(__file__).resolve().parents[1]

PREDICT = "/v1/models/streamrec:predict"
INSTANCES = 64
EXPERIMENT = """
[experiment]
name = "bench-{run}"
unit = "c1"
[experiment.arms.control]
share = 0.25
[experiment.arms.treatment]
share = 0.25
"""


def log(msg: str) -> None:
    print(f"[bench/serve] {msg}", file=sys.stderr, flush=True)


# -- the servers (subprocess mode) -------------------------------------------------------


NOOP_SETTINGS_ENV = "STREAMREC_BENCH_NOOP_SETTINGS"


def noop_app(settings_path: Path) -> tuple[Any, Any]:
    """The served app with the predict route answering constants, and its close."""
    from streamrec.config import load_settings
    from streamrec.serving import build_serving

    app, close = build_serving(load_settings(settings_path))
    app.router.routes[:] = [
        r for r in app.router.routes if getattr(r, "path", None) != "/v1/models/{name}:predict"
    ]

    @app.post("/v1/models/{name}:predict", response_model=PredictResponse)
    def constant(name: str, body: PredictRequest) -> PredictResponse:
        return PredictResponse(predictions=[0.5] * len(body.instances), model_version=1)

    return app, close


def noop_worker_app() -> Any:
    """uvicorn's app factory in each worker of the noop server."""
    import atexit

    app, close = noop_app(Path(os.environ[NOOP_SETTINGS_ENV]))
    atexit.register(close)
    return app


def serve(settings_path: Path, port: int, noop: bool, workers: int) -> None:
    """Run the service (or its noop twin) on ``port`` until terminated."""
    import uvicorn

    from storage.allocator import tune_malloc
    from streamrec.cli import main as streamrec_main
    from streamrec.config import load_settings
    from streamrec.serving import build_serving

    if load_settings(settings_path).malloc_tuning:  # as `streamrec serve`, noop alike
        tune_malloc()
    if workers > 1 and not noop:  # exactly what users run
        cmd = ["serve", "--config", str(settings_path), "--port", str(port)]
        sys.exit(streamrec_main([*cmd, "--workers", str(workers)]))
    if workers > 1:
        os.environ[NOOP_SETTINGS_ENV] = str(settings_path)
        uvicorn.run(
            "serve:noop_worker_app",
            factory=True,
            app_dir=str(Path(__file__).parent),
            host="127.0.0.1",
            port=port,
            workers=workers,
            log_level="warning",
        )
        return
    app, close = noop_app(settings_path) if noop else build_serving(load_settings(settings_path))
    try:
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    finally:
        close()


# -- the load generator (subprocess mode) ------------------------------------------------


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> int:
    """One request on a keep-alive connection; returns the status code."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


def _requests(port: int, bodies: list[bytes]) -> list[bytes]:
    return [
        (
            f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]


async def fixed_rate(
    port: int, raws: list[bytes], rate: float, duration: float, connections: int
) -> dict[str, Any]:
    """Open loop: request i is due at i / rate; latency from its due time."""
    conns = [await _connect(port) for _ in range(connections)]
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    latencies: list[float] = []
    errors = 0
    total = int(rate * duration)
    start = time.perf_counter() + 0.1

    async def one(i: int) -> None:
        nonlocal errors
        due = start + i / rate
        conn = await idle.get()
        try:
            status = await _call(*conn, raws[i % len(raws)])
        finally:
            idle.put_nowait(conn)
        if status != 200:
            errors += 1
        latencies.append(time.perf_counter() - due)

    tasks = []
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    # A server slower than the rate would keep the run going long after `duration`:
    # requests unanswered after another `duration` count with their wait so far.
    _, late = await asyncio.wait(tasks, timeout=duration)
    elapsed = time.perf_counter() - start
    for task in late:
        task.cancel()
    now = time.perf_counter()
    answered = len(latencies)
    latencies.extend(now - (start + i / rate) for i in range(total) if tasks[i] in late)
    for _, writer in conns:
        writer.close()
    ms = np.array(latencies) * 1000
    return {
        "requests": total,
        "unanswered": len(late),
        "errors": errors,
        "achieved_rps": answered / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


async def saturate(
    port: int, raws: list[bytes], duration: float, connections: int
) -> dict[str, Any]:
    """Closed loop: ``connections`` requests always in flight."""
    done = errors = 0
    stop_at = time.perf_counter() + duration

    async def worker(k: int) -> None:
        nonlocal done, errors
        conn = await _connect(port)
        i = k
        while time.perf_counter() < stop_at:
            if await _call(*conn, raws[i % len(raws)]) != 200:
                errors += 1
            done += 1
            i += connections
        conn[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(connections)))
    return {"requests": done, "errors": errors, "rps": done / (time.perf_counter() - started)}


def load(args: argparse.Namespace) -> None:
    bodies = [line.encode() for line in Path(args.bodies).read_text().splitlines()]
    raws = _requests(args.port, bodies)
    if args.load == "fixed":
        result = asyncio.run(
            fixed_rate(args.port, raws, args.rate, args.duration, args.connections)
        )
    else:
        result = asyncio.run(saturate(args.port, raws, args.duration, args.connections))
    print(json.dumps(result))


# -- the driver ---------------------------------------------------------------------------


def train(settings_path: Path, events: int, arm: str | None = None) -> dict[str, Any]:
    """The real trainer on the synthetic stream, into the configured store (``arm``: an
    experiment arm's trainer, into its store, on its units' events)."""
    from streaming.log import InMemoryLog
    from streamrec.config import load_settings
    from streamrec.wiring import build_store, embedded_source
    from trainer.experiment import ArmFilter, arms_of_values
    from trainer.trainer import StreamingTrainer

    settings = load_settings(settings_path).for_arm(arm)
    source = embedded_source(settings, events)
    store = build_store(settings, source.spec)
    memory_log = InMemoryLog(capacity=events + 1)
    stream = list(source)
    for event in stream:
        memory_log.append("events", event.to_json())
    filter_ = ArmFilter.of(settings.experiment, arm)
    kept = events
    if filter_ is not None and arm is not None:
        units = [e.features.get(filter_.split.unit) for e in stream]
        kept = int(np.sum(arms_of_values(filter_.split, units) == filter_.split.index(arm)))
    trainer = StreamingTrainer(
        source.spec, store, memory_log.consumer("events"), settings.trainer, arm=filter_
    )
    started = time.perf_counter()
    report = trainer.run(threading.Event(), max_events=kept)
    took = time.perf_counter() - started
    stats = store.stats()
    store.close()
    return {
        "events": report.events,
        "events_per_s": report.events / took,
        "version": report.version,
        "hot_rows": sum(v for k, v in stats.items() if k.startswith("hot_rows.")),
    }


def predict_bodies(n: int, after: int, one_unit: bool = False) -> list[str]:
    """``n`` bodies of the events that follow the ``after`` the trainer saw (same
    stream: known ids with the stream's Zipf popularity, plus the new ids it brings).
    ``one_unit``: every instance of a body has its first instance's ``c1`` (one user's
    candidates, as a recommender asks)."""
    from itertools import islice

    from streaming.sources.synthetic import SyntheticConfig, SyntheticSource

    stream = SyntheticSource(SyntheticConfig(), after + n * INSTANCES)
    events = list(islice(stream, after, None))
    bodies = []
    for b in range(n):
        chunk = events[b * INSTANCES : (b + 1) * INSTANCES]
        instances = [{**e.features, **e.dense} for e in chunk]
        if one_unit:
            instances = [{**i, "c1": instances[0]["c1"]} for i in instances]
        bodies.append(orjson.dumps({"instances": instances}))
    return [b.decode() for b in bodies]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(settings_path: Path, noop: bool, workers: int) -> Iterator[int]:
    import httpx

    port = free_port()
    cmd = [sys.executable, __file__, "--serve", str(settings_path), "--port", str(port)]
    cmd += ["--workers", str(workers), *(["--noop"] if noop else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)
        yield port
    finally:
        stop(proc)


def run_load(port: int, bodies: Path, mode: str, **opts: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--load", mode, "--port", str(port), "--bodies", str(bodies)]
    for key, value in opts.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def scrape(port: int, name: str) -> float:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller run (CI smoke)")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument(
        "--cluster-masters",
        type=int,
        default=0,
        help="a private Redis Cluster of N masters instead of one redis-server",
    )
    parser.add_argument("--rate", type=float, default=300.0, help="fixed-rate phase, req/s")
    parser.add_argument("--connections", type=int, default=8, help="saturation: in flight")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn processes of both servers")
    parser.add_argument(
        "--experiment",
        action="store_true",
        help="also serve an experiment (two arms of 25%% of the units each, trained on "
        "their own units) routing each instance by its c1, and report its figures beside "
        "the plain server's (experiment_*)",
    )
    # Internal modes: the server and the load generator run as subprocesses.
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--noop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load", choices=["fixed", "saturate"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bodies", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.port, args.noop, args.workers)
        return
    if args.load:
        load(args)
        return

    events = 5_000 if args.quick else 50_000
    duration = 1.5 if args.quick else 20.0
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.redis_url:
            url = args.redis_url
        elif args.cluster_masters:
            url = stack.enter_context(private_redis_cluster(log, args.cluster_masters))
        else:
            url = stack.enter_context(private_redis(log))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serve-")))
        settings_path = tmp / "streamrec.toml"
        settings_path.write_text(
            f"""
features = "synthetic"
source = "synthetic"
[store]
hot = "redis"
redis_url = "{url}"
redis_prefix = "bench-serve-{uuid.uuid4().hex[:8]}"
data_dir = "{tmp / "data"}"
[trainer]
batch_size = 1024
"""
        )
        log(f"training on {events:,} synthetic events into Redis ({url}) over RocksDB")
        trained = train(settings_path, events)
        log(f"trained: {trained}")
        experiment_path = tmp / "experiment.toml"
        if args.experiment:
            experiment_path.write_text(
                settings_path.read_text() + EXPERIMENT.format(run=uuid.uuid4().hex[:8])
            )
            for arm in ("control", "treatment"):
                log(f"training arm {arm} on its units' events")
                log(f"trained {arm}: {train(experiment_path, events, arm)}")
        bodies = tmp / "bodies.jsonl"
        bodies.write_text("\n".join(predict_bodies(50 if args.quick else 400, events)))
        phases = [("real", settings_path, bodies), ("noop", settings_path, bodies)]
        if args.experiment:
            one_unit = tmp / "one-unit.jsonl"
            one_unit.write_text(
                "\n".join(predict_bodies(50 if args.quick else 400, events, one_unit=True))
            )
            phases += [
                ("experiment", experiment_path, bodies),
                ("one_unit", settings_path, one_unit),
                ("experiment_one_unit", experiment_path, one_unit),
            ]

        results: dict[str, dict[str, Any]] = {}
        for kind, path, kind_bodies in phases:
            with server(path, noop=kind == "noop", workers=args.workers) as port:
                log(f"{kind}: warm-up")
                run_load(
                    port,
                    kind_bodies,
                    "saturate",
                    duration=duration / 2,
                    connections=args.connections,
                )
                fixed = run_load(
                    port, kind_bodies, "fixed", rate=args.rate, duration=duration, connections=32
                )
                log(f"{kind}: fixed {args.rate:.0f}/s: {fixed}")
                sat = run_load(
                    port, kind_bodies, "saturate", duration=duration, connections=args.connections
                )
                log(f"{kind}: saturation: {sat}")
                extra: dict[str, Any] = {}
                if kind != "noop":
                    hits = scrape(port, 'streamrec_service_near_cache_total{result="hit"}')
                    misses = scrape(port, 'streamrec_service_near_cache_total{result="miss"}')
                    extra["near_cache_hit_ratio"] = hits / max(hits + misses, 1.0)
                    extra["defaulted_keys"] = scrape(
                        port, "streamrec_service_lookup_defaulted_total"
                    )
                    full = 'streamrec_service_gc_pause_seconds_{}{{generation="2"{}}}'
                    extra["gc_full_passes"] = scrape(port, full.format("count", ""))
                    extra["gc_full_passes_over_50ms"] = extra["gc_full_passes"] - scrape(
                        port, full.format("bucket", ',le="0.05"')
                    )
                results[kind] = {"fixed": fixed, "saturate": sat, **extra}

    real, noop = results["real"], results["noop"]
    result: dict[str, Any] = {
        "p50_ms": round(real["fixed"]["p50_ms"], 2),
        "p99_ms": round(real["fixed"]["p99_ms"], 2),
        "rps": round(real["saturate"]["rps"], 1),
        "noop_rps": round(noop["saturate"]["rps"], 1),
        "rps_over_noop": round(real["saturate"]["rps"] / noop["saturate"]["rps"], 3),
        "fixed_rate": args.rate,
        "fixed_achieved_rps": round(real["fixed"]["achieved_rps"], 1),
        "p90_ms": round(real["fixed"]["p90_ms"], 2),
        "max_ms": round(real["fixed"]["max_ms"], 2),
        "noop_p50_ms": round(noop["fixed"]["p50_ms"], 2),
        "noop_p99_ms": round(noop["fixed"]["p99_ms"], 2),
        "errors": sum(
            results[k][p]["errors"] for k in ("real", "noop") for p in ("fixed", "saturate")
        ),
        "fixed_unanswered": real["fixed"]["unanswered"],
        "near_cache_hit_ratio": round(real["near_cache_hit_ratio"], 3),
        "defaulted_keys": real["defaulted_keys"],
        "gc_full_passes": real["gc_full_passes"],
        "gc_full_passes_over_50ms": real["gc_full_passes_over_50ms"],
        "instances": INSTANCES,
        "sparse_fields": 26,
        "connections": args.connections,
        "workers": args.workers,
        "duration_s": duration,
        "train_events": trained["events"],
        "hot_rows": trained["hot_rows"],
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "private_redis": args.redis_url is None,
        "redis_cluster_masters": args.cluster_masters or None,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if "experiment" in results:
        for kind, plain in (("experiment", "real"), ("experiment_one_unit", "one_unit")):
            routed, baseline = results[kind], results[plain]
            result.update(
                {
                    f"{kind}_p50_ms": round(routed["fixed"]["p50_ms"], 2),
                    f"{kind}_p99_ms": round(routed["fixed"]["p99_ms"], 2),
                    f"{kind}_rps": round(routed["saturate"]["rps"], 1),
                    f"{kind}_over_plain_rps": round(
                        routed["saturate"]["rps"] / baseline["saturate"]["rps"], 3
                    ),
                    f"{kind}_near_cache_hit_ratio": round(routed["near_cache_hit_ratio"], 3),
                }
            )
        single = results["one_unit"]
        result.update(
            one_unit_p50_ms=round(single["fixed"]["p50_ms"], 2),
            one_unit_p99_ms=round(single["fixed"]["p99_ms"], 2),
            one_unit_rps=round(single["saturate"]["rps"], 1),
            one_unit_near_cache_hit_ratio=round(single["near_cache_hit_ratio"], 3),
        )
        result["errors"] += sum(
            results[k][p]["errors"]
            for k in ("experiment", "one_unit", "experiment_one_unit")
            for p in ("fixed", "saturate")
        )
    result["targets"] = {
        "p99_le_15ms_at_300rps": result["p99_ms"] <= 15.0,
        "rps_ge_half_noop": result["rps"] >= 0.5 * result["noop_rps"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
