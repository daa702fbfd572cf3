"""Segmentation metrics per mask."""

from __future__ import annotations

import torch


def dice_per_mask(predictions: torch.Tensor, targets: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Dice of ``(N, ...)`` binary predictions against ``(N, ...)`` binary targets -> ``(N,)``.

    Two empty masks score 1 (nothing to find, nothing found).
    """
    p = predictions.flatten(1) > 0
    t = targets.flatten(1) > 0
    inter = (p & t).sum(1).double()
    total = p.sum(1).double() + t.sum(1).double()
    return torch.where(total > 0, 2 * inter / (total + eps), torch.ones_like(total)).float()


def iou_per_mask(predictions: torch.Tensor, targets: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Intersection over union of ``(N, ...)`` binary masks -> ``(N,)`` (1 for two empty masks)."""
    p = predictions.flatten(1) > 0
    t = targets.flatten(1) > 0
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    return torch.where(union > 0, inter / (union + eps), torch.ones_like(union)).float()
