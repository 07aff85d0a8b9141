"""Experiments: A/B tests that stay fair while every model trains online.

With online training a model learns from the traffic it serves, so arms that serve 5%
and 95% of the users also learn from 5% and 95% of the events, and the bigger one wins
for that alone (Monolith #28). Here an experiment splits the *units* (users, say) into
disjoint, randomised slices of a set share each: serving answers a unit with its arm's
model, and that arm's trainer learns from its slice's events only. Two arms of equal
share then differ in their model and in nothing else. Units in no arm get the default
model, whose trainer learns from every event (or, with ``default_trains_on = "rest"``,
from the units in no arm).

Assignment is a pure function of the unit's value, the same in the trainer and in
serving: its store key (the hash the unit's own embedding row has) mixed with a salt
from the experiment's name, modulo ``buckets``. Each arm has a lane of ``buckets /
arms`` buckets and owns the first ``share x buckets`` of it, so raising an arm's share
keeps every unit it had (and never moves another arm's), and a new experiment name
reshuffles every unit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from hashlib import blake2b
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.base import Keys
from storage.keys import feature_keys, splitmix64
from trainer.encoding import EncodedBatch, bag_lengths

DEFAULT_ARM = "default"
"""The arm name of units in no arm (metrics label, response field)."""

_ARM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class ArmConfig(BaseModel):
    """One arm: its share of the units, and how its model differs from the default."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(
        gt=0, le=1, description="Fraction of the units in this arm (at most 1 / arms)."
    )
    store: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the [store] section for this arm's store (default: "
        "redis_prefix '<prefix>-<arm>', data_dir '<data_dir>/arms/<arm>'), e.g. another "
        "optimizer or learning rate.",
    )
    trainer: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the [trainer] section for this arm's trainer, e.g. "
        "another model or dense learning rate.",
    )


class ExperimentConfig(BaseModel):
    """An A/B test: units split by a stable hash into arms, each with its own model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, description="Salts the assignment: a new name reshuffles the units."
    )
    unit: str = Field(
        description="The categorical sparse field whose value is the unit of assignment "
        "(e.g. the user id); an event or instance without it gets the default model."
    )
    arms: dict[str, ArmConfig] = Field(
        min_length=1, max_length=64, description="Arm name -> its share and overrides."
    )
    buckets: int = Field(
        10_000, ge=2, le=1_000_000, description="Assignment granularity: shares round to it."
    )
    default_trains_on: Literal["all", "rest"] = Field(
        "all",
        description="What the default model learns from: every event, or the events of "
        "units in no arm.",
    )

    @model_validator(mode="after")
    def _arms_fit(self) -> ExperimentConfig:
        lane = self.buckets // len(self.arms)
        for name, arm in self.arms.items():
            if name == DEFAULT_ARM or _ARM_NAME.fullmatch(name) is None:
                raise ValueError(
                    f"arm name {name!r}: use 1-32 of a-z, 0-9, '_' and '-' (not "
                    f"{DEFAULT_ARM!r}), starting with a letter or digit"
                )
            owned = round(arm.share * self.buckets)
            if owned > lane:
                raise ValueError(
                    f"arm {name!r}: share {arm.share} is more than one lane: with "
                    f"{len(self.arms)} arms each may have at most {lane / self.buckets:g}"
                )
            if owned == 0:
                raise ValueError(
                    f"arm {name!r}: share {arm.share} rounds to no bucket of {self.buckets}"
                )
        return self

    def split(self) -> ArmSplit:
        return ArmSplit(self)


class ArmSplit:
    """Which arm each unit is in: index into ``arms``, or -1 for the default model."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.unit = config.unit
        self.arms = list(config.arms)
        self.shares = [arm.share for arm in config.arms.values()]
        self.buckets = config.buckets
        self._salt = np.frombuffer(
            blake2b(b"streamrec.experiment:" + config.name.encode(), digest_size=8).digest(),
            dtype="<u8",
        )[0]
        self._lane = config.buckets // len(self.arms)
        self._owned = np.array([round(s * config.buckets) for s in self.shares], dtype=np.int64)

    def of_keys(self, keys: Keys) -> npt.NDArray[np.int8]:
        """The arm index of each unit key (-1: the default model)."""
        bucket = (splitmix64(keys ^ self._salt) % np.uint64(self.buckets)).astype(np.int64)
        lane, offset = np.divmod(bucket, self._lane)
        in_lane = lane < len(self.arms)
        owned = np.zeros(len(keys), dtype=bool)
        owned[in_lane] = offset[in_lane] < self._owned[lane[in_lane]]
        return np.where(owned, lane, -1).astype(np.int8)

    def name(self, index: int) -> str:
        return DEFAULT_ARM if index < 0 else self.arms[index]

    def index(self, arm: str) -> int:
        return self.arms.index(arm)


def arms_of_batch(split: ArmSplit, batch: EncodedBatch) -> npt.NDArray[np.int8]:
    """The arm index of each example of an encoded batch, by its unit's key (-1: no
    unit value, or in no arm)."""
    field = batch.fields[split.unit]
    present = bag_lengths(field) > 0
    arms = np.full(batch.size, -1, dtype=np.int8)
    arms[present] = split.of_keys(field.keys[field.offsets[present]])
    return arms


def arms_of_values(split: ArmSplit, values: Sequence[object]) -> npt.NDArray[np.int8]:
    """The arm index of each unit value (None: no value, the default model), hashed as
    the trainer hashes them (``storage.keys.feature_keys``)."""
    present = np.fromiter((v is not None for v in values), dtype=bool, count=len(values))
    arms = np.full(len(values), -1, dtype=np.int8)
    if present.any():
        ids = [v for v in values if v is not None]
        arms[present] = split.of_keys(feature_keys(split.unit, ids))  # type: ignore[arg-type]
    return arms


class ArmFilter:
    """The examples one trainer of an experiment learns from: its arm's units (or, for
    the default model with ``default_trains_on = "rest"``, the units in no arm)."""

    def __init__(self, config: ExperimentConfig, arm: str | None) -> None:
        self.split = config.split()
        self.arm = DEFAULT_ARM if arm is None else arm
        self._index = -1 if arm is None else self.split.index(arm)
        self.share = config.arms[arm].share if arm is not None else 1.0 - sum(self.split.shares)

    @classmethod
    def of(cls, config: ExperimentConfig | None, arm: str | None) -> ArmFilter | None:
        """The filter of ``arm``'s trainer (None: the default model's); None where it
        learns from every event."""
        if config is None or (arm is None and config.default_trains_on == "all"):
            return None
        return cls(config, arm)

    def keep(self, batch: EncodedBatch) -> npt.NDArray[np.bool_]:
        keep: npt.NDArray[np.bool_] = arms_of_batch(self.split, batch) == self._index
        return keep

    def records_per_batch(self, batch_size: int) -> int:
        """Records to read for about ``batch_size`` of this trainer's events, so a step
        learns from as many events as the default model's (a share under 1% reads as 1%,
        so a batch stays bounded)."""
        return math.ceil(batch_size / max(self.share, 0.01))
