"""The typed configuration of dfm (DESIGN.md rule 6).

A :class:`TrainConfig` is a tree of frozen attrs sections. It is resolved in layers, lowest first: a
named recipe (:mod:`dfm.app.recipes`), a YAML file, dotted ``key.sub=value`` CLI overrides; then it is
structured once with cattrs (unknown keys forbidden) so that every validator runs on the result.
Problems are reported together in one :class:`ConfigError`, one ``dotted.key: reason`` per line.
"""

from dfm.app.config.checkpoint import CheckpointConfig
from dfm.app.config.codecs import CodecsConfig
from dfm.app.config.data import DataConfig, SyntheticConfig
from dfm.app.config.docs import attribute_docs, config_classes
from dfm.app.config.errors import ConfigError
from dfm.app.config.layering import merge, parse_overrides, resolve_config
from dfm.app.config.logs import LoggingConfig
from dfm.app.config.lora import LoraConfig
from dfm.app.config.optim import OptimConfig
from dfm.app.config.parallel import ParallelConfig
from dfm.app.config.run import RunConfig
from dfm.app.config.sample import SampleConfig
from dfm.app.config.serialize import (
    config_from_dict,
    config_from_yaml,
    config_to_dict,
    config_to_yaml,
    structure,
)
from dfm.app.config.tracking import TrackingConfig
from dfm.app.config.training import TrainingConfig
from dfm.app.config.tree import DiffusionSection, ModelSection, TrainConfig

__all__ = [
    "CheckpointConfig",
    "CodecsConfig",
    "ConfigError",
    "DataConfig",
    "DiffusionSection",
    "LoggingConfig",
    "LoraConfig",
    "ModelSection",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "SampleConfig",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "TrainingConfig",
    "attribute_docs",
    "config_classes",
    "config_from_dict",
    "config_from_yaml",
    "config_to_dict",
    "config_to_yaml",
    "merge",
    "parse_overrides",
    "resolve_config",
    "structure",
]
