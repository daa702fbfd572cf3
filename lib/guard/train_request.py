"""What a REST training request may set: the documented recipe fields and the task's config choices, in range.

A training run loads weights and writes files, so a request is an instruction to the server's file system unless it
is held to documented values. Accepted: the fields of :class:`lib.training.recipe.RecipeConfig` that tune a run (under
their own names or MONAI Label's ``max_epochs`` / ``train_batch_size``), each within :data:`NUMBERS` or
:data:`NUMBER_LISTS`, and the train task's config choices (``recipe``, ``multi_gpu``, ``gpus``...). Refused: any
other key, among them ``init``, ``checkpoint``, ``model_config`` and ``image_size`` (they change where the weights
come from or what they are: a different starting checkpoint is the server's ``--conf train_checkpoint``) and
MONAI Label's ``name`` (the run's output folder).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from lib.common.settings import RequestError, SettingError, parse_bool, parse_number

# Numeric keys and the values a request may give them (inclusive). The learning rate goes far above any useful
# value on purpose: a diverging run is harmless (the promotion gate keeps it from being served) and tests use one.
NUMBERS: dict[str, tuple[float, float]] = {
    "max_epochs": (1, 1000),
    "epochs": (1, 1000),
    "train_batch_size": (1, 256),
    "batch_size": (1, 256),
    "lr": (1e-12, 1e4),
    "lr_gamma": (0.0, 1.0),
    "masks_per_image": (1, 64),
    "num_gpus": (1, 64),
    "decoder_iterations": (0, 64),
    "box_probability": (0.0, 1.0),
    "box_max_shift": (0, 256),
    "focal_weight": (0.0, 1000.0),
    "val_split": (0.0, 0.9),
    "val_max_images": (0, 1_000_000),
    "min_mask_fraction": (0.0, 1.0),
    "seed": (0, 2**31 - 1),
    "num_workers": (0, 64),
}
FLOATS = {"lr", "lr_gamma", "box_probability", "focal_weight", "val_split", "min_mask_fraction"}
# Lists of integers (a JSON list or "1,3,5"): at most 16 values, each in the range.
NUMBER_LISTS: dict[str, tuple[int, int]] = {"lr_milestones": (1, 1000), "point_choices": (1, 64), "val_points": (1, 64)}
FLAGS = {"multi_gpu", "multimask", "amp"}
CHOICES: dict[str, tuple[str, ...]] = {"loss_reduction": ("batch", "mask")}
_GPUS = re.compile(r"all|[0-9]{1,2}(,[0-9]{1,2}){0,15}")


def check_train_params(params: Any, config: Mapping[str, Any]) -> None:
    """Refuse a training request's ``params`` unless every key is documented and its value in range.

    Args:
        params: the request's JSON body (``None``: the defaults).
        config: the train task's config (``TrainTask.config()``, what Slicer shows); its list values are choices.

    Raises:
        RequestError: 422 naming the key and what it accepts.
    """
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise RequestError(f"training parameters must be a JSON object, got {type(params).__name__}", 422)
    choices = {**CHOICES, **{k: tuple(v) for k, v in config.items() if isinstance(v, list)}}
    for key, value in params.items():
        # MONAI Label's config lists its default first and clients may send the list back: its first value counts.
        single = value[0] if isinstance(value, list) and value and key not in NUMBER_LISTS else value
        if key in choices:
            if single not in choices[key]:
                raise RequestError(f"training parameter {key}={value!r} is not one of {list(choices[key])}", 422)
        elif key in FLAGS:
            _check(parse_bool, single, f"training parameter {key}")
        elif key in NUMBERS:
            low, high = NUMBERS[key]
            _check(parse_number, single, f"training parameter {key}", integer=key not in FLOATS, low=low, high=high)
        elif key in NUMBER_LISTS:
            items = [v for v in value.replace(" ", "").split(",") if v] if isinstance(value, str) else value
            if not isinstance(items, list) or not 1 <= len(items) <= 16:
                raise RequestError(f"training parameter {key}={value!r} must be 1 to 16 integers like [1, 3]", 422)
            for item in items:
                low, high = NUMBER_LISTS[key]
                _check(parse_number, item, f"training parameter {key}", integer=True, low=low, high=high)
        elif key == "gpus":
            if not isinstance(single, str) or not _GPUS.fullmatch(single):
                raise RequestError(f"training parameter gpus={value!r} must be 'all' or device numbers ('0,1')", 422)
        else:
            accepted = sorted({*choices, *FLAGS, *NUMBERS, *NUMBER_LISTS, "gpus"})
            raise RequestError(
                f"training parameter {key!r} is not accepted; accepted: {', '.join(accepted)} "
                "(a different starting checkpoint is the server's --conf train_checkpoint)",
                422,
            )


def _check(parse: Callable[..., Any], value: Any, name: str, **kwargs: Any) -> None:
    try:
        parse(value, name, **kwargs)
    except SettingError as err:
        raise RequestError(str(err), 422) from None
