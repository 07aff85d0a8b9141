"""Decoding polled records into model inputs, in the trainer's thread or in worker
processes.

Parsing and validating JSON events and hashing their ids take about a third of an
embedded trainer's main thread, and Python runs them under the GIL, so a thread would
not overlap them with training. ``decode_workers = N`` (N >= 1) runs them in N worker
processes instead: the trainer sends each batch's raw record values to a worker (round
robin) and takes the results back in the order it sent them, while it trains on earlier
batches. The result is the same as decoding in the trainer's thread
(``decode_workers = 0``): same function, same order.

A worker is ``python -m trainer.decoding``, talking over its stdin and stdout, so it
imports only the decoding code (not the trainer's main module, as ``multiprocessing``
would), and it ends when the trainer does, however that ends: its stdin closes. A worker
that dies (killed, out of memory) costs no records: the trainer decodes its batches
itself, starts a new one and counts ``streamrec_trainer_decode_worker_failures_total``.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from storage.pipes import PipeChild, parent_pipes
from streaming.events import BadEvent, decode_events
from streaming.log import Record
from streaming.spec import FeatureSpec
from trainer import metrics
from trainer.encoding import EncodedBatch, concat_batches, encode

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DecodedChunk:
    """One batch of records decoded: the good events' labels and encoded inputs, in
    order, and ``(index in the batch, reason, detail)`` of each bad one."""

    labels: npt.NDArray[np.float32]
    encoded: EncodedBatch
    bad: list[tuple[int, str, str]]

    @property
    def size(self) -> int:
        return len(self.labels)


def decode_chunk(values: Sequence[bytes], spec: FeatureSpec) -> DecodedChunk:
    """Decode, validate and encode a batch of record values."""
    decoded = decode_events(values, spec)
    good = [e for e in decoded if not isinstance(e, BadEvent)]
    bad = [(i, e.reason, e.detail) for i, e in enumerate(decoded) if isinstance(e, BadEvent)]
    labels = np.fromiter((e.label for e in good), dtype=np.float32, count=len(good))
    encoded = encode([e.features for e in good], [e.dense for e in good], spec)
    return DecodedChunk(labels, encoded, bad)


def merge_chunks(chunks: Sequence[DecodedChunk]) -> DecodedChunk:
    """Decoded runs of records, one after another, as one chunk."""
    if len(chunks) == 1:
        return chunks[0]
    bad: list[tuple[int, str, str]] = []
    start = 0
    for chunk in chunks:
        bad.extend((start + i, reason, detail) for i, reason, detail in chunk.bad)
        start += chunk.size + len(chunk.bad)
    labels = np.concatenate([c.labels for c in chunks])
    return DecodedChunk(labels, concat_batches([c.encoded for c in chunks]), bad)


class WorkerDied(Exception):
    """A decode worker's pipe closed: the process is gone."""


class _Worker(PipeChild):
    """One ``python -m trainer.decoding`` process; answers requests in order."""

    def __init__(self, spec: FeatureSpec) -> None:
        super().__init__("trainer.decoding")
        self.sent = 0  # requests not answered yet
        self.stale = 0  # of those, answers nobody waits for any more (see `Decoder.clear`)
        self.dead = False
        try:
            self.request(spec.model_dump_json().encode(), counted=False)
        except WorkerDied:
            self.stop(kill=True)
            raise

    def request(self, data: bytes, *, counted: bool = True) -> None:
        try:
            self.send(data)
        except OSError as exc:
            raise WorkerDied(str(exc)) from None
        self.sent += counted

    def answer(self, wait_s: float | None) -> DecodedChunk | None:
        """The answer to the oldest request nobody gave up on; None if it takes longer
        than ``wait_s``."""
        try:
            while True:
                if wait_s is not None and not self.poll(wait_s):
                    return None
                data = self.receive()
                self.sent -= 1
                if not self.stale:
                    chunk: DecodedChunk = pickle.loads(data)
                    return chunk
                self.stale -= 1
        except (EOFError, OSError) as exc:
            raise WorkerDied(str(exc) or "end of its output") from None

    def stop(self, *, kill: bool = False) -> None:
        self.dead = True
        super().stop(kill=kill)


class Decoder:
    """Decodes batches of records in submission order: ``feed`` it each poll's records,
    ``submit`` them as a batch, then ``take`` the oldest batch's result (waiting for it if
    asked). ``workers = 0`` decodes each poll as it is fed, in the trainer's thread (in
    small steps between polls, as the Kafka client's own thread needs the GIL too)."""

    def __init__(self, spec: FeatureSpec, workers: int) -> None:
        self.spec = spec
        self.workers = workers
        self._pool: list[_Worker | None] = [None] * workers
        self._next = 0
        self._queue: deque[tuple[list[Record], _Worker | DecodedChunk]] = deque()
        self._fed: list[DecodedChunk] = []  # workers = 0: the polls of the next batch
        self.records = 0  # submitted, not taken yet

    def __len__(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Start the workers now, not at the first batch; workers that cannot start leave
        the decoding to the trainer's thread, with a warning."""
        for i in range(self.workers):
            try:
                worker = self._worker(i)
                worker.request(pickle.dumps([]))
                if worker.answer(_START_TIMEOUT_S) is None:
                    raise WorkerDied(f"no answer within {_START_TIMEOUT_S:.0f} s")
            except (WorkerDied, OSError) as exc:  # OSError: the process could not start
                log.warning("decode workers cannot start (%s): decoding in the trainer", exc)
                self.close()
                self.workers = 0
                return

    def pending_records(self) -> Iterator[Record]:
        """The records submitted and not taken yet, in order."""
        for records, _ in self._queue:
            yield from records

    def worker_pids(self) -> list[int]:
        """The running workers' process ids."""
        return [w.proc.pid for w in self._pool if w is not None and not w.dead]

    def _worker(self, i: int) -> _Worker:
        worker = self._pool[i]
        if worker is None or worker.dead:
            worker = self._pool[i] = _Worker(self.spec)
        return worker

    def feed(self, records: list[Record]) -> None:
        """A poll's records, the next of the batch being gathered."""
        if self.workers == 0:
            self._fed.append(decode_chunk([record.value for record in records], self.spec))

    def submit(self, records: list[Record]) -> None:
        """The records fed since the last batch, as a batch."""
        job: _Worker | DecodedChunk
        if self.workers == 0:
            job = merge_chunks(self._fed)
            self._fed = []
        else:
            values = [record.value for record in records]
            slot, self._next = self._next, (self._next + 1) % self.workers
            worker = None
            try:
                worker = self._worker(slot)
                worker.request(pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL))
                job = worker
            except (WorkerDied, OSError) as exc:
                job = self._recover(worker, exc, values)
        self._queue.append((records, job))
        self.records += len(records)

    def take(self, wait_s: float | None) -> tuple[list[Record], DecodedChunk] | None:
        """The oldest submitted batch and its result; None if there is none, or it is not
        decoded within ``wait_s`` (None: wait as long as it takes)."""
        if not self._queue:
            return None
        records, job = self._queue[0]
        if isinstance(job, _Worker):
            if job.dead:  # died answering an earlier batch
                job = decode_chunk([record.value for record in records], self.spec)
            else:
                try:
                    chunk = job.answer(wait_s)
                except WorkerDied as exc:
                    chunk = self._recover(job, exc, [record.value for record in records])
                if chunk is None:
                    return None
                job = chunk
        self._queue.popleft()
        self.records -= len(records)
        return records, job

    def _recover(self, worker: _Worker | None, exc: Exception, values: list[bytes]) -> DecodedChunk:
        """A worker died: decode its batch here; the next batch for its slot starts a new
        one (its other batches already sent are decoded here too, in ``take``)."""
        metrics.DECODE_WORKER_FAILURES.inc()
        log.warning(
            "decode worker %s died (%s, exit code %s); decoding its batches in the trainer "
            "and starting a new one",
            worker.proc.pid if worker else "(new)",
            exc,
            worker.proc.poll() if worker else None,
        )
        if worker is not None:
            worker.stop(kill=True)
        return decode_chunk(values, self.spec)

    def clear(self) -> None:
        """Forget the submitted batches (their records are read again); answers still
        on their way are dropped when they arrive."""
        for worker in self._pool:
            if worker is not None:
                worker.stale = worker.sent
        self._fed.clear()
        self._queue.clear()
        self.records = 0

    def close(self) -> None:
        self.clear()
        for i, worker in enumerate(self._pool):
            if worker is not None and not worker.dead:
                worker.stop()
            self._pool[i] = None


def _serve() -> None:
    """A worker: the spec, then batches of record values, each answered in order with
    its ``DecodedChunk``; ends at the end of its input (the trainer closed it or died)."""
    requests, answers = parent_pipes()
    spec = FeatureSpec.model_validate_json(requests.recv_bytes())
    # A reader thread keeps taking requests while a batch decodes, so the trainer's
    # writes never wait on the decoding (and both sides never wait on each other).
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(requests.recv_bytes())
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read, name="requests", daemon=True).start()
    while (data := inbox.get()) is not None:
        chunk = decode_chunk(pickle.loads(data), spec)
        try:
            answers.send_bytes(pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:  # the trainer is gone
            return


if __name__ == "__main__":
    # Run the imported module's copy, so the answers pickle as trainer.decoding classes.
    from trainer.decoding import _serve as serve

    serve()
