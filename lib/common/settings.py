"""Typed settings from a MONAI Label server's ``--conf`` (string values, one key per dataclass field)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def conf_bool(value: Any) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, any case) or a bool; anything else raises ValueError."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{value!r} is not a boolean (true/false)")
    return text in ("true", "1", "yes")


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
        try:
            if field.type in ("bool", bool):
                values[field.name] = conf_bool(raw)
            elif field.type in ("int", int):
                values[field.name] = int(raw)
            elif field.type in ("float", float):
                values[field.name] = float(raw)
            else:
                values[field.name] = str(raw).strip()
        except ValueError as err:
            raise ValueError(f"--conf {key} {raw!r}: {err}") from err
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"--conf {prefix}*: {err}") from err
