"""Training through the real server: POST /train/sam_med2d on saved HC18 labels raises validation Dice, publishes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from lib.io.image_source import read_image
from lib.serving.model_store import ModelStore
from lib.training.curation import iter_curated
from scripts.monailabel_server import free_port, running_server, server_log
from tests.client_files import dcmqi_liver_mask, hc18_mask, write_slicer_label

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_train_on_saved_hc18_labels_raises_validation_dice(tmp_path: Path, data_dir: Path, golden_dir: Path) -> None:
    hc18 = data_dir / "hc18"
    studies = tmp_path / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    for image in sorted((hc18 / "images").glob("*.png"))[:24]:
        shutil.copy(image, studies / image.name)  # a throw-away datastore; labels saved as annotators would
        shutil.copy(hc18 / "masks" / image.name, final / image.name)
    model_dir = tmp_path / "model"
    conf = {
        "model": golden_dir / "meta.json",
        "model_dir": model_dir,
        "download_url": f"http://127.0.0.1:{free_port()}/sam-med2d_b.pth",  # nothing listens: random init served
    }
    params = {"max_epochs": 2, "lr": 1e-3, "val_split": 0.25, "train_batch_size": 2, "val_points": "1,3"}
    with running_server("apps/sam_med2d", studies, conf) as url:
        info = requests.get(f"{url}/info/", timeout=60).json()
        assert "sam_med2d" in info["trainers"]
        response = requests.post(f"{url}/train/sam_med2d?run_sync=true", json=params, timeout=900)
        assert response.status_code == 200, response.text + server_log(url)[-4000:]
        stats = json.loads((model_dir / "train" / "train_stats.json").read_text())
        assert stats["status"] == "completed", server_log(url)[-4000:]
        assert stats["val_images"] == 6 and stats["train_images"] == 18
        baseline = stats["baseline"]["dice"]["mean"]
        best = max(row["val"]["dice"]["mean"] for row in stats["epochs"])
        assert best > baseline + 0.05, f"validation Dice {best:.3f} did not rise over the start {baseline:.3f}"
        assert stats["published"] is not None and stats["served_after"] == stats["published"]
        store = ModelStore(model_dir, golden_dir / "meta.json")
        versions = store.list_versions()
        assert [v["version"] for v in versions] == [stats["published"]]
        assert versions[0]["metrics"]["val_dice"]["mean"] == pytest.approx(best)
        published = torch.load(store.published_path, weights_only=True)
        best_run = torch.load(model_dir / "train" / "train_01" / "best.pt", weights_only=True)
        assert all(torch.equal(published[k], best_run[k]) for k in published)
        assert not (model_dir / "train" / "model.pt").exists()  # MONAI Label's own checkpoints never land here


def test_train_on_labels_saved_from_slicer_on_a_picture_and_a_dicom_frame(
    tmp_path: Path, data_dir: Path, golden_dir: Path
) -> None:
    """Labels Slicer saves on 2D images ((I, J, 1) NIfTI in the image's geometry) train, aligned, none skipped."""
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(data_dir / "hc18" / "images" / "002_HC.png", studies / "hc_002.png")  # 800 x 540: not square
    shutil.copy(data_dir / "dicom_ct_seg" / "01.dcm", studies / "ct_frame.dcm")
    drawn = {"hc_002": hc18_mask(data_dir, "002_HC.png"), "ct_frame": dcmqi_liver_mask(data_dir)}
    model_dir = tmp_path / "model"
    conf = {"model": golden_dir / "meta.json", "model_dir": model_dir, "download": "false"}
    params = {"max_epochs": 1, "val_split": 0.5, "train_batch_size": 1, "val_points": "1"}
    with running_server("apps/sam_med2d", studies, conf) as url:
        for image_id, mask in drawn.items():
            image = next(studies.glob(f"{image_id}.*"))
            label = write_slicer_label(mask, image, tmp_path / f"{image_id}.nii.gz")  # as Slicer's saveNode writes
            response = requests.put(
                f"{url}/datastore/label",
                params={"image": image_id},
                files={
                    "params": (None, json.dumps({"label_info": [{"name": "x", "idx": 1}]})),
                    "label": (label.name, label.read_bytes()),
                },
                timeout=60,
            )
            assert response.status_code == 200, response.text
        response = requests.post(f"{url}/train/sam_med2d?run_sync=true", json=params, timeout=900)
        assert response.status_code == 200, response.text + server_log(url)[-4000:]
        stats = json.loads((model_dir / "train" / "train_stats.json").read_text())
        assert stats["status"] == "completed", server_log(url)[-4000:]
        assert stats["labels_skipped"] == 0 and stats["skipped_labels"] == []
        assert stats["train_images"] + stats["val_images"] == 2  # both labels became training data
        info = requests.get(f"{url}/info/", timeout=60).json()
        assert info["train_stats"]["sam_med2d"]["labels_skipped"] == 0
    # What the run curated, from the same files with the trainer's functions: the mask lies where it was drawn.
    for image_id, mask in drawn.items():
        image = next(studies.glob(f"{image_id}.*"))
        label = next((studies / "labels" / "final").glob(f"{image_id}.*"))
        (curated,) = iter_curated([(image_id, image, label)])
        union = np.any(curated.masks, axis=0)
        assert 2 * np.logical_and(union, mask).sum() / (union.sum() + mask.sum()) > 0.99
    hounsfield = read_image(studies / "ct_frame.dcm").pixels
    liver = np.any(next(iter_curated([("ct_frame", studies / "ct_frame.dcm", label)])).masks, axis=0)
    assert 20 < hounsfield[liver].mean() < 200  # soft tissue: the liver, not air or bone
