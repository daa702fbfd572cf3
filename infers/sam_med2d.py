"""MONAI Label infer tasks for SAM-Med2D: clicks and boxes on 2D images and on slices of 3D volumes.

Both registered tasks (``sam_med2d_points`` and ``sam_med2d_box``) run the same pipeline and accept the same request
(points, a box and the previous mask); they differ in the prompt the client offers first. The stages are
BasicInferTask's:

- pre transforms: :class:`LoadImageSourced` (the image, read once per content version: on a repeated click only an
  ``os.stat``), :class:`ReadPromptsd` (the request's prompts checked against the image).
- inferer: :class:`lib.serving.interactive.InteractiveSegmenter`, which encodes a view once and keeps the
  prompt-independent decoder inputs with the embedding, so a click costs one decoder pass.
- post transforms: :class:`KeepLargestComponentd` (when ``largest_cc``), :class:`PlaceMaskd` (the mask in the input's
  geometry: the 2D image, or the whole volume with the clicked slice filled, or with ``propagate`` every slice of the
  client's label, see :mod:`lib.serving.propagation`).
- writer: the label file in the extension and dtype the request names, plus the JSON result.

The request schema is in ``docs/prompts.md``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.common.settings import RequestError, parse_bool
from lib.guard.limits import Limits
from lib.io.image_source import ImageReadError, picture_affine
from lib.io.volume_io import encode_label_png, write_label, write_slice_label_nrrd
from lib.serving.decoding import ServedDecoding
from lib.serving.interactive import InteractiveSegmenter, Segmentation
from lib.serving.prompt_inputs import parse_prompts, parse_propagation
from lib.serving.prompts import largest_component
from lib.serving.propagation import AREA_JUMP_RATIO, DEFAULT_MIN_IOU

logger = logging.getLogger(__name__)

LABEL_VALUE = 1
RESULT_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}
PICTURE_RESULTS = (".png", ".tif", ".tiff", ".bmp")  # lossless only: a label must keep its values
VOLUME_RESULTS = (".nrrd", ".nii.gz", ".nii", ".seg.nrrd")


class LoadImageSourced:
    """``data["image"]`` (a path) -> ``data["image_source"]`` (:class:`lib.io.image_source.ImageSource`), reused while
    the file's size and mtime are unchanged."""

    def __init__(self, segmenter: Callable[[], InteractiveSegmenter], key: str = "image") -> None:
        self.segmenter = segmenter
        self.key = key

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        path = d.get(self.key)
        if not isinstance(path, str) or not path:
            raise RequestError("unknown image: it is neither in the datastore nor a file on the server", 404)
        if not os.path.exists(path):
            raise RequestError(f"unknown image {os.path.basename(path)!r}: no such file on the server", 404)
        try:
            d["image_source"], d["image_in_memory"] = self.segmenter().source(path)
        except ImageReadError as exc:
            raise RequestError(f"unreadable image: {exc}" if exc.status == 422 else str(exc), exc.status) from exc
        return d


class ReadPromptsd:
    """The request's prompts -> ``data["prompts"]`` (:class:`lib.serving.prompt_inputs.ViewPrompts`) in view pixels, and
    its result options -> ``data["result_format"]``: both checked, with the request's bounds, before any model work.
    ``multimask_output`` defaults to the server's decoding rule (:class:`lib.serving.decoding.ServedDecoding`)."""

    def __init__(self, decoding: Callable[[], ServedDecoding], limits: Limits) -> None:
        self.decoding = decoding
        self.limits = limits

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        source = d["image_source"]
        for key in ("client_id", "label"):  # kept as keys of the interaction state, so bounded like it
            value = d.get(key)
            if value is not None and len(str(value)) > self.limits.id_chars:
                raise RequestError(
                    f"{key} has {len(str(value))} characters; the server accepts {self.limits.id_chars} "
                    "(--conf max_id_chars)"
                )
        num_slices = source.num_slices if source.is_volume else None
        d["prompts"] = parse_prompts(
            d,
            source.view_hw,
            num_slices,
            source.affine,
            self.decoding().multimask_output,
            max_points=self.limits.points,
        )
        d["propagation"] = parse_propagation(d, num_slices, DEFAULT_MIN_IOU, AREA_JUMP_RATIO)
        d["result_format"] = result_format(d, source.is_volume, source.affine is not None)
        return d


def result_format(request: dict[str, Any], is_volume: bool, has_geometry: bool = False) -> tuple[str, np.dtype, bool]:
    """``(extension, dtype, compress)`` of the label file from ``result_extension``, ``result_dtype`` and
    ``result_compress`` (defaults: ``.nii.gz`` for volumes and for pictures with a geometry (single-frame DICOM, a
    pixel size) because a PNG cannot carry it, else ``.png``; uint8; gzip for volumes only)."""
    ext = str(request.get("result_extension") or (".nii.gz" if is_volume or has_geometry else ".png")).lower()
    ext = ext if ext.startswith(".") else "." + ext
    if ext not in PICTURE_RESULTS + VOLUME_RESULTS:
        raise RequestError(f"result_extension {ext!r} is not supported; use .png, .nrrd, .nii.gz or .nii")
    if ext in PICTURE_RESULTS and is_volume:
        raise RequestError(f"result_extension {ext!r} cannot hold a volume; use .nrrd or .nii.gz")
    dtype_name = str(request.get("result_dtype") or "uint8").lower()
    if dtype_name not in RESULT_DTYPES:
        raise RequestError(f"result_dtype {dtype_name!r} is not supported; use one of {sorted(RESULT_DTYPES)}")
    if ext in PICTURE_RESULTS and dtype_name not in ("uint8", "uint16"):
        raise RequestError(f"result_dtype {dtype_name!r} cannot be written as {ext}; use uint8 or uint16")
    # Volumes answer gzip-compressed unless the client says otherwise (a 512x512x300 label is 75 MB raw).
    compress = bool(parse_bool(request.get("result_compress"), "result_compress", default=is_volume))
    return ext, np.dtype(RESULT_DTYPES[dtype_name]), compress


class KeepLargestComponentd:
    """Keep the largest 8-connected component of ``data["pred"]`` (``(H, W)`` bool, or each slice of a propagated
    ``(K, H, W)`` label) when ``largest_cc`` is true."""

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        if not parse_bool(d.get("largest_cc"), "largest_cc", default=False) or not d["pred"].any():
            return d
        views = d["pred"] if d["pred"].ndim == 3 else d["pred"][None]
        for k in np.flatnonzero(views.any(axis=(1, 2))):
            views[k] = largest_component(views[k])
        return d


class PlaceMaskd:
    """``data["pred"]`` (``(H, W)`` bool view mask) -> label values (``LABEL_VALUE`` on the object).

    A 2D image's label is the ``(H, W)`` array. For a volume the label is the volume's ``(I, J, K)`` grid, empty
    except on the clicked slice; it stays described by the slice (``data["pred"]``, ``(J, I)``) and
    ``data["label_slice"]`` (``k``) because the writer fills the rest without building the array. A propagated label
    is ``data["pred"]`` ``(K, J, I)`` (``data["label_slice"]`` ``None``).
    """

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        d["pred"] = d["pred"].astype(np.uint8) * np.uint8(LABEL_VALUE)
        if d["image_source"].is_volume:
            d["label_slice"] = None if d["pred"].ndim == 3 else d["prompts"].slice_index
        return d


def run_stage(data: dict[str, Any], transforms: Sequence[Callable], stage: str) -> dict[str, Any]:
    """Run ``transforms`` in order, each one's seconds under ``data["latencies"][stage]`` as MONAI Label records them.

    MONAI Label's ``run_transforms`` also builds a ``Compose`` (seeding its random state), calls ``logger.setLevel``
    (which clears the cache of each of the process's 400 loggers) and logs every transform: about 1 ms per click,
    half the time of this task's own pre and post transforms.
    """
    latencies = {}
    for transform in transforms:
        start = time.perf_counter()
        data = transform(data)
        latencies[type(transform).__name__] = round(time.perf_counter() - start, 4)
    data.setdefault("latencies", {})[stage] = latencies
    return data


class SamMed2DInfer(BasicInferTask):
    """SAM-Med2D interactive segmentation (MONAI Label type ``deepgrow``, dimension 2).

    Args:
        segmenter: returns the app's shared :class:`InteractiveSegmenter` (called per request, so the task stays
            cheap to build and every client of the worker shares one embedding cache).
        first_prompt: ``"points"`` or ``"box"``: what the client offers first.
        info_extra: returns fields added to :meth:`info` (served weights, warnings).
    """

    def __init__(
        self,
        segmenter: Callable[[], InteractiveSegmenter],
        first_prompt: str = "points",
        labels: Sequence[str] | None = None,
        info_extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        if first_prompt not in ("points", "box"):
            raise ValueError(f"first_prompt must be 'points' or 'box', got {first_prompt!r}")
        description = (
            "SAM-Med2D: click foreground/background points; a box and the previous mask refine it"
            if first_prompt == "points"
            else "SAM-Med2D: draw a box (Slicer ROI or [x1, y1, x2, y2]); points and the previous mask refine it"
        )
        super().__init__(
            path=None,
            network=None,
            type=InferType.DEEPGROW,
            labels=list(labels) if labels else ["object"],
            dimension=2,
            description=description,
            # Slicer shows these in the model's options and sends them with every click; MONAI Label fills them in.
            config={
                "multimask_output": True,
                "reset": False,
                "largest_cc": False,
                "propagate": "none",
            },
        )
        self.segmenter = segmenter
        self.first_prompt = first_prompt
        self.info_extra = info_extra

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["first_prompt"] = self.first_prompt
        # What a request with ``propagate`` gets when it does not name these (chosen on MNI152: docs/propagation.md).
        d["propagation_defaults"] = {"propagate_min_iou": DEFAULT_MIN_IOU, "propagate_max_area_ratio": AREA_JUMP_RATIO}
        if self.info_extra is not None:
            d.update(self.info_extra())
        return d

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any], callbacks: dict | None = None) -> tuple[str | None, dict]:
        """BasicInferTask's stages, logged at ``WARNING`` unless the request names ``logging``.

        At ``INFO`` MONAI Label writes a dozen lines per click (the whole request, each stage's keys and latency) to
        the console and the log file: about 2 ms of a 15 ms click on two cores, for lines nobody reads while
        clicking. The stage latencies still come back in the result's ``latencies``.
        """
        return super().__call__({"logging": "WARNING", **request}, callbacks)

    def run_pre_transforms(self, data: dict[str, Any], transforms: Sequence[Callable]) -> dict[str, Any]:
        return run_stage(data, transforms, "pre")

    def run_post_transforms(self, data: dict[str, Any], transforms: Sequence[Callable]) -> dict[str, Any]:
        return run_stage(data, transforms, "post")

    def pre_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        segmenter = self.segmenter()
        return [LoadImageSourced(self.segmenter), ReadPromptsd(lambda: self.segmenter().decoding, segmenter.limits)]

    def inverse_transforms(self, data: dict[str, Any] | None = None) -> None:
        return None

    def post_transforms(self, data: dict[str, Any] | None = None) -> Sequence[Callable]:
        return [KeepLargestComponentd(), PlaceMaskd()]

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        """Decode the prompts on the (cached) image embedding; ``data["pred"]`` is the ``(H, W)`` view mask, or with
        ``propagate`` the ``(K, H, W)`` label of every slice."""
        # Slicer's module says reset_state (when the annotator switches segments); REST clients say reset.
        reset = bool(
            parse_bool(data.get("reset"), "reset", default=False)
            or parse_bool(data.get("reset_state"), "reset_state", default=False)
        )
        client_id, label = str(data.get("client_id") or ""), str(data.get("label") or "")
        d = data
        propagation = d["propagation"]
        if propagation.direction == "none":
            result: Segmentation = self.segmenter().segment_view(
                d["image_source"], d["prompts"], client_id=client_id, label=label, reset=reset
            )
            d["pred"] = result.mask
        else:
            volume = self.segmenter().segment_volume(
                d["image_source"], d["prompts"], propagation, client_id=client_id, label=label, reset=reset
            )
            result = volume.first
            d["pred"] = volume.label
        d["result"] = {
            "iou": round(result.iou, 6),
            "embedding_cached": result.embedding_cached,
            "used_previous_mask": result.used_previous_mask,
            "multimask_output": result.multimask_output,
            "slice": result.slice_index,
            "image_in_memory": bool(d.get("image_in_memory")),
            "model_version": result.model_version,
            "timings_ms": result.timings_ms,
            "label": d.get("label") or "",
            "client_id": d.get("client_id") or "",
        }
        if propagation.direction != "none":
            d["result"]["propagation"] = {
                "direction": propagation.direction,
                "max_slices": propagation.max_slices,
                "min_iou": propagation.min_iou,
                "max_area_ratio": propagation.max_area_ratio,
                "slices": volume.slices,
                "stops": [stop.to_dict() for stop in volume.stops],
                "review_first": volume.review_first,
                "seconds_per_slice": volume.seconds_per_slice,
            }
        if self.info_extra is not None:
            d["result"].update(self.info_extra())
        return d

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
        """Write ``data["pred"]`` in ``data["result_format"]``; returns the file and the JSON result."""
        source = data["image_source"]
        ext, label_dtype, compress = data["result_format"]
        label = data["pred"].astype(label_dtype, copy=False)
        fd, output = tempfile.mkstemp(suffix=ext, prefix="sam_med2d_")
        if ext == ".png":
            with os.fdopen(fd, "wb") as file:  # through the descriptor mkstemp opened: no second open by path
                file.write(encode_label_png(label))
            return output, dict(data.get("result", {}))
        if ext in PICTURE_RESULTS:
            from PIL import Image

            with os.fdopen(fd, "wb") as file:
                Image.fromarray(label).save(file, format=Image.registered_extensions()[ext])
            return output, dict(data.get("result", {}))
        os.close(fd)
        if label.ndim == 3:  # a propagated (K, J, I) label: the whole volume, ITK index order
            write_label(label.transpose(2, 1, 0), output, source.affine, compress)
        elif source.is_volume and ext.endswith(".nrrd"):
            write_slice_label_nrrd(output, source.pixels.shape[:3], data["label_slice"], label, source.affine, compress)
        elif source.is_volume:
            volume = np.zeros(source.pixels.shape[:3], dtype=label.dtype)
            volume[:, :, data["label_slice"]] = label.T
            write_label(volume, output, source.affine, compress)
        elif source.affine is not None:  # a picture with its geometry: one (x, y, 1) slice, as Slicer holds it
            write_label(label.T[:, :, None], output, source.affine, compress)
        else:  # label files hold ITK index order (x, y), in the geometry ITK gives a plain picture
            write_label(label.T, output, picture_affine(), compress)
        return output, dict(data.get("result", {}))
