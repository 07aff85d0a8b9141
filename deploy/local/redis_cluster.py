"""A local Redis Cluster on loopback: several ``redis-server`` masters, no replicas.

For trying streamrec's Redis hot tier on a cluster, and for the tests that do (a
session fixture in ``tests/conftest.py``). Usage::

    python deploy/local/redis_cluster.py start [--dir DIR] [--ports 17000 17001 17002]
    python deploy/local/redis_cluster.py add-master [--dir DIR] [--port 17003]
    python deploy/local/redis_cluster.py rebalance [--dir DIR]
    python deploy/local/redis_cluster.py stop [--dir DIR]

``start`` prints the URL of the first master (``redis://127.0.0.1:17000/0``): point
``store.redis_url`` at it; the store finds the other masters itself. The 16384 hash
slots are split evenly over the masters (``CLUSTER ADDSLOTSRANGE``), the masters meet,
and ``start`` returns once every one reports ``cluster_state:ok``. ``add-master``
joins one more, empty master (on a free port unless ``--port`` names one) and
``rebalance`` moves slots to it (``redis-cli --cluster rebalance``): a scale-out that
running trainers and services follow without a restart. No persistence: a
stopped cluster is gone. Needs ``redis-server`` 7.0+ on PATH (Debian's
``redis-server``, as ``deploy/local/services.sh`` installs) and the ``redis`` package.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

SLOTS = 16384
DEFAULT_PORTS = (17000, 17001, 17002)
DEFAULT_DIR = Path.home() / ".cache" / "streamrec" / "services" / "redis-cluster"
# What the hot tier needs from every master (see storage/redis_tier.py, Memory).
SETTINGS = ("--hash-max-listpack-entries", "512", "--hash-max-listpack-value", "1024")


def command(client: redis.Redis, *args: object) -> Any:
    """``client.execute_command`` (which redis-py leaves untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def free_ports(count: int, first: int = 21000) -> list[int]:
    """``count`` loopback ports that are free, each with its cluster bus port (+10000)."""
    ports: list[int] = []
    for port in range(first, 30000, 7):
        if len(ports) == count:
            break
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        ports.append(port)
    return ports


def start(workdir: Path, ports: Sequence[int] = DEFAULT_PORTS, timeout: float = 30.0) -> str:
    """Start the masters on ``ports`` (state and logs in ``workdir``, emptied first) and
    join them into one cluster; the first master's URL."""
    stop(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    for port in ports:
        node_dir = workdir / str(port)
        node_dir.mkdir(exist_ok=True)
        for old in node_dir.iterdir():  # a fresh cluster: no nodes.conf of an old one
            old.unlink()
        _spawn(node_dir, port)
    clients = [_connect(workdir, port, deadline) for port in ports]
    per = SLOTS // len(ports)
    for i, client in enumerate(clients):
        last = SLOTS - 1 if i == len(ports) - 1 else (i + 1) * per - 1
        command(client, "CLUSTER", "ADDSLOTSRANGE", i * per, last)
    for port in ports[1:]:
        command(clients[0], "CLUSTER", "MEET", "127.0.0.1", port)
    _wait_ok(clients, deadline)
    return f"redis://127.0.0.1:{ports[0]}/0"


def restart(workdir: Path, port: int, timeout: float = 30.0) -> None:
    """Stop the master on ``port`` and start it again, empty (no persistence): it
    rejoins with its slots (its ``nodes.conf`` is kept), as a crashed master would."""
    node_dir = workdir / str(port)
    _stop_node(node_dir / "redis.pid")
    _spawn(node_dir, port)
    deadline = time.monotonic() + timeout
    _wait_ok([_connect(workdir, p, deadline) for p in _running(workdir)], deadline)


def add_replica(workdir: Path, master_port: int, port: int, timeout: float = 30.0) -> None:
    """Start a replica of the master on ``master_port`` on ``port``; returns once it
    has the master's data (``master_link_status:up``)."""
    node_dir = workdir / str(port)
    node_dir.mkdir(parents=True, exist_ok=True)
    _spawn(node_dir, port)
    deadline = time.monotonic() + timeout
    replica = _connect(workdir, port, deadline)
    master = _connect(workdir, master_port, deadline)
    try:
        master_id = command(master, "CLUSTER", "MYID").decode()
        command(replica, "CLUSTER", "MEET", "127.0.0.1", master_port)
        while master_id.encode() not in command(replica, "CLUSTER", "NODES"):
            _until(deadline, "the replica never met its master")
        command(replica, "CLUSTER", "REPLICATE", master_id)
        while replica.info("replication").get("master_link_status") != "up":
            _until(deadline, "the replica never synced")
    finally:
        replica.close()
        master.close()


def add_master(workdir: Path, port: int, timeout: float = 30.0) -> None:
    """Start an empty master on ``port`` and join it to the cluster; returns once every
    running node knows it. It serves no slots until ``rebalance`` moves some to it."""
    node_dir = workdir / str(port)
    node_dir.mkdir(parents=True, exist_ok=True)
    for old in node_dir.iterdir():
        old.unlink()
    ports = _running(workdir)
    _spawn(node_dir, port)
    deadline = time.monotonic() + timeout
    new = _connect(workdir, port, deadline)
    clients = [_connect(workdir, p, deadline) for p in ports]
    try:
        new_id = command(new, "CLUSTER", "MYID")
        command(new, "CLUSTER", "MEET", "127.0.0.1", ports[0])
        while not all(new_id in command(c, "CLUSTER", "NODES") for c in clients):
            _until(deadline, f"the cluster never met the master on {port}")
        _wait_ok([new, *clients], deadline)
    finally:
        for client in (new, *clients):
            client.close()


def rebalance(workdir: Path) -> None:
    """Spread the hash slots evenly over every master, empty ones included, moving their
    keys while clients go on using them (``redis-cli --cluster rebalance
    --cluster-use-empty-masters``: slot by slot, ``MIGRATE`` in batches)."""
    address = f"127.0.0.1:{_running(workdir)[0]}"
    args = ["--cluster", "rebalance", address, "--cluster-use-empty-masters"]
    done = subprocess.run(["redis-cli", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0 or "[ERR]" in done.stdout:
        raise RuntimeError(f"redis-cli {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def _running(workdir: Path) -> list[int]:
    """The ports of the nodes started in ``workdir`` that have not been stopped."""
    return sorted(int(d.name) for d in workdir.iterdir() if (d / "redis.pid").exists())


def kill(workdir: Path, port: int, *, hard: bool = False) -> None:
    """Stop the node on ``port`` for good (as a crashed host; ``hard``: ``SIGKILL``,
    no shutdown at all)."""
    _stop_node(workdir / str(port) / "redis.pid", hard=hard)


def take_over(workdir: Path, replica_port: int, timeout: float = 30.0) -> None:
    """Promote the replica on ``replica_port`` in place of its (dead) master
    (``CLUSTER FAILOVER TAKEOVER``); returns once it serves the slots and every
    running node reports ``cluster_state:ok``."""
    deadline = time.monotonic() + timeout
    replica = _connect(workdir, replica_port, deadline)
    try:
        command(replica, "CLUSTER", "FAILOVER", "TAKEOVER")
        while replica.info("replication").get("role") != "master":
            _until(deadline, "the replica never took over")
    finally:
        replica.close()
    _wait_ok([_connect(workdir, p, deadline) for p in _running(workdir)], deadline)


def _until(deadline: float, what: str) -> None:
    if time.monotonic() > deadline:
        raise RuntimeError(what)
    time.sleep(0.05)


def _spawn(node_dir: Path, port: int) -> None:
    with (node_dir / "redis.log").open("ab") as log:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--save", "", "--appendonly", "no", "--daemonize", "no", *SETTINGS],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    (node_dir / "redis.pid").write_text(str(proc.pid))


def _connect(
    workdir: Path, port: int, deadline: float, client: redis.Redis | None = None
) -> redis.Redis:
    """A client of the server on ``port`` (``client``, default a plain one) once it
    answers PING."""
    client = client or redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    while True:
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                log_tail = (workdir / str(port) / "redis.log").read_text()[-2000:]
                raise RuntimeError(
                    f"redis-server on port {port} did not start: {log_tail}"
                ) from None
            time.sleep(0.05)


def _wait_ok(clients: Sequence[redis.Redis], deadline: float) -> None:
    """Until every master reports ``cluster_state:ok``; closes the clients."""
    try:
        while not all(b"cluster_state:ok" in command(c, "CLUSTER", "INFO") for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("Redis Cluster not ok in time")
            time.sleep(0.1)
    finally:
        for client in clients:
            client.close()


def stop(workdir: Path) -> None:
    """Stop the masters started in ``workdir`` (none running: nothing to do)."""
    if workdir.is_dir():
        for pid_file in workdir.glob("*/redis.pid"):
            _stop_node(pid_file)


def _stop_node(pid_file: Path, *, hard: bool = False) -> None:
    pid = int(pid_file.read_text())
    try:
        Path(f"/proc/{pid}/cmdline").read_bytes().index(b"redis-server")
    except (OSError, ValueError):  # gone, or the PID is someone else's now
        pid_file.unlink()
        return
    os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink()


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "add-master", "rebalance"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--ports", type=int, nargs="+", default=list(DEFAULT_PORTS))
    parser.add_argument("--port", type=int, help="add-master: its port (default: a free one)")
    parser.add_argument(
        "--free-ports", type=int, metavar="N", help="N masters on free ports instead of --ports"
    )
    args = parser.parse_args(argv)
    if args.command == "start":
        print(start(args.dir, free_ports(args.free_ports) if args.free_ports else args.ports))
    elif args.command == "add-master":
        port = args.port or free_ports(1, first=max(_running(args.dir)) + 1)[0]
        add_master(args.dir, port)
        print(f"redis://127.0.0.1:{port}/0")
    elif args.command == "rebalance":
        rebalance(args.dir)
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
