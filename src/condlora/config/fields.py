"""The building blocks of every config section: a field with help text, checks that name the field, and the
conversion of command-line / JSON values to a field's type."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A section field with its default and the help text the command line shows."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"help": help, **kw})


def check(ok: bool, section: str, name: str, message: str, value: Any) -> None:
    """Raise ConfigError("section.name: message, got value") unless `ok`."""
    if not ok:
        raise ConfigError(f"{section}.{name}: {message}, got {value!r}")


def check_fields(obj: Any, section: str) -> None:
    """Checks every section shares: Literal fields hold an allowed value, float fields are finite."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        choices = literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices and value not in choices:
            allowed = ", ".join(map(str, choices))
            raise ConfigError(f"{section}.{f.name}: must be one of {allowed}, got {value!r}")
        if hints[f.name] is float:
            check(isinstance(value, (int, float)) and math.isfinite(value), section, f.name, "must be finite", value)


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` annotation, else None."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a JSON or command-line value to `annotation` (int, float, bool, str, tuple[int, ...], Literal)."""
    choices = literal_choices(annotation)
    if choices:
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            (item, _) = typing.get_args(annotation)
            items = value.split(",") if isinstance(value, str) else value
            return tuple(item(v) for v in items if str(v).strip() != "")
        if annotation is bool:
            return _to_bool(value)
        if annotation in (int, float) and isinstance(value, bool):
            raise ValueError("a boolean is not a number")
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return annotation(value)
    except (TypeError, ValueError) as err:
        kind = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{where}: expected {kind}, got {value!r} ({err})") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")
