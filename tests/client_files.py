"""Files as 3D Slicer writes them (SimpleITK = the ITK writers Slicer uses), for replaying its requests.

A Slicer volume is always 3D: a picture or a DICOM frame is a one-slice volume whose geometry ITK read from the file,
and a label exported on it (``ExportSegmentsToLabelmapNode`` + ``saveNode``) is an ``(I, J, 1)`` image with that
geometry. An RGB picture is a one-slice vector volume, which the NIfTI writer stores 5D.
"""

from __future__ import annotations

from pathlib import Path

import nrrd
import numpy as np
import pydicom
import SimpleITK as sitk  # noqa: N813
from PIL import Image


def as_slicer_volume(path: str | Path) -> sitk.Image:
    """The image as Slicer holds it after loading it with ITK: 3D, its geometry as ITK reads it."""
    image = sitk.ReadImage(str(path))
    return sitk.JoinSeries(image) if image.GetDimension() == 2 else image


def write_slicer_label(mask_rows_columns: np.ndarray, image_path: str | Path, out: Path) -> Path:
    """A label drawn on ``image_path`` and saved by Slicer: ``(I, J, 1)`` in the image's geometry."""
    reference = as_slicer_volume(image_path)
    label = sitk.GetImageFromArray(mask_rows_columns.astype(np.uint8)[None])  # (k, rows, columns) -> (I, J, 1)
    label.CopyInformation(reference)
    sitk.WriteImage(label, str(out), useCompression=True)
    return out


def write_slicer_rgb_volume(rgb: np.ndarray, out: Path) -> Path:
    """An RGB picture opened locally in Slicer and saved by its NIfTI writer (a one-slice vector volume, 5D)."""
    volume = sitk.GetImageFromArray(rgb[None], isVector=True)
    volume.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(volume, str(out))
    return out


def hc18_mask(data_dir: Path, name: str) -> np.ndarray:
    """The HC18 expert head mask of ``name`` (``002_HC.png``) as (rows, columns) bool."""
    return np.asarray(Image.open(data_dir / "hc18" / "masks" / name)) > 0


def dcmqi_liver_mask(data_dir: Path, frame: str = "01.dcm", organ: str = "liver") -> np.ndarray:
    """The dcmqi label of ``organ`` (liver, spine, heart) on one CT frame as (rows, columns) bool: the NRRD slice at
    the frame's position."""
    labels, header = nrrd.read(str(data_dir / "dicom_ct_seg" / f"{organ}_seg.nrrd"))  # (i, j, k)
    z = float(pydicom.dcmread(data_dir / "dicom_ct_seg" / frame).ImagePositionPatient[2])
    k = round((z - float(header["space origin"][2])) / float(header["space directions"][2][2]))
    return labels[:, :, k].T > 0
