"""DICOM SEG for labels kept in a PACS: write an annotator's label map as a SEG of its series, read SEGs back.

A label map here is what the app works with: an ``(I, J, K)`` integer array in ITK index order (``i`` across,
``j`` down, ``k`` slice), on the grid of the series as SimpleITK's GDCM series reader builds it (which is also the
grid of the NIfTI file MONAI Label converts the series to). Value ``n > 0`` is segment ``n``.

- :func:`write_seg`: label map + the series' DICOM instances -> a DICOM SEG dataset (pydicom-seg), one segment per
  label value with its name, referencing the series (``ReferencedSeriesSequence``) and each source instance.
- :func:`read_seg`: a DICOM SEG + the series grid -> per-segment masks resampled (nearest neighbour) onto that grid,
  so a SEG made by any tool (dcmqi, OHIF, Slicer) that covers only some slices or crops in-plane lines up with the
  image. Overlapping segments stay separate masks.

Malformed input raises :class:`SegError` (a ``ValueError``) whose message names the file and the problem. Nothing
here imports the server.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
DEFAULT_COLORS = ((255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (200, 0, 255), (0, 220, 220))


class SegError(ValueError):
    """A DICOM SEG (or the label to write as one) is malformed or does not fit its series; the message says why."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """One segment of a SEG: its number (the label value), name and display colour (RGB 0..255)."""

    number: int
    name: str
    color: tuple[int, int, int] = (255, 0, 0)


@dataclasses.dataclass
class SegLabels:
    """A SEG read onto its series' grid.

    Attributes:
        masks: segment number -> ``(I, J, K)`` bool mask on the series grid.
        segments: segment number -> :class:`Segment`.
        referenced_series: SeriesInstanceUID of the image series the SEG annotates.
        series_instance_uid: the SEG's own SeriesInstanceUID.
    """

    masks: dict[int, np.ndarray]
    segments: dict[int, Segment]
    referenced_series: str
    series_instance_uid: str

    def label_map(self) -> np.ndarray:
        """``(I, J, K)`` uint16 label map (segment number per voxel; a later segment wins where masks overlap)."""
        shape = next(iter(self.masks.values())).shape
        out = np.zeros(shape, dtype=np.uint16)
        for number in sorted(self.masks):
            out[self.masks[number]] = number
        return out


def segments_from_label_info(
    values: Sequence[int], label_info: Sequence[Mapping] | Mapping | None, default_name: str = "object"
) -> list[Segment]:
    """Segment descriptions for the label values present.

    ``label_info`` is what clients send with a label: MONAI Label's list of ``{"name", "idx", "color"}`` (``idx``
    optional: else the list is in value order), or a mapping ``{name: value}`` / ``{value: name}``. Values without
    a description get ``default_name`` (numbered when there are several).
    """
    by_value: dict[int, dict] = {}
    if isinstance(label_info, Mapping):
        for key, val in label_info.items():
            if isinstance(val, int | float) and not isinstance(key, int | float):
                by_value[int(val)] = {"name": str(key)}
            else:
                by_value[int(key)] = {"name": str(val)}
    elif label_info:
        for position, info in enumerate(label_info):
            if not isinstance(info, Mapping):
                raise SegError(f"label_info entry {position} must be an object with a 'name', got {info!r}")
            value = int(info.get("idx", info.get("label", values[position] if position < len(values) else -1)))
            by_value[value] = dict(info)
    segments = []
    for position, value in enumerate(sorted(int(v) for v in values)):
        info = by_value.get(value, {})
        name = str(info.get("name") or (default_name if len(values) == 1 else f"{default_name} {value}"))
        color = info.get("color") or DEFAULT_COLORS[position % len(DEFAULT_COLORS)]
        rgb = tuple(int(c) for c in list(color)[:3])
        segments.append(Segment(value, name, rgb))  # type: ignore[arg-type]
    return segments


def _template(segments: Sequence[Segment], series_description: str, algorithm: str):
    import pydicom_seg

    attributes = [
        {
            "labelID": s.number,
            "SegmentLabel": s.name,
            "SegmentDescription": s.name,
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": algorithm,
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "123037004",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure",
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": "85756007",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Tissue",
            },
            "recommendedDisplayRGBValue": list(s.color),
        }
        for s in segments
    ]
    return pydicom_seg.template.from_dcmqi_metainfo(
        {
            "ContentCreatorName": "SAM-Med2D^MONAI Label",
            "SeriesDescription": series_description,
            "SeriesNumber": "300",
            "InstanceNumber": "1",
            "segmentAttributes": [attributes],
            "ContentLabel": "SEGMENTATION",
            "ContentDescription": "Interactive segmentation (SAM-Med2D)",
            "ClinicalTrialCoordinatingCenterName": "",
            "BodyPartExamined": "",
        }
    )


def read_series(files: Sequence[str | Path]):
    """The DICOM instances of one image series -> (SimpleITK volume, pydicom datasets without pixels).

    Raises:
        SegError: no files, files that are not DICOM, or a series that SimpleITK cannot assemble into a volume.
    """
    import pydicom
    import SimpleITK
    from pydicom.errors import InvalidDicomError

    files = [str(f) for f in files]
    if not files:
        raise SegError("the image series has no DICOM instances")
    datasets = []
    for f in files:
        try:
            dataset = pydicom.dcmread(f, defer_size=1024)  # pixel data is not read, only its length
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise SegError(f"{Path(f).name} is not a readable DICOM file: {exc}") from exc
        _check_pixel_data(dataset, Path(f).name)
        datasets.append(dataset)
    folder = str(Path(files[0]).parent)
    try:
        reader = SimpleITK.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(folder, str(datasets[0].SeriesInstanceUID))
        reader.SetFileNames(names or files)
        volume = reader.Execute()
    except RuntimeError as exc:
        raise SegError(f"the series in {folder} cannot be read as a volume: {str(exc).strip()[-300:]}") from exc
    if volume.GetDimension() == 4 and volume.GetSize()[3] == 1:
        volume = volume[:, :, :, 0]
    if volume.GetDimension() == 2:  # one 2D instance (e.g. an ultrasound frame): a volume of one slice
        volume = SimpleITK.JoinSeries(volume)
    return volume, datasets


def _check_pixel_data(dataset, name: str) -> None:
    """Raise :class:`SegError` for an instance without pixel data or whose uncompressed pixel data is cut short
    (readers would otherwise fill the missing part with whatever follows)."""
    element = dataset.get_item(0x7FE00010)
    if element is None:
        raise SegError(f"{name} has no pixel data")
    length = getattr(element, "length", None)  # a raw (not yet parsed) element knows its length
    if length is None:
        length = 0xFFFFFFFF if element.is_undefined_length else len(element.value or b"")
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None or syntax.is_compressed or length == 0xFFFFFFFF:
        return
    try:
        expected = (
            int(dataset.Rows)
            * int(dataset.Columns)
            * int(dataset.get("SamplesPerPixel", 1))
            * int(dataset.get("NumberOfFrames", 1) or 1)
            * int(dataset.BitsAllocated)
            // 8
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise SegError(f"{name}: the image size is missing or malformed ({exc})") from exc
    if length < expected:
        raise SegError(f"{name}: pixel data is cut short ({length} bytes where the image needs {expected})")


def write_seg(
    label: np.ndarray,
    reference,
    source_datasets: Sequence,
    segments: Sequence[Segment],
    series_description: str = "SAM-Med2D label",
    algorithm: str = "SAM-Med2D",
):
    """A label map of a series -> a DICOM SEG ``pydicom.Dataset``.

    Args:
        label: ``(I, J, K)`` integer label map on ``reference``'s grid (``(I, J)`` for a one-slice series).
        reference: the series as a SimpleITK image (:func:`read_series`), giving the geometry.
        source_datasets: the series' instances (headers suffice); each is referenced by the SEG.
        segments: one :class:`Segment` per non-zero value present in ``label``.

    Raises:
        SegError: empty label, values without a segment, or a label whose shape is not the series'.
    """
    import pydicom_seg
    import SimpleITK

    label = np.asarray(label)
    size = tuple(reference.GetSize())
    if label.ndim == 2 and len(size) == 3 and size[2] == 1:
        label = label[:, :, None]
    if label.shape != size:
        raise SegError(f"the label's shape {label.shape} is not the series' voxel grid {size} (I, J, K)")
    is_integral = np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.bool_)
    if not is_integral and not np.all(np.equal(np.mod(label, 1), 0)):
        raise SegError("the label must hold integer segment numbers")
    label = label.astype(np.uint16)
    present = sorted(int(v) for v in np.unique(label) if v != 0)
    if not present:
        raise SegError("the label is empty: there is nothing to store as a DICOM SEG")
    described = {s.number for s in segments}
    missing = [v for v in present if v not in described]
    if missing:
        raise SegError(f"label values {missing} have no segment description")
    image = SimpleITK.GetImageFromArray(np.ascontiguousarray(label.transpose(2, 1, 0)))
    image.CopyInformation(reference)
    writer = pydicom_seg.MultiClassWriter(
        template=_template([s for s in segments if s.number in present], series_description, algorithm),
        inplane_cropping=False,
        skip_empty_slices=True,
        skip_missing_segment=False,
    )
    try:
        dataset = writer.write(image, list(source_datasets))
    except (ValueError, KeyError, AttributeError) as exc:
        raise SegError(f"cannot encode the label as DICOM SEG for this series: {exc}") from exc
    now = datetime.datetime.now()
    dataset.SeriesDate = dataset.ContentDate = now.strftime("%Y%m%d")
    dataset.SeriesTime = dataset.ContentTime = now.strftime("%H%M%S.%f")
    return dataset


def check_seg(dataset, name: str = "DICOM SEG") -> None:
    """Raise :class:`SegError` unless ``dataset`` is a segmentation with a referenced series and segments."""
    if str(dataset.get("SOPClassUID", "")) != SEG_SOP_CLASS_UID and dataset.get("Modality") != "SEG":
        raise SegError(f"{name} is not a DICOM SEG (Modality {dataset.get('Modality')!r})")
    if not dataset.get("ReferencedSeriesSequence"):
        raise SegError(f"{name} does not say which image series it annotates (no ReferencedSeriesSequence)")
    if not dataset.get("SegmentSequence"):
        raise SegError(f"{name} has no segments (empty SegmentSequence)")
    if "PixelData" not in dataset:
        raise SegError(f"{name} has no pixel data")


def read_seg(seg, reference) -> SegLabels:
    """A DICOM SEG -> its segments as masks on the image series' grid.

    Args:
        seg: a ``pydicom.Dataset`` or a path to the SEG file.
        reference: the annotated series as a SimpleITK image (:func:`read_series`, or the NIfTI it was converted
            to, read with SimpleITK).

    Raises:
        SegError: not a SEG, no segments, undecodable frames, or masks that miss the series entirely.
    """
    import pydicom
    import pydicom_seg
    import SimpleITK
    from pydicom.errors import InvalidDicomError

    name = "DICOM SEG"
    if not isinstance(seg, pydicom.Dataset):
        name = Path(seg).name
        try:
            seg = pydicom.dcmread(seg)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise SegError(f"{name} is not a readable DICOM file: {exc}") from exc
    check_seg(seg, name)
    try:
        result = pydicom_seg.SegmentReader().read(seg)
    except (ValueError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
        raise SegError(f"{name} cannot be decoded: {exc}") from exc
    if reference.GetDimension() == 4 and reference.GetSize()[3] == 1:
        reference = reference[:, :, :, 0]
    masks: dict[int, np.ndarray] = {}
    segments: dict[int, Segment] = {}
    for number in sorted(result.available_segments):
        info = result.segment_infos[number]
        mask_image = SimpleITK.Cast(result.segment_image(number), SimpleITK.sitkUInt8)
        on_grid = SimpleITK.Resample(
            mask_image, reference, SimpleITK.Transform(), SimpleITK.sitkNearestNeighbor, 0, SimpleITK.sitkUInt8
        )
        mask = SimpleITK.GetArrayFromImage(on_grid).transpose(2, 1, 0).astype(bool)
        if SimpleITK.GetArrayViewFromImage(mask_image).any() and not mask.any():
            raise SegError(f"{name}: segment {number} lies outside the image series it references")
        masks[number] = mask
        rgb = info.get("RecommendedDisplayCIELabValue")
        color = tuple(int(c) for c in _cielab_to_rgb(rgb)) if rgb else DEFAULT_COLORS[0]
        segments[number] = Segment(number, str(info.get("SegmentLabel", f"segment {number}")), color)  # type: ignore
    if not masks:
        raise SegError(f"{name} has no decodable segments")
    return SegLabels(
        masks=masks,
        segments=segments,
        referenced_series=str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
    )


def _cielab_to_rgb(lab: Sequence[int]) -> tuple[int, int, int]:
    """DICOM's scaled CIELab (0..65535) -> RGB 0..255 (D65), for the segment colours a viewer shows."""
    lightness = lab[0] * 100.0 / 65535.0
    a = lab[1] * 255.0 / 65535.0 - 128.0
    b = lab[2] * 255.0 / 65535.0 - 128.0
    fy = (lightness + 16.0) / 116.0
    fx, fz = fy + a / 500.0, fy - b / 200.0

    def inverse(t: float) -> float:
        return t**3 if t**3 > 0.008856 else (t - 16.0 / 116.0) / 7.787

    x, y, z = 0.95047 * inverse(fx), 1.0 * inverse(fy), 1.08883 * inverse(fz)
    linear = (
        3.2406 * x - 1.5372 * y - 0.4986 * z,
        -0.9689 * x + 1.8758 * y + 0.0415 * z,
        0.0557 * x - 0.2040 * y + 1.0570 * z,
    )
    srgb = [12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055 for c in linear]
    return tuple(int(round(min(max(c, 0.0), 1.0) * 255)) for c in srgb)  # type: ignore[return-value]


@dataclasses.dataclass
class SliceSample:
    """One training sample from a volume label: a slice view and the masks of the segments on it.

    Attributes:
        image: ``(H, W, 3)`` uint8, the view the annotator clicked on (:meth:`lib.io.image_source.ImageSource.view`).
        masks: ``(H, W)`` bool, one per segment present on the slice.
        names: the segments' names, parallel to ``masks``.
        slice_index: ``k`` of the slice.
    """

    image: np.ndarray
    masks: list[np.ndarray]
    names: list[str]
    slice_index: int


def volume_label_samples(
    image_path: str | Path, label_path: str | Path, segments: Mapping[int | str, str] | None = None
) -> list[SliceSample]:
    """Training samples from a volume and its label map (e.g. a datastore item made from a DICOM SEG).

    Every slice with labelled voxels gives one :class:`SliceSample`, its masks in view pixels (row ``y``, column
    ``x``), with the image mapped to 0..255 exactly as for inference, so training sees what the annotator saw.

    Raises:
        SegError: a label map that is not on the image's grid or cannot be read.
    """
    import SimpleITK

    from lib.io.image_source import read_image

    source = read_image(image_path)
    try:
        label_image = SimpleITK.ReadImage(str(label_path))
    except RuntimeError as exc:
        raise SegError(f"unreadable label map {Path(label_path).name}: {str(exc).strip()[-200:]}") from exc
    label = SimpleITK.GetArrayFromImage(label_image).transpose(*reversed(range(label_image.GetDimension())))
    if label.ndim == 2:
        label = label[:, :, None]
    pixels_shape = source.pixels.shape[:3] if source.is_volume else (*source.pixels.shape[1::-1], 1)
    if label.shape != tuple(pixels_shape):
        raise SegError(f"label map {Path(label_path).name} {label.shape} is not on the image's grid {pixels_shape}")
    names = {int(k): v for k, v in (segments or {}).items()}
    samples = []
    for k in range(label.shape[2]):
        plane = label[:, :, k].T  # (H, W) in view pixels
        values = [int(v) for v in np.unique(plane) if v != 0]
        if not values:
            continue
        view = source.view(k if source.is_volume else None)
        samples.append(
            SliceSample(view, [plane == v for v in values], [names.get(v, f"segment {v}") for v in values], k)
        )
    return samples
