"""Request and response bodies of the prediction API (KServe v1 conventions)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelList(BaseModel):
    models: list[str]


class FeatureNames(BaseModel):
    sparse: list[str]
    dense: list[str]


class ModelInfo(BaseModel):
    name: str
    version: int | None = Field(description="Served version; null until the first publish.")
    ready: bool
    created_at: float | None = Field(None, description="Publish time of the served version.")
    events_trained: int | None = None
    features: FeatureNames


class PredictRequest(BaseModel):
    instances: list[dict[str, Any]] = Field(
        min_length=1,
        description="One object per example: {feature name: value}. Sparse values are "
        "strings or integers (lists for multi_hot fields); dense values are numbers.",
        examples=[[{"c1": "a", "c2": 17, "i1": 0.5}]],
    )


class PredictResponse(BaseModel):
    predictions: list[float] = Field(description="Click probability per instance, in order.")
    model_version: int


class Health(BaseModel):
    status: str
    detail: str | None = None
