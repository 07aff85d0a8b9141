"""Helpers shared by the benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_redis(settings: Mapping[str, str], log: Callable[[str], None]) -> Iterator[str]:
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
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
