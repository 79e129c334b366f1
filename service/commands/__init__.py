"""The batch and operator commands behind the CLI: ``predict``, ``upload``, ``annotations``,
``replace-annotations`` (the tutorial's tools) and ``hook``, ``backfill``, ``status``."""
