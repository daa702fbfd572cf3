"""The SAM-Med2D training loss: 20 x focal + Dice + MSE of the predicted IoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalDiceIoULoss(nn.Module):
    """``focal_weight * focal(alpha, gamma) + dice(smooth) + iou_weight * mse(predicted IoU, soft IoU)``.

    As in the published training script, the focal term is a mean over every pixel, and the Dice term and the IoU
    target are computed over the whole batch (``reduction="batch"``); ``reduction="mask"`` computes Dice and IoU per
    mask and averages them. Computed in float32 whatever the autocast dtype of the logits.

    Args:
        focal_weight: weight of the focal term (20 in the paper).
        alpha, gamma: focal loss parameters (0.25, 2).
        smooth: Dice smoothing (1).
        iou_weight: weight of the IoU regression term (1).
        reduction: ``"batch"`` (published) or ``"mask"``.
    """

    def __init__(
        self,
        focal_weight: float = 20.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        smooth: float = 1.0,
        iou_weight: float = 1.0,
        reduction: str = "batch",
    ) -> None:
        super().__init__()
        if reduction not in ("batch", "mask"):
            raise ValueError(f"reduction must be 'batch' or 'mask', got {reduction!r}")
        self.focal_weight = focal_weight
        self.alpha = alpha
        self.gamma = gamma
        self.smooth = smooth
        self.iou_weight = iou_weight
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, predicted_iou: torch.Tensor) -> torch.Tensor:
        """Loss of ``(B, 1, H, W)`` mask logits against ``(B, 1, H, W)`` 0/1 targets and ``(B, 1)`` predicted IoU."""
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        logits = logits.float()
        targets = targets.float()
        probs = torch.sigmoid(logits)
        # log(p) and log(1 - p) from the logits directly: stable where the published log(p + 1e-12) saturates.
        log_p = F.logsigmoid(logits)
        log_not_p = F.logsigmoid(-logits)
        focal = -(
            self.alpha * targets * (1 - probs) ** self.gamma * log_p
            + (1 - self.alpha) * (1 - targets) * probs**self.gamma * log_not_p
        ).mean()
        dims = None if self.reduction == "batch" else (1, 2, 3)
        inter = (probs * targets).sum(dim=dims)
        total = probs.sum(dim=dims) + targets.sum(dim=dims)
        dice = (1 - (2 * inter + self.smooth) / (total + self.smooth)).mean()
        soft_iou = (inter + 1e-7) / (total - inter + 1e-7)
        if self.reduction == "mask":
            soft_iou = soft_iou[:, None]
        iou_mse = ((soft_iou - predicted_iou.float()) ** 2).mean()
        return self.focal_weight * focal + dice + self.iou_weight * iou_mse
