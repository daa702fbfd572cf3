"""Images as annotators send them (2D pictures, single DICOM frames, 3D volumes) and their 2D views for the model.

Coordinates follow MONAI Label's clients: a 2D image is addressed by ``[x, y]`` (column, row); a volume by voxel
``[i, j, k]`` in ITK index order (what Slicer and OHIF send), where a slice ``k`` is shown with ``i`` across and ``j``
down. A view is always returned as an ``(H, W, 3)`` uint8 picture whose pixel ``(x, y)`` is ``image[y, x]``; for a
volume slice that is ``volume[x, y, k]``, so clicks map without any transposition by the caller.

Intensities: 8-bit pictures are used as they are (the paper keeps 2D images in 0..255). Anything else (CT, MR, 16-bit
pictures, DICOM) is mapped to 0..255 by min-max over the whole image or volume, as the paper prepares its 3D data,
or over a window ``(low, high)`` when the client asks for one. Nothing here imports the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from lib.guard.limits import Limits, is_plain_name

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom")
NO_FINITE_VALUE = "image has no finite pixel value (all NaN or infinite): nothing to segment"


class ImageReadError(ValueError):
    """The file is missing, of an unsupported kind or unreadable; the message names it and says why.

    ``status`` is the HTTP status a server answers with: 422 (unusable content) or 413 (more pixels than allowed).
    """

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def suffix_of(path: str | Path) -> str:
    """The file's extension, with the double extension of ``.nii.gz``, lower case."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def fingerprint(path: str | Path) -> str:
    """Cheap identity of a file's content (size and mtime in ns; for a DICOM folder, those of every file)."""
    path = Path(path)
    try:
        if path.is_dir():
            digest = hashlib.sha1()
            with os.scandir(path) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if entry.is_file():
                        st = entry.stat()
                        digest.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns};".encode())
            return f"dir:{digest.hexdigest()}"
        st = path.stat()
    except OSError as exc:
        raise ImageReadError(f"image {path} cannot be accessed: {exc.strerror or exc}") from exc
    return f"{st.st_size}:{st.st_mtime_ns}"


@dataclasses.dataclass
class ImageSource:
    """One image as loaded once per content version.

    Attributes:
        path: where it was read from.
        content: :func:`fingerprint` at load time.
        pixels: 2D ``(H, W)`` or ``(H, W, 3)``; volumes ``(I, J, K)`` (ITK index order).
        is_volume: a 3D volume (clicks carry a slice) rather than a 2D image.
        affine: the 4x4 RAS affine (MONAI convention) of a volume, or of a 2D image whose reader reports a geometry
            (single-frame DICOM, a picture with a pixel size, a picture written by Slicer); ``None`` for a plain
            picture (ITK and Slicer then use :func:`picture_affine`).
        value_range: ``(min, max)`` of the whole image, the default intensity window.
    """

    path: str
    content: str
    pixels: np.ndarray
    is_volume: bool
    affine: np.ndarray | None = None
    value_range: tuple[float, float] = (0.0, 255.0)

    @property
    def needs_mapping(self) -> bool:
        """Whether intensities must be mapped to 0..255 (anything but an 8-bit picture)."""
        return self.is_volume or self.pixels.dtype != np.uint8

    @property
    def num_slices(self) -> int:
        return int(self.pixels.shape[2]) if self.is_volume else 1

    @property
    def view_hw(self) -> tuple[int, int]:
        """``(H, W)`` of every 2D view: for a volume ``(J, I)``."""
        if self.is_volume:
            return int(self.pixels.shape[1]), int(self.pixels.shape[0])
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def view(self, slice_index: int | None = None, window: tuple[float, float] | None = None) -> np.ndarray:
        """The 2D picture the model sees: ``(H, W, 3)`` uint8.

        Args:
            slice_index: slice ``k`` of a volume (required for volumes, ignored for 2D images).
            window: intensity ``(low, high)`` mapped to 0..255; default: the whole image's min..max. Ignored for
                8-bit pictures.
        """
        if self.is_volume:
            if slice_index is None:
                raise ValueError("a volume needs a slice index")
            plane = self.pixels[:, :, slice_index].T
        else:
            plane = self.pixels
        if self.needs_mapping:
            low, high = window if window is not None else self.value_range
            plane = to_uint8(plane, low, high)
        if plane.ndim == 2:
            plane = np.repeat(plane[:, :, None], 3, axis=2)
        return np.ascontiguousarray(plane)


def mapped_from_disk(source: ImageSource, directory: str | None = None) -> ImageSource:
    """``source`` with a volume's pixels moved to an unnamed temporary file (in ``directory``, default ``tempfile``'s)
    and mapped back read-only; a 2D image as it is.

    A server keeps the volumes being annotated for further clicks (decoding a 512x512x64 ``.nii.gz`` again takes
    about 0.2 s): in memory that is 32 MB of its resident memory each, mapped it is the page cache's, which the kernel
    reclaims when it needs to, and a click reads the one slice it shows (the file is column-major, so a slice is
    contiguous). The file is unlinked from its creation: nothing is left on disk when the mapping closes or the
    process dies. On a ``/tmp`` in memory (tmpfs) the pages stay in memory, outside the process's resident memory;
    set ``TMPDIR`` to a disk folder there.
    """
    if not source.is_volume:
        return source
    pixels = source.pixels
    try:
        with tempfile.TemporaryFile(dir=directory) as file:
            # Column-major, a slice at a time: no second copy of a volume that a reader gave in another order (a
            # NIfTI volume's slices are written from its own buffer).
            for k in range(pixels.shape[2]):
                np.ascontiguousarray(pixels[:, :, k].T).tofile(file)
            file.flush()
            mapped = np.memmap(file, dtype=pixels.dtype, mode="r", shape=pixels.shape, order="F")
    except OSError as exc:  # a full or read-only disk: the volume is served from memory, as before
        warnings.warn(f"{Path(source.path).name} kept in memory: its temporary file failed ({exc})", stacklevel=2)
        return source
    return dataclasses.replace(source, pixels=mapped)


def picture_affine(spacing_xy: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """The RAS affine ITK (and so Slicer) gives a 2D picture: identity LPS directions at the origin, its pixel size."""
    from lib.io.volume_io import LPS_TO_RAS

    return LPS_TO_RAS @ np.diag([spacing_xy[0], spacing_xy[1], 1.0, 1.0])


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly to 0..255 (rounded, clipped): the one mapping for serving and for training data.

    Defined for every value: NaN (no data, e.g. outside a resampled field of view) and -inf map to 0, +inf to 255; a
    constant image (``high == low``) maps to 0 everywhere.
    """
    scale = 255.0 / (high - low) if high > low else 0.0
    with np.errstate(invalid="ignore"):
        mapped = np.rint((values.astype(np.float64) - low) * scale)
    mapped = np.nan_to_num(mapped, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(mapped, 0.0, 255.0).astype(np.uint8)


def read_image(path: str | Path, limits: Limits | None = None) -> ImageSource:
    """Load a 2D picture, a single-frame DICOM, a volume file or a DICOM series folder.

    The header is checked first (:func:`check_header`): nothing is decoded when the image is larger than ``limits``
    (default: :class:`lib.guard.limits.Limits`'s) or points at data elsewhere.

    Raises:
        ImageReadError: missing, unsupported, unreadable or too large input.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image {path} does not exist")
    content = fingerprint(path)
    check_header(path, limits or Limits())
    if path.is_dir():
        return _read_volume(path, content)
    suffix = suffix_of(path)
    if suffix in PICTURE_SUFFIXES:
        return _read_picture(path, content)
    if suffix in VOLUME_SUFFIXES:
        return _read_volume(path, content)
    if suffix in DICOM_SUFFIXES or _looks_like_dicom(path):
        return _read_dicom_frame(path, content)
    raise ImageReadError(
        f"image {path.name}: unsupported file type {suffix or '(none)'}; use PNG/JPG, single-frame DICOM, "
        "NIfTI, NRRD or a DICOM series folder"
    )


def read_scored_view(path: str | Path, limits: Limits | None = None) -> tuple[np.ndarray, str]:
    """What uncertainty scoring scores of an image, and its :func:`fingerprint`: the view (:meth:`ImageSource.view`)
    of a 2D image, or of a volume's middle slice in the whole volume's default window.

    A gzip-compressed NIfTI volume is read a slice at a time and never held whole
    (:func:`lib.io.volume_io.read_nifti_middle_slice`): the server scores every unlabeled image while it serves clicks.

    Raises:
        ImageReadError: as :func:`read_image`.
    """
    from lib.io.volume_io import read_nifti_middle_slice

    path = Path(path)
    if path.is_file() and suffix_of(path) == ".nii.gz":
        content = fingerprint(path)
        check_header(path, limits or Limits())
        try:
            streamed = read_nifti_middle_slice(path)
        except Exception as exc:  # nibabel and gzip raise many types for unreadable input
            raise ImageReadError(f"image {path.name} is not a readable volume: {exc}") from exc
        if streamed is not None:
            plane, low, high = streamed
            if math.isnan(low):
                raise ImageReadError(NO_FINITE_VALUE)
            return ImageSource(str(path), content, plane[:, :, None], True, value_range=(low, high)).view(0), content
    source = read_image(path, limits)
    return source.view(source.num_slices // 2 if source.is_volume else None), source.content


def check_header(path: str | Path, limits: Limits) -> None:
    """Check an image from its header alone, before any pixel is decoded.

    Refused: more pixels (2D) or voxels (3D) than ``limits`` allow (413), and files whose pixel data is elsewhere
    (NRRD ``data file:``, MetaImage ``ElementDataFile`` other than ``LOCAL`` or a file beside it): such a header makes
    the reader open any file the server can read.

    Raises:
        ImageReadError: unreadable header (422), detached data (422) or too large (413).
    """
    path = Path(path)
    suffix = "" if path.is_dir() else suffix_of(path)
    try:
        if path.is_dir():
            files = [f for f in sorted(path.iterdir()) if f.is_file()]
            first = _dicom_header_size(files[0]) if files else 0
            size, is_volume = first * len(files), True
        elif suffix in PICTURE_SUFFIXES:
            size, is_volume = _picture_header_size(path), False
        elif suffix in (".nii", ".nii.gz"):
            import nibabel as nib

            size, is_volume = math.prod(nib.load(str(path)).shape), True
        elif suffix == ".nrrd":
            size, is_volume = _nrrd_header_size(path), True
        elif suffix in (".mha", ".mhd"):
            size, is_volume = _metaimage_header_size(path), True
        else:  # single-frame DICOM, or a file read_image refuses anyway
            size, is_volume = (
                (_dicom_header_size(path) if _looks_like_dicom(path) or suffix in DICOM_SUFFIXES else 0),
                False,
            )
    except ImageReadError:
        raise
    except Exception as exc:  # PIL, nibabel, pynrrd and pydicom raise many types for a broken header
        kind = "volume" if suffix in VOLUME_SUFFIXES else "picture" if suffix in PICTURE_SUFFIXES else "DICOM image"
        kind = "DICOM series" if path.is_dir() else kind
        raise ImageReadError(f"image {path.name} is not a readable {kind}: {exc}") from exc
    bound, what, key = (
        (limits.volume_voxels, "voxels", "max_volume_voxels")
        if is_volume
        else (limits.image_pixels, "pixels", "max_image_pixels")
    )
    if size > bound:
        raise ImageReadError(
            f"image {path.name} has {size} {what}, more than the server accepts ({bound}; --conf {key})", 413
        )


def _picture_header_size(path: Path) -> int:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's decompression-bomb warning: the bound here is the server's own
        with Image.open(path) as img:
            width, height = img.size
    return width * height


def _dicom_header_size(path: Path) -> int:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)


def _nrrd_header_size(path: Path) -> int:
    import nrrd

    header = nrrd.read_header(str(path))
    if "data file" in header or "datafile" in header:
        raise ImageReadError(f"image {path.name}: NRRD files with a detached data file ('data file:') are not accepted")
    return math.prod(int(s) for s in header["sizes"])


def _metaimage_header_size(path: Path) -> int:
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for raw in f:
            key, _, value = raw.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":  # the last header field; pixel data follows in .mha files
                break
    data_file = fields.get("ElementDataFile", "")
    # LIST and "pattern min max step" name other files; a path or "../" names any file the server can read.
    if data_file != "LOCAL" and (data_file.upper() == "LIST" or not is_plain_name(data_file)):
        raise ImageReadError(
            f"image {path.name}: MetaImage data must be LOCAL or one file beside the header, not {data_file[:40]!r}"
        )
    return math.prod(int(s) for s in fields.get("DimSize", "0").split())


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _with_range(pixels: np.ndarray) -> tuple[float, float]:
    """The default window: min..max of the finite values (NaN and infinities are mapped by :func:`to_uint8`)."""
    if pixels.size == 0:
        raise ImageReadError("empty image")
    low, high = float(pixels.min()), float(pixels.max())
    if math.isfinite(low) and math.isfinite(high):
        return low, high
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        raise ImageReadError(NO_FINITE_VALUE)
    return float(finite.min()), float(finite.max())


def _read_picture(path: Path, content: str) -> ImageSource:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                pixels = np.array(img)
            elif img.mode in ("L", "1"):
                pixels = np.array(img.convert("L"))
            else:
                pixels = np.array(img.convert("RGB"))
            spacing = _pixel_size_mm(img.info.get("dpi"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(f"image {path.name} is not a readable picture: {exc}") from exc
    affine = picture_affine(spacing) if spacing is not None else None
    return ImageSource(str(path), content, pixels, is_volume=False, affine=affine, value_range=_with_range(pixels))


def _pixel_size_mm(dpi: object) -> tuple[float, float] | None:
    """Pixel size (x, y) in mm from a picture's resolution (JPEG density, PNG pHYs, TIFF resolution), as ITK reads it;
    ``None`` when the picture states no physical unit (PIL then reports no ``dpi``; ITK reads 1 mm)."""
    if not isinstance(dpi, tuple) or len(dpi) != 2:
        return None
    try:
        x_dpi, y_dpi = float(dpi[0]), float(dpi[1])
    except (TypeError, ValueError):
        return None
    if not (x_dpi > 0 and y_dpi > 0):
        return None
    return 25.4 / x_dpi, 25.4 / y_dpi


def _read_dicom_frame(path: Path, content: str) -> ImageSource:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixel_data_handlers.util import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ImageReadError(
                f"image {path.name} is a multi-frame DICOM ({frames} frames); send a series folder or a NIfTI volume"
            )
        pixels = ds.pixel_array
    except ImageReadError:
        raise
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, NotImplementedError) as exc:
        raise ImageReadError(f"image {path.name} is not a readable DICOM image: {exc}") from exc
    affine = _dicom_frame_affine(ds)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        if pixels.dtype != np.uint8:
            pixels = to_uint8(pixels, float(pixels.min()), float(pixels.max()))
        return ImageSource(str(path), content, np.ascontiguousarray(pixels), is_volume=False, affine=affine)
    if pixels.ndim != 2:
        raise ImageReadError(f"image {path.name}: unsupported DICOM pixel layout {pixels.shape}")
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)  # stored values -> HU etc.
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() + values.min() - values
    return ImageSource(str(path), content, values, is_volume=False, affine=affine, value_range=_with_range(values))


def _dicom_frame_affine(ds: object) -> np.ndarray | None:
    """RAS affine of one DICOM frame as ITK (GDCM) reads it: columns advance along the row cosines by the column
    spacing, rows along the column cosines by the row spacing, from the image position; ``None`` if absent."""
    from lib.io.volume_io import LPS_TO_RAS

    try:
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        orientation = np.asarray([float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
        origin = np.asarray([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])])
    except (AttributeError, TypeError, ValueError):
        return None
    if orientation.shape != (6,) or origin.shape != (3,) or not row_spacing > 0 or not column_spacing > 0:
        return None
    along_row, along_column = orientation[:3], orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = along_row * column_spacing
    lps[:3, 1] = along_column * row_spacing
    lps[:3, 2] = np.cross(along_row, along_column)  # one frame: ITK gives the normal unit spacing
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _read_volume(path: Path, content: str) -> ImageSource:
    from lib.io.volume_io import read_nifti, read_nrrd, read_with_itk

    suffix = "" if path.is_dir() else suffix_of(path)
    reader = {".nii": read_nifti, ".nii.gz": read_nifti, ".nrrd": read_nrrd}.get(suffix, read_with_itk)
    try:
        pixels, affine = reader(path)
    except Exception as exc:  # nibabel, pynrrd, ITK and MONAI raise many types for unreadable input
        what = "DICOM series" if path.is_dir() else "volume"
        raise ImageReadError(f"image {path.name} is not a readable {what}: {exc}") from exc
    pixels = np.asarray(pixels)
    picture = vector_picture(pixels)
    if picture is not None:  # Slicer's writer output for an RGB picture opened locally
        return ImageSource(str(path), content, picture, False, affine=affine, value_range=_with_range(picture))
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim == 4 and pixels.shape[3] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 3:
        raise ImageReadError(f"image {path.name}: expected a 3D volume, got shape {tuple(pixels.shape)}")
    return ImageSource(str(path), content, pixels, is_volume=True, affine=affine, value_range=_with_range(pixels))


def vector_picture(array: np.ndarray) -> np.ndarray | None:
    """An RGB(A) picture ``(H, W, 3)`` from a one-slice vector volume in ITK index order, ``None`` for anything else.

    Slicer holds an RGB picture as a one-slice vector volume and its NIfTI writer stores it as ``(I, J, 1, 1, C)``
    (5D, intent "vector").
    """
    if array.ndim not in (4, 5) or array.shape[-1] not in (3, 4) or any(n != 1 for n in array.shape[2:-1]):
        return None
    rgb = array.reshape(array.shape[0], array.shape[1], array.shape[-1])[:, :, :3].transpose(1, 0, 2)
    if rgb.dtype != np.uint8:
        rgb = to_uint8(rgb, float(rgb.min()), float(rgb.max()))
    return np.ascontiguousarray(rgb)
