"""The assembled SAM-Med2D network."""

from __future__ import annotations

import torch
from torch import nn

from .config import SamMed2DConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder


class SamMed2D(nn.Module):
    """Image encoder, prompt encoder and mask decoder, with parameter names of the published checkpoint.

    Images enter :meth:`encode` normalised and at ``config.image_size`` (see :mod:`lib.serving.preprocessing`); prompts
    enter :meth:`decode` in that same input frame.
    """

    def __init__(
        self,
        config: SamMed2DConfig,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Run with (SAM-Med2D) or without (SAM-Med2D*) the encoder adapters."""
        self.image_encoder.set_adapters_enabled(enabled)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised images -> ``(B, C, S/16, S/16)`` image embeddings."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        image_pe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompt rows; returns the kept mask of each row.

        Args:
            image_embeddings: ``(B, C, h, w)``, or ``(1, C, h, w)`` shared by every prompt row.
            point_coords: ``(B, N, 2)`` (x, y) in the input frame; ``point_labels``: ``(B, N)``.
            boxes: ``(B, 4)`` XYXY in the input frame.
            mask_inputs: ``(B, 1, 4h, 4w)``.
            multimask_output: decode three candidate masks and keep the one with the highest predicted IoU (as the
                published code does); otherwise the single-mask output.
            image_pe: ``(1, C, h, w)`` dense positional encoding, when the caller has it cached.

        Returns:
            low-resolution logits ``(B, 1, 4h, 4w)`` and predicted IoU ``(B, 1)``.
        """
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
        if image_embeddings.shape[0] != sparse.shape[0]:
            image_embeddings = image_embeddings.expand(sparse.shape[0], -1, -1, -1)
        if image_pe is None:
            image_pe = self.prompt_encoder.get_dense_pe()
        low_res, iou = self.mask_decoder(image_embeddings, image_pe, sparse, dense, multimask_output)
        if multimask_output:
            best = iou.argmax(dim=1, keepdim=True)
            iou = iou.gather(1, best)
            low_res = low_res.gather(1, best[:, :, None, None].expand(-1, -1, *low_res.shape[-2:]))
        return low_res, iou
