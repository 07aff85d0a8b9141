"""Helpers shared by the benchmarks."""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import redis

LISTPACK_SETTINGS = {"hash-max-listpack-entries": "512", "hash-max-listpack-value": "1024"}
"""What ``storage.redis_tier`` asks Redis for (``deploy/local/services.sh`` sets it too)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis(
    log: Callable[[str], None], settings: Mapping[str, str] = LISTPACK_SETTINGS
) -> Iterator[str]:
    """A throwaway redis-server (no persistence, ``settings`` as extra config) on a free
    loopback port; its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not on PATH; install it or pass --redis-url")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", workdir, "--daemonize", "no", "--loglevel", "warning"]
    for name, value in settings.items():
        args += [f"--{name}", value]
    log_path = Path(workdir) / "redis.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = log_path.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"private redis-server did not start: {err}") from None
                time.sleep(0.05)
        client.close()
        log(f"private redis-server (pid {proc.pid}) at {url}")
        yield url
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float = 15) -> None:
    """Terminate ``proc``, killing it if it does not exit within ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def private_redis_cluster(log: Callable[[str], None], masters: int = 3) -> Iterator[str]:
    """A throwaway Redis Cluster of ``masters`` masters on free loopback ports
    (``deploy/local/redis_cluster.py``); its first master's URL."""
    path = Path(__file__).resolve().parents[1] / "deploy" / "local" / "redis_cluster.py"
    spec = importlib.util.spec_from_file_location("redis_cluster", path)
    assert spec is not None and spec.loader is not None
    cluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cluster)
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-cluster-"))
    try:
        url: str = cluster.start(workdir, cluster.free_ports(masters))
        log(f"private Redis Cluster ({masters} masters) at {url}")
        yield url
    finally:
        cluster.stop(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
