"""A running trainer with everything it owns: store, log, threads."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from storage.tiered import TieredStore
from streaming.log import (
    EventConsumer,
    EventProducer,
    InMemoryLog,
    JsonlFileProducer,
    KafkaEventConsumer,
    KafkaEventProducer,
)
from streamrec.config import ConfigError, Settings
from streamrec.wiring import (
    build_store,
    check_experiment,
    data_path,
    embedded_source,
    feed_log,
    resolve_spec,
)
from trainer import metrics
from trainer.dense_sync import member_name
from trainer.experiment import DEFAULT_ARM, ArmFilter
from trainer.trainer import StreamingTrainer, TrainerReport

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


@dataclass
class TrainerRuntime:
    store: TieredStore
    trainer: StreamingTrainer
    consumer: EventConsumer
    dead_letters: EventProducer
    stop_event: threading.Event
    thread: threading.Thread | None = None
    embedded_log: InMemoryLog | None = None
    report: TrainerReport | None = None
    failed: bool = False
    error: Exception | None = None
    """What ended the trainer thread, if it failed."""
    on_failure: Callable[[], None] = field(default=lambda: None)

    @classmethod
    def start(
        cls, settings: Settings, *, max_events: int | None = None, rate: float | None = None
    ) -> TrainerRuntime:
        """Build and start the trainer thread (and, embedded, the source feeding it)."""
        stop = threading.Event()
        embedded_log: InMemoryLog | None = None
        arm = ArmFilter.of(settings.experiment, settings.arm)
        if settings.experiment is not None:
            # Joins the trainer's evaluation metrics to its arm in queries.
            metrics.EXPERIMENT_ARM.labels(arm=settings.arm or DEFAULT_ARM).set(1)
        batch_records = (
            settings.trainer.batch_size
            if arm is None
            else arm.records_per_batch(settings.trainer.batch_size)
        )
        if settings.log.kind == "memory":
            source = embedded_source(settings, max_events)
            spec = source.spec
            store = build_store(settings, spec)
            position = store.position()
            embedded_log = InMemoryLog(settings.log.memory_capacity, start=position)
            consumer: EventConsumer = embedded_log.consumer(settings.log.topic, position)
            dead_letters: EventProducer = JsonlFileProducer(
                data_path(settings, "dead-letters.jsonl")
            )
            feed_log(source, embedded_log, settings.log.topic, stop, rate)
            total = source.total
            log.info(
                "embedded mode: training on %r; store under %s", source, settings.store.data_dir
            )
        else:
            spec = resolve_spec(settings)
            store = build_store(settings, spec)
            consumer = KafkaEventConsumer(
                settings.log.bootstrap_servers,
                settings.log.topic,
                settings.log.group_id,
                resume_from=store.position,
                shared=settings.store.shared_hot,
                max_poll_records=batch_records,
            )
            dead_letters = KafkaEventProducer(settings.log.bootstrap_servers)
            total = None
            log.info(
                "training from Kafka %s topic %s (group %s)%s",
                settings.log.bootstrap_servers,
                settings.log.topic,
                settings.log.group_id,
                "" if arm is None else f" on the units of experiment arm {arm.arm!r}",
            )
        try:
            check_experiment(settings, spec)
        except ConfigError:
            store.close()
            raise
        trainer = StreamingTrainer(
            spec,
            store,
            consumer,
            settings.trainer,
            # Every trainer of an experiment reads every event: the default model's
            # dead-letters the bad ones, an arm's only counts them.
            dead_letters=dead_letters if settings.arm is None else None,
            dead_letter_topic=settings.log.dead_letter_topic,
            total_events=total,
            group_member=member_name() if settings.store.shared_hot else None,
            arm=arm,
        )
        if isinstance(consumer, KafkaEventConsumer):
            # A rebalance (e.g. after a broker restart) resumes where the trainer has read
            # to, not at the older recorded position: nothing is trained twice.
            consumer.resume_from = trainer.read_position
        runtime = cls(store, trainer, consumer, dead_letters, stop, embedded_log=embedded_log)
        runtime.thread = threading.Thread(
            target=runtime._train, args=(max_events,), name="trainer", daemon=True
        )
        runtime.thread.start()
        return runtime

    def _train(self, max_events: int | None) -> None:
        try:
            self.report = self.trainer.run(self.stop_event, max_events=max_events)
        except Exception as e:
            log.exception("trainer failed")
            self.error = e
            self.failed = True
            self.on_failure()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> int:
        """Stop training, flush the store, release everything. Returns an exit code."""
        self.stop_event.set()
        if self.embedded_log is not None:
            self.embedded_log.close()
        if self.thread is not None:
            self.thread.join(STOP_TIMEOUT_S)
            if self.thread.is_alive():
                log.error("trainer did not stop within %.0f s", STOP_TIMEOUT_S)
                self.failed = True
        for closer in (self.consumer.close, self.dead_letters.close, self.store.close):
            try:
                closer()
            except Exception:
                log.exception("error while closing")
        log.info("stopped%s", "" if self.report is None else f" after {self.report.events} events")
        return 1 if self.failed else 0
