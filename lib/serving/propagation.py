"""Carrying a mask through a volume, slice by slice, with the model's own confidence on every slice.

From the slice the annotator prompted, each direction walks to the next slice and prompts it with what the previous
slice gave: the box around its mask, its kept low-resolution logits as the mask prompt, and a foreground click at the
most interior pixel of each of its larger regions (:func:`lib.serving.prompts.interior_clicks`, the benchmarks'
deterministic annotator; :data:`CLICKED_REGIONS`). The
slice is decoded exactly as a click on the server is (:func:`lib.serving.decoding.decode_view` and
:func:`lib.serving.decoding.view_mask` with the server's :class:`lib.serving.decoding.ServedDecoding`). A direction
stops, and the slice that made it stop is not kept, when

* ``mask_vanished``: nothing is above the threshold;
* ``low_iou``: the predicted IoU is below ``propagate_min_iou`` (default :data:`DEFAULT_MIN_IOU`);
* ``area_jump``: the area grew or shrank by more than ``propagate_max_area_ratio`` (default :data:`AREA_JUMP_RATIO`)
  against the previous slice (a leak into a neighbour, or the prompt box collapsing);

and, keeping everything so far, at ``volume_end``, after ``propagate_slices`` slices (``propagate_slices``) or at a
slice the annotator prompted earlier (``user_slice``: corrections are never overwritten).

:class:`VolumeLabel` is one client's label of one volume: which slices the annotator prompted and which were
propagated, bit-packed so that many clients stay bounded in memory. Nothing here imports the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Sequence

import numpy as np
import torch
from scipy import ndimage

from lib.modeling import SamMed2D
from lib.serving.decoding import ServedDecoding, decode_view, view_mask
from lib.serving.embedding_cache import CachedEmbedding
from lib.serving.prompt_inputs import PropagationRequest
from lib.serving.prompts import interior_clicks, mask_box

# The highest threshold that kept the best 3D Dice on both MNI152 tuning walks (brain mask, white matter; the sweep
# and the choice are in docs/propagation.md): there 0.6 cut the white matter walk after 6 slices, 0.5 changed nothing.
DEFAULT_MIN_IOU = 0.5
# Adjacent slices of one structure rarely change area by more than 2x; a leak into a neighbour does. On MNI152, 1.5
# stopped the white matter walk halfway and 3 gained at most 0.001 Dice (tiny last slices): not worth a looser guard.
AREA_JUMP_RATIO = 2.0
# Slices encoded together in one encoder batch as a direction walks (a batch of 4 ViT-B views costs about 0.6 of
# four single ones on 2 CPU cores, less on a GPU); at most this many minus one are encoded beyond where it stops.
ENCODE_AHEAD = 4
# The next slice gets a click in each region of the previous mask at least MIN_REGION_SHARE of its largest region, at
# most CLICKED_REGIONS of them: with one click, a structure that splits into regions (white matter into the two
# hemispheres above the corpus callosum) is followed into the clicked one only (MNI152 white matter, 3D Dice 0.641
# with one click, 0.698 with one per region; docs/propagation.md).
CLICKED_REGIONS = 3
MIN_REGION_SHARE = 0.1

STOP_REASONS = ("mask_vanished", "low_iou", "area_jump", "volume_end", "propagate_slices", "user_slice")


@dataclasses.dataclass
class SliceMask:
    """One slice's decoded mask.

    Attributes:
        index: the slice ``k``.
        mask: ``(H, W)`` bool, the view's pixels.
        low_res: ``(1, 1, s, s)`` kept logits (the next slice's mask prompt).
        iou: the model's predicted IoU.
    """

    index: int
    mask: np.ndarray
    low_res: torch.Tensor
    iou: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why and where one direction stopped; ``slice``/``iou``/``area`` describe the rejected slice, if any."""

    direction: str
    reason: str
    slice: int | None = None
    iou: float | None = None
    area: int | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def next_prompts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A non-empty ``(H, W)`` mask -> the next slice's prompts in view pixels: ``(N, 2)`` clicks (x, y) at the most
    interior pixel of each of its ``N`` larger 4-connected regions (:data:`CLICKED_REGIONS`, largest first), ``(N,)``
    labels 1, and the ``(4,)`` XYXY box around the whole mask (max corner exclusive)."""
    box = mask_box(mask)
    regions, _ = ndimage.label(mask)
    areas = np.bincount(regions.ravel())[1:]
    largest_first = np.argsort(-areas, kind="stable")[:CLICKED_REGIONS]
    clicked = [i + 1 for i in largest_first if areas[i] >= MIN_REGION_SHARE * areas.max()]
    targets = torch.from_numpy(np.stack([regions == i for i in clicked]))
    coords, labels = interior_clicks(torch.zeros_like(targets), targets)
    return coords[:, 0].numpy().astype(np.float64), labels[:, 0].numpy(), box


def propagate_direction(
    model: SamMed2D,
    decoding: ServedDecoding,
    embed: Callable[[Sequence[int]], list[CachedEmbedding]],
    start: SliceMask,
    step: int,
    num_slices: int,
    request: PropagationRequest,
    blocked: Container[int] = (),
) -> tuple[list[SliceMask], Stop]:
    """Walk from ``start`` in steps of ``step`` (``+1`` up, ``-1`` down) until a stop rule fires.

    Args:
        model, decoding: the served network and its decoding rule.
        embed: slice indices -> their embeddings in that order (from the cache, the missing ones encoded in one
            batch); called with the next :data:`ENCODE_AHEAD` slices the walk may reach.
        start: the slice it starts from (not part of the result).
        num_slices: ``K`` of the volume.
        request: ``max_slices``, ``min_iou`` and ``max_area_ratio``.
        blocked: slices the annotator prompted; the walk stops before them.

    Returns:
        the kept slices in walking order and why the walk stopped.
    """
    direction = "up" if step > 0 else "down"
    limit = request.max_slices if request.max_slices is not None else num_slices
    kept: list[SliceMask] = []
    if start.area == 0:  # nothing to carry
        return kept, Stop(direction, "mask_vanished", slice=start.index, iou=round(start.iou, 6), area=0)
    previous = start
    while True:
        k = previous.index + step
        if not 0 <= k < num_slices:
            return kept, Stop(direction, "volume_end")
        if len(kept) >= limit:
            return kept, Stop(direction, "propagate_slices")
        if k in blocked:
            return kept, Stop(direction, "user_slice", slice=k)
        ahead = [k]
        while len(ahead) < min(ENCODE_AHEAD, limit - len(kept)):
            nxt = ahead[-1] + step
            if not 0 <= nxt < num_slices or nxt in blocked:
                break
            ahead.append(nxt)
        entry = embed(ahead)[0]
        coords, labels, box = next_prompts(previous.mask)
        with torch.inference_mode():
            low_res, iou = decode_view(model, entry, decoding, coords, labels, box, previous.low_res)
            mask = view_mask(entry.geometry, low_res, decoding)[0].cpu().numpy()
        current = SliceMask(k, mask, low_res, float(iou[0]))
        area = current.area
        reason = None
        if area == 0:
            reason = "mask_vanished"
        elif current.iou < request.min_iou:
            reason = "low_iou"
        elif not 1 / request.max_area_ratio <= area / previous.area <= request.max_area_ratio:
            reason = "area_jump"
        if reason is not None:
            return kept, Stop(direction, reason, slice=k, iou=round(current.iou, 6), area=area)
        kept.append(current)
        previous = current


@dataclasses.dataclass
class SliceRecord:
    """A slice of a :class:`VolumeLabel`: its mask bit-packed (``np.packbits`` of the ``(H, W)`` mask), its predicted
    IoU, its area and whether the annotator prompted it (``user``) or it was ``propagated``."""

    bits: np.ndarray
    iou: float
    area: int
    source: str


class VolumeLabel:
    """One client's label of one volume (one ``label``): the slices the annotator prompted and those propagated.

    Args:
        view_hw: ``(H, W)`` of a slice view.
    """

    def __init__(self, view_hw: tuple[int, int]) -> None:
        self.view_hw = view_hw
        self.slices: dict[int, SliceRecord] = {}

    @property
    def nbytes(self) -> int:
        return sum(record.bits.nbytes for record in self.slices.values()) + 64 * len(self.slices)

    def user_slices(self) -> set[int]:
        return {k for k, record in self.slices.items() if record.source == "user"}

    def put(self, result: SliceMask, source: str) -> None:
        self.slices[result.index] = SliceRecord(np.packbits(result.mask), result.iou, result.area, source)

    def replace_direction(self, start: int, step: int, kept: Sequence[SliceMask]) -> None:
        """Forget the propagated slices beyond ``start`` in the direction ``step`` up to the next slice the annotator
        prompted (they came from an earlier walk through ``start``), then keep the new walk's ``kept``."""
        k = start + step
        while k in self.slices and self.slices[k].source != "user":
            del self.slices[k]
            k += step
        for result in kept:
            self.put(result, "propagated")

    def mask(self, k: int) -> np.ndarray:
        """``(H, W)`` bool mask of slice ``k`` (which must be in :attr:`slices`)."""
        h, w = self.view_hw
        return np.unpackbits(self.slices[k].bits, count=h * w).reshape(h, w).astype(bool)

    def stack(self, num_slices: int) -> np.ndarray:
        """``(K, H, W)`` bool: the whole label, empty on slices not in it."""
        h, w = self.view_hw
        volume = np.zeros((num_slices, h, w), dtype=bool)
        for k in self.slices:
            volume[k] = self.mask(k)
        return volume

    def review_first(self) -> int | None:
        """The propagated slice with the lowest predicted IoU (where the annotator should look first), or ``None``."""
        propagated = [(record.iou, k) for k, record in self.slices.items() if record.source == "propagated"]
        return min(propagated)[1] if propagated else None
