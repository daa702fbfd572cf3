"""Training through the real server: POST /train/sam_med2d on saved HC18 labels raises validation Dice, publishes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests
import torch

from lib.model_store import ModelStore
from tests.server_utils import free_port, running_server, server_log

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
