"""Settings: ``config.yaml`` parsed once, at the edge, into frozen dataclasses.

- :mod:`~service.config.settings`: one dataclass per section; it owns the section's keys
  (its fields) and their defaults.
- :mod:`~service.config.loader`: finds and reads the file. Rules it enforces, so that a typo
  is a start-up error and not a silent default:

  - every key is known; an unknown key names the section and lists the allowed ones;
  - ``${NAME}`` in a string is replaced by that environment variable. A missing variable is
    an error only where the value is used: ``predict`` runs without ``LABEL_STUDIO_TOKEN``,
    ``serve`` refuses to start without it (see :meth:`Config.require`);
  - every path is relative to the folder of the config file, not to the working directory.

  Where no ``--config`` is given, :func:`find_config` looks in ``$LS_AUTOSEG_CONFIG``,
  ``./config.yaml`` and finally the repository's own ``config.yaml`` (bundled demo model).
- :mod:`~service.config.section`: reads one YAML mapping into its dataclass, by the fields.
- :mod:`~service.config.writer`: :func:`write_config`, the one writer of config files.
"""

from __future__ import annotations

from service.config.loader import (
    CONFIG_ENV_VAR,
    find_config,
    load_config,
    parse_config,
    parse_threshold_flag,
    parse_thresholds,
)
from service.config.settings import (
    Activation,
    Config,
    LabelStudioConfig,
    MissingEnv,
    ModelConfig,
    PredictionConfig,
    ProjectConfig,
    QueueConfig,
    ReconcileConfig,
    ServerConfig,
    Thresholds,
    WorkerConfig,
)
from service.config.writer import section_document, write_config

__all__ = [
    "CONFIG_ENV_VAR",
    "Activation",
    "Config",
    "LabelStudioConfig",
    "MissingEnv",
    "ModelConfig",
    "PredictionConfig",
    "ProjectConfig",
    "QueueConfig",
    "ReconcileConfig",
    "ServerConfig",
    "Thresholds",
    "WorkerConfig",
    "find_config",
    "load_config",
    "parse_config",
    "parse_threshold_flag",
    "parse_thresholds",
    "section_document",
    "write_config",
]
