"""Reading and writing volumes with their geometry, in the conventions MONAI Label and its clients use.

Arrays are in ITK index order ``(i, j, k)`` (what Slicer and OHIF call voxel coordinates) and geometry is a 4x4 RAS
affine (MONAI's convention; NIfTI stores RAS, NRRD and DICOM store LPS and are converted). NIfTI goes through
nibabel and NRRD through pynrrd, which are light; only DICOM series need ITK (GDCM), imported on first use because
it costs about 270 MB of server memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NRRD_SPACES = {
    "left-posterior-superior": LPS_TO_RAS,
    "LPS": LPS_TO_RAS,
    "right-anterior-superior": np.eye(4),
    "RAS": np.eye(4),
}


def read_nifti(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (i, j, k[, ...]), RAS affine)``; scaled intensities when the file says so."""
    import nibabel as nib

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), np.asarray(image.affine, dtype=np.float64)


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


def write_label(label: np.ndarray, path: str | Path, affine: np.ndarray | None, compress: bool = False) -> None:
    """Write a label array in ITK index order (``(i, j, k)`` or ``(x, y)``) as NRRD or NIfTI with its geometry.

    Args:
        label: the array (its dtype is kept).
        path: ``.nrrd``, ``.seg.nrrd``, ``.nii`` or ``.nii.gz``.
        affine: RAS affine, ``None`` for a 2D picture's label (unit spacing at the origin).
        compress: gzip NRRD data (NIfTI compresses by its ``.gz`` extension).
    """
    name = str(path).lower()
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
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
