"""Data curation as the paper does it, and the command that writes the SAM-Med2D layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
from PIL import Image

from lib.training.curation import MIN_MASK_FRACTION, component_masks, curate_case, read_array
from lib.training.data import SamMed2DDataset, read_layout
from lib.training.evaluation import samples_from_layout

ROOT = Path(__file__).resolve().parents[1]


def _label_volume(shape: tuple[int, int, int]) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    label[30:70, 20:60, 10:20] = 1  # one organ
    label[80:100, 10:30, 12:16] = 2  # class 2, component A
    label[80:100, 70:95, 12:16] = 2  # class 2, component B
    label[5:7, 5:7, 12:16] = 3  # 4 pixels of 122 x 101: under 0.153%, dropped
    return label


def test_components_per_class_and_small_masks_dropped() -> None:
    label = _label_volume((122, 101, 30))[:, :, 13]
    masks, classes = component_masks(label)
    assert sorted(classes) == [1, 2, 2]
    assert all(m.sum() >= MIN_MASK_FRACTION * label.size for m in masks)
    assert sum(int(m.sum()) for m in masks) == int((label == 1).sum() + (label == 2).sum())


def test_volume_slices_follow_the_aspect_filter_and_scale_per_volume(data_dir: Path) -> None:
    image = read_array(data_dir / "nifti" / "example_ct_sm.nii.gz")
    assert image.shape == (122, 101, 30)
    label = _label_volume(image.shape)
    slices = curate_case(image, label, "ct")
    # x and y slices are 101x30 and 122x30 (short side under half the long side): dropped; z slices are kept
    # where a label is.
    assert {s.name[3] for s in slices} == {"z"}
    assert [int(s.name[4:]) for s in slices] == list(range(10, 20))
    low, high = float(image.min()), float(image.max())
    expected = np.round((image[:, :, 13].astype(np.float64) - low) / (high - low) * 255).astype(np.uint8)
    assert np.array_equal(next(s for s in slices if s.name == "ct_z0013").image, expected)
    assert [len(s.masks) for s in slices if s.name in ("ct_z0010", "ct_z0013")] == [1, 3]
    cubic = curate_case(np.random.default_rng(0).integers(0, 4000, (40, 40, 40)), np.ones((40, 40, 40)), "c")
    assert len(cubic) == 120  # a cube keeps every slice along x, y and z


def test_curation_command_writes_the_sam_med2d_layout(tmp_path: Path, data_dir: Path) -> None:
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    ct = nibabel.load(str(data_dir / "nifti" / "example_ct_sm.nii.gz"))
    for case in ("case_a", "case_b", "case_c"):
        (images / f"{case}.nii.gz").symlink_to(data_dir / "nifti" / "example_ct_sm.nii.gz")
        nibabel.save(nibabel.Nifti1Image(_label_volume(ct.shape), ct.affine), str(labels / f"{case}.nii.gz"))
    hc = data_dir / "hc18"
    Image.open(hc / "images" / "002_HC.png").save(images / "us_002.png")
    Image.open(hc / "masks" / "002_HC.png").save(labels / "us_002.png")
    out = tmp_path / "dataset"
    result = subprocess.run(
        [sys.executable, "-m", "lib.training.curation", "--images", images, "--labels", labels, "--output", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cases"] == 4 and summary["test_images"] > 0 and summary["train_images"] > 0
    train = json.loads((out / "image2label_train.json").read_text())
    test = json.loads((out / "label2image_test.json").read_text())
    train_cases = {Path(i).name.rsplit("_z", 1)[0].removesuffix(".png") for i in train}
    test_cases = {Path(i).name.rsplit("_z", 1)[0].removesuffix(".png") for i in test.values()}
    assert len(test_cases) == 1 and not train_cases & test_cases  # 20% of 4 cases, split by case
    for mask in test:
        values = np.unique(np.asarray(Image.open(out / mask)))
        assert values.tolist() == [0, 255]
    pairs = read_layout(out, "train")
    item = SamMed2DDataset(pairs, masks_per_image=5)[0]
    assert item["image"].shape == (3, 256, 256) and item["label"].shape == (5, 256, 256)
    assert samples_from_layout(out, "test")[0].masks.dtype == bool
    bad = subprocess.run(
        [sys.executable, "-m", "lib.training.curation", "--images", images, "--labels", tmp_path, "--output", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no image" in bad.stderr
