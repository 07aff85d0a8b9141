"""The settings of every streamrec process: one pydantic-settings model.

Precedence: command-line flags > ``STREAMREC_*`` environment variables (nested
with ``__``, e.g. ``STREAMREC_TRAINER__BATCH_SIZE=2048``) > the TOML file given
with ``--config`` > defaults. With no file, everything runs embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.app import ServiceConfig
from storage.config import StoreConfig
from streaming.spec import FeatureSpec
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
    metrics_host: str = Field("127.0.0.1", description="`streamrec train`: bind of /metrics.")
    metrics_port: int = Field(9100, description="`streamrec train`: port of /metrics.")
    malloc_tuning: bool = Field(
        True,
        description="Keep freed heap memory for the next batch instead of handing it back "
        "to the kernel (glibc; see storage/allocator.py): fewer page faults, up to ~200 MB "
        "of freed memory kept resident per malloc arena (one per busy thread).",
    )

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
