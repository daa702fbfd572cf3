"""Build the demo datastore from images that installed packages ship (nothing is downloaded).

    python -m apps.sam_med2d.demo --output datastore/demo

- ``retina_fundus.jpg``: scikit-image's fundus photograph (RGB, 2D).
- ``retina_microaneurysms.png``: scikit-image's retinal angiography crop (grey, 2D).
- ``cells_fluorescence.png``: scikit-image's fluorescence microscopy image (grey, 2D).
- ``ct_small.dcm``: pydicom's CT test slice (single-frame DICOM, Hounsfield units).
- ``mr_anatomical.nii.gz``: nibabel's anatomical MR test volume (3D NIfTI, 33x41x25).

Running it again leaves existing files alone, so it is idempotent and fast.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from pathlib import Path

from lib.common.atomic_files import atomic_path


def _skimage_file(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def _pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def _nibabel_file(name: str) -> Path:
    import nibabel.tests

    return Path(nibabel.tests.__file__).parent / "data" / name


def _copy(source: Callable[[], Path]) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        shutil.copyfile(source(), target)

    return write


def _gzip_nifti(source: Callable[[], Path]) -> Callable[[Path], None]:
    def write(target: Path) -> None:
        import nibabel as nib

        image = nib.load(source())
        nib.save(image, target)

    return write


DEMO_IMAGES: dict[str, Callable[[Path], None]] = {
    "retina_fundus.jpg": _copy(lambda: _skimage_file("retina.jpg")),
    "retina_microaneurysms.png": _copy(lambda: _skimage_file("microaneurysms.png")),
    "cells_fluorescence.png": _copy(lambda: _skimage_file("cell.png")),
    "ct_small.dcm": _copy(lambda: _pydicom_file("CT_small.dcm")),
    "mr_anatomical.nii.gz": _gzip_nifti(lambda: _nibabel_file("anatomical.nii")),
}


def build_demo_datastore(output: str | Path) -> list[Path]:
    """Write the demo images into ``output`` (created if needed); existing files are kept. Returns every image."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, write in DEMO_IMAGES.items():
        target = output / name
        if not target.is_file():
            with atomic_path(target) as tmp:
                write(tmp)
        paths.append(target)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="datastore/demo", help="datastore folder (default: datastore/demo)")
    args = parser.parse_args()
    paths = build_demo_datastore(args.output)
    print(f"Demo datastore {args.output}: {', '.join(p.name for p in paths)}")


if __name__ == "__main__":
    main()
