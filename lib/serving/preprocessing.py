"""Image preprocessing and prompt/mask geometry: the one path shared by inference, training and evaluation.

Two policies reproduce the published code:

``"evaluation"`` (default)
    What the published training and test scripts do, so what the paper's numbers and the released weights were
    made with: the image is read in BGR order (OpenCV) and normalised with the RGB statistics; an image whose sides
    are both under the model size is centre-padded with zeros (after normalisation) and its prediction cropped back;
    any other image is resized to the model size with nearest neighbour.
``"predictor"``
    What the published ``SammedPredictor`` does: channels as given (RGB), always resized with nearest neighbour.

The evaluation policy is the default because it is the input distribution the weights were trained on and the
one the trainer in this project uses, so served predictions and training agree. For grey images (almost all
medical images) the channel order makes no difference; the two policies then differ only for small images.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

PolicyName = Literal["evaluation", "predictor"]
POLICIES: tuple[str, ...] = ("evaluation", "predictor")


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
    """How an ``(H, W)`` original image sits in the model's ``S x S`` input frame.

    Either ``padded`` (placed at ``(top, left)``, unscaled) or resized (scaled by ``S/W``, ``S/H``).
    """

    original_hw: tuple[int, int]
    input_size: int
    padded: bool
    top: int = 0
    left: int = 0

    def points_to_input(self, coords: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map ``(..., 2)`` (x, y) original pixel coordinates into the input frame."""
        h, w = self.original_hw
        coords = coords.clone() if isinstance(coords, torch.Tensor) else np.array(coords, dtype=np.float64)
        if self.padded:
            coords[..., 0] = coords[..., 0] + self.left
            coords[..., 1] = coords[..., 1] + self.top
        else:
            coords[..., 0] = coords[..., 0] * (self.input_size / w)
            coords[..., 1] = coords[..., 1] * (self.input_size / h)
        return coords

    def boxes_to_input(self, boxes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map ``(..., 4)`` XYXY boxes into the input frame (a box is two points)."""
        shape = boxes.shape
        return self.points_to_input(boxes.reshape(*shape[:-1], 2, 2)).reshape(shape)

    def masks_to_original(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """``(B, M, s, s)`` low-resolution logits -> ``(B, M, H, W)`` logits in the original image."""
        h, w = self.original_hw
        masks = F.interpolate(low_res_logits, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.padded:
            return masks[..., self.top : self.top + h, self.left : self.left + w]
        return F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)

    def masks_to_input(self, masks: torch.Tensor) -> torch.Tensor:
        """``(B, M, H, W)`` masks in the original image -> the input frame (nearest, as the training data path)."""
        if self.padded:
            h, w = self.original_hw
            s = self.input_size
            return F.pad(masks, (self.left, s - w - self.left, self.top, s - h - self.top))
        return F.interpolate(masks, (self.input_size, self.input_size), mode="nearest")


def frame_geometry(original_hw: tuple[int, int], input_size: int, policy: PolicyName) -> FrameGeometry:
    """Where an image of ``original_hw`` goes in the input frame under ``policy``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown preprocessing policy {policy!r}; choose one of {POLICIES}")
    h, w = original_hw
    if policy == "evaluation" and h < input_size and w < input_size:
        return FrameGeometry((h, w), input_size, padded=True, top=(input_size - h) // 2, left=(input_size - w) // 2)
    return FrameGeometry((h, w), input_size, padded=False)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Accept ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` images (0..255) -> ``(H, W, 3)``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    return image


def preprocess_image(
    image: np.ndarray,
    input_size: int,
    pixel_mean: tuple[float, float, float],
    pixel_std: tuple[float, float, float],
    policy: PolicyName = "evaluation",
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, FrameGeometry]:
    """An RGB ``(H, W, 3)`` image with values in 0..255 -> normalised ``(1, 3, S, S)`` input and geometry."""
    image = as_rgb_uint8(image)
    geometry = frame_geometry(image.shape[:2], input_size, policy)
    pixels = torch.as_tensor(np.ascontiguousarray(image), device=device).to(torch.float32)
    if policy == "evaluation":
        pixels = pixels.flip(-1)  # OpenCV's BGR order, as the weights were trained
    mean = torch.tensor(pixel_mean, device=device, dtype=torch.float32)
    std = torch.tensor(pixel_std, device=device, dtype=torch.float32)
    normalised = ((pixels - mean) / std).permute(2, 0, 1)[None]
    h, w = geometry.original_hw
    if geometry.padded:
        s = input_size
        tensor = F.pad(normalised, (geometry.left, s - w - geometry.left, geometry.top, s - h - geometry.top))
    else:
        tensor = F.interpolate(normalised, (input_size, input_size), mode="nearest")
    return tensor.contiguous(), geometry
