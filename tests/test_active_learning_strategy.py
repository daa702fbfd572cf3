"""The uncertainty scoring task and strategy (apps.sam_med2d.activelearning) on a real MONAI Label datastore of HC18
images, served by the golden tiny model through the ModelStore."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from monailabel.datastore.local import LocalDatastore
from PIL import Image

from apps.sam_med2d.activelearning import SCORES_FILE, SamUncertaintyScoring, SamUncertaintyStrategy, scores_missing
from lib.serving.model_store import ModelStore


@pytest.fixture()
def setup(tmp_path, data_dir, golden_dir, golden_config):
    studies = tmp_path / "studies"
    studies.mkdir()
    sources = sorted((data_dir / "hc18" / "images").glob("*_HC.png"))[:4]
    for src in sources:  # linked, not copied
        (studies / src.name).symlink_to(src)
    datastore = LocalDatastore(str(studies), extensions=["*.png"], auto_reload=False)
    store = ModelStore(tmp_path / "model", golden_config, base_checkpoint=golden_dir / "weights.pth")
    return datastore, store, data_dir / "hc18" / "masks"


def _save_label(datastore, masks_dir, image_id, tmp_path):
    mask = np.asarray(Image.open(masks_dir / f"{image_id}.png").convert("L")) > 0
    label = tmp_path / f"{image_id}_label.png"
    Image.fromarray(mask.astype(np.uint8)).save(label)
    datastore.save_label(image_id, str(label), "final", {})


def test_scoring_then_strategy_picks_the_least_certain_unlabeled_image(setup, tmp_path):
    datastore, store, masks_dir = setup
    scoring = SamUncertaintyScoring(store, threads=1)
    result = scoring({"method": "sam_uncertainty"}, datastore)
    assert result["scored"] == 4 and result["total"] == 4 and result["model_version"] == "base"
    saved = json.loads((store.model_dir / SCORES_FILE).read_text())
    assert saved["progress"]["done"] == 4 and saved["progress"]["finished_at"]
    scores = {k: v["score"] for k, v in saved["scores"].items()}
    assert len(set(scores.values())) > 1, "all images scored the same: the score does not depend on the image"

    # a rerun with the same model and images scores nothing again
    assert scoring({"method": "sam_uncertainty"}, datastore)["scored"] == 0

    strategy = SamUncertaintyStrategy(store)
    pick = strategy({"strategy": "sam_uncertainty"}, datastore)
    assert pick["id"] == max(scores, key=scores.get)
    assert pick["sam_uncertainty"] == pytest.approx(max(scores.values()))
    assert pick["score_source"] == "current"

    # once labeled, that image is no longer a candidate
    _save_label(datastore, masks_dir, pick["id"], tmp_path)
    second = strategy({"strategy": "sam_uncertainty"}, datastore)
    remaining = {k: v for k, v in scores.items() if k != pick["id"]}
    assert second["id"] == max(remaining, key=remaining.get)


def test_new_model_version_makes_scores_stale_and_rescoring_covers_them(setup, tmp_path):
    datastore, store, masks_dir = setup
    scoring = SamUncertaintyScoring(store, threads=1)
    scoring({"method": "sam_uncertainty"}, datastore)
    _save_label(datastore, masks_dir, sorted(datastore.list_images())[0], tmp_path)

    model = store.load()
    with torch.no_grad():
        for p in model.mask_decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    version = store.publish(model, {"val_dice": 0.5})
    strategy = SamUncertaintyStrategy(store)
    stale = strategy({"strategy": "sam_uncertainty"}, datastore)
    assert stale["score_source"] == "stale" and stale["scored_with"] == "base"

    result = scoring({"method": "sam_uncertainty"}, datastore)
    assert result["scored"] == 3 and result["model_version"] == version
    fresh = strategy({"strategy": "sam_uncertainty"}, datastore)
    assert fresh["score_source"] == "current" and fresh["scored_with"] == version


def test_strategy_without_scores_falls_back_and_says_so(setup):
    datastore, store, _ = setup
    pick = SamUncertaintyStrategy(store)({"strategy": "sam_uncertainty"}, datastore)
    assert pick["id"] == sorted(datastore.get_unlabeled_images())[0]
    assert "no scores yet" in pick["score_source"]


def test_recently_served_image_comes_after_the_others(setup):
    datastore, store, _ = setup
    SamUncertaintyScoring(store, threads=1)({"method": "sam_uncertainty"}, datastore)
    strategy = SamUncertaintyStrategy(store, hold_seconds=600)
    first = strategy({"strategy": "sam_uncertainty"}, datastore)["id"]
    datastore.update_image_info(first, {"strategy": {"sam_uncertainty": {"ts": int(time.time())}}})
    assert strategy({"strategy": "sam_uncertainty"}, datastore)["id"] != first


def test_untrained_weights_are_not_scored(setup, tmp_path, golden_config):
    datastore, _, _ = setup
    untrained = ModelStore(tmp_path / "untrained", golden_config)  # no checkpoint: seeded random weights serve
    result = SamUncertaintyScoring(untrained, threads=1)({"method": "sam_uncertainty"}, datastore)
    assert result["scored"] == 0 and result["skipped"] == "no trained weights"
    assert not (untrained.model_dir / SCORES_FILE).exists()
    assert scores_missing(untrained, datastore) == 0
