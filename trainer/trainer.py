"""The streaming trainer: poll the log, validate, train, record the position.

One loop, in order: poll records -> batch -> decode, validate and encode the batch
(bad records go to the dead letter topic; in ``decode_workers`` processes,
``trainer.decoding``) -> look ahead -> look up rows -> forward
(progressive evaluation uses these pre-update predictions) -> backward -> sparse
updates to the store and a dense Adam step -> periodically flush the store with the
position it covers, then commit that position to the log.

Look ahead (after MLKV): the loop reads up to ``lookahead_batches`` batches past the
one it trains and hands their keys to a background thread, which fetches their rows
(into the trainer cache, or from the cold tier into the hot one) while the current
batch trains. The loop keeps polling between batches, so the consumer stays in its
group however long the backlog. The store is wrapped in the bounded-staleness
``CachedStore`` (``trainer.cache``); with its default s_r = s_w = 0 training is exact.

Store faults (Redis unreachable, or restarted empty) rewind the trainer to its last
recorded position and it trains on from there (``trainer.recovery``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from storage.base import EmbeddingStore
from storage.keyindex import sorted_distinct
from streaming.events import BadEvent
from streaming.log import EventConsumer, EventProducer, LogUnavailable, Record, position_slot
from streaming.spec import FeatureSpec
from trainer import metrics
from trainer.cache import CacheConfig, CachedStore
from trainer.decoding import Decoder
from trainer.dense_sync import DenseSync
from trainer.encoding import EncodedBatch, select_examples
from trainer.evaluation import EvalReport, ProgressiveEvaluator
from trainer.experiment import ArmFilter
from trainer.features import gather
from trainer.model import DLRM, ModelConfig
from trainer.recovery import RECOVERABLE, Mark, recover
from trainer.versions import latest_version, load_version, publish

log = logging.getLogger(__name__)

_LOG_RETRY_S = 1.0
"""Pause after a failed read from the log."""


class TrainerConfig(BaseModel):
    """How the trainer batches, optimises and checkpoints."""

    model_config = ConfigDict(extra="forbid")

    model_name: str = Field("streamrec", description="Name the model is published under.")
    batch_size: int = Field(
        1024,
        ge=1,
        description="Records per mini-batch, in log order (bad ones are dead-lettered and "
        "leave it that much smaller; an experiment arm's trainer reads batch_size / share "
        "records, so it learns from about batch_size of its units' events).",
    )
    max_batch_wait_s: float = Field(
        0.5, gt=0, description="Train a partial batch after waiting this long."
    )
    dense_optimizer: Literal["adam", "adamw"] = "adam"
    dense_learning_rate: float = Field(1e-3, gt=0)
    flush_every_s: float = Field(
        5.0, gt=0, description="Flush the store and commit the position this often."
    )
    publish_every_s: float = Field(5.0, gt=0, description="Publish a model version this often.")
    keep_versions: int = Field(10, ge=1, description="Published versions kept in the store.")
    expire_every_s: float = Field(
        60.0, gt=0, description="Expire rows by the tables' ttl_s and min_l2_norm this often."
    )
    serving_reads_every_s: float = Field(
        1.0,
        gt=0,
        description="This often, take what serving processes reported reading (Redis hot "
        "tier): promote the rows they found only in the cold tier, count their hot reads "
        "as uses for eviction.",
    )
    progress_every_s: float = Field(5.0, gt=0, description="Print a progress line this often.")
    dense_sync_every_s: float = Field(
        10.0,
        gt=0,
        description="Scale-out: average dense weights with the other trainers this often.",
    )
    eval_window: int = Field(50_000, ge=100, description="Events in the windowed metrics.")
    lookahead_batches: int = Field(
        2, ge=0, description="Batches read ahead whose rows are prefetched (0: none)."
    )
    cache: CacheConfig = Field(default_factory=CacheConfig)
    recover_timeout_s: float = Field(
        300.0,
        gt=0,
        description="After a store fault, keep retrying the rewind this long, then exit.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads of the dense math (process-wide). None: the cores "
        "this process may use less the decode workers, at least 1 (torch's default without "
        "decode workers).",
    )
    gc_threshold: int = Field(
        50_000,
        ge=0,
        description="Python's youngest-generation collection threshold while training "
        "(process-wide; Python's default is 700). Every batch allocates a few dicts per "
        "event, so at 700 the collector runs full passes over the process's objects "
        "(torch's included) every few batches. 0 leaves the collector alone.",
    )
    decode_workers: int = Field(
        1,
        ge=0,
        description="Processes that decode, validate and encode polled events while the "
        "trainer trains (it is a third of an embedded trainer's work, and under the GIL "
        "a thread would not overlap it). 0: decode in the training thread.",
    )
    seed: int = 0


def checkpoint_name(model_name: str, position: dict[str, int]) -> str:
    """The blob holding the dense weights and Adam state as of ``position``.

    Named by the position it belongs to: written before the store records that position,
    so whichever position a crash leaves recorded has its own blob."""
    digest = hashlib.sha1(json.dumps(position, sort_keys=True).encode()).hexdigest()[:16]
    return f"trainer/{model_name}/checkpoint/{digest}"


@dataclass(frozen=True)
class TrainerReport:
    events: int
    bad_events: int
    evaluation: EvalReport
    version: int | None


class StreamingTrainer:
    def __init__(
        self,
        spec: FeatureSpec,
        store: EmbeddingStore,
        consumer: EventConsumer,
        config: TrainerConfig,
        *,
        dead_letters: EventProducer | None = None,
        dead_letter_topic: str = "streamrec-dead-letters",
        total_events: int | None = None,
        group_member: str | None = None,
        arm: ArmFilter | None = None,
    ) -> None:
        """``group_member``: this trainer's name when several share the store (scale-out):
        dense weights are then averaged with the others' (``trainer.dense_sync``) and
        only the trainer reading partition 0 publishes versions. ``arm``: learn only from
        the events of an experiment arm's units (the others are read and skipped), reading
        that many more records per batch."""
        self.spec = spec
        self.store = CachedStore(store, config.cache, shared=group_member is not None)
        self.consumer = consumer
        self.config = config
        self.dead_letters = dead_letters
        self.dead_letter_topic = dead_letter_topic
        self.total_events = total_events
        threads = config.torch_threads
        if threads is None and config.decode_workers:
            # Spinning intra-op threads would fight the workers for the same cores.
            threads = max(len(os.sched_getaffinity(0)) - config.decode_workers, 1)
        if threads is not None:
            torch.set_num_threads(threads)
        torch.manual_seed(config.seed)
        self.model = DLRM(spec, config.model)
        self.optimizer = self._new_optimizer(self.model)
        self.evaluator = ProgressiveEvaluator(config.eval_window)
        # `position` covers what the model has learned (or dead-lettered); `_decoded` runs
        # ahead of it by the decoded batches not trained yet, and `_read` ahead of that by
        # the records polled and not decoded yet.
        self.position: dict[str, int] = dict(store.position() or {})
        self._decoded: dict[str, int] = dict(self.position)
        self._read: dict[str, int] = dict(self.position)
        self._checkpoint_blob: str | None = None
        if not self._resume_checkpoint():
            self._resume_published()
        self.bad_events = 0
        self.version: int | None = latest_version(store, config.model_name)
        self.group_member = group_member
        self.dense_sync: DenseSync | None = None
        if group_member is not None:
            self.dense_sync = DenseSync(
                self.store,
                self.model,
                model_name=config.model_name,
                member=group_member,
                every_s=config.dense_sync_every_s,
            )
        # A batch is ``batch_size`` records in log order (bad ones included): polled into
        # `_raw`, then decoded as one (`_decoder`), then prefetched in `_ready`, trained.
        self._raw: list[Record] = []
        self.arm = arm
        self._batch_records = (
            config.batch_size if arm is None else arm.records_per_batch(config.batch_size)
        )
        self._decoder = Decoder(spec, config.decode_workers)
        self._ready: deque[_Batch] = deque()
        consumer.on_revoked(self._on_revoked)
        # Where a rewind goes back to: the bookkeeping of the recorded position, and of
        # the position a flush in progress (or failed) was recording.
        self._mark = Mark.of(self, self.position)
        self._next_mark: Mark | None = None
        self._log_failing_since: float | None = None

    def _new_optimizer(self, model: DLRM) -> torch.optim.Optimizer:
        cfg = self.config
        optimizer = torch.optim.AdamW if cfg.dense_optimizer == "adamw" else torch.optim.Adam
        return optimizer(model.parameters(), lr=cfg.dense_learning_rate)

    def read_position(self) -> dict[str, int]:
        """Where the log resumes after a rebalance: after the last record read (trained,
        buffered or dead-lettered), or the store's recorded position where that is
        further (a partition this trainer read before and another one recorded since)."""
        merged = dict(self.store.position() or {})
        for slot, offset in dict(self._read).items():
            merged[slot] = max(offset, merged.get(slot, offset))
        return merged

    # -- checkpoints ----------------------------------------------------------------------
    def _checkpoint_name(self, position: dict[str, int]) -> str:
        return checkpoint_name(self.config.model_name, position)

    def _resume_checkpoint(self) -> bool:
        """Restore dense weights and optimizer state exactly as of the recorded position."""
        name = self._checkpoint_name(self.position)
        raw = self.store.get_blob(name)
        if raw is None:
            return False
        state = torch.load(io.BytesIO(raw), weights_only=True)
        if state["spec"] != self.spec.model_dump_json() or state["arch"] != (
            self.config.model.model_dump_json()
        ):
            log.warning("checkpoint %s has another feature spec or architecture; ignored", name)
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._checkpoint_blob = name
        log.info("resumed from checkpoint at position %s", self.position)
        return True

    def _dense_checkpoint(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "spec": self.spec.model_dump_json(),
                "arch": self.config.model.model_dump_json(),
            },
            buffer,
        )
        return buffer.getvalue()

    def _resume_published(self) -> None:
        """Without a checkpoint, start from the newest published dense weights."""
        version = latest_version(self.store, self.config.model_name)
        if version is None:
            return
        meta, model = load_version(self.store, self.config.model_name, version)
        if meta.spec != self.spec or meta.model != self.config.model:
            log.warning(
                "published version %d has another feature spec or architecture; "
                "starting dense weights afresh",
                version,
            )
            return
        self.model.load_state_dict(model.state_dict())
        log.info("resumed dense weights from version %d (%d events)", version, meta.events_trained)

    # -- one step -------------------------------------------------------------------------
    def train_step(self, label_values: np.ndarray, batch: EncodedBatch) -> np.ndarray:
        """Train on one encoded batch; returns the predictions made before the update."""
        started = time.perf_counter()
        labels = torch.from_numpy(label_values)
        self.model.train()
        sparse, rows = gather(self.store, batch, self.spec, train=True)
        logits = self.model(torch.from_numpy(batch.dense), sparse)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        for table, weight in rows.weights.items():
            if weight.grad is not None and len(rows.keys[table]):
                self.store.update(table, rows.keys[table], weight.grad.numpy())
        preds = torch.sigmoid(logits.detach()).numpy()
        self.evaluator.add(labels.numpy(), preds)
        metrics.EVENTS.inc(len(label_values))
        metrics.BATCHES.inc()
        metrics.STEP_SECONDS.observe(time.perf_counter() - started)
        return preds

    # -- the loop -------------------------------------------------------------------------
    def _take_decoded(self, wait_s: float | None, lookahead: _Lookahead) -> bool:
        """Move the oldest batch decoded within ``wait_s`` (None: however long it takes)
        to the ready ones and its lookahead: its records are now read, its bad ones
        dead-lettered. False if there is none."""
        taken = self._decoder.take(wait_s)
        if taken is None:
            return False
        records, chunk = taken
        bad = {i: BadEvent(reason, detail) for i, reason, detail in chunk.bad}
        first: dict[str, int] = {}
        topic, partition, slot = "", -1, ""
        for i, record in enumerate(records):
            if record.partition != partition or record.topic != topic:
                # A poll returns runs of one partition: name each run's slot once.
                topic, partition, slot = record.topic, record.partition, record.slot
            if i in bad:
                self._dead_letter(record, bad[i])
            else:
                first.setdefault(slot, record.offset)
            self._decoded[slot] = record.offset + 1
        labels, encoded = chunk.labels, chunk.encoded
        if self.arm is not None and chunk.size:
            keep = self.arm.keep(encoded)
            metrics.OTHER_ARM_EVENTS.inc(chunk.size - int(keep.sum()))
            labels, encoded = labels[keep], select_examples(encoded, keep)
        if len(labels):
            self._ready.append(_Batch(labels, encoded, dict(self._decoded), first))
            lookahead.submit(encoded)
        return True

    def _due(self, arrived: bool) -> bool:
        """Whether the oldest ready batch trains now: once the lookahead is full, or as
        soon as the stream is not ahead (nothing arrived, nothing being decoded)."""
        ready = self._ready
        return bool(ready) and (
            len(ready) > self.config.lookahead_batches or not (arrived or len(self._decoder))
        )

    def _buffered(self) -> int:
        """Records polled and not trained yet (decoded ones: their good events)."""
        return len(self._raw) + self._decoder.records + sum(b.size for b in self._ready)

    def _forget_buffered(self) -> None:
        """Drop the polled, untrained events (they are read again)."""
        self._raw.clear()
        self._decoder.clear()
        self._ready.clear()

    def _note_read(self, records: list[Record]) -> None:
        """Advance the read position past ``records``."""
        ends: dict[tuple[str, int], int] = {}
        for record in records:
            ends[record.topic, record.partition] = record.offset + 1
        for (topic, partition), end in ends.items():
            self._read[position_slot(topic, partition)] = end

    def _dead_letter(self, record: Record, bad: BadEvent) -> None:
        self.bad_events += 1
        metrics.BAD_EVENTS.labels(reason=bad.reason).inc()
        log.debug("bad event at %s@%d: %s", record.slot, record.offset, bad)
        if self.dead_letters is not None:
            self.dead_letters.send(
                self.dead_letter_topic,
                record.value,
                headers={"reason": bad.reason, "detail": bad.detail[:500]},
            )

    def checkpoint(self, *, final: bool = False, commit: bool = True) -> bool:
        """Make the position durable with the rows and dense state it covers, then
        acknowledge it to the log. Returns False, recording nothing, when dead letters
        cannot be stored yet (Kafka down; the next checkpoint tries again); with
        ``final`` that raises ``LogUnavailable`` instead.

        Order matters for exactly-once: the dense checkpoint blob (named after the
        position) is stored first, then the store records the position atomically
        with the rows, and only then the log's offsets are committed.
        """
        if self.dead_letters is not None:
            # A bad event is acknowledged only once its dead-letter copy is stored.
            try:
                # Kafka down: do not hold up training for long, the next checkpoint retries.
                self.dead_letters.flush(timeout_s=30.0 if final else 5.0)
            except LogUnavailable as e:
                if final:
                    raise
                log.warning("checkpoint put off: dead letters not stored yet (%s)", e)
                metrics.CHECKPOINTS_SKIPPED.inc()
                return False
        position = dict(self.position)
        name = self._checkpoint_name(position)
        self.store.put_blob(name, self._dense_checkpoint())
        self._next_mark = Mark.of(self, position)
        self.store.flush(position)
        self._mark, self._next_mark = self._next_mark, None
        if self._checkpoint_blob not in (None, name):
            self.store.delete_blob(self._checkpoint_blob)
        self._checkpoint_blob = name
        if commit:
            self.consumer.commit(position)
        metrics.FLUSHES.inc()
        return True

    def rewind(self) -> int:
        """Go back to the position the store recorded, as a restarted trainer would: drop
        the store's unflushed updates (the hot tier is rebuilt from the cold tier on
        demand), reload the dense checkpoint of that position, restore the evaluation
        and counters of then, and read the log on from there. Returns how many events
        trained since are dropped (to be trained again). Raises ``StoreUnavailable`` /
        ``LogUnavailable`` while those are down (nothing is lost; call again)."""
        self.store.discard_unflushed()
        self._forget_buffered()
        recorded = self.store.position() or {}
        # A flush that raised may still have committed (e.g. Redis failed after the
        # RocksDB commit): the recorded position says which mark is current.
        marks = [m for m in (self._next_mark, self._mark) if m is not None]
        mark = next((m for m in marks if m.position == recorded), None)
        if mark is None:
            log.warning("no bookkeeping for position %s; evaluation is not rewound", recorded)
            mark = Mark.of(self, recorded)
        self.consumer.seek(recorded)
        self.position, self._decoded, self._read = dict(recorded), dict(recorded), dict(recorded)
        torch.manual_seed(self.config.seed)
        fresh = DLRM(self.spec, self.config.model)
        self.model.load_state_dict(fresh.state_dict())
        self.optimizer.load_state_dict(self._new_optimizer(fresh).state_dict())
        stale = self._checkpoint_blob
        self._checkpoint_blob = None
        if not self._resume_checkpoint():
            self._resume_published()
        if stale not in (None, self._checkpoint_blob):
            self.store.delete_blob(stale)
        replay = self.evaluator.events - mark.evaluator.events
        self.evaluator, self.bad_events = mark.evaluator.copy(), mark.bad_events
        self._mark, self._next_mark = mark, None
        return replay

    def _on_revoked(self) -> dict[str, int]:
        """Partitions are about to move to another trainer: forget the buffered, untrained
        events (whoever reads those partitions next reads them again) and record what was
        handled: each partition up to its first dropped event (what was read before it was
        trained or dead-lettered), or all it read. The consumer commits the returned
        position, so the next owner starts exactly there."""
        dropped = self._buffered()
        first: dict[str, int] = {}
        for batch in self._ready:
            for slot, offset in batch.first.items():
                first.setdefault(slot, offset)
        for record in chain(self._decoder.pending_records(), self._raw):  # not decoded yet
            first.setdefault(record.slot, record.offset)
        trained = dict(self.position)
        self._forget_buffered()
        self.position = {**self._decoded, **first}
        self._decoded, self._read = dict(self.position), dict(self.position)
        if not self.checkpoint(commit=False):
            # Dead letters not stored: they must be read (and sent) again.
            self.position, self._decoded, self._read = trained, dict(trained), dict(trained)
            return dict(self.store.position() or {})
        log.info("rebalance: committed %s, dropped %d buffered events", self.position, dropped)
        return dict(self.position)

    def _poll(self, want: int, timeout_s: float, stop: threading.Event) -> list[Record]:
        """Records from the log. An error reading it is retried after a pause instead of
        ending the trainer, for up to ``recover_timeout_s`` of consecutive failures: the
        consumer is put back at what the trainer has read, so a poll that failed halfway
        neither skips nor repeats a record."""
        try:
            if self._log_failing_since is not None:
                self.consumer.seek(self.read_position())
            records = self.consumer.poll(want, timeout_s=timeout_s)
        except LogUnavailable as e:
            now = time.monotonic()
            if self._log_failing_since is None:
                self._log_failing_since = now
                log.warning("cannot read the log (%s); retrying", e)
            elif now - self._log_failing_since > self.config.recover_timeout_s:
                raise LogUnavailable(
                    f"still failing after {self.config.recover_timeout_s:.0f} s: {e}"
                ) from e
            metrics.LOG_ERRORS.inc()
            stop.wait(_LOG_RETRY_S)
            return []
        if self._log_failing_since is not None:
            log.info("reading the log again")
            self._log_failing_since = None
        return records

    def _publishes(self) -> bool:
        if self.group_member is None:
            return True
        return any(slot.endswith(":0") for slot in self.consumer.assignment())

    def publish(self) -> None:
        meta = publish(
            self.store,
            self.model,
            name=self.config.model_name,
            spec=self.spec,
            config=self.config.model,
            events_trained=self.evaluator.events,
            position=dict(self.position),
            keep=self.config.keep_versions,
        )
        self.version = meta.version
        metrics.MODEL_VERSION.set(meta.version)

    def run(self, stop: threading.Event, max_events: int | None = None) -> TrainerReport:
        """Train until ``stop`` is set or ``max_events`` events were trained on, then
        flush, publish and return. Never raises on bad input. A store fault rewinds to
        the recorded position (``trainer.recovery``) and training goes on from there;
        ``max_events`` counts events kept, not replays."""
        first = self.evaluator.events
        try:
            self._decoder.start()
            with collector_threshold(self.config.gc_threshold):
                while True:
                    left = (
                        None if max_events is None else max_events - (self.evaluator.events - first)
                    )
                    try:
                        return self._run(stop, left)
                    except RECOVERABLE as fault:
                        recover(self, fault, stop, self.config.recover_timeout_s)
        finally:
            self._decoder.close()

    def _run(self, stop: threading.Event, max_events: int | None) -> TrainerReport:
        """The loop, from ``self.position``; raises the store's faults (``run`` rewinds,
        which also drops the buffered batches, and calls it again)."""
        cfg = self.config
        decoder, ready = self._decoder, self._ready
        lookahead = _Lookahead(self.store, self.spec, cfg.lookahead_batches)
        batch_started = now = time.monotonic()
        next_flush, next_publish = now + cfg.flush_every_s, now + cfg.publish_every_s
        next_expire = now + cfg.expire_every_s
        next_serving_reads = now + cfg.serving_reads_every_s
        checkpointed, published = dict(self.position), 0
        progress = _Progress(cfg.progress_every_s, self.total_events)
        trained = 0
        try:
            while not stop.is_set() and (max_events is None or trained < max_events):
                # Batches on their way: being decoded, or decoded and prefetching.
                ahead = len(decoder) + len(ready)
                want = self._batch_records - len(self._raw)
                if max_events is not None:
                    want = min(want, max_events - trained - self._buffered())
                arrived = False
                if want > 0 and ahead <= cfg.lookahead_batches + 1:
                    # With work in hand, only take what has already arrived.
                    records = self._poll(want, 0.0 if ahead else 0.1, stop)
                    if records:
                        arrived = True
                        if not self._raw:
                            batch_started = time.monotonic()
                        self._raw.extend(records)
                        self._note_read(records)
                        decoder.feed(records)
                if self._raw and (
                    len(self._raw) >= self._batch_records
                    or (max_events is not None and trained + self._buffered() >= max_events)
                    or time.monotonic() - batch_started > cfg.max_batch_wait_s
                ):
                    decoder.submit(self._raw)
                    self._raw = []
                # Wait for a decode only with nothing else to do (no batch to train, nothing
                # more arriving).
                wait: float | None = None if not arrived and not self._due(arrived) else 0.0
                while self._take_decoded(wait, lookahead):
                    wait = 0.0
                if self._due(arrived):
                    batch = ready.popleft()
                    lookahead.claim(batch.encoded)
                    self.train_step(batch.labels, batch.encoded)
                    trained += batch.size
                    self.position = batch.end
                if not ready:
                    # Never record buffered, untrained events: a crash would skip them.
                    self.position = dict(self._decoded)
                now = time.monotonic()
                if now >= next_flush:
                    # An idle stream writes nothing.
                    if self.position != checkpointed and self.checkpoint():
                        checkpointed = dict(self.position)
                    next_flush = now + cfg.flush_every_s
                if now >= next_expire:
                    expired = self.store.expire()
                    if any(expired.values()):
                        log.info("expired rows: %s", expired)
                    next_expire = now + cfg.expire_every_s
                if now >= next_serving_reads:
                    self.store.take_serving_reads()
                    next_serving_reads = now + cfg.serving_reads_every_s
                if self.dense_sync is not None:
                    self.dense_sync.maybe_sync(now)
                if now >= next_publish and self.evaluator.events > published and self._publishes():
                    self.publish()
                    published = self.evaluator.events
                    next_publish = now + cfg.publish_every_s
                progress.maybe_log(self, now)
            if self._raw:
                decoder.submit(self._raw)
                self._raw = []
            while len(decoder):
                self._take_decoded(None, lookahead)
            while ready:
                batch = ready.popleft()
                lookahead.claim(batch.encoded)
                self.train_step(batch.labels, batch.encoded)
        finally:
            lookahead.close()
        self.position = dict(self._decoded)
        if self.dense_sync is not None:
            self.dense_sync.leave()
        self.checkpoint(final=True)
        if self.evaluator.events > published and self._publishes():
            self.publish()
        progress.maybe_log(self, time.monotonic(), force=True)
        return TrainerReport(
            events=self.evaluator.events,
            bad_events=self.bad_events,
            evaluation=self.evaluator.report(),
            version=self.version,
        )


@dataclass
class _Batch:
    labels: np.ndarray
    encoded: EncodedBatch
    end: dict[str, int]  # the read position after its last record (bad ones included)
    first: dict[str, int]  # offset of each partition's first event in it

    @property
    def size(self) -> int:
        return len(self.labels)


_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None


@contextlib.contextmanager
def collector_threshold(threshold: int) -> Iterator[None]:
    """Raise the garbage collector's youngest-generation threshold to ``threshold``
    while the block runs (0: leave it). Process-wide, so trainers running side by side
    share it: the first sets it, the last one out puts Python's back."""
    global _gc_users, _gc_saved
    if threshold <= 0:
        yield
        return
    with _gc_lock:
        if _gc_users == 0:
            _gc_saved = gc.get_threshold()
            gc.set_threshold(max(threshold, _gc_saved[0]), *_gc_saved[1:])
        _gc_users += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_saved is not None:
                gc.set_threshold(*_gc_saved)


class _Lookahead:
    """Fetches the rows of batches waiting to be trained, on a background thread, so the
    training lookup finds them close (MLKV's lookahead). A full queue skips a prefetch
    rather than holding up training; a failed one is logged (the lookup retries).

    Before a batch trains, ``claim`` settles its prefetch: one not started yet is
    dropped (the training lookup reads the rows itself), one under way is waited for, so
    no row is read twice because training caught up with its prefetch."""

    def __init__(self, store: EmbeddingStore, spec: FeatureSpec, depth: int) -> None:
        self._store = store
        self._spec = spec
        self._depth = max(depth, 1)
        self._waiting: deque[EncodedBatch] = deque()
        self._running: EncodedBatch | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name="lookahead", daemon=True)
            self._thread.start()

    def submit(self, batch: EncodedBatch) -> None:
        if self._thread is None:
            return
        with self._changed:
            if len(self._waiting) >= self._depth:
                metrics.PREFETCH_SKIPPED.labels(reason="queue_full").inc()
                return
            self._waiting.append(batch)
            self._changed.notify_all()

    def claim(self, batch: EncodedBatch) -> None:
        """``batch`` is about to train: take it off the queue, or wait for its prefetch."""
        if self._thread is None:
            return
        with self._changed:
            if any(b is batch for b in self._waiting):
                self._waiting = deque(b for b in self._waiting if b is not batch)
                metrics.PREFETCH_SKIPPED.labels(reason="overtaken").inc()
                return
            if self._running is batch:
                started = time.perf_counter()
                self._changed.wait_for(lambda: self._running is not batch)
                metrics.PREFETCH_WAIT_SECONDS.observe(time.perf_counter() - started)

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if self._closed:
                    return
                batch = self._running = self._waiting.popleft()
            started = time.perf_counter()
            try:
                self._store.prefetch_tables(
                    {
                        field.name: sorted_distinct(batch.fields[field.name].keys)
                        for field in self._spec.sparse
                    }
                )
            except Exception:
                log.warning(
                    "prefetch failed; the training lookup will read the rows", exc_info=True
                )
            finally:
                with self._changed:
                    self._running = None
                    self._changed.notify_all()
            metrics.PREFETCH_SECONDS.observe(time.perf_counter() - started)

    def close(self) -> None:
        if self._thread is not None:
            with self._changed:
                self._closed = True
                self._waiting.clear()
                self._changed.notify_all()
            self._thread.join()


class _Progress:
    """A periodic progress line with the rate, ETA (finite streams) and online metrics."""

    def __init__(self, every_s: float, total: int | None) -> None:
        self._every = every_s
        self._total = total
        self._last_time = time.monotonic()
        self._last_events = 0
        self._lagging: set[str] = set()  # partitions with a lag series

    def maybe_log(self, trainer: StreamingTrainer, now: float, force: bool = False) -> None:
        if not force and now - self._last_time < self._every:
            return
        report = trainer.evaluator.report()
        rate = (report.events - self._last_events) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_events = now, report.events
        metrics.EVENTS_PER_SECOND.set(rate)
        for gauge, value in (
            (metrics.PROGRESSIVE_AUC, report.auc),
            (metrics.WINDOW_AUC, report.window_auc),
            (metrics.WINDOW_LOGLOSS, report.window_logloss),
            (metrics.WINDOW_CALIBRATION, report.window_calibration),
        ):
            gauge.set(value)
        lag = self._publish_lag(trainer)
        eta = ""
        if self._total and rate > 0:
            eta = f" eta={max(self._total - report.events, 0) / rate:.0f}s"
        log.info(
            "%sevents=%d rate=%.0f/s auc=%.4f window_auc=%.4f logloss=%.4f calibration=%.3f "
            "bad=%d version=%s lag=%s%s",
            "" if trainer.arm is None else f"arm={trainer.arm.arm} ",
            report.events,
            rate,
            report.auc,
            report.window_auc,
            report.window_logloss,
            report.window_calibration,
            trainer.bad_events,
            trainer.version,
            "?" if lag is None else lag,
            eta,
        )

    def _publish_lag(self, trainer: StreamingTrainer) -> int | None:
        """Set the lag gauge of each partition read whose end and trained position are
        known (dropping the series of partitions no longer read); their total."""
        lags = {
            slot: max(end - trainer.position[slot], 0)
            for slot, end in trainer.consumer.end_offsets().items()
            if slot in trainer.position
        }
        for slot in self._lagging - lags.keys():
            metrics.LAG_EVENTS.remove(slot)
        for slot, lag in lags.items():
            metrics.LAG_EVENTS.labels(partition=slot).set(lag)
        self._lagging = set(lags)
        return sum(lags.values()) if lags else None
