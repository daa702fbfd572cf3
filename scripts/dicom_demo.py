"""DICOM series for a PACS demo (and the tests) made from the real data in ``tests/fixtures/data``.

That data has CT as DICOM already; MR and ultrasound come as NIfTI and PNG. This writes them as the DICOM a
scanner would send (MR Image Storage slices with their geometry; one Ultrasound Image Storage frame with its pixel
size), so the DICOMweb path can be tried on all three modalities::

    .venv/bin/python scripts/dicom_demo.py --output /tmp/dicom_demo     # then: scripts/orthanc.py upload ...

UIDs are derived from the source file, so writing again gives the same series (an upload is idempotent).
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data"


def _base(sop_class: str, modality: str, source: str, patient_id: str, description: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[source, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[source, "series"])
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.SeriesDescription = description
    ds.StudyDescription = f"SAM-Med2D demo ({modality})"
    today = datetime.date.today().strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = today
    ds.StudyTime = ds.SeriesTime = "120000"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


def volume_to_mr_series(volume_path: str | Path, output: str | Path) -> list[Path]:
    """A NIfTI volume -> one MR DICOM file per slice (int16, geometry from the volume, LPS as DICOM wants)."""
    import SimpleITK

    volume_path = Path(volume_path)
    image = SimpleITK.ReadImage(str(volume_path))
    pixels = SimpleITK.GetArrayFromImage(image)  # (K, J, I)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    source = str(volume_path.name)
    frame_of_reference = generate_uid(entropy_srcs=[source, "frame of reference"])
    files = []
    for k in range(pixels.shape[0]):
        ds = _base(MR_IMAGE_STORAGE, "MR", source, "demo-mr", f"MR from {volume_path.name}")
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[source, "slice", str(k)])
        ds.FrameOfReferenceUID = frame_of_reference
        ds.InstanceNumber = k + 1
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (j), column spacing (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        plane = pixels[k].astype(np.int16)
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        files.append(_save(ds, Path(output) / f"{k + 1:03d}.dcm"))
    return files


def picture_to_us_frame(picture_path: str | Path, output: str | Path, pixel_size_mm: float | None = None) -> Path:
    """An 8-bit grey ultrasound picture -> one Ultrasound Image Storage file."""
    from PIL import Image

    picture_path = Path(picture_path)
    with Image.open(picture_path) as img:
        plane = np.asarray(img.convert("L"))
    source = str(picture_path.name)
    ds = _base(US_IMAGE_STORAGE, "US", source, "demo-us", f"US from {picture_path.name}")
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[source, "frame"])
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = plane.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixel_size_mm:
        ds.PixelSpacing = [f"{pixel_size_mm:.9f}", f"{pixel_size_mm:.9f}"]
    ds.PixelData = np.ascontiguousarray(plane).tobytes()
    return _save(ds, Path(output) / f"{picture_path.stem}.dcm")


def hc18_pixel_size(name: str, data: Path = DATA) -> float | None:
    """The HC18 pixel size (mm) of one image, from the set's CSV."""
    import csv

    with open(data / "hc18" / "pixel_size_and_HC.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["filename"] == name:
                return float(row["pixel size(mm)"])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--data", default=str(DATA), help="real data folder (tests/fixtures/data)")
    args = parser.parse_args(argv)
    data, output = Path(args.data), Path(args.output)
    mr = volume_to_mr_series(data / "nifti" / "example_mr_sm.nii.gz", output / "mr")
    us_name = "002_HC.png"
    us = picture_to_us_frame(data / "hc18" / "images" / us_name, output / "us", hc18_pixel_size(us_name, data))
    print(f"wrote {len(mr)} MR slices to {output / 'mr'} and {us}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
