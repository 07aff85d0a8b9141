"""The feature spec: which fields an event carries and how each one is embedded.

The spec is configuration, not code, so a user can train on their own stream by
writing a TOML/JSON file (see README "Configuration").
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SparseFeature(BaseModel):
    """One categorical field; each distinct value gets its own embedding row."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Field name as it appears in event.features.")
    kind: Literal["categorical", "multi_hot"] = Field(
        "categorical",
        description="categorical: one string/int per event; multi_hot: a list of them.",
    )
    dim: int = Field(16, ge=1, le=1024, description="Embedding dimension of this field's table.")
    pooling: Literal["sum", "mean"] = Field(
        "mean", description="How a multi_hot list is pooled into one vector."
    )


class FeatureSpec(BaseModel):
    """The schema of `features` and `dense` in every event and predict instance."""

    model_config = ConfigDict(extra="forbid")

    sparse: list[SparseFeature] = Field(min_length=1)
    dense: list[str] = Field(default_factory=list, description="Names of float inputs.")

    @model_validator(mode="after")
    def _names_unique(self) -> FeatureSpec:
        names = [f.name for f in self.sparse] + list(self.dense)
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"feature names must be unique across sparse and dense: {dupes}")
        return self

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    @cached_property
    def _sparse_by_name(self) -> dict[str, SparseFeature]:
        # Validation looks fields up for every event and instance: keep it O(1).
        return {f.name: f for f in self.sparse}

    @cached_property
    def categorical_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.sparse if f.kind == "categorical")

    @cached_property
    def dense_names(self) -> frozenset[str]:
        return frozenset(self.dense)

    @cached_property
    def sparse_name_set(self) -> frozenset[str]:
        return frozenset(self.sparse_names)

    @cached_property
    def known_names(self) -> frozenset[str]:
        return self.sparse_name_set | self.dense_names

    def sparse_field(self, name: str) -> SparseFeature | None:
        return self._sparse_by_name.get(name)
