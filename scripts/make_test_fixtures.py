"""Write the test fixtures in ``tests/fixtures/`` from the project's shared data, reproducibly.

    .venv/bin/python scripts/make_test_fixtures.py --shared ../shared

The fixtures are committed (a fresh clone runs the whole suite without ``../shared``); this script says how each
was made. Sizes are kept under 20 MB in all:

- the golden outputs and tiny weights of the published implementation, except two files the tests derive:
  the train-script checkpoint (the tests write it from ``weights.pth`` as ``train.py`` saves it) and the converted
  SAM checkpoint, of which only the five tensors that the conversion changes are kept (the other 225 equal the
  original's, which the test checks);
- HC18: the first ``HC18_SUBJECTS`` subjects in name order, with their expert masks. ``002_HC`` and ``004_HC`` stay
  at their published 800x540 (clients' recorded requests click on their pixels); the others are halved (Lanczos for
  images, nearest for masks) and their pixel size in the CSV doubled accordingly;
- dcmqi's 3-slice CT with its SEG and label maps, TotalSegmentator's 20-slice CT series and its small volumes,
  byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HC18_SUBJECTS = 56  # the loop test's 40 labels and 16 held-out subjects
HC18_FULL_SIZE = ("002_HC.png", "004_HC.png")
GOLDEN_COPIED = ("meta.json", "weights.pth", "cases.npz", "cases_evaluation.npz", "sam_original_1024.pth")
CONVERTED_CHANGES = "sam_original_converted_256_changed.pth"
STATE_DICT_SHAPES = "sam_med2d_vit_b_256_state_dict.json"


def write_golden(shared: Path, out: Path) -> None:
    source = shared / "spec" / "golden_tiny"
    out.mkdir(parents=True, exist_ok=True)
    for name in GOLDEN_COPIED:
        shutil.copyfile(source / name, out / name)
    original = torch.load(source / "sam_original_1024.pth", weights_only=True)
    converted = torch.load(source / "sam_original_converted_256.pth", weights_only=True)
    changed = {
        key: value
        for key, value in converted.items()
        if key not in original or original[key].shape != value.shape or not torch.equal(original[key], value)
    }
    torch.save(changed, out / CONVERTED_CHANGES)
    spec = out.parent / "spec"
    spec.mkdir(exist_ok=True)
    shutil.copyfile(shared / "spec" / STATE_DICT_SHAPES, spec / STATE_DICT_SHAPES)


def write_hc18(shared: Path, out: Path) -> None:
    source = shared / "data" / "hc18"
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    names = [p.name for p in sorted((source / "images").glob("*_HC.png"))[:HC18_SUBJECTS]]
    for name in names:
        with Image.open(source / "images" / name) as image, Image.open(source / "masks" / name) as mask:
            if name not in HC18_FULL_SIZE:
                size = (image.width // 2, image.height // 2)
                image, mask = image.resize(size, Image.LANCZOS), mask.resize(size, Image.NEAREST)
            image.save(out / "images" / name, optimize=True)
            mask.save(out / "masks" / name, optimize=True)
    with open(source / "pixel_size_and_HC.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["filename"] in names]
    for row in rows:
        if row["filename"] not in HC18_FULL_SIZE:
            row["pixel size(mm)"] = f"{2 * float(row['pixel size(mm)']):.9f}"
    with open(out / "pixel_size_and_HC.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["filename"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    args = parser.parse_args(argv)
    write_golden(args.shared, FIXTURES / "golden_tiny")
    write_hc18(args.shared, FIXTURES / "data" / "hc18")
    for folder in ("dicom_ct_seg", "dicom_ct_series", "nifti"):
        shutil.copytree(args.shared / "data" / folder, FIXTURES / "data" / folder, dirs_exist_ok=True)
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"tests/fixtures: {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
