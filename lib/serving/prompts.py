"""The prompt sampler: the simulated annotator shared by training and evaluation, and the interior click that
propagation prompts the next slice with.

Everything works on masks in the model's input frame (``S x S``, see :mod:`lib.serving.preprocessing`), batched as
prompt rows ``(N, S, S)``, and draws its random numbers from a :class:`PromptRandom`: seeded, so two runs agree, and
sharded, so that the rows a process holds get the same draws whether the batch runs in one process or is split over
several (multi-GPU training matches single-process training on the same total batch).

What the published SAM-Med2D training and test scripts do, and so what this module does:

* first prompt: a box around the largest connected component (XYXY, the max corner exclusive like
  ``regionprops.bbox``), translated by one random shift of at most ``max_shift`` pixels (training; none in
  evaluation), or one foreground point drawn uniformly from the mask;
* further clicks: drawn uniformly (with replacement) from the error region of the previous prediction; a click on a
  false negative is positive (label 1), on a false positive negative (label 0). When a prediction has no error left,
  clicks fall anywhere and carry the ground truth's label there (a confirming click), so a batch keeps its shape.

:func:`interior_clicks` is the deterministic annotator of interactive-segmentation benchmarks (and of this project's
promotion gate and loop benchmark): the most interior pixel of the larger error region (false negatives or false
positives), which for the first click (nothing predicted yet) is the mask's most interior pixel.

Point coordinates are integer pixel positions ``(x, y)``; the prompt encoder adds the half-pixel offset itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from scipy import ndimage

T = TypeVar("T")

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class PromptRandom:
    """Seeded random numbers for the simulated annotator, identical across processes.

    Every process draws the numbers of the whole (global) batch from the same stream and keeps its own contiguous
    share of rows, so a row's draws do not depend on how the batch is split. Per-batch choices (box or point, how
    many clicks) come from the same stream and agree everywhere.

    Args:
        seed: the seed of the stream.
        rank, world_size: this process's place in the group; its rows are ``rank * n .. (rank + 1) * n``.
    """

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a group of {world_size}")
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rank = rank
        self.world_size = world_size

    def rows(self, n: int, *shape: int) -> torch.Tensor:
        """Uniform ``[0, 1)`` numbers of shape ``(n, *shape)`` for this process's ``n`` rows."""
        full = torch.rand((n * self.world_size, *shape), generator=self.generator)
        return full[self.rank * n : (self.rank + 1) * n]

    def uniform(self) -> float:
        """One shared uniform number in ``[0, 1)``."""
        return float(torch.rand((), generator=self.generator))

    def integer(self, low: int, high: int) -> int:
        """One shared integer in ``[low, high)``."""
        return int(torch.randint(low, high, (), generator=self.generator))

    def choice(self, options: Sequence[T]) -> T:
        """One shared element of ``options``, uniformly."""
        return options[self.integer(0, len(options))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a ``(H, W)`` mask, as bool (an empty mask stays empty)."""
    mask = np.asarray(mask) > 0
    labels, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if count < 2:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Box ``(x0, y0, x1, y1)`` (max exclusive, float64) around every pixel of a non-empty ``(H, W)`` mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)


def largest_component_box(mask: np.ndarray) -> np.ndarray:
    """Box ``(x0, y0, x1, y1)`` (max exclusive) around the largest 8-connected component of a ``(H, W)`` mask.

    An empty mask gives the whole image, so a caller never gets a degenerate box.
    """
    mask = largest_component(mask)
    if not mask.any():
        h, w = mask.shape
        return np.array([0, 0, w, h], dtype=np.float32)
    return mask_box(mask).astype(np.float32)


def jitter_boxes(boxes: torch.Tensor, rng: PromptRandom, max_shift: int = 5, std: float = 0.1) -> torch.Tensor:
    """Translate each row of ``(N, 4)`` XYXY boxes by one random integer shift, as the published training data does.

    The largest shift is ``m = min(max_shift, int(5 * std * min(width, height)))`` pixels, drawn uniformly from
    ``[-m, m)`` for x and y independently; the box keeps its size.
    """
    uniform = rng.rows(boxes.shape[0], 2).to(boxes.device)
    if max_shift <= 0:
        return boxes.clone()
    sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    limit = torch.clamp((sides * std * 5).floor(), min=0, max=max_shift)[:, None]
    shift = (uniform * 2 * limit - limit).floor()
    return boxes + torch.cat([shift, shift], dim=-1)


def random_points(masks: torch.Tensor, rng: PromptRandom, num_points: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_points`` foreground clicks per row of ``(N, H, W)`` masks.

    Returns ``(N, num_points, 2)`` float (x, y) coordinates and ``(N, num_points)`` int labels: 1, or 0 for an empty
    mask, whose clicks are drawn from the background (as the published code does).
    """
    masks = masks > 0
    empty = ~masks.flatten(1).any(dim=1)
    region = torch.where(empty[:, None, None], ~masks, masks)
    coords = _sample_pixels(region, rng.rows(masks.shape[0], num_points))
    labels = (~empty).to(torch.int64)[:, None].expand(-1, num_points).contiguous()
    return coords, labels


def error_clicks(
    predictions: torch.Tensor, targets: torch.Tensor, num_points: int, rng: PromptRandom
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_points`` clicks per row uniformly (with replacement) from the error region of a prediction.

    Args:
        predictions: ``(N, H, W)`` binary predictions (bool or 0/1).
        targets: ``(N, H, W)`` ground truth masks (bool or 0/1).
        num_points: clicks per row.
        rng: the random source.

    Returns:
        ``(N, num_points, 2)`` float (x, y) coordinates and ``(N, num_points)`` int labels: 1 on false negatives, 0
        on false positives. A row without errors gets confirming clicks anywhere, labelled with the ground truth.
    """
    predictions = predictions > 0
    targets = targets > 0
    errors = predictions ^ targets
    no_error = ~errors.flatten(1).any(dim=1)
    region = errors | no_error[:, None, None]
    coords = _sample_pixels(region, rng.rows(targets.shape[0], num_points))
    xs = coords[..., 0].long()
    ys = coords[..., 1].long()
    rows = torch.arange(targets.shape[0], device=targets.device)[:, None]
    labels = targets[rows, ys, xs].to(torch.int64)
    return coords, labels


def interior_clicks(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per row at the most interior pixel of the larger error region.

    Args:
        predictions: ``(N, H, W)`` binary predictions (all false before the first click).
        targets: ``(N, H, W)`` ground truth masks.

    Returns:
        ``(N, 1, 2)`` float (x, y) and ``(N, 1)`` int labels: 1 when the false negatives are the larger region, 0 when
        the false positives are. The most interior pixel is the farthest from the region's border, the image border
        counting as border; ties go to the first in row-major order. A row without errors gets a confirming click at
        the target's most interior pixel (label 1), or the image centre (label 0) when the target is empty.
    """
    predictions = (predictions > 0).cpu().numpy()
    targets = (targets > 0).cpu().numpy()
    coords = np.zeros((len(targets), 1, 2), dtype=np.float32)
    labels = np.zeros((len(targets), 1), dtype=np.int64)
    for row, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        missed, extra = target & ~prediction, prediction & ~target
        region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
        if not region.any():
            region, label = target, 1
        if not region.any():
            h, w = target.shape
            coords[row, 0] = (w // 2, h // 2)
            continue
        distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        coords[row, 0] = (x, y)
        labels[row, 0] = label
    return torch.from_numpy(coords), torch.from_numpy(labels)


def _sample_pixels(region: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Pixels drawn uniformly from each row of a non-empty ``(N, H, W)`` region by inverting its CDF.

    ``uniform``: ``(N, k)`` numbers in ``[0, 1)``, one per click. Returns ``(N, k, 2)`` float (x, y).
    """
    n, h, w = region.shape
    cdf = region.reshape(n, h * w).to(torch.float32).cumsum(dim=1)
    target = uniform.to(cdf.device) * cdf[:, -1:]
    flat = torch.searchsorted(cdf, target, right=True).clamp_(max=h * w - 1)
    return torch.stack([flat % w, torch.div(flat, w, rounding_mode="floor")], dim=-1).to(torch.float32)
