"""Child processes that talk over their stdin and stdout (the service's read processes,
the trainer's decode workers; here at the bottom of the import graph so both can use it).

A child is ``python -m <module>`` with the parent's import path, so it imports only that
module (not the parent's main module, as ``multiprocessing`` would), and it ends when
its stdin closes: when the parent stops it or dies, however. It runs in a process group
of its own, so Ctrl-C at a terminal (SIGINT to the foreground group) reaches only the
parent, which stops its children in order instead of losing them mid-answer. Messages
are length-prefixed bytes (``multiprocessing.connection.Connection``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from multiprocessing.connection import Connection


class PipeChild:
    """One running ``python -m module``. ``send`` raises ``OSError`` and ``receive``
    ``EOFError`` or ``OSError`` once the child is gone; starting raises ``OSError``."""

    def __init__(self, module: str) -> None:
        path = [p or os.getcwd() for p in sys.path]  # the same imports as the parent's
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            process_group=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._to = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self._from = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()

    def send(self, data: bytes) -> None:
        self._to.send_bytes(data)

    def poll(self, timeout_s: float) -> bool:
        """Whether a message arrives within ``timeout_s``."""
        return self._from.poll(timeout_s)

    def receive(self) -> bytes:
        return self._from.recv_bytes()

    def stop(self, *, kill: bool = False) -> None:
        self._to.close()  # the child reads the end of its input and exits
        self._from.close()
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def parent_pipes() -> tuple[Connection, Connection]:
    """In the child: the parent's messages and the connection to answer on. Stray
    prints go to stderr, so they cannot corrupt the answers."""
    requests = Connection(os.dup(0), writable=False)
    answers = Connection(os.dup(1), readable=False)
    sys.stdout = sys.stderr
    return requests, answers
