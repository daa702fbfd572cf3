"""The paper's evaluation protocol: seeded, clicks accumulated from the error region, and its command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from lib.io.checkpoint import load_model
from lib.serving.decoding import decode_view, view_mask
from lib.serving.prompts import interior_clicks
from lib.training import evaluation
from lib.training.evaluation import EvalSample, evaluate_model, samples_from_layout
from tests.client_files import dcmqi_liver_mask

ROOT = Path(__file__).resolve().parents[1]
ORGANS = ("liver", "spine", "heart")


@pytest.fixture(scope="module")
def layout_dataset(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dcmqi CT slices and their liver, spine and heart labels in the SAM-Med2D dataset layout (8-bit PNG images
    in an abdominal window, one mask file per organ, ``label2image_test.json``)."""
    root = tmp_path_factory.mktemp("layout")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    mask_to_image = {}
    for frame in ("01.dcm", "02.dcm", "03.dcm"):
        ds = pydicom.dcmread(data_dir / "dicom_ct_seg" / frame)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        image = f"images/ct_{frame[:2]}.png"
        Image.fromarray((np.clip((hu + 160) / 400, 0, 1) * 255).astype(np.uint8)).save(root / image)
        for organ in ORGANS:
            mask = f"masks/ct_{frame[:2]}_{organ}.png"
            Image.fromarray(dcmqi_liver_mask(data_dir, frame, organ).astype(np.uint8) * 255).save(root / mask)
            mask_to_image[mask] = image
    (root / "label2image_test.json").write_text(json.dumps(mask_to_image))
    return root


def test_two_runs_with_one_seed_agree(golden_dir: Path, layout_dataset: Path) -> None:
    model = load_model(golden_dir / "weights.pth", golden_dir / "meta.json")
    samples = samples_from_layout(layout_dataset, "test")
    assert [len(s.masks) for s in samples] == [3, 3, 3]
    first = evaluate_model(model, samples, (1, 3, 5), seed=5)
    again = evaluate_model(model, samples, (1, 3, 5), seed=5)
    assert first["per_mask"] == again["per_mask"]
    assert list(first["dice"]) == ["box", "1 point", "3 points", "5 points"] and first["masks"] == 9
    assert all(0.0 <= v <= 1.0 for v in first["dice"].values())


@pytest.mark.parametrize("clicks", ["random", "interior"])
def test_clicks_accumulate_from_the_error_region_with_mask_feedback(golden_dir: Path, monkeypatch, clicks) -> None:
    """Replays the protocol's prompts step by step: each new click lies on an error of the prediction before it, in
    the image's own pixels, with its label; earlier clicks are kept and the previous mask is the mask prompt."""
    model = load_model(golden_dir / "weights.pth", golden_dir / "meta.json")
    image = np.asarray(np.load(golden_dir / "cases.npz")["image"])  # 181 x 258: resized to the input frame
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[60:140, 80:200] = True
    seen: list[dict] = []

    def recording_decode_view(model, entry, decoding, point_coords=None, point_labels=None, box=None, prev=None):
        low_res, iou = decode_view(model, entry, decoding, point_coords, point_labels, box, prev)
        seen.append({"coords": point_coords, "labels": point_labels, "previous": prev, "low_res": low_res})
        seen[-1]["mask"] = view_mask(entry.geometry, low_res, decoding)[0].numpy()
        return low_res, iou

    monkeypatch.setattr(evaluation, "decode_view", recording_decode_view)
    result = evaluate_model(model, [EvalSample(image, mask[None])], points=(1, 3), box=False, seed=11, clicks=clicks)
    assert len(seen) == 3 and seen[0]["previous"] is None
    assert seen[0]["coords"].shape == (1, 2) and seen[0]["labels"].tolist() == [1]
    x, y = seen[0]["coords"][0].astype(int)
    assert mask[y, x], "the first click is on the structure"
    for step in (1, 2):
        previous, current = seen[step - 1], seen[step]
        np.testing.assert_array_equal(current["coords"][:-1], previous["coords"])
        assert current["previous"] is previous["low_res"]
        x, y = current["coords"][-1].astype(int)
        assert previous["mask"][y, x] != mask[y, x], "the new click is not on an error of the previous prediction"
        assert current["labels"][-1] == int(mask[y, x])
    expected = 2 * (seen[2]["mask"] & mask).sum() / (seen[2]["mask"].sum() + mask.sum())
    assert result["dice"]["3 points"] == pytest.approx(expected, abs=1e-6)
    if clicks == "interior":
        x, y = seen[0]["coords"][0]
        assert min(x - 80 + 1, 200 - x, y - 60 + 1, 140 - y) == 40, "the first click is the most interior pixel"


def test_interior_clicks_pick_the_larger_error_region() -> None:
    target = torch.zeros(1, 20, 30, dtype=torch.bool)
    target[0, 2:18, 2:12] = True
    prediction = torch.zeros_like(target)
    prediction[0, 2:18, 2:6] = True  # misses columns 6..11 (96 pixels)
    prediction[0, 0:2, 20:30] = True  # 20 extra pixels
    coords, labels = interior_clicks(prediction, target)
    assert labels.tolist() == [[1]] and 6 <= coords[0, 0, 0] <= 11 and 2 <= coords[0, 0, 1] <= 17
    prediction[0, :, 14:30] = True  # now 320 extra pixels: the larger region
    coords, labels = interior_clicks(prediction, target)
    assert labels.tolist() == [[0]] and coords[0, 0, 0] >= 14


def test_evaluation_command_prints_the_papers_table(golden_dir: Path, layout_dataset: Path) -> None:
    command = [sys.executable, "-m", "lib.training.evaluation", "--checkpoint", golden_dir / "weights.pth"]
    command += ["--config", golden_dir / "meta.json", "--data", layout_dataset]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.split("|")[2:6]] == ["box", "1 point", "3 points", "5 points"]
    assert "3 images, 9 masks" in result.stdout
    missing = subprocess.run([*command[:-1], str(golden_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "SAM-Med2D layout" in missing.stderr
