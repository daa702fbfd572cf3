"""The one reader of typed values: the server's ``--conf`` (strings) and request parameters (JSON or strings).

One vocabulary everywhere: booleans are ``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off`` (any case) or
JSON booleans; anything else is an error that names the setting, never a silent ``false``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


class SettingError(ValueError):
    """A setting or parameter with a value of the wrong kind; the message names it and what it accepts."""


class RequestError(SettingError):
    """A request the server answers with ``status`` (a 4xx) and a message that names the problem."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def parse_bool(value: Any, name: str, default: bool | None = None, allow_auto: bool = False) -> bool | None:
    """A boolean from a JSON value or a string.

    ``None`` and ``""`` give ``default``; so does ``"auto"`` where ``allow_auto`` (request parameters whose default
    depends on the request). Numbers 0 and 1 are accepted as JSON sends them.
    """
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if allow_auto and text == "auto":
        return default
    if text in TRUE_WORDS or text in FALSE_WORDS:
        return text in TRUE_WORDS
    accepted = "true, false or 'auto'" if allow_auto else "true or false"
    raise SettingError(f"{name} must be {accepted}, got {value!r}")


def parse_number(
    value: Any, name: str, integer: bool = False, low: float = -math.inf, high: float = math.inf
) -> float | int:
    """A finite number (an integer where ``integer``) in ``[low, high]`` from a JSON value or a string."""
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise SettingError(f"{name} must be finite, got {value!r}")
    if not low <= number <= high:
        raise SettingError(f"{name}={value!r} must be in [{low:g}, {high:g}]")
    if integer:
        if number != int(number):
            raise SettingError(f"{name}={value!r} must be an integer")
        return int(number)
    return number


def conf_flag(conf: Mapping[str, Any], key: str, default: bool) -> bool:
    """The boolean ``--conf key`` (absent or empty: ``default``)."""
    value = parse_bool(conf.get(key), f"--conf {key}", default=default)
    return default if value is None else value


def dataclass_from_conf(cls: type[T], conf: Mapping[str, Any], prefix: str) -> T:
    """Build the dataclass ``cls`` from the keys ``<prefix><field>`` of ``conf`` (absent or empty: the default).

    Values are converted to the field's type (bool, int, float, else a stripped string); a bad value, or one the
    dataclass rejects, raises a ValueError naming the key.
    """
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = prefix + field.name
        if key not in conf or conf[key] in (None, ""):
            continue
        raw = conf[key]
        name = f"--conf {key}"
        if field.type in ("bool", bool):
            values[field.name] = parse_bool(raw, name)
        elif field.type in ("int", int):
            values[field.name] = parse_number(raw, name, integer=True)
        elif field.type in ("float", float):
            values[field.name] = parse_number(raw, name)
        else:
            values[field.name] = str(raw).strip()
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"--conf {prefix}*: {err}") from err
