"""Typed reading of one mapping of the YAML document into its section dataclass.

The dataclass is the schema: its fields are the allowed keys, its defaults are what an absent
key reads as (a field without a default is a required key), and its annotations say how a
plain field (``bool``, ``int``, ``float``, ``str``, a ``Literal``, an optional string, a
secret) is checked. Fields that need more (lists, paths, cross-checks) are read by the
section's parser and handed to :meth:`Section.build`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    TypeVar,
    get_args,
    get_origin,
    get_type_hints,
)

from service.config.settings import MissingEnv
from service.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
S = TypeVar("S", bound="DataclassInstance")

_SECRET = frozenset({str, MissingEnv, type(None)})
_OPTIONAL_STR = frozenset({str, type(None)})


def field_defaults(schema: type[DataclassInstance]) -> dict[str, object]:
    """Each field's default (a factory is called); fields without one are left out."""
    out: dict[str, object] = {}
    for f in fields(schema):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


class Section(Generic[T]):
    """Typed access to one mapping of the YAML document, with errors that name the key."""

    def __init__(
        self,
        raw: object,
        where: str,
        source: Path,
        schema: type[T],
        keys: Iterable[str] | None = None,
    ) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: {where} must be a mapping")
        self.raw: dict[str, Any] = raw
        self.where = where
        self.source = source
        self.schema = schema
        self.keys = tuple(f.name for f in fields(schema)) if keys is None else tuple(keys)
        self.defaults = field_defaults(schema)
        unknown = sorted(set(map(str, self.raw)) - set(self.keys))
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {unknown} in {where}; allowed: {sorted(self.keys)}"
            )

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.where}.{key} {message}")

    def section(self, key: str, schema: type[S]) -> Section[S]:
        return Section(self.raw.get(key), key, self.source, schema)

    def build(
        self,
        given: Mapping[str, object] | None = None,
        *,
        minimum: Mapping[str, int] | None = None,
        float_minimum: float | None = None,
    ) -> T:
        """The dataclass: ``given`` fields as passed, every other one read by its annotation.

        ``minimum`` bounds integer fields by name; ``float_minimum`` bounds every float field
        read here, and makes it finite too.
        """
        values = dict(given or {})
        bounds = minimum or {}
        hints = get_type_hints(self.schema)
        for f in fields(self.schema):
            if f.name in values or f.name not in self.keys:
                continue
            hint = hints[f.name]
            if hint is bool:
                values[f.name] = self.bool_value(f.name)
            elif hint is int:
                values[f.name] = self.int_value(f.name, minimum=bounds.get(f.name))
            elif hint is float:
                values[f.name] = self.float_value(f.name, minimum=float_minimum)
            elif hint is str:
                values[f.name] = self.str_value(f.name)
            elif get_origin(hint) is Literal:
                values[f.name] = self.choice(f.name, tuple(map(str, get_args(hint))))
            elif frozenset(get_args(hint)) == _SECRET:
                values[f.name] = self.secret(f.name)
            elif frozenset(get_args(hint)) == _OPTIONAL_STR:
                values[f.name] = self.opt_str(f.name)
            else:  # a programming error: the section's parser must read this field
                raise TypeError(f"{self.schema.__name__}.{f.name} ({hint}) needs its own reader")
        return self.schema(**values)

    def get(self, key: str) -> Any:
        """The value given, else the field's default (None for a required key)."""
        value = self.raw[key] if key in self.raw else self.defaults.get(key)
        if isinstance(value, MissingEnv):
            raise self.error(key, f"uses ${{{value.name}}}, which is not set")
        return value

    def required(self, key: str) -> bool:
        return key not in self.defaults

    def secret(self, key: str) -> str | MissingEnv | None:
        value = self.raw.get(key, self.defaults.get(key))
        if value is None or isinstance(value, MissingEnv):
            return value
        if not isinstance(value, str):
            raise self.error(key, "must be a string")
        return value

    def str_value(self, key: str) -> str:
        value = self.get(key)
        if value is None and self.required(key):
            raise self.error(key, "is required")
        if not isinstance(value, str) or not value:
            raise self.error(key, "must be a non-empty string")
        return value

    def opt_str(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise self.error(key, "must be a non-empty string or null")
        return value

    def str_list(self, key: str) -> list[str]:
        value = self.get(key)
        if value is None and self.required(key):
            raise self.error(key, "is required")
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of strings")
        return list(value)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
        if value not in choices:
            raise self.error(key, f"must be one of {list(choices)}, not {value!r}")
        return str(value)

    def int_value(self, key: str, minimum: int | None = None) -> int:
        value = self.get(key)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, not {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}")
        return value

    def float_value(self, key: str, minimum: float | None = None) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {value!r}")
        if minimum is not None and not (math.isfinite(value) and value >= minimum):
            raise self.error(key, f"must be a finite number >= {minimum:g}, not {value!r}")
        return float(value)

    def bool_value(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def triple(self, key: str, positive: bool = False) -> tuple[float, float, float]:
        value = self.get(key)
        if (
            not isinstance(value, list | tuple)
            or len(value) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise self.error(key, "must be a list of three numbers (R, G, B)")
        if positive and not all(v > 0 for v in value):
            raise self.error(key, "must be positive")
        return (float(value[0]), float(value[1]), float(value[2]))
