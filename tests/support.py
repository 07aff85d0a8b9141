"""Helpers shared by the tests that start streamrec processes."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base_url: str, timeout_s: float = 60.0) -> bool:
    """Poll ``/readyz`` until it answers 200 or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/readyz").status_code == 200:
                return True
        time.sleep(0.5)
    return False


def new_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """Create a topic with a unique name on the test broker."""
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"{prefix}-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    admin.close()
    return topic


def restart_service(name: str) -> str:
    """Restart the local Kafka or Redis (``deploy/local/services.sh restart-NAME``, with
    this process's environment: the same ports as the test fixtures); returns its output."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "deploy" / "local" / "services.sh"
    proc = subprocess.run(
        ["bash", str(script), f"restart-{name}"],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"restart-{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout
