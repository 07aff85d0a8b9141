"""Prometheus metrics of the prediction service (default registry).

With several uvicorn workers (``PROMETHEUS_MULTIPROC_DIR`` set before start) every
worker writes its own files and ``/metrics`` sums counters and histograms over all of
them; gauges say how they combine (``multiprocess_mode``).
"""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "streamrec_service_predict_requests_total", "Predict requests by outcome.", ["status"]
)
INSTANCES = Counter("streamrec_service_predict_instances_total", "Instances scored.")
LATENCY = Histogram(
    "streamrec_service_predict_seconds",
    "Predict latency inside the handler.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
BATCH_REQUESTS = Histogram(
    "streamrec_service_predict_batch_requests",
    "Predict requests scored together in one batch (dynamic batching).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
)
UNKNOWN_IDS = Counter(
    "streamrec_service_unknown_ids_total", "Sparse ids with no row, served as zero vectors."
)
NEAR_CACHE = Counter(
    "streamrec_service_near_cache_total",
    "Distinct keys per request by near-cache result.",
    ["result"],
)
READ_PROCESS_FAILURES = Counter(
    "streamrec_service_read_process_failures_total",
    "Read processes that died or could not start; their reads ran in the server meanwhile.",
)
LOOKUP_DEFAULTED = Counter(
    "streamrec_service_lookup_defaulted_total",
    "Keys answered with the default embedding because the store read was late (budget) "
    "or too many reads were in flight (overloaded).",
    ["reason"],
)
for _reason in ("budget", "overloaded"):  # a zero series each from the start, for rates
    LOOKUP_DEFAULTED.labels(reason=_reason)
STORE_READ_REQUESTS = Histogram(
    "streamrec_service_store_read_requests",
    "Predict batches whose near-cache misses one store read served (coalescing: above "
    "1 under load; always 1 means the reader threads keep up without it).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MODEL_VERSION = Gauge(
    "streamrec_service_model_version", "Model version being served.", multiprocess_mode="max"
)
MODEL_AGE = Gauge(
    "streamrec_service_model_age_seconds",
    "Age of the served model version (since the trainer published it).",
    multiprocess_mode="max",
)
PUBLISH_LAG = Histogram(
    "streamrec_service_publish_to_visible_seconds",
    "From a version's publish by the trainer to this service serving it.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
SWAPS = Counter("streamrec_service_model_swaps_total", "Served-version changes.")
EVENTS = Counter(
    "streamrec_service_events_total", "Events posted to /v1/events by outcome.", ["status"]
)
FRESHNESS = Histogram(
    "streamrec_service_event_to_visible_seconds",
    "From an event posted to /v1/events being produced to the log to the first change "
    "of one of its embedding rows as this service serves it (near cache included), "
    "per table.",
    ["table"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
FRESHNESS_QUANTILE = Gauge(
    "streamrec_service_event_to_visible_quantile_seconds",
    "p50 and p95 of event_to_visible over the last 1024 rows observed (worst worker).",
    ["quantile"],
    multiprocess_mode="max",
)
FRESHNESS_UNOBSERVED = Counter(
    "streamrec_service_event_rows_unobserved_total",
    "Rows of posted events whose change was never seen within the watch timeout "
    "(e.g. an id the admission policy has not admitted yet), per table.",
    ["table"],
)
GC_PAUSE = Histogram(
    "streamrec_service_gc_pause_seconds",
    "Passes of Python's garbage collector in the service, by generation: a pass stalls "
    "every request in flight.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
for _generation in ("0", "1", "2"):
    GC_PAUSE.labels(generation=_generation)
EXPERIMENT_INSTANCES = Counter(
    "streamrec_service_experiment_instances_total",
    "Predict instances per experiment arm (default: units in no arm).",
    ["arm"],
)
EXPERIMENT_FALLBACKS = Counter(
    "streamrec_service_experiment_fallback_instances_total",
    "Instances of an arm with no model version yet, scored by the default model.",
    ["arm"],
)
EXPERIMENT_EVENTS = Counter(
    "streamrec_service_experiment_events_total",
    "Events posted per experiment arm and label (1: a click): the arms' CTR.",
    ["arm", "label"],
)
EXPERIMENT_MODEL_VERSION = Gauge(
    "streamrec_service_experiment_model_version", "Served version of each arm's model.", ["arm"]
)
