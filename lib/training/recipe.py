"""Training recipes (the paper's and the continual fine-tuning one): hyper-parameters, which parameters train,
the optimizer and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lib.common.settings import parse_bool
from lib.modeling import SamMed2D


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """Everything a training run needs besides the network and the data.

    ``batch_size`` is images per process; each image contributes ``masks_per_image`` prompt rows.
    ``init`` says where the weights come from: ``"served"`` (the model inference serves now) or ``"checkpoint"``
    (``checkpoint``: any layout :func:`lib.io.checkpoint.load_model` reads, e.g. ``sam_vit_b_01ec64.pth``).
    """

    name: str = "continual"
    init: str = "served"
    checkpoint: str = ""
    model_config: str = "vit_b"
    epochs: int = 4
    lr: float = 1e-4
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.5
    image_size: int = 256
    masks_per_image: int = 5
    batch_size: int = 2
    num_gpus: int = 1
    decoder_iterations: int = 8
    point_choices: tuple[int, ...] = (1, 3, 5, 9)
    box_probability: float = 0.5
    box_max_shift: int = 5
    multimask: bool = True
    amp: bool = True
    focal_weight: float = 20.0
    loss_reduction: str = "batch"
    val_split: float = 0.2
    val_points: tuple[int, ...] = (1, 3, 5)
    val_max_images: int = 0
    min_mask_fraction: float = 100 / (256 * 256)
    seed: int = 0
    num_workers: int = 0

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> RecipeConfig:
        """A copy with some values replaced; strings (from a request or a command line) are converted."""
        if not overrides:
            return self
        fields = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        values = {key: _coerce(getattr(self, key), value, key) for key, value in overrides.items()}
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _coerce(default: Any, value: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            return parse_bool(value, key, default=default)
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(int(v) for v in value)
        return type(default)(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"training config {key}={value!r} is not a valid {type(default).__name__}") from err


RECIPES: dict[str, RecipeConfig] = {
    # The app's default: start from what is served, a few epochs on the saved labels, validate on a held-out share.
    "continual": RecipeConfig(),
    # The paper: from SAM ViT-B, 12 epochs, Adam 1e-4 halved at epochs 7 and 10, 5 masks, 50 images x 8 GPUs.
    "sam_med2d_paper": RecipeConfig(
        name="sam_med2d_paper",
        init="checkpoint",
        checkpoint="sam_vit_b_01ec64.pth",
        epochs=12,
        lr=1e-4,
        lr_milestones=(7, 10),
        batch_size=50,
        num_gpus=8,
        val_split=0.2,
        num_workers=8,
    ),
}


def recipe(name: str, overrides: Mapping[str, Any] | None = None) -> RecipeConfig:
    """A named recipe (``continual``, ``sam_med2d_paper``) with optional overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown training config {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name].with_overrides(overrides)


# ------------------------------------------------------------------------------------------------ parameter groups
def parameter_groups(model: SamMed2D) -> dict[str, list[torch.nn.Parameter]]:
    """The model's parameters by role: ``adapters``, ``prompt_encoder``, ``mask_decoder``, ``frozen_encoder``."""
    groups: dict[str, list[torch.nn.Parameter]] = {
        "adapters": [],
        "prompt_encoder": [],
        "mask_decoder": [],
        "frozen_encoder": [],
    }
    for name, param in model.named_parameters():
        if name.startswith("image_encoder."):
            groups["adapters" if ".Adapter." in name else "frozen_encoder"].append(param)
        elif name.startswith("prompt_encoder."):
            groups["prompt_encoder"].append(param)
        else:
            groups["mask_decoder"].append(param)
    return groups


def trainable_parameters(model: SamMed2D) -> list[torch.nn.Parameter]:
    """What the recipe ever trains: adapters, prompt encoder and mask decoder."""
    groups = parameter_groups(model)
    return groups["adapters"] + groups["prompt_encoder"] + groups["mask_decoder"]


def train_only(model: SamMed2D, names: Sequence[str]) -> None:
    for group, params in parameter_groups(model).items():
        for param in params:
            param.requires_grad_(group in names)


def make_optimizer(model: SamMed2D, config: RecipeConfig) -> torch.optim.Adam:
    """Adam over the trainable groups (frozen encoder weights are not even handed to it).

    The fused implementation does the same arithmetic as the default one in a few kernels instead of a Python loop
    over hundreds of small tensors (5x faster per step on CPU; there are nine steps per batch).
    """
    return torch.optim.Adam(trainable_parameters(model), lr=config.lr, fused=True)


def configure_cpu_math() -> None:
    """Flush denormal floats to zero on CPU.

    Fresh adapters and small gradients produce denormals, and x86 CPUs handle them up to 10x slower (measured on the
    encoder backward pass); their values are below 1e-38 and do not matter to training. The setting is per thread
    and new threads inherit it, so call this before the first parallel operation of the process.
    """
    torch.set_flush_denormal(True)


def make_scheduler(optimizer: torch.optim.Optimizer, config: RecipeConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Learning rate multiplied by ``lr_gamma`` at each milestone epoch (stepped once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)


# ---------------------------------------------------------------------------------------------------- the iteration
