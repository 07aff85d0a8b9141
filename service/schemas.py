"""Request and response bodies of the prediction API (KServe v1 conventions)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelList(BaseModel):
    models: list[str]


class FeatureNames(BaseModel):
    sparse: list[str]
    dense: list[str]


class ArmInfo(BaseModel):
    name: str
    share: float = Field(description="Fraction of the units this arm serves.")
    version: int | None = Field(description="The arm's served version; null until its first.")
    ready: bool
    latest_version: int | None = None
    created_at: float | None = None
    events_trained: int | None = None


class ExperimentInfo(BaseModel):
    name: str
    unit: str = Field(description="The field whose value picks an instance's arm.")
    default_trains_on: str = Field(description="all: every event; rest: units in no arm.")
    arms: list[ArmInfo]


class ModelInfo(BaseModel):
    name: str
    version: int | None = Field(description="Served version; null until the first publish.")
    ready: bool
    pinned: bool = Field(
        False, description="True when the served version is pinned (rollback), not the latest."
    )
    latest_version: int | None = Field(None, description="The newest published version.")
    versions: list[int] = Field(
        default_factory=list, description="Versions stored, oldest first; any can be pinned."
    )
    created_at: float | None = Field(None, description="Publish time of the served version.")
    events_trained: int | None = None
    features: FeatureNames
    experiment: ExperimentInfo | None = Field(
        None, description="The A/B test this service routes predicts by, with each arm's model."
    )


class PredictParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(
        None, ge=1, description="Predict with this stored version instead of the served one."
    )


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[dict[str, Any]] = Field(
        min_length=1,
        description="One object per example: {feature name: value}. Sparse values are "
        "strings or integers (lists for multi_hot fields); dense values are numbers.",
        examples=[[{"c1": "a", "c2": 17, "i1": 0.5}]],
    )
    parameters: PredictParameters | None = None


class PredictResponse(BaseModel):
    predictions: list[float] = Field(description="Click probability per instance, in order.")
    model_version: int = Field(
        description="The version that scored them (with an experiment and instances in "
        "several arms: the default model's; see model_versions)."
    )
    arms: list[str] | None = Field(
        None, description="With an experiment: each instance's arm ('default': in none)."
    )
    model_versions: dict[str, int] | None = Field(
        None, description="With an experiment: the version each arm present scored with."
    )


class PinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(
        ge=1,
        description="Serve this stored version from now on (rollback); null follows the "
        "latest version again.",
    )


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[dict[str, Any]] = Field(
        min_length=1,
        description="Impressions (label 0) or feedback (label 1) in the event schema: "
        '{"event_id", "ts" (epoch ms), "label", "features": {...}, "dense": {...}}.',
        examples=[[{"event_id": "e1", "ts": 1700000000000, "label": 1, "features": {"c1": "a"}}]],
    )


class EventsAccepted(BaseModel):
    accepted: int = Field(description="Events produced to the log.")
    topic: str


class Health(BaseModel):
    status: str
    detail: str | None = None
