"""The settings of every streamrec process: one pydantic-settings model.

Precedence: command-line flags > ``STREAMREC_*`` environment variables (nested
with ``__``, e.g. ``STREAMREC_TRAINER__BATCH_SIZE=2048``) > the TOML file given
with ``--config`` > defaults. With no file, everything runs embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.app import ServiceConfig
from storage.config import StoreConfig
from streaming.spec import FeatureSpec
from trainer.experiment import ExperimentConfig
from trainer.trainer import TrainerConfig

BuiltinSpec = Literal["synthetic", "movielens-100k"]


class LogConfig(BaseModel):
    """Where events come from: the in-process log (embedded) or Kafka."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["memory", "kafka"] = "memory"
    bootstrap_servers: str = "127.0.0.1:19092"
    topic: str = "streamrec-events"
    dead_letter_topic: str = "streamrec-dead-letters"
    group_id: str = "streamrec-trainer"
    memory_capacity: int = Field(
        200_000, ge=1, description="Embedded log: unacknowledged events held before producers wait."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", extra="forbid"
    )

    features: FeatureSpec | BuiltinSpec = Field(
        "synthetic",
        description="The feature spec, or the name of a built-in source whose spec to use.",
    )
    source: str = Field(
        "auto",
        description="Embedded event source: auto (movielens-100k when fetched, else "
        "synthetic), synthetic, movielens-100k or jsonl:PATH.",
    )
    log: LogConfig = Field(default_factory=LogConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    experiment: ExperimentConfig | None = Field(
        None, description="An A/B test of models that each train online (README: Experiments)."
    )
    arm: str | None = Field(
        None,
        description="This process's experiment arm (`--arm`): it uses the arm's store, "
        "trainer settings and consumer group, and trains on the arm's units only. None: "
        "the default model.",
    )
    metrics_host: str = Field("127.0.0.1", description="`streamrec train`: bind of /metrics.")
    metrics_port: int = Field(9100, description="`streamrec train`: port of /metrics.")
    malloc_tuning: bool = Field(
        True,
        description="Keep freed heap memory for the next batch instead of handing it back "
        "to the kernel (glibc; see storage/allocator.py): fewer page faults, up to ~200 MB "
        "of freed memory kept resident per malloc arena (one per busy thread).",
    )

    @model_validator(mode="after")
    def _arms_resolve(self) -> Settings:
        if self.arm is not None and (
            self.experiment is None or self.arm not in self.experiment.arms
        ):
            known = [] if self.experiment is None else list(self.experiment.arms)
            raise ValueError(f"arm {self.arm!r} is not an arm of the experiment (arms: {known})")
        if self.experiment is not None:
            for name in self.experiment.arms:
                try:
                    arm_overrides(self, name)
                except ValueError as exc:
                    raise ValueError(f"experiment arm {name!r}: {exc}") from None
        return self

    def for_arm(self, arm: str | None) -> Settings:
        """These settings as ``arm``'s processes see them (``arm_overrides``); None:
        the default model's. Only the deployment's settings (``arm`` None) have views."""
        if self.arm is not None:
            raise ValueError(f"these settings are already arm {self.arm!r}'s view")
        if arm is None:
            return self.model_copy(update={"arm": None})
        return self.model_copy(update={"arm": arm, **arm_overrides(self, arm)})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def arm_overrides(settings: Settings, arm: str) -> dict[str, BaseModel]:
    """The sections an experiment arm's processes use instead of the default model's:
    its own store (Redis prefix ``<prefix>-<arm>``, data under ``<data_dir>/arms/<arm>``,
    then the arm's ``store`` overrides), trainer (the arm's ``trainer`` overrides) and
    consumer group (``<group_id>-<arm>``, so it reads every event too)."""
    assert settings.experiment is not None
    config = settings.experiment.arms[arm]
    own = {
        "redis_prefix": f"{settings.store.redis_prefix}-{arm}",
        "data_dir": settings.store.data_dir / "arms" / arm,
    }
    store = StoreConfig.model_validate(
        _merged({**settings.store.model_dump(), **own}, config.store)
    )
    trainer = TrainerConfig.model_validate(_merged(settings.trainer.model_dump(), config.trainer))
    log = settings.log.model_copy(update={"group_id": f"{settings.log.group_id}-{arm}"})
    return {"store": store, "trainer": trainer, "log": log}


def _merged(base: dict[str, object], overrides: dict[str, object]) -> dict[str, object]:
    """``base`` with ``overrides`` laid over it, nested tables merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = _merged(below, value)
        else:
            out[key] = value
    return out


class ConfigError(ValueError):
    """A configuration file that is missing or invalid."""


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Settings from ``path`` (TOML), the environment and ``overrides``."""
    if path is None:
        return Settings(**overrides)  # type: ignore[arg-type]
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})

    return FileSettings(**overrides)  # type: ignore[arg-type]
