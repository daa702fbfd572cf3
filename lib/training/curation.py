"""Data curation as the paper does it (section 3.1), and the SAM-Med2D dataset layout.

* 3D volumes: intensities to 0..255 per volume (min-max); every slice along the chosen axes (default x, y and z);
  slices whose short side is under half the long side are dropped, and so are slices without any label.
* 2D images: values kept in 0..255 (8-bit images as they are; anything else min-max scaled).
* Labels: one mask per class, then one mask per 8-connected component; masks under ``min_fraction`` of the image
  (100 / (256 x 256) = 0.153%) are dropped.
* Split by case (a volume or a 2D image, never slices of one volume on both sides), 80/20 by default.

The layout written is the published one: ``images/*.png``, ``masks/*.png`` (0/255), ``image2label_train.json``
(image -> masks, training cases) and ``label2image_test.json`` (mask -> image, held-out cases), paths relative to
the output folder. The trainer curates the datastore's final labels with the same functions.

    python -m lib.training.curation --images <dir> --labels <dir> --output <dir> [--axes 0,1,2] [--val-fraction 0.2]

Images and labels are paired by file name (NIfTI ``.nii``/``.nii.gz``, NRRD, PNG, JPEG, TIFF, BMP, NumPy ``.npy``,
single-frame DICOM images).

Orientation contract for 2D images: every 2D array is handled as (rows, columns), the picture's own order. NIfTI and
NRRD files store ITK index order (i, j) = (column, row): a 2D label saved from Slicer on a PNG, JPEG or DICOM frame is
an ``(I, J, 1)`` NIfTI/NRRD/``.seg.nrrd`` and is transposed on reading; PNG/TIFF/NumPy labels are taken as they are.
A label whose grid then differs from its image's is refused (:func:`check_label`), never transposed by guessing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from lib.common.atomic_files import write_json_atomic
from lib.io.image_source import DICOM_SUFFIXES, read_image, suffix_of, vector_picture
from lib.io.image_source import to_uint8 as map_to_uint8
from lib.training.data import TEST_LAYOUT, TRAIN_LAYOUT

MIN_MASK_FRACTION = 100 / (256 * 256)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy", ".dcm")
INDEX_ORDER_SUFFIXES = (".nii.gz", ".nii", ".nrrd")  # formats that store ITK index order (i, j[, k])
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class CurationError(ValueError):
    """An image/label pair that cannot be curated (unreadable, mismatched shapes)."""


@dataclasses.dataclass
class CuratedSlice:
    """One 2D training image: ``image`` (H, W) or (H, W, 3) uint8 and its component masks (H, W) bool."""

    case: str
    name: str
    image: np.ndarray
    masks: list[np.ndarray]
    classes: list[int]


def stem(path: str | Path) -> str:
    """File name without its image suffix (``ct_01.nii.gz`` -> ``ct_01``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_array(path: str | Path) -> np.ndarray:
    """Read an image or label file into an array: 2D ``(H, W)`` / ``(H, W, 3)`` (rows, columns, whatever the format:
    see the orientation contract above) or 3D ``(X, Y, Z)``."""
    path = Path(path)
    name = path.name.lower()
    index_order = name.endswith(INDEX_ORDER_SUFFIXES)
    try:
        if suffix_of(path) in DICOM_SUFFIXES:
            array = read_image(path).pixels  # modality values, (rows, columns), as the server segments them
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel

            array = np.asanyarray(nibabel.load(str(path)).dataobj)
        elif name.endswith(".nrrd"):
            import nrrd

            array, _ = nrrd.read(str(path))
        elif name.endswith(".npy"):
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                if img.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
                    img = img.convert("RGB") if img.mode != "P" else img
                array = np.array(img)
    except (OSError, ValueError, EOFError) as err:
        raise CurationError(f"cannot read {path.name}: {err}") from err
    picture = vector_picture(array) if index_order else None
    if picture is not None:  # an RGB picture as Slicer writes it
        return picture
    array = np.squeeze(array)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise CurationError(f"{path.name}: expected a 2D image or a 3D volume, got shape {array.shape}")
    if index_order and array.ndim == 2:
        array = array.T  # (i, j) -> (rows, columns)
    # NIfTI arrays come in Fortran order; slicing them along the last axis would copy with a large stride each time.
    return np.ascontiguousarray(array)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Intensities to 0..255: 8-bit data as is, anything else min-max over the whole array (per volume, as the paper),
    with the same mapping the server applies to the images it segments."""
    if array.dtype == np.uint8:
        return array
    return map_to_uint8(array, float(np.min(array)), float(np.max(array)))


def component_masks(label: np.ndarray, min_fraction: float = MIN_MASK_FRACTION) -> tuple[list[np.ndarray], list[int]]:
    """Split a 2D label map into one mask per class and connected component, dropping the small ones.

    Returns the masks ``(H, W)`` bool and the class value of each.
    """
    label = np.asarray(label)
    if label.dtype.kind == "f":
        label = np.round(label).astype(np.int64)
    minimum = min_fraction * label.shape[0] * label.shape[1]
    masks, classes = [], []
    for value in np.unique(label):
        if value == 0:
            continue
        components, count = ndimage.label(label == value, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        for index in range(1, count + 1):
            if sizes[index] >= minimum:
                masks.append(components == index)
                classes.append(int(value))
    return masks, classes


def _is_volume(image: np.ndarray, label: np.ndarray) -> bool:
    if label.ndim == 2:
        return False
    return not (image.ndim == 3 and image.shape[-1] in (3, 4) and label.ndim == 2)


def _check_grids(image: np.ndarray, label: np.ndarray, case: str) -> None:
    """Raise :class:`CurationError` naming the mismatch unless the label covers the image voxel for voxel."""
    if _is_volume(image, label):
        if label.shape != image.shape:
            raise CurationError(f"{case}: label shape {label.shape} differs from image shape {image.shape}")
        return
    if image.shape[:2] != label.shape:
        rows, columns = label.shape[:2]
        raise CurationError(
            f"{case}: the label is {rows} rows x {columns} columns but the image is {image.shape[0]} rows x "
            f"{image.shape[1]} columns (NIfTI/NRRD labels are read in ITK (i, j) order, as Slicer writes them; "
            "PNG/TIFF labels in rows and columns)"
        )


def check_label(image_path: str | Path, label_path: str | Path, case: str) -> None:
    """Refuse, before it is stored, a label that training could not pair with its image pixel for pixel.

    Raises:
        CurationError: unreadable label or image, or a grid (after the orientation contract) other than the image's.
    """
    _check_grids(read_array(image_path), read_array(label_path), case)


def curate_case(
    image: np.ndarray,
    label: np.ndarray,
    case: str,
    axes: Sequence[int] = (0, 1, 2),
    min_fraction: float = MIN_MASK_FRACTION,
) -> list[CuratedSlice]:
    """Curate one image/label pair (2D, or a 3D volume cut into slices) into training slices."""
    _check_grids(image, label, case)
    if not _is_volume(image, label):
        if image.ndim == 3 and image.shape[-1] == 4:
            image = image[..., :3]
        masks, classes = component_masks(label, min_fraction)
        return [CuratedSlice(case, case, to_uint8(image), masks, classes)] if masks else []
    volume = to_uint8(image)
    out = []
    for axis in axes:
        if axis not in (0, 1, 2):
            raise ValueError(f"slice axes must be 0, 1 or 2, got {axis}")
        for index in range(volume.shape[axis]):
            lab = np.take(label, index, axis=axis)
            if not lab.any():
                continue
            short, long = sorted(lab.shape)
            if short * 2 < long:
                continue
            masks, classes = component_masks(lab, min_fraction)
            if masks:
                name = f"{case}_{'xyz'[axis]}{index:04d}"
                out.append(CuratedSlice(case, name, np.take(volume, index, axis=axis), masks, classes))
    return out


def iter_curated(
    pairs: Iterable[tuple[str, str | Path, str | Path]],
    axes: Sequence[int] = (0, 1, 2),
    min_fraction: float = MIN_MASK_FRACTION,
) -> Iterator[CuratedSlice]:
    """Curate ``(case, image path, label path)`` pairs one at a time."""
    for case, image_path, label_path in pairs:
        image, label = read_array(image_path), read_array(label_path)
        yield from curate_case(image, label, case, axes, min_fraction)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_slices(slices: Iterable[CuratedSlice], output: str | Path) -> list[dict[str, object]]:
    """Write curated slices as PNG files under ``output/images`` and ``output/masks``.

    Returns records ``{"case", "image", "masks"}`` with paths relative to ``output``.
    """
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    (output / "masks").mkdir(parents=True, exist_ok=True)
    records = []
    for item in slices:
        name = _safe(item.name)
        image_rel = f"images/{name}.png"
        Image.fromarray(item.image).save(output / image_rel)
        mask_rels = []
        for k, (mask, cls) in enumerate(zip(item.masks, item.classes)):
            rel = f"masks/{name}_c{cls}_{k:03d}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(output / rel)
            mask_rels.append(rel)
        records.append({"case": item.case, "image": image_rel, "masks": mask_rels})
    return records


def split_cases(cases: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[set[str], set[str]]:
    """Seeded split of case ids: ``round(val_fraction * n)`` held out (at least one when ``n >= 2``)."""
    unique = sorted(set(cases))
    if val_fraction <= 0 or len(unique) < 2:
        return set(unique), set()
    held = min(len(unique) - 1, max(1, round(val_fraction * len(unique))))
    order = np.random.default_rng(seed).permutation(len(unique))
    val = {unique[i] for i in order[:held]}
    return set(unique) - val, val


def write_layout(records: Sequence[dict[str, object]], output: str | Path, val_cases: set[str]) -> dict[str, int]:
    """Write ``image2label_train.json`` and ``label2image_test.json`` for records split by case."""
    output = Path(output)
    train = {r["image"]: r["masks"] for r in records if r["case"] not in val_cases}
    test = {m: r["image"] for r in records if r["case"] in val_cases for m in r["masks"]}
    write_json_atomic(output / TRAIN_LAYOUT, train, indent=1)
    write_json_atomic(output / TEST_LAYOUT, test, indent=1)
    return {
        "train_images": len(train),
        "train_masks": sum(len(v) for v in train.values()),
        "test_images": len(set(test.values())),
        "test_masks": len(test),
    }


def pair_folders(images: str | Path, labels: str | Path) -> list[tuple[str, Path, Path]]:
    """``(case, image, label)`` for every image with a label of the same name; raises if none match."""
    image_files = {stem(p): p for p in sorted(Path(images).iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)}
    label_files = {stem(p): p for p in sorted(Path(labels).iterdir()) if p.name.lower().endswith(IMAGE_SUFFIXES)}
    pairs = [(name, image_files[name], label_files[name]) for name in sorted(image_files) if name in label_files]
    if not pairs:
        raise CurationError(f"no image in {images} has a label of the same name in {labels}")
    return pairs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.training.curation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder of images (NIfTI, NRRD, PNG, ...)")
    parser.add_argument("--labels", required=True, help="folder of label maps with the same file names")
    parser.add_argument("--output", required=True, help="output folder (SAM-Med2D layout)")
    parser.add_argument("--axes", default="0,1,2", help="slice axes of 3D volumes (default all three)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of cases held out (default 0.2)")
    parser.add_argument("--min-fraction", type=float, default=MIN_MASK_FRACTION, help="smallest mask kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        pairs = pair_folders(args.images, args.labels)
        axes = tuple(int(a) for a in args.axes.split(",") if a)
        records = []
        for i, (case, image, label) in enumerate(pairs, 1):
            records += write_slices(iter_curated([(case, image, label)], axes, args.min_fraction), args.output)
            print(f"[{i}/{len(pairs)}] {case}: {len(records)} images so far", flush=True)
        _, val = split_cases([r["case"] for r in records], args.val_fraction, args.seed)
        summary = write_layout(records, args.output, val)
    except (CurationError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"cases": len(pairs), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
