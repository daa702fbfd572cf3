"""What a REST training request may set: the keys a train task lists in its config (what Slicer shows), in range.

A training run loads weights and writes files, so a request is an instruction to the server's file system unless it
is held to documented values: no key that is not in the task's config (``init``, ``checkpoint``, ``name`` and any
path are refused; a different starting checkpoint is the server's ``--conf train_checkpoint``, chosen by whoever
runs the server), choices from the config's lists, numbers in :data:`RANGES`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .http_guard import RequestRefusedError

# Numeric keys of the trainer's config and the values a request may give them (inclusive).
RANGES: dict[str, tuple[float, float]] = {
    "max_epochs": (1, 1000),
    "train_batch_size": (1, 256),
    "val_split": (0.0, 0.9),
    "lr": (1e-9, 1.0),
    "masks_per_image": (1, 64),
    "decoder_iterations": (0, 64),
    "seed": (0, 2**31 - 1),
    "val_max_images": (0, 1_000_000),
}
_GPUS = re.compile(r"all|[0-9]{1,2}(,[0-9]{1,2}){0,15}")
_TRUE_FALSE = ("true", "false", "1", "0", "yes", "no")


def check_train_params(params: Any, config: Mapping[str, Any]) -> None:
    """Refuse a training request's ``params`` unless every key is one of ``config``'s with a valid value.

    Args:
        params: the request's JSON body (``None``: the defaults).
        config: the train task's config (``TrainTask.config()``): a list value is a choice, a bool a flag, a number a
            value bounded by :data:`RANGES`, ``gpus`` ``all`` or device numbers.

    Raises:
        RequestRefusedError: 422 naming the key and what it accepts.
    """
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise RequestRefusedError(f"training parameters must be a JSON object, got {type(params).__name__}")
    for key, value in params.items():
        if key not in config:
            raise RequestRefusedError(
                f"training parameter {key!r} is not accepted; accepted: {', '.join(sorted(config))} "
                "(a different starting checkpoint is the server's --conf train_checkpoint)"
            )
        _check_value(key, value[0] if isinstance(value, list) and len(value) == 1 else value, config[key])


def _check_value(key: str, value: Any, default: Any) -> None:
    if isinstance(default, list):
        if value not in default:
            raise RequestRefusedError(f"training parameter {key}={value!r} is not one of {default}")
    elif isinstance(default, bool):
        if not isinstance(value, bool) and str(value).strip().lower() not in _TRUE_FALSE:
            raise RequestRefusedError(f"training parameter {key}={value!r} must be true or false")
    elif key in RANGES:
        low, high = RANGES[key]
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RequestRefusedError(f"training parameter {key}={value!r} must be a number") from None
        if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
            raise RequestRefusedError(f"training parameter {key}={value!r} must be in [{low:g}, {high:g}]")
        if isinstance(default, int) and number != int(number):
            raise RequestRefusedError(f"training parameter {key}={value!r} must be an integer")
    elif key == "gpus":
        if not isinstance(value, str) or not _GPUS.fullmatch(value):
            raise RequestRefusedError(f"training parameter gpus={value!r} must be 'all' or device numbers like '0,1'")
    else:  # a config key without a documented range: nothing a request can set safely
        raise RequestRefusedError(f"training parameter {key!r} cannot be set by a request")
