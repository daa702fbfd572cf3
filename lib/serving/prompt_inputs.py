"""Prompts as MONAI Label clients send them, checked and turned into pixels of one 2D view.

The request schema is described for users in ``docs/prompts.md``. In short:

``foreground`` / ``background``
    lists of clicks: ``[x, y]`` on a 2D image (``[x, y, 0]`` from Slicer, which loads pictures as one-slice volumes);
    voxel ``[i, j, k]`` on a volume (``[i, j]`` together with ``slice``).
``box``
    ``[x1, y1, x2, y2]`` in pixels of the view (on a volume: ``[i1, j1, i2, j2]`` on the clicked slice);
    ``roi`` is accepted as a synonym, and so is Slicer's 6-value IJK ``roi``
    ``[i_a, i_b, j_a, j_b, k_a, k_b]`` (each pair in either order, as Slicer's RAS->IJK rounding gives them).
``slice``
    the slice ``k`` of a volume; optional when the clicks (or the ROI's k range) say it. A one-slice 6-value ROI
    decides the slice by itself; next to a multi-slice ROI and no click, ``slice`` is read as what Slicer sends there
    (the red view's offset in mm, without its sign) through the volume's geometry, else as an index. Clicks on other
    slices than the one segmented are ignored.
``multimask_output``
    ``true`` (default; ``"auto"`` is the same) decodes SAM's three candidate masks and keeps the best predicted IoU,
    for every prompt, as the published SAM-Med2D train and test scripts do (see :mod:`lib.serving.decoding`); ``false``
    decodes output 0, which the published recipe never trains.
``window``
    ``[low, high]`` or ``{"level": L, "width": W}``: intensities mapped to 0..255 (volumes, DICOM, 16-bit pictures).
``reset`` (or Slicer's ``reset_state``), ``client_id``, ``label``
    interaction state: the previous mask of the same client, image, slice and label is the next mask prompt unless
    ``reset`` is true.

Errors raise :class:`RequestError` with an HTTP-like status and a message that names the problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lib.common.settings import RequestError, parse_bool, parse_number
from lib.guard.limits import Limits


@dataclasses.dataclass(frozen=True)
class ViewPrompts:
    """Prompts in pixels of one 2D view (``x`` across, ``y`` down), ready for the model.

    Attributes:
        point_coords: ``(N, 2)`` float (x, y); ``point_labels``: ``(N,)`` 1 foreground, 0 background.
        box: ``(4,)`` XYXY or ``None``.
        slice_index: the volume slice the prompts are on (``None`` for 2D images).
        multimask_output: decode three candidates and keep the best predicted IoU.
        window: intensity window ``(low, high)`` or ``None`` for the image's own range.
    """

    point_coords: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    slice_index: int | None
    multimask_output: bool
    window: tuple[float, float] | None

    @property
    def num_points(self) -> int:
        return int(self.point_labels.shape[0])


def _as_list(value: Any, name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        raise RequestError(f"{name} must be a JSON list, got a string {value!r}")
    if not isinstance(value, Sequence):
        raise RequestError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def parse_window(value: Any) -> tuple[float, float] | None:
    """``[low, high]`` or ``{"level"|"center": L, "width": W}`` -> ``(low, high)``; ``None`` when absent."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, Mapping):
        level = value.get("level", value.get("center"))
        if level is None or "width" not in value:
            raise RequestError("window as an object needs 'level' (or 'center') and 'width'")
        level, width = parse_number(level, "window level"), parse_number(value["width"], "window width")
        low, high = level - width / 2, level + width / 2
    else:
        items = _as_list(value, "window")
        if len(items) != 2:
            raise RequestError(f"window must be [low, high], got {value!r}")
        low, high = parse_number(items[0], "window low"), parse_number(items[1], "window high")
    if not high > low:
        raise RequestError(f"window [low, high] must have high > low, got [{low}, {high}]")
    return low, high


def parse_slice(value: Any, num_slices: int) -> int | None:
    """``slice`` as an index ``k`` of a volume with ``num_slices`` slices; ``None`` when absent or negative."""
    k = _slice_number(value)
    if k is not None and k >= num_slices:
        raise RequestError(f"slice {k} is out of range: the volume has {num_slices} slices (0..{num_slices - 1})")
    return k


def _slice_number(value: Any) -> int | None:
    if value is None or value == "":
        return None
    k = parse_number(value, "slice")
    if k != int(k):
        raise RequestError(f"slice must be an integer, got {value!r}")
    return int(k) if k >= 0 else None  # Slicer and the SAM2 app send -1 for "no slice"


def parse_prompts(
    request: Mapping[str, Any],
    view_hw: tuple[int, int],
    num_slices: int | None,
    affine: np.ndarray | None = None,
    default_multimask: bool = True,
    max_points: int = Limits.points,
) -> ViewPrompts:
    """Check a request's prompts against the image and express them in pixels of one view.

    Args:
        request: the infer request (``foreground``, ``background``, ``box``/``roi``, ``slice``, ``multimask_output``,
            ``window``).
        view_hw: ``(H, W)`` of the 2D view (for a volume ``(J, I)``).
        num_slices: ``K`` for a volume, ``None`` for a 2D image.
        affine: the volume's RAS affine: reads Slicer's ``slice`` (a view offset in mm) next to a 6-value roi.
        default_multimask: ``multimask_output`` when the request does not say (or says ``"auto"``): the server's
            :attr:`lib.serving.decoding.ServedDecoding.multimask_output`.
        max_points: most foreground plus background points (``--conf max_points``).

    Raises:
        RequestError: malformed, out-of-image or contradictory prompts, none at all, or too many (413).
    """
    # Counted before any point is looked at: a request's cost grows with its points (the decoder attends to each).
    count = sum(len(v) for v in (request.get("foreground"), request.get("background")) if isinstance(v, Sequence))
    if count > max_points:
        raise RequestError(f"{count} points in one request; the server accepts {max_points} (--conf max_points)", 413)
    h, w = view_hw
    is_volume = num_slices is not None

    clicks: list[tuple[float, float, int, int | None]] = []
    for name, label in (("foreground", 1), ("background", 0)):
        for n, point in enumerate(_as_list(request.get(name), name)):
            where = f"{name} point {n} {point!r}"
            coords = _as_list(point, where)
            if len(coords) not in (2, 3):
                raise RequestError(f"{where} must be [x, y] or [i, j, k]")
            x, y = parse_number(coords[0], where), parse_number(coords[1], where)
            k = None
            if len(coords) == 3:
                k = round(parse_number(coords[2], where))  # the nearest slice (RAS->IJK can give 11.9999)
                if not is_volume and k != 0:
                    raise RequestError(f"{where} is outside the image: a 2D image has only slice 0")
                if is_volume and not 0 <= k < num_slices:
                    raise RequestError(f"{where} is outside the image: slice {k} of a volume with {num_slices} slices")
            if not (0 <= x < w and 0 <= y < h):
                size = f"{w}x{h} (x in 0..{w - 1}, y in 0..{h - 1})"
                raise RequestError(f"{where} is outside the image of size {size}")
            clicks.append((x, y, label, k if is_volume else None))

    box, box_slices = _parse_box(request, (h, w), is_volume)

    slice_index = None
    if is_volume:
        click_slices = {c[3] for c in clicks if c[3] is not None}
        slice_index = _volume_slice(request.get("slice"), click_slices, box, box_slices, num_slices, affine)
        # Clicks on other slices are ignored, not refused: Slicer sends every click of the segment when the clicked
        # slice is 0 (its module tests the slice index for truth), and they say nothing about this slice.
        ignored = sorted({c[3] for c in clicks if c[3] not in (None, slice_index)})
        clicks = [c for c in clicks if c[3] in (None, slice_index)]
        if not clicks and box is None and ignored:
            raise RequestError(f"no prompt on slice {slice_index}: the clicks are on slices {ignored}")

    if not clicks and box is None:
        raise RequestError("no prompt: send foreground/background points or a box")

    coords = np.array([[c[0], c[1]] for c in clicks], dtype=np.float64).reshape(-1, 2)
    labels = np.array([c[2] for c in clicks], dtype=np.int64)
    multimask = parse_bool(
        request.get("multimask_output"), "multimask_output", default=default_multimask, allow_auto=True
    )
    return ViewPrompts(
        point_coords=coords,
        point_labels=labels,
        box=box,
        slice_index=slice_index,
        multimask_output=bool(multimask),
        window=parse_window(request.get("window")),
    )


def _volume_slice(
    requested: Any,
    click_slices: set[int],
    box: np.ndarray | None,
    box_slices: tuple[int, int] | None,
    num_slices: int,
    affine: np.ndarray | None,
) -> int:
    """The slice ``k`` a volume request segments, from its roi, ``slice`` and clicks (see ``docs/prompts.md``)."""
    if box_slices is not None:
        k_low, k_high = box_slices
        if k_low < 0 or k_high >= num_slices:
            raise RequestError(f"roi slices {k_low}..{k_high} are out of range: the volume has {num_slices}")
        if k_low == k_high:  # the box is drawn on one slice: nothing else can say otherwise
            return k_low
        if click_slices or requested in (None, ""):
            index = parse_slice(requested, num_slices)
            chosen = index if index is not None else _clicks_slice(click_slices)
            if chosen is None:
                return (k_low + k_high) // 2
        else:
            # No click: Slicer's `slice` is then round(abs(offset of the red view in mm)); read it through the
            # geometry first, as an index second.
            number = _slice_number(requested)
            chosen = _slice_at_offset(number, box, box_slices, affine) if number is not None else None
            chosen = number if chosen is None else chosen
            if chosen is None:
                return (k_low + k_high) // 2
        if not k_low <= chosen <= k_high:
            raise RequestError(
                f"the roi's slices {k_low}..{k_high} do not include slice {chosen} (neither as an index nor as the "
                "view offset in mm)"
            )
        return chosen
    index = parse_slice(requested, num_slices)
    chosen = index if index is not None else _clicks_slice(click_slices)
    if chosen is not None:
        return chosen
    if num_slices == 1:
        return 0
    raise RequestError("which slice? send voxel clicks [i, j, k], 'slice', or a 6-value roi")


def _clicks_slice(click_slices: set[int]) -> int | None:
    if len(click_slices) > 1:
        raise RequestError(
            f"clicks are on several slices {sorted(click_slices)}; send the clicks of one slice (or 'slice')"
        )
    return next(iter(click_slices), None)


def _slice_at_offset(
    offset_mm: int, box: np.ndarray, box_slices: tuple[int, int], affine: np.ndarray | None
) -> int | None:
    """The roi's slice whose plane is at ``+-offset_mm`` along S (RAS) at the box centre, ``None`` if none is.

    Slicer sends ``round(abs(red view offset))``: the sign is lost, so both signs are tried.
    """
    if affine is None or abs(float(affine[2, 2])) < 1e-6:  # no geometry, or k does not run along S
        return None
    i_centre, j_centre = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    s_at_k0 = affine[2, 0] * i_centre + affine[2, 1] * j_centre + affine[2, 3]
    k_low, k_high = box_slices
    found = [round((sign * offset_mm - s_at_k0) / affine[2, 2]) for sign in (1, -1)]
    inside = [k for k in found if k_low <= k <= k_high]
    return min(inside, key=lambda k: abs(k - (k_low + k_high) / 2)) if inside else None


def _parse_box(
    request: Mapping[str, Any], view_hw: tuple[int, int], is_volume: bool
) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """The box in view pixels and, for a 6-value ROI, its slice range."""
    name = "box" if request.get("box") not in (None, [], "") else "roi"
    values = _as_list(request.get(name), name)
    if not values:
        return None, None
    numbers = [parse_number(v, f"{name} value") for v in values]
    h, w = view_hw
    slices = None
    if len(numbers) == 6:  # Slicer: [i_a, i_b, j_a, j_b, k_a, k_b], pairs unordered
        x1, x2 = sorted(numbers[0:2])
        y1, y2 = sorted(numbers[2:4])
        k1, k2 = sorted(round(k) for k in numbers[4:6])
        slices = (k1, k2)
        if not is_volume and slices != (0, 0):
            raise RequestError(f"{name} {values!r} is outside the image: a 2D image has only slice 0")
    elif len(numbers) == 4:
        x1, y1, x2, y2 = numbers
        if x2 < x1 or y2 < y1:
            raise RequestError(f"inverted {name} {values!r}: expected [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2")
    else:
        raise RequestError(
            f"{name} must be [x1, y1, x2, y2] or Slicer's 6-value IJK roi [i1, i2, j1, j2, k1, k2], got {values!r}"
        )
    if x1 == x2 or y1 == y2:
        raise RequestError(f"empty {name} {values!r}: it has zero width or height")
    if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
        raise RequestError(f"{name} {values!r} is outside the image of size {w}x{h}")
    return np.array([x1, y1, x2, y2], dtype=np.float64), slices


PROPAGATE_DIRECTIONS = ("none", "both", "up", "down")


@dataclasses.dataclass(frozen=True)
class PropagationRequest:
    """How far a volume request carries its mask to neighbouring slices (see :mod:`lib.serving.propagation`).

    Attributes:
        direction: ``none``, ``both``, ``up`` (increasing slice index ``k``) or ``down`` (decreasing ``k``).
        max_slices: at most this many slices each way; ``None``: until the structure ends.
        min_iou: a direction stops at the first slice whose predicted IoU is below this.
        max_area_ratio: a direction stops at the first slice whose area is more than this times, or less than
            ``1 / max_area_ratio`` of, the previous slice's.
    """

    direction: str
    max_slices: int | None
    min_iou: float
    max_area_ratio: float

    @property
    def steps(self) -> tuple[int, ...]:
        """The slice steps to walk: ``+1`` for up, ``-1`` for down."""
        return {"none": (), "both": (1, -1), "up": (1,), "down": (-1,)}[self.direction]


def parse_propagation(
    request: Mapping[str, Any], num_slices: int | None, default_min_iou: float, default_area_ratio: float
) -> PropagationRequest:
    """``propagate``, ``propagate_slices``, ``propagate_min_iou`` and ``propagate_max_area_ratio`` of a request,
    checked (also when not propagating, so a typo is reported rather than ignored).

    Args:
        request: the infer request.
        num_slices: ``K`` for a volume, ``None`` for a 2D image (which cannot propagate).
        default_min_iou, default_area_ratio: the values when the request does not say.

    Raises:
        RequestError: an unknown direction, a non-positive or fractional slice count, an IoU outside 0..1, an
            area ratio not above 1, or propagation asked on a 2D image.
    """
    value = request.get("propagate")
    direction = "none" if value is None or value == "" else str(value).strip().lower()
    if direction not in PROPAGATE_DIRECTIONS:
        raise RequestError(f"propagate must be one of {list(PROPAGATE_DIRECTIONS)}, got {value!r}")
    if direction != "none" and num_slices is None:
        raise RequestError(f"propagate {direction!r} needs a volume: a 2D image has no neighbouring slices")
    max_slices = None
    raw = request.get("propagate_slices")
    if raw is not None and raw != "":
        count = parse_number(raw, "propagate_slices")
        if count != int(count) or count < 1:
            raise RequestError(f"propagate_slices must be a positive integer (slices each way), got {raw!r}")
        max_slices = int(count)
    raw = request.get("propagate_min_iou")
    min_iou = default_min_iou if raw is None or raw == "" else parse_number(raw, "propagate_min_iou")
    if not 0.0 <= min_iou <= 1.0:
        raise RequestError(f"propagate_min_iou must be between 0 and 1, got {raw!r}")
    raw = request.get("propagate_max_area_ratio")
    ratio = default_area_ratio if raw is None or raw == "" else parse_number(raw, "propagate_max_area_ratio")
    if not ratio > 1.0:
        raise RequestError(f"propagate_max_area_ratio must be above 1, got {raw!r}")
    return PropagationRequest(direction=direction, max_slices=max_slices, min_iou=min_iou, max_area_ratio=ratio)
