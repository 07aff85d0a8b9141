"""Prometheus metrics of the streaming trainer (default registry)."""

from prometheus_client import Counter, Gauge, Histogram

from streaming.events import BAD_EVENT_REASONS

EVENTS = Counter("streamrec_trainer_events_total", "Events trained on.")
BAD_EVENTS = Counter(
    "streamrec_trainer_bad_events_total",
    "Events rejected by validation and copied to the dead-letter topic.",
    ["reason"],
)
for _reason in BAD_EVENT_REASONS:  # series from the start: rates and alerts see zeros
    BAD_EVENTS.labels(reason=_reason)
BATCHES = Counter("streamrec_trainer_batches_total", "Mini-batches trained.")
STEP_SECONDS = Histogram(
    "streamrec_trainer_step_seconds",
    "Time of one training step (lookup, forward, backward, sparse and dense updates).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENTS_PER_SECOND = Gauge("streamrec_trainer_events_per_second", "Recent training rate.")
PROGRESSIVE_AUC = Gauge(
    "streamrec_trainer_progressive_auc", "AUC of predictions made before training, since start."
)
WINDOW_AUC = Gauge("streamrec_trainer_window_auc", "Progressive AUC over the recent window.")
WINDOW_LOGLOSS = Gauge("streamrec_trainer_window_logloss", "Progressive logloss, recent window.")
WINDOW_CALIBRATION = Gauge(
    "streamrec_trainer_window_calibration", "Mean predicted CTR / observed CTR, recent window."
)
LAG_EVENTS = Gauge(
    "streamrec_trainer_lag_events",
    "Records in the log not trained yet, per partition (its end offset, as last seen, "
    "minus the trained position).",
    ["partition"],
)
MODEL_VERSION = Gauge("streamrec_trainer_published_version", "Last published model version.")
FLUSHES = Counter("streamrec_trainer_flushes_total", "Store flushes with a recorded position.")
PREFETCH_SECONDS = Histogram(
    "streamrec_trainer_prefetch_seconds",
    "Time to prefetch the rows of one upcoming batch (on the lookahead thread).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PREFETCH_SKIPPED = Counter(
    "streamrec_trainer_prefetch_skipped_total",
    "Upcoming batches not prefetched: the lookahead queue was full (queue_full), or "
    "training reached the batch before its prefetch started (overtaken).",
    ["reason"],
)
PREFETCH_WAIT_SECONDS = Histogram(
    "streamrec_trainer_prefetch_wait_seconds",
    "Time training waited for a batch's prefetch under way to finish.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
for _reason in ("queue_full", "overtaken"):
    PREFETCH_SKIPPED.labels(reason=_reason)
REWINDS = Counter(
    "streamrec_trainer_rewinds_total",
    "Rewinds to the recorded position after a store fault (reason: the error's class).",
    ["reason"],
)
LOG_ERRORS = Counter(
    "streamrec_trainer_log_errors_total",
    "Failed reads from the log (Kafka), retried after a pause.",
)
CHECKPOINTS_SKIPPED = Counter(
    "streamrec_trainer_checkpoints_skipped_total",
    "Checkpoints put off because dead letters could not be stored (Kafka unreachable).",
)
DECODE_WORKER_FAILURES = Counter(
    "streamrec_trainer_decode_worker_failures_total",
    "Decode worker processes found dead; the trainer decoded their batches itself and "
    "started a new worker.",
)
EXPERIMENT_ARM = Gauge(
    "streamrec_trainer_experiment_arm",
    "1, labelled with the experiment arm whose units this trainer learns from "
    "(default: the default model); absent without an experiment.",
    ["arm"],
)
OTHER_ARM_EVENTS = Counter(
    "streamrec_trainer_other_arm_events_total",
    "Events read and skipped: their unit is in another experiment arm.",
)
