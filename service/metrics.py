"""Prometheus metrics of the prediction service (default registry)."""

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
UNKNOWN_IDS = Counter(
    "streamrec_service_unknown_ids_total", "Sparse ids with no row, served as zero vectors."
)
MODEL_VERSION = Gauge("streamrec_service_model_version", "Model version being served.")
MODEL_AGE = Gauge("streamrec_service_model_age_seconds", "Age of the served model version.")
PUBLISH_LAG = Histogram(
    "streamrec_service_publish_to_visible_seconds",
    "From a version's publish by the trainer to this service serving it.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
