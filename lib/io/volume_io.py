"""Reading and writing volumes with their geometry, in the conventions MONAI Label and its clients use.

Arrays are in ITK index order ``(i, j, k)`` (what Slicer and OHIF call voxel coordinates) and geometry is a 4x4 RAS
affine (MONAI's convention; NIfTI stores RAS, NRRD and DICOM store LPS and are converted). NIfTI goes through
nibabel and NRRD through pynrrd, which are light; only DICOM series need ITK (GDCM), imported on first use because
it costs about 270 MB of server memory.
"""

from __future__ import annotations

import functools
import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NRRD_SPACES = {
    "left-posterior-superior": LPS_TO_RAS,
    "LPS": LPS_TO_RAS,
    "right-anterior-superior": np.eye(4),
    "RAS": np.eye(4),
}


# Bytes decompressed at a time into a gzip-compressed NIfTI file's array (read_gzip_nifti_data).
GZIP_READ_CHUNK = 2**20


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k[, ...]), RAS affine)``; scaled intensities when the file says so."""
    import nibabel as nib

    image = nib.load(str(path))
    proxy = image.dataobj
    if _unscaled(proxy):
        if str(path).endswith(".gz"):
            data = read_gzip_nifti_data(path, proxy.shape, proxy.dtype, proxy.offset, proxy.order)
        else:
            data = np.asanyarray(proxy)  # stored dtype (int16 CT stays int16)
    else:
        data = image.get_fdata(dtype=np.float32)  # scaled values; float32, not nibabel's default float64
    return data, np.asarray(image.affine, dtype=np.float64)


def read_gzip_nifti_data(
    path: str | Path, shape: tuple[int, ...], dtype: np.dtype, offset: int, order: str
) -> np.ndarray:
    """The array of a gzip-compressed NIfTI file (its header's ``shape``, ``dtype``, data ``offset`` and ``order``),
    decompressed straight into it :data:`GZIP_READ_CHUNK` bytes at a time.

    nibabel reads it with one ``readinto`` of the whole array, which Python's gzip serves by decompressing all of it
    into a bytes object first and copying that: the file's data twice at once (+68 MB for a 512x512x64 int16 CT, the
    server's largest transient while it scores or opens a volume).
    """
    buffer = bytearray(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    with gzip.open(path, "rb") as stream:
        stream.seek(offset)
        _fill(stream, memoryview(buffer), path, 0, len(buffer))
    return np.ndarray(shape, dtype=dtype, buffer=buffer, order=order)


def _unscaled(proxy: object) -> bool:
    """Whether a NIfTI array proxy's stored values are its values (no slope or intercept)."""
    return getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0


def _fill(stream: gzip.GzipFile, view: memoryview, path: str | Path, start: int, total: int) -> None:
    """Decompress the next ``len(view)`` bytes of ``stream`` into ``view``, :data:`GZIP_READ_CHUNK` at a time;
    ``start`` bytes of the data's ``total`` were read before (for the message when the data ends early)."""
    filled = 0
    while filled < len(view):
        read = stream.readinto(view[filled : filled + GZIP_READ_CHUNK])
        if not read:
            raise ValueError(f"{Path(path).name}: the data ends after {start + filled} of {total} bytes")
        filled += read


def read_nifti_middle_slice(path: str | Path) -> tuple[np.ndarray, float, float] | None:
    """The middle slice ``(I, J)`` of a 3D gzip-compressed NIfTI volume stored as it is served (no scaling,
    column-major) and the finite min..max of the whole volume (``nan`` both when no value is finite), decompressed one
    slice at a time: what start-up scoring needs of a volume, with two slices in memory instead of the whole array and
    decompression buffers (a 512x512x64 int16 CT: 1 MB instead of 32 MB). ``None`` for any other file: read it whole.
    """
    import nibabel as nib

    if not str(path).endswith(".gz"):
        return None
    proxy = nib.load(str(path)).dataobj
    shape, dtype = tuple(proxy.shape), np.dtype(proxy.dtype)
    if len(shape) != 3 or proxy.order != "F" or not _unscaled(proxy) or dtype.kind not in "iuf":
        return None
    keep = shape[2] // 2
    plane = np.empty(shape[:2], dtype=dtype, order="F")
    plane_bytes = memoryview(plane.T.reshape(-1).view(np.uint8))
    kept = np.empty_like(plane)
    low, high = math.inf, -math.inf
    with gzip.open(path, "rb") as stream:
        stream.seek(proxy.offset)
        for k in range(shape[2]):
            _fill(stream, plane_bytes, path, k * len(plane_bytes), shape[2] * len(plane_bytes))
            values = plane[np.isfinite(plane)] if dtype.kind == "f" else plane
            if values.size:
                low, high = min(low, float(values.min())), max(high, float(values.max()))
            if k == keep:
                kept[...] = plane
    return (kept, low, high) if low <= high else (kept, math.nan, math.nan)


def read_nrrd(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k), RAS affine)`` from a NRRD file's space directions and origin."""
    import nrrd

    data, header = nrrd.read(str(path), index_order="F")
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        spatial = [np.asarray(d, dtype=np.float64) for d in directions if d is not None and not np.isnan(d).any()]
        if len(spatial) == min(3, data.ndim):
            matrix = np.stack(spatial, axis=1)
            affine[: matrix.shape[0], : matrix.shape[1]] = matrix
        origin = header.get("space origin")
        if origin is not None:
            affine[: len(origin), 3] = np.asarray(origin, dtype=np.float64)
        affine = _NRRD_SPACES.get(str(header.get("space", "LPS")), LPS_TO_RAS) @ affine
    return data, affine


def read_with_itk(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k), RAS affine)`` with ITK: a DICOM series folder (GDCM sorts the slices), MHA/MHD."""
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    image = LoadImage(reader=ITKReader(), image_only=True)(str(path))
    return np.asarray(image.array), np.asarray(image.affine, dtype=np.float64)


def write_label(label: np.ndarray, path: str | Path, affine: np.ndarray, compress: bool = False) -> None:
    """Write a label array in ITK index order (``(i, j, k)`` or ``(x, y)``) as NRRD or NIfTI with its geometry.

    Args:
        label: the array (its dtype is kept).
        path: ``.nrrd``, ``.seg.nrrd``, ``.nii`` or ``.nii.gz``.
        affine: RAS affine (a 2D label's geometry is that of its picture, see ``lib.io.image_source.picture_affine``).
        compress: gzip NRRD data (NIfTI compresses by its ``.gz`` extension).
    """
    name = str(path).lower()
    affine = np.asarray(affine, dtype=np.float64)
    if name.endswith(".nrrd"):
        import nrrd

        header: dict = {"kinds": ["domain"] * label.ndim, "encoding": "gzip" if compress else "raw"}
        if label.ndim == 3:
            lps = LPS_TO_RAS @ affine
            header["space"] = "left-posterior-superior"
            header["space directions"] = lps[:3, :3].T
            header["space origin"] = lps[:3, 3]
        nrrd.write(str(path), np.asarray(label), header, index_order="F")
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.Nifti1Image(np.asarray(label), affine)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(path))
    else:
        raise ValueError(f"cannot write a label as {Path(path).name}: use .nrrd or .nii.gz")


_ZERO_CHUNK = bytes(1 << 20)
_NRRD_TYPES = {"uint8": "uint8", "uint16": "uint16", "int16": "int16", "int32": "int32", "float32": "float"}


def write_slice_label_nrrd(
    path: str | Path,
    shape: tuple[int, int, int],
    slice_index: int,
    plane: np.ndarray,
    affine: np.ndarray,
    compress: bool = False,
) -> None:
    """Write an ``(I, J, K)`` NRRD label that is empty except on slice ``k``, without building the volume.

    Interactive clicks answer with the whole volume (Slicer and OHIF expect the input's geometry) but only one slice
    is set; writing that slice into an empty file (a sparse file, or a gzip stream whose empty parts are compressed
    once) costs a few milliseconds instead of the tens a 512x512xK array costs to build, reorder and write.

    Args:
        shape: ``(I, J, K)``.
        plane: the slice as ``(J, I)`` (rows j, columns i), in the label's dtype.
        affine: RAS affine of the volume.
        compress: gzip (level 1) instead of raw.
    """
    i_size, j_size, k_size = shape
    if plane.shape != (j_size, i_size):
        raise ValueError(f"slice of shape {plane.shape} does not fit a volume of shape {shape}")
    dtype = np.dtype(plane.dtype).newbyteorder("<")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    vectors = " ".join("(" + ",".join(f"{v:.17g}" for v in lps[:3, axis]) + ")" for axis in range(3))
    header = (
        "NRRD0004\n"
        f"type: {_NRRD_TYPES[dtype.name]}\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {i_size} {j_size} {k_size}\n"
        f"space directions: {vectors}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        f"encoding: {'gzip' if compress else 'raw'}\n"
        "space origin: (" + ",".join(f"{v:.17g}" for v in lps[:3, 3]) + ")\n\n"
    ).encode()
    block = np.ascontiguousarray(plane, dtype=dtype).tobytes()
    before = slice_index * len(block)
    after = (k_size - slice_index - 1) * len(block)
    with open(path, "wb") as f:
        f.write(header)
        if not compress:
            f.seek(before, 1)
            f.write(block)
            f.truncate(len(header) + before + len(block) + after)
            return
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")  # gzip member header, no name, unknown OS
        crc = 0
        for part in (before, None, after):
            if part is None:
                f.write(_deflate_fresh(block))
                crc = zlib.crc32(block, crc)
                continue
            chunks, rest = divmod(part, len(_ZERO_CHUNK))
            compressed_chunk = _deflated_zero_chunk()
            for _ in range(chunks):
                f.write(compressed_chunk)
            if rest:
                f.write(_deflate_fresh(_ZERO_CHUNK[:rest]))
            crc = crc32_of_zeros(crc, part)
        f.write(b"\x03\x00")  # final empty fixed-Huffman block
        total = before + len(block) + after
        f.write(struct.pack("<II", crc & 0xFFFFFFFF, total & 0xFFFFFFFF))


def crc32_of_zeros(crc: int, length: int) -> int:
    """``zlib.crc32(bytes(length), crc)`` without reading the bytes.

    Appending zero bytes acts linearly on the CRC register, as a matrix over GF(2) (zlib's ``crc32_combine``): the
    matrices for 1, 2, 4 ... zero bytes are made once, and a run of ``length`` zeros applies one per set bit of
    ``length``. The empty slices of a 512x512x300 label are 75 MB that a click's answer would otherwise run through
    the CRC (about 4 ms for a 64-slice volume).
    """
    register = crc ^ 0xFFFFFFFF
    for power, operator in enumerate(_zero_byte_operators()):
        if length >> power == 0:
            break
        if length >> power & 1:
            register = _gf2_apply(operator, register)
    return register ^ 0xFFFFFFFF


def _gf2_apply(matrix: tuple[int, ...], vector: int) -> int:
    result, row = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[row]
        vector >>= 1
        row += 1
    return result


@functools.lru_cache(maxsize=1)
def _zero_byte_operators() -> tuple[tuple[int, ...], ...]:
    """The CRC-32 register operators of 2**k zero bytes, k = 0..47."""
    operator = (0xEDB88320, *(1 << n for n in range(31)))  # one zero bit (reflected polynomial)
    for _ in range(3):  # one zero byte: 8 bits
        operator = tuple(_gf2_apply(operator, row) for row in operator)
    operators = [operator]
    for _ in range(47):
        operator = tuple(_gf2_apply(operator, row) for row in operator)
        operators.append(operator)
    return tuple(operators)


def _deflate_fresh(data: bytes) -> bytes:
    """Raw deflate of ``data`` as an independent, byte-aligned, non-final run of blocks (ends with a full flush)."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


@functools.lru_cache(maxsize=1)
def _deflated_zero_chunk() -> bytes:
    return _deflate_fresh(_ZERO_CHUNK)


def encode_label_png(label: np.ndarray) -> bytes:
    """A 2D ``uint8`` or ``uint16`` label ``(H, W)`` as a greyscale PNG, values kept.

    A label is a few runs of equal values, which deflate well as they are: every row is stored unfiltered, as small
    as Pillow's PNG (a 512x512 mask is a few KB) without its trial of every row filter, which took about 2 ms of a
    click through REST.
    """
    if label.ndim != 2 or label.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"a PNG label is 2D uint8 or uint16, got {label.dtype} {label.shape}")
    height, width = label.shape
    rows = np.zeros((height, 1 + width * label.itemsize), dtype=np.uint8)  # each row: filter type 0, then pixels
    rows[:, 1:] = np.ascontiguousarray(label, dtype=label.dtype.newbyteorder(">")).view(np.uint8).reshape(height, -1)
    idat = zlib.compress(rows.data, 1)
    header = struct.pack(">IIBBBBB", width, height, 8 * label.itemsize, 0, 0, 0, 0)  # greyscale, no interlace

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
