"""A local Redis under Sentinel on loopback: a master, its replicas and the sentinels
that watch them and promote a replica when the master dies.

For trying streamrec's Redis hot tier with failover, and for the tests that do.
Usage::

    python deploy/local/redis_sentinel.py start [--dir DIR] [--replicas 2] [--sentinels 3]
                                              [--tls CERT KEY]
    python deploy/local/redis_sentinel.py kill-master [--dir DIR]
    python deploy/local/redis_sentinel.py stop [--dir DIR]

``start`` prints the URL to point ``store.redis_url`` at
(``redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/streamrec/0``) and returns
once the replicas are in sync and every sentinel knows the replicas and the other
sentinels (so a failover can be agreed on). The sentinels deem a master down after
1 s without an answer (``down-after-milliseconds``) and need ``sentinels // 2 + 1`` of
them to agree. ``kill-master`` kills the current master (as a crashed host) and
returns once the sentinels name a promoted replica. No persistence: a stopped group is
gone. ``--tls CERT KEY`` makes every server and sentinel speak only TLS (the
certificate, which must name 127.0.0.1, is its own CA): the URL is then
``rediss+sentinel://...?ssl_ca_certs=CERT``. Needs ``redis-server`` 7.0+ on PATH
(Debian's ``redis-server``, as ``deploy/local/services.sh`` installs) and the ``redis``
package.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis_cluster as cluster
from redis_cluster import SETTINGS, _until, command, free_ports, kill, stop

SERVICE = "streamrec"
DEFAULT_DIR = Path.home() / ".cache" / "streamrec" / "services" / "redis-sentinel"
DOWN_AFTER_MS = 1000


def start(
    workdir: Path,
    replicas: int = 2,
    sentinels: int = 3,
    timeout: float = 60.0,
    tls: tuple[Path, Path] | None = None,
) -> str:
    """Start a master with ``replicas`` and ``sentinels`` on free ports (state and logs
    in ``workdir``, emptied first); the Sentinel URL of the master. ``tls``: a
    certificate and its key; every server and sentinel then speaks only TLS, the
    certificate being its own CA (it must name 127.0.0.1)."""
    stop(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tls").write_text("\n".join(map(str, tls or ())))
    deadline = time.monotonic() + timeout
    master, *replica_ports = free_ports(1 + replicas)
    sentinel_ports = free_ports(sentinels, first=max(master, *replica_ports) + 7)
    _spawn(workdir, master)
    for port in replica_ports:
        _spawn(workdir, port, "--replicaof", "127.0.0.1", str(master))
    for port in replica_ports:
        with _connect(workdir, port, deadline) as replica:
            while replica.info("replication").get("master_link_status") != "up":
                _until(deadline, f"the replica on {port} never synced")
    quorum = sentinels // 2 + 1
    for port in sentinel_ports:
        node_dir = workdir / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        listen = "".join(f"{option} {value}\n" for option, value in _listen(workdir, port))
        (node_dir / "sentinel.conf").write_text(
            f"{listen}bind 127.0.0.1\ndir {node_dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        _spawn(workdir, port, "--sentinel", config=node_dir / "sentinel.conf")
    for port in sentinel_ports:
        with _connect(workdir, port, deadline) as sentinel:
            while (
                len(command(sentinel, "SENTINEL", "REPLICAS", SERVICE)) < replicas
                or len(command(sentinel, "SENTINEL", "SENTINELS", SERVICE)) < sentinels - 1
            ):
                _until(deadline, f"the sentinel on {port} never met the group")
    (workdir / "sentinels").write_text(" ".join(map(str, sentinel_ports)))
    hosts = ",".join(f"127.0.0.1:{port}" for port in sentinel_ports)
    if tls:
        return f"rediss+sentinel://{hosts}/{SERVICE}/0?ssl_ca_certs={tls[0]}"
    return f"redis+sentinel://{hosts}/{SERVICE}/0"


def _listen(workdir: Path, port: int) -> list[tuple[str, str]]:
    """Where a server or sentinel listens: ``port``; with TLS, only TLS there (no plain
    port), TLS between servers and sentinels too, no certificate asked of clients."""
    tls = _tls(workdir)
    if tls is None:
        return [("port", str(port))]
    cert, key = map(str, tls)
    return [
        ("port", "0"), ("tls-port", str(port)), ("tls-cert-file", cert),
        ("tls-key-file", key), ("tls-ca-cert-file", cert), ("tls-auth-clients", "no"),
        ("tls-replication", "yes"),
    ]  # fmt: skip


def _tls(workdir: Path) -> tuple[Path, Path] | None:
    lines = (workdir / "tls").read_text().split("\n")
    return (Path(lines[0]), Path(lines[1])) if len(lines) == 2 else None


def _client(workdir: Path, port: int, timeout: float = 5.0) -> redis.Redis:
    tls = _tls(workdir)
    if tls is None:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout)
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, ssl=True, ssl_ca_certs=str(tls[0])
    )


def _connect(workdir: Path, port: int, deadline: float) -> redis.Redis:
    """A client of the server or sentinel on ``port`` (over TLS if the group speaks
    it) once it answers PING."""
    return cluster._connect(workdir, port, deadline, _client(workdir, port))


def sentinel_ports(workdir: Path) -> list[int]:
    """The sentinels' ports."""
    return [int(p) for p in (workdir / "sentinels").read_text().split()]


def master_port(workdir: Path) -> int:
    """The port of the master the first sentinel that answers names."""
    return _named_masters(workdir)[0]


def _named_masters(workdir: Path) -> list[int]:
    """The master's port as each sentinel that answers names it."""
    ports = []
    for port in sentinel_ports(workdir):
        try:
            with _client(workdir, port, timeout=2) as sentinel:
                _, master = command(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                ports.append(int(master))
        except redis.ConnectionError:
            continue
    if not ports:
        raise RuntimeError("no sentinel answers")
    return ports


def kill_master(workdir: Path, timeout: float = 60.0) -> int:
    """Kill the master (``SIGKILL``, for good); returns the port of the replica the
    sentinels promote, once every sentinel names it and it reports itself a master."""
    old = master_port(workdir)
    kill(workdir, old, hard=True)
    deadline = time.monotonic() + timeout
    while len(named := set(_named_masters(workdir))) != 1 or old in named:
        _until(deadline, "the sentinels never agreed on a promoted replica")
    (new,) = named
    with _connect(workdir, new, deadline) as promoted:
        while promoted.info("replication").get("role") != "master":
            _until(deadline, "the promoted replica never became a master")
    return new


def _spawn(workdir: Path, port: int, *args: str, config: Path | None = None) -> None:
    node_dir = workdir / str(port)
    node_dir.mkdir(parents=True, exist_ok=True)
    listen = [arg for option, value in _listen(workdir, port) for arg in (f"--{option}", value)]
    server = [str(config)] if config else [
        *listen, "--bind", "127.0.0.1", "--dir", str(node_dir),
        "--save", "", "--appendonly", "no", *SETTINGS,
    ]  # fmt: skip
    with (node_dir / "redis.log").open("ab") as log:
        proc = subprocess.Popen(
            ["redis-server", *server, *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    (node_dir / "redis.pid").write_text(str(proc.pid))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "kill-master"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--sentinels", type=int, default=3)
    parser.add_argument("--tls", type=Path, nargs=2, metavar=("CERT", "KEY"))
    args = parser.parse_args(argv)
    if args.command == "start":
        print(start(args.dir, args.replicas, args.sentinels, tls=args.tls))
    elif args.command == "kill-master":
        print(f"promoted: 127.0.0.1:{kill_master(args.dir)}")
    else:
        stop(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
