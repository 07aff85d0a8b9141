"""A read-only store in a child process.

Reading a few hundred keys from the tiered store is a few milliseconds of Python
(building the Redis commands, parsing the replies, unpacking rows, the RocksDB
multi-get of the Redis misses), all under the reading process's GIL. A serving process,
whose event loop is busy with requests, gets that time back by reading through a
``ReadProcess``: a child process with its own read-only view of the same store. The
caller sends the keys and takes the rows back over a pipe (pickled numpy arrays) and
waits without holding the GIL, while the child's Python runs on another core.

The child is ``python -m storage.read_process`` talking over its stdin and stdout
(``storage.pipes``), so it imports only the storage package, and it ends when its stdin
closes: when the caller closes it or dies, however.
Its RocksDB secondary instance lives in a directory the caller creates and removes.
"""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from storage.base import Keys, LookupResult, StoreError, TableConfig
from storage.config import StoreConfig
from storage.pipes import PipeChild, parent_pipes

_START_TIMEOUT_S = 60.0


class ReadProcessDied(StoreError):
    """The child's pipe closed or it did not start: the process is gone."""


class _Child(PipeChild):
    """One running ``python -m storage.read_process``."""

    def __init__(self, init: bytes) -> None:
        self.secondary = tempfile.mkdtemp(prefix="streamrec-read-process-")
        try:
            super().__init__("storage.read_process")
        except OSError as exc:
            shutil.rmtree(self.secondary, ignore_errors=True)
            raise ReadProcessDied(f"cannot start a read process: {exc}") from None
        try:
            self.send(init + b"\n" + self.secondary.encode())
            if not self.poll(_START_TIMEOUT_S):
                raise ReadProcessDied(f"no answer within {_START_TIMEOUT_S:.0f} s")
            self.answer()  # "ready", or the error that kept it from opening the store
        except BaseException:
            self.stop(kill=True)
            raise

    def ask(self, data: bytes) -> Any:
        try:
            self.send(data)
        except OSError as exc:
            raise ReadProcessDied(f"read process {self.proc.pid}: {exc}") from None
        return self.answer()

    def answer(self) -> Any:
        try:
            status, payload = pickle.loads(self.receive())
        except (EOFError, OSError) as exc:
            raise ReadProcessDied(
                f"read process {self.proc.pid} ended (exit code {self.proc.poll()}): "
                f"{exc or 'end of its output'}"
            ) from None
        if status == "error":
            raise payload
        return payload

    def stop(self, *, kill: bool = False) -> None:
        super().stop(kill=kill)
        shutil.rmtree(self.secondary, ignore_errors=True)


class ReadProcess:
    """``lookup_tables`` of a read-only store opened from ``config`` and ``tables`` in a
    child process (see the module docstring). One read at a time (callers wait their
    turn). ``start`` runs the child; a read raises ``ReadProcessDied`` when there is no
    child or it died, and the store's own errors (``StoreUnavailable``, ...) as they are.
    """

    def __init__(self, config: StoreConfig, tables: Sequence[TableConfig]) -> None:
        self._init = json.dumps(
            {
                "store": config.model_dump(mode="json"),
                "tables": [t.model_dump(mode="json") for t in tables],
            }
        ).encode()
        self._child: _Child | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._child is not None

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.proc.pid if child is not None else None

    def start(self) -> None:
        """Run a child (if none runs) and wait until it has opened the store; raises
        ``ReadProcessDied`` or the error that kept the child from opening it."""
        with self._lock:
            if self._child is None:
                self._child = _Child(self._init)

    def lookup_tables(self, keys: Mapping[str, Keys]) -> dict[str, LookupResult]:
        """``TieredStore.lookup_tables`` in the child."""
        with self._lock:
            child = self._child
            if child is None:
                raise ReadProcessDied("no read process is running")
            try:
                got = child.ask(pickle.dumps(dict(keys), protocol=pickle.HIGHEST_PROTOCOL))
            except ReadProcessDied:
                self._child = None
                child.stop(kill=True)
                raise
        return {table: LookupResult(rows, found) for table, (rows, found) in got.items()}

    def close(self) -> None:
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.stop()


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (the caller re-raises it), else its text."""
    try:
        back: BaseException = pickle.loads(pickle.dumps(exc))
    except Exception:
        return StoreError(f"{type(exc).__name__}: {exc}")
    return back


def _serve() -> None:
    """The child: the store's settings, then key batches, each answered in order with
    ``("ok", {table: (rows, found)})`` or ``("error", exception)``; ends at the end of
    its input."""
    from storage.factory import open_store  # here: the parent never needs it

    requests, answers = parent_pipes()
    init, secondary = requests.recv_bytes().rsplit(b"\n", 1)
    settings = json.loads(init)
    try:
        store = open_store(
            StoreConfig.model_validate(settings["store"]),
            [TableConfig.model_validate(t) for t in settings["tables"]],
            read_only=True,
            secondary_path=secondary.decode(),
        )
    except Exception as exc:
        answers.send_bytes(pickle.dumps(("error", _portable(exc))))
        return
    answers.send_bytes(pickle.dumps(("ready", None)))
    try:
        while True:
            try:
                keys = pickle.loads(requests.recv_bytes())
            except (EOFError, OSError):  # the caller closed us or is gone
                return
            answer: tuple[str, Any]
            try:
                found = store.lookup_tables(keys)
                answer = ("ok", {t: (r.rows, r.found) for t, r in found.items()})
            except Exception as exc:
                answer = ("error", _portable(exc))
            try:
                answers.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:
                return
    finally:
        store.close()


if __name__ == "__main__":
    # Run the imported module's copy, so errors pickle as storage.read_process classes.
    from storage.read_process import _serve as serve

    serve()
