"""The ``streamrec`` command: run | train | serve | replay | fetch | snapshot | restore |
check | rebalance."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pydantic import ValidationError

from storage.allocator import tune_malloc
from streamrec.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from storage.rebalance import ClusterAdmin

log = logging.getLogger("streamrec")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    service: dict[str, object] = {}
    if getattr(args, "host", None):
        service["host"] = args.host
    if getattr(args, "port", None) is not None:
        service["port"] = args.port
    if getattr(args, "workers", None) is not None:
        service["workers"] = args.workers
    if service:
        overrides["service"] = service
    if getattr(args, "source", None) and args.command in ("run", "train"):
        overrides["source"] = args.source
    if getattr(args, "data_dir", None):
        overrides["store"] = {"data_dir": args.data_dir}
    if getattr(args, "arm", None):
        overrides["arm"] = args.arm
    settings = load_settings(args.config, **overrides)
    if settings.arm is not None:
        # The arm's store, trainer and consumer group from here on.
        settings = settings.model_copy(update={"arm": None}).for_arm(settings.arm)
    if settings.malloc_tuning:
        tune_malloc()
    return settings


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; flushing and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def cmd_run(args: argparse.Namespace) -> int:
    """Trainer and service in one process, sharing one store."""
    from service.app import EventSink, create_app
    from streaming.log import EventProducer, KafkaEventProducer, LogUnavailable
    from streamrec.runtime import TrainerRuntime
    from streamrec.serving import PRODUCE_BLOCK_MS

    settings = _settings(args)
    if settings.experiment is not None:
        raise ConfigError(
            "`streamrec run` trains and serves one model; an experiment needs a trainer "
            "per arm (`streamrec train` and `streamrec train --arm NAME`, with Kafka) "
            "and `streamrec serve`"
        )
    runtime = TrainerRuntime.start(settings, max_events=args.max_events, rate=args.rate)
    producer: EventProducer
    if runtime.embedded_log is not None:
        producer = runtime.embedded_log.producer()
    else:
        try:
            producer = KafkaEventProducer(
                settings.log.bootstrap_servers, max_block_ms=PRODUCE_BLOCK_MS
            )
        except LogUnavailable:
            runtime.stop()
            raise
    sink = EventSink(producer, settings.log.topic, runtime.trainer.spec)
    app = create_app(runtime.store, settings.service, events=sink)
    server = _http_server(app, settings)
    runtime.on_failure = lambda: setattr(server, "should_exit", True)
    log.info(
        "serving on http://%s:%d (docs at /docs, metrics at /metrics); Ctrl-C to stop",
        settings.service.host,
        settings.service.port,
    )
    server.run()  # returns on SIGINT/SIGTERM (uvicorn handles both)
    producer.close()
    return runtime.stop()


def _http_server(app: FastAPI, settings: Settings) -> uvicorn.Server:
    import uvicorn

    class Server(uvicorn.Server):
        """Stops on SIGINT/SIGTERM without re-raising the signal afterwards (uvicorn
        does, which would turn a clean flush-and-exit into exit code -15)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)
            yield

    config = uvicorn.Config(
        app,
        host=settings.service.host,
        port=settings.service.port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return Server(config)


def cmd_train(args: argparse.Namespace) -> int:
    """The trainer alone, with /metrics on ``metrics_port``."""
    from prometheus_client import start_http_server

    from streamrec.runtime import TrainerRuntime

    settings = _settings(args)
    start_http_server(settings.metrics_port, addr=settings.metrics_host)
    log.info(
        "trainer metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port
    )
    stop = threading.Event()
    _stop_on_signals(stop)
    runtime = TrainerRuntime.start(settings, max_events=args.max_events, rate=args.rate)
    runtime.on_failure = stop.set
    while not stop.is_set() and runtime.alive():
        time.sleep(0.2)
    return runtime.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    """The service alone, reading the store the trainer writes."""
    from streamrec.serving import build_serving

    settings = _settings(args)
    if settings.service.workers > 1:
        return _serve_workers(settings)
    app, close = build_serving(settings)
    try:
        _http_server(app, settings).run()
    finally:
        close()
    return 0


def _serve_workers(settings: Settings) -> int:
    """``service.workers`` uvicorn processes on one port. Metrics: prometheus-client
    multiprocess mode over a fresh directory; an API pin reaches every worker through
    a pin file there (unless ``service.pin_file`` names one)."""
    import os
    import shutil
    import tempfile

    import uvicorn

    from streamrec.serving import SETTINGS_ENV

    shared = Path(tempfile.mkdtemp(prefix="streamrec-serve-"))
    if settings.service.pin_file is None:
        settings.service.pin_file = shared / "pinned-version"
    metrics_dir = shared / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    os.environ[SETTINGS_ENV] = settings.model_dump_json()
    log.info(
        "serving on http://%s:%d with %d workers",
        settings.service.host,
        settings.service.port,
        settings.service.workers,
    )
    try:
        uvicorn.run(
            "streamrec.serving:worker_app",
            factory=True,
            host=settings.service.host,
            port=settings.service.port,
            workers=settings.service.workers,
            log_level="warning",
            timeout_graceful_shutdown=5,
            # A worker imports torch before it answers the supervisor's health check:
            # on a busy machine that takes longer than uvicorn's default 5 s.
            timeout_worker_healthcheck=60,
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return 0


REPLAY_FLUSH_EVERY = 5_000


def cmd_replay(args: argparse.Namespace) -> int:
    """Produce a source's events to Kafka, with a progress bar."""
    from tqdm import tqdm

    from streaming.log import KafkaEventProducer
    from streaming.sources import open_source
    from streamrec.wiring import pace

    settings = _settings(args)
    source = open_source(
        args.source,
        data_dir=settings.store.data_dir,
        seed=settings.trainer.seed,
        max_events=args.max_events,
    )
    bootstrap = args.bootstrap_servers or settings.log.bootstrap_servers
    topic = args.topic or settings.log.topic
    producer = KafkaEventProducer(bootstrap)
    sent = 0
    try:
        with tqdm(total=source.total, unit="ev", desc=f"replay -> {topic}", mininterval=1) as bar:
            for event in pace(source, args.rate):
                producer.send(topic, event.to_json(), key=event.event_id.encode())
                sent += 1
                if sent % REPLAY_FLUSH_EVERY == 0:
                    # Bounded backlog: the bar counts stored events, and no final flush
                    # has to drain a whole buffer within its timeout.
                    producer.flush()
                    bar.update(REPLAY_FLUSH_EVERY)
            producer.flush()
            bar.update(sent % REPLAY_FLUSH_EVERY)
    finally:
        producer.close()
    log.info("produced %d events to %s at %s", sent, topic, bootstrap)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch a dataset into the data dir."""
    from streaming.sources.movielens import fetch_movielens_100k

    settings = _settings(args)
    path = fetch_movielens_100k(settings.store.data_dir, source=args.source_path)
    log.info("MovieLens-100k is at %s", path)
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Export the store's model as of its recorded position (safe while a trainer runs)."""
    from storage.base import StoreError
    from streamrec.snapshot import SnapshotError, snapshot

    settings = _settings(args)
    try:
        manifest = snapshot(settings, args.directory)
    except (SnapshotError, StoreError) as e:
        log.error("snapshot failed: %s", e)
        return 1
    log.info(
        "snapshot in %s (%d rows, position %s)", args.directory, manifest.rows, manifest.position
    )
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Load a snapshot into the (empty, or --force) store of the settings."""
    from storage.base import StoreError
    from streamrec.snapshot import SnapshotError, restore

    settings = _settings(args)
    try:
        restore(settings, args.directory, force=args.force, rows_only=args.rows_only)
    except (SnapshotError, StoreError) as e:
        log.error("restore failed: %s", e)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check the configured services and state; exit 1 if anything fails."""
    from streamrec.check import render, run_checks

    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the findings say what failed
    findings = run_checks(_settings(args))
    print(render(findings, as_json=args.json), flush=True)
    return 1 if any(f.status == "fail" for f in findings) else 0


def cmd_rebalance(args: argparse.Namespace) -> int:
    """Plan slot moves that even out a Redis Cluster's measured load; --apply moves them;
    --every repeats that until stopped, with /metrics on ``metrics_port``."""
    from storage.base import StoreError
    from storage.rebalance import ClusterAdmin

    settings = _settings(args)
    store = settings.store
    if store.hot != "redis":
        log.error("rebalance needs store.hot = 'redis' (a Redis Cluster)")
        return 2
    flags = (args.max_moves, args.tolerance, args.write_cost, args.memory_slack)
    if min(flags) < 0 or (args.every is not None and args.every <= 0):
        log.error(
            "--max-moves, --tolerance, --write-cost and --memory-slack must be >= 0, --every > 0"
        )
        return 2
    admin = ClusterAdmin(store.redis_url, store.redis_prefix)  # not a cluster: exit 1
    try:
        if args.every is None:
            return _rebalance_round(admin, args)
        from prometheus_client import start_http_server

        from storage import metrics

        start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info(
            "rebalancing every %g s; metrics on http://%s:%d/metrics",
            args.every, settings.metrics_host, settings.metrics_port,
        )  # fmt: skip
        stop = threading.Event()
        _stop_on_signals(stop)
        while not stop.is_set():
            try:  # a cluster that is down or changing now may be fine at the next round
                admin.refresh()
                _rebalance_round(admin, args)
            except StoreError as e:
                metrics.REBALANCE_ROUNDS.labels("failed").inc()
                log.error("rebalance round failed: %s: %s", type(e).__name__, e)
            stop.wait(args.every)
        return 0
    finally:
        admin.close()


def _rebalance_round(admin: ClusterAdmin, args: argparse.Namespace) -> int:
    """One plan (printed as a JSON line) and, with --apply, its moves."""
    from storage import metrics
    from storage.rebalance import plan_moves, plan_report

    open_migrations = [
        {"slot": slot, "from": source.address, "to": target.address}
        for slot, source, target in admin.open_migrations
    ]
    if open_migrations and args.apply:  # a move left half done: finish it first
        admin.finish_open_migrations()
    elif open_migrations:
        log.warning(
            "%d slots are left half-migrated (%s): --apply finishes them first",
            len(open_migrations), ", ".join(str(m["slot"]) for m in open_migrations),
        )  # fmt: skip
    rates, reporters = admin.traffic()
    if not reporters:
        metrics.REBALANCE_ROUNDS.labels("no_reports").inc()
        log.error(
            "no store with prefix %r reports its traffic: none runs against this cluster "
            "(stores report every 10 s)",
            admin.prefix,
        )
        return 1
    plan = plan_moves(
        rates[0] + args.write_cost * rates[1],
        admin.memory(),
        admin.owner,
        len(admin.masters),
        max_moves=args.max_moves,
        tolerance=args.tolerance,
        memory_slack=args.memory_slack,
    )
    report = plan_report(admin.masters, plan, reporters)
    print(json.dumps({**report, "open_migrations": open_migrations}), flush=True)
    metrics.REBALANCE_IMBALANCE.labels("before").set(plan.imbalance_before)
    metrics.REBALANCE_IMBALANCE.labels("after").set(plan.imbalance_after)
    if args.apply and plan.moves:
        keys = admin.apply(plan.moves)
        metrics.REBALANCE_SLOTS_MOVED.inc(len(plan.moves))
        metrics.REBALANCE_ROUNDS.labels("applied").inc()
        log.info(
            "moved %d slots (%d keys); load imbalance %.3f -> %.3f (planned)",
            len(plan.moves), keys, plan.imbalance_before, plan.imbalance_after,
        )  # fmt: skip
    else:
        metrics.REBALANCE_ROUNDS.labels("planned").inc()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec",
        description="Continual-learning recommendation: stream -> trainer -> store -> API.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            help="TOML settings file (Kafka, Redis, features, ...); default: embedded",
        )
        p.add_argument("--data-dir", type=Path, help="RocksDB and datasets (store.data_dir)")
        p.add_argument(
            "--arm",
            help="act as this experiment arm: its store, trainer settings and consumer "
            "group (see README: Experiments)",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--source",
            help="embedded source: auto, synthetic, movielens-100k or jsonl:PATH (default auto)",
        )
        p.add_argument("--max-events", type=int, help="stop the source after this many events")
        p.add_argument(
            "--rate",
            type=float,
            help="embedded source: events per second (default: as fast as training goes)",
        )

    run = sub.add_parser(
        "run",
        help="train and serve in one process (embedded default: no Kafka or Redis needed)",
    )
    common(run)
    training(run)
    run.add_argument("--host", help="bind address (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="HTTP port (default 8000)")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="run the streaming trainer (Kafka with --config)")
    common(train)
    training(train)
    train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="serve predictions from the store")
    common(serve)
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument(
        "--workers", type=int, help="uvicorn worker processes, metrics summed (default 1)"
    )
    serve.set_defaults(func=cmd_serve)

    replay = sub.add_parser("replay", help="produce a source's events to Kafka")
    common(replay)
    replay.add_argument(
        "--source",
        default="synthetic",
        help="synthetic, movielens-100k or jsonl:PATH (default synthetic)",
    )
    replay.add_argument("--rate", type=float, default=0, help="events per second (0: unlimited)")
    replay.add_argument("--topic", help="Kafka topic (default log.topic)")
    replay.add_argument("--bootstrap-servers", help="Kafka address (default log.bootstrap_servers)")
    replay.add_argument("--max-events", type=int, help="stop after this many events")
    replay.set_defaults(func=cmd_replay)

    fetch = sub.add_parser("fetch", help="fetch a dataset (movielens-100k) into the data dir")
    common(fetch)
    fetch.add_argument("dataset", choices=["movielens-100k"])
    fetch.add_argument(
        "--from",
        dest="source_path",
        type=Path,
        help="the official ml-100k.zip or an unpacked folder (default: from PyPI's recbole wheel)",
    )
    fetch.set_defaults(func=cmd_fetch)

    snap = sub.add_parser(
        "snapshot",
        help="export rows, dense weights and stream position as of the last flush "
        "(safe while a trainer runs)",
    )
    common(snap)
    snap.add_argument("directory", type=Path, help="where to write it (must not exist)")
    snap.set_defaults(func=cmd_snapshot)

    restore = sub.add_parser(
        "restore", help="load a snapshot into an empty store; a trainer then resumes from it"
    )
    common(restore)
    restore.add_argument("directory", type=Path, help="a directory written by `snapshot`")
    restore.add_argument(
        "--force", action="store_true", help="delete the store's rows first if it is not empty"
    )
    restore.add_argument(
        "--rows-only",
        action="store_true",
        help="restore the rows and the position but not the dense weights (for a "
        "trainer.model other than the snapshot's; its trainer starts them afresh)",
    )
    restore.set_defaults(func=cmd_restore)

    check = sub.add_parser(
        "check",
        help="check what the settings name (feature spec, Kafka topics, Redis and its "
        "settings, RocksDB) and report every problem; exit 1 if one fails",
    )
    common(check)
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.set_defaults(func=cmd_check)

    rebalance = sub.add_parser(
        "rebalance",
        help="move Redis Cluster hash slots so the load the stores measure evens out "
        "(prints the plan as JSON; --apply carries it out)",
    )
    common(rebalance)
    rebalance.add_argument("--apply", action="store_true", help="move the slots (default: plan)")
    rebalance.add_argument(
        "--max-moves", type=int, default=64, help="slots moved at most (default 64)"
    )
    rebalance.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="stop once every master is within this share of the mean load (default 0.05)",
    )
    rebalance.add_argument(
        "--write-cost",
        type=float,
        default=1.0,
        help="what a row written costs, a row read costing 1 (default 1)",
    )
    rebalance.add_argument(
        "--memory-slack",
        type=float,
        default=0.1,
        help="a move may take a master's memory to (1 + this) x the mean, or to the "
        "largest now if that is more (default 0.1)",
    )
    rebalance.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="plan (and with --apply, move) again every SECONDS until stopped, with "
        "/metrics on metrics_port (default: once)",
    )
    rebalance.set_defaults(func=cmd_rebalance)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kafka-python logs every connection at INFO and warns about its own slow tasks.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    # While a broker is down it warns ten times a second that no node is available.
    logging.getLogger("kafka.cluster").setLevel(logging.ERROR)
    from storage.base import StoreError
    from streaming.log import LogUnavailable

    try:
        code: int = args.func(args)
    except (ConfigError, ValidationError) as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    except (StoreError, LogUnavailable) as exc:  # at start: a service it needs is not there
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
