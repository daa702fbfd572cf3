"""A SAM-style predictor for SAM-Med2D: set an image once, then decode any number of prompts."""

from __future__ import annotations

import numpy as np
import torch

from lib.modeling import SamMed2D
from lib.serving.preprocessing import FrameGeometry, PolicyName, preprocess_image


class Predictor:
    """Same semantics as the published ``SammedPredictor``, with both preprocessing policies.

    Prompts are in original image pixels, (x, y) order; boxes are XYXY. A single prompt (``point_coords`` ``(N, 2)``,
    ``box`` ``(4,)``) gives outputs with a leading mask axis of 1; a batch of prompt rows (``point_coords``
    ``(B, N, 2)`` and/or ``box`` ``(B, 4)``) runs in one decoder call and gives outputs with a leading ``B`` axis.
    """

    def __init__(self, model: SamMed2D, preprocess: PolicyName = "evaluation") -> None:
        self.model = model
        self.policy = preprocess
        self.features: torch.Tensor | None = None
        self.geometry: FrameGeometry | None = None
        self._image_pe: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode an ``(H, W, 3)`` uint8 image (or ``(H, W)`` grey)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format == "BGR" and image.ndim == 3:
            image = image[..., ::-1]
        cfg = self.model.config
        tensor, geometry = preprocess_image(
            image, cfg.image_size, cfg.pixel_mean, cfg.pixel_std, self.policy, device=self.device
        )
        self.set_embedding(self.model.encode(tensor), geometry)

    def set_embedding(self, features: torch.Tensor, geometry: FrameGeometry) -> None:
        """Use an embedding computed earlier (for example from a cache) for the image described by ``geometry``."""
        self.features = features
        self.geometry = geometry

    def reset_image(self) -> None:
        self.features = None
        self.geometry = None

    def image_pe(self) -> torch.Tensor:
        """The dense positional encoding, computed once: it depends on the weights only."""
        if self._image_pe is None:
            with torch.no_grad():
                self._image_pe = self.model.prompt_encoder.get_dense_pe()
        return self._image_pe

    @torch.no_grad()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts on the current image.

        Args:
            point_coords: ``(N, 2)`` or ``(B, N, 2)`` (x, y) original pixels; ``point_labels``: ``(N,)`` or ``(B, N)``
                with 1 foreground, 0 background.
            box: ``(4,)`` or ``(B, 4)`` XYXY original pixels.
            mask_input: ``(1, s, s)`` or ``(B, 1, s, s)`` low-resolution mask prompt, passed to the model as given
                (the published predictor passes logits; the training and evaluation protocol passes probabilities).
            multimask_output: decode three candidates and keep the one with the highest predicted IoU.
            return_logits: return logits instead of a boolean mask.

        Returns:
            masks ``([B,] 1, H, W)``, predicted IoU ``([B,] 1)`` and low-resolution logits ``([B,] 1, s, s)``.
        """
        if self.features is None or self.geometry is None:
            raise RuntimeError("call set_image() before predict()")
        coords_t = labels_t = box_t = mask_t = None
        batched = False
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            batched = coords.ndim == 3
            if not batched:
                coords, labels = coords[None], labels[None]
            coords_t = self._tensor(self.geometry.points_to_input(coords))
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
        if box is not None:
            boxes = np.asarray(box, dtype=np.float64)
            batched = batched or boxes.ndim == 2
            box_t = self._tensor(self.geometry.boxes_to_input(boxes.reshape(-1, 4)))
        if mask_input is not None:
            masks = np.asarray(mask_input, dtype=np.float32)
            batched = batched or masks.ndim == 4
            mask_t = self._tensor(masks.reshape(-1, 1, *masks.shape[-2:]))
        low_res, iou = self.predict_torch(coords_t, labels_t, box_t, mask_t, multimask_output)
        masks = self.geometry.masks_to_original(low_res)
        if not return_logits:
            masks = masks > 0.0
        out = (masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy())
        if batched:
            return out
        return tuple(o[0] for o in out)  # type: ignore[return-value]

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts already in the input frame (``(B, N, 2)``, ``(B, N)``, ``(B, 4)``, ``(B, 1, s, s)``) ->
        low-resolution logits ``(B, 1, s, s)`` and IoU ``(B, 1)``."""
        if self.features is None:
            raise RuntimeError("call set_image() before predict()")
        return self.model.decode(
            self.features, point_coords, point_labels, boxes, mask_input, multimask_output, image_pe=self.image_pe()
        )

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=self.device)
