"""The active-learning loop end to end against the real MONAI Label server.

A simulated annotator asks ``/activelearning/sam_uncertainty`` for the next image and saves its HC18 expert mask with
``PUT /datastore/label``, one at a time. After ``retrain_after_labels`` labels the server starts a training run by
itself (MONAI Label's background train task), keeps answering clicks meanwhile, promotes the new version (its
validation Dice is not lower than the served model's) and the next click uses it. A deliberately diverging run
(``/train`` with a huge learning rate) is not promoted. The served network is the golden tiny SAM-Med2D config.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from PIL import Image

from scripts.monailabel_server import server_log, start_server, stop_server
from tests.conftest import golden_conf

pytestmark = [pytest.mark.server, pytest.mark.slow]

APP = "apps/sam_med2d"
LABELS_BEFORE_RETRAIN = 6
# Seeded: from the golden tiny weights the run's validation Dice leaves the early collapse to empty masks at epoch
# 10-11 (0.40 against 0.12 at the start); 16 epochs leave room for the arithmetic of another CPU.
TRAIN = {
    "max_epochs": 16,
    "lr": 1e-3,
    "decoder_iterations": 2,
    "masks_per_image": 1,
    "train_batch_size": 2,
    "val_split": 0.34,
    "val_points": "1",
}


def _wait(condition, timeout: float, what: str, url: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; server log:\n{server_log(url)[-8000:]}")


class Phases:
    """Prints how long each phase took (``pytest -s`` shows it; the test's budget is tight on 2 CPUs)."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        print(f"[{now - self.start:6.1f} s] +{now - self.last:5.1f} s  {what}", flush=True)
        self.last = now


def _info(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=30).json()


def _click(url: str, image: str, xy: tuple[int, int]) -> dict:
    response = requests.post(
        f"{url}/infer/sam_med2d_points",
        params={"image": image, "output": "json"},
        files={"params": (None, json.dumps({"foreground": [list(xy)], "client_id": "annotator"}))},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def _train_status(url: str) -> dict:
    response = requests.get(f"{url}/train/", params={"check_if_running": "false"}, timeout=30)
    return response.json() if response.status_code == 200 else {}


@pytest.fixture()
def server(tmp_path, data_dir, golden_dir):
    studies = tmp_path / "studies"
    studies.mkdir()
    images = sorted((data_dir / "hc18" / "images").glob("*_HC.png"))[:10]
    for image in images:  # linked, not copied
        (studies / image.name).symlink_to(image)
    conf = golden_conf(
        golden_dir,
        tmp_path / "model",
        device="cpu",
        retrain_after_labels=LABELS_BEFORE_RETRAIN,
        retrain_poll_seconds=1,
        retrain_params=json.dumps(TRAIN, separators=(",", ":")),  # the launcher splits on spaces
        uncertainty_refresh="true",
        uncertainty_idle_seconds=2,
    )
    # MONAI Label's own scoring after every /activelearning call would queue one scoring process per label on top of
    # the training run (two CPUs here); the scheduler keeps the scores current by itself (uncertainty_refresh).
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}
    url = start_server(APP, studies, conf, env=env)
    if "sam_med2d" not in _info(url).get("trainers", {}):
        stop_server(url)
        pytest.fail("the app registers no sam_med2d train task")
    urls = [url]

    def restart() -> str:
        stop_server(urls[-1])
        urls.append(start_server(APP, studies, conf, env=env))
        return urls[-1]

    yield url, data_dir / "hc18" / "masks", tmp_path / "model", [p.stem for p in images], restart, studies
    stop_server(urls[-1])


def test_labels_trigger_retraining_promotion_and_a_diverging_run_is_kept_out(server):
    url, masks, model_dir, ids, restart, studies = server
    phase = Phases()
    info = _info(url)
    assert info["retraining"]["active_version"] == "base"
    assert info["retraining"]["policy"]["after_labels"] == LABELS_BEFORE_RETRAIN
    assert {"sam_uncertainty", "random", "first"} <= set(info["strategies"])

    # the server scores the unlabeled images in the background when it starts; then next_sample uses the scores
    progress = _wait(
        lambda: (p := _info(url)["scoring"]["sam_uncertainty"]["progress"]).get("finished_at") and p,
        180,
        "the background uncertainty scoring",
        url,
    )
    assert progress["done"] == progress["total"] == 10
    # ... in the server process with the served model: no MONAI Label scoring task (a subprocess holding a second
    # copy of the weights) ever ran
    assert requests.get(f"{url}/scoring/", params={"all": True}, timeout=60).status_code == 404
    phase("background scoring of 10 images finished")

    saved: list[str] = []
    for n in range(LABELS_BEFORE_RETRAIN):
        pick = requests.post(f"{url}/activelearning/sam_uncertainty", json={}, timeout=60).json()
        image = pick["id"]
        assert image not in saved
        if n == 0:
            assert pick["score_source"] == "current" and 0.0 <= pick["sam_uncertainty"] <= 1.0
        if n < LABELS_BEFORE_RETRAIN - 1:
            with open(masks / f"{image}.png", "rb") as f:
                response = requests.put(
                    f"{url}/datastore/label",
                    params={"image": image, "tag": "final"},
                    files={"label": (f"{image}.png", f, "image/png")},
                    timeout=60,
                )
            assert response.status_code == 200, response.text
        else:  # the last one copied into the datastore as a file, as an administrator might: it counts too
            shutil.copy(masks / f"{image}.png", studies / "labels" / "final" / f"{image}.png")
        saved.append(image)
        if n < LABELS_BEFORE_RETRAIN - 1:
            time.sleep(1.5)  # a poll happens in between: no run may start before the threshold
            assert _info(url)["retraining"]["running"] is None

    phase(f"{LABELS_BEFORE_RETRAIN} labels saved")
    running = _wait(lambda: _info(url)["retraining"]["running"], 60, "the retraining run to start", url)
    phase("retraining started by itself")
    assert running["trigger"] == "labels" and f"{LABELS_BEFORE_RETRAIN} new final labels" in running["reason"]
    assert running["version_before"] == "base"
    # never two runs at once: a manual /train while the scheduler's run trains is refused
    _wait(lambda: _train_status(url).get("status") == "RUNNING", 60, "the train task to run", url)
    refused = requests.post(f"{url}/train/sam_med2d", json={"max_epochs": 1}, timeout=60)
    assert refused.status_code == 429, refused.text

    # clicks are answered while the run trains, by the model that served before
    probe = sorted(set(ids) - set(saved))[0]
    with Image.open(studies / f"{probe}.png") as picture:
        centre = (picture.width // 2, picture.height // 2)
    versions_during_training = []
    while _info(url)["retraining"]["running"]:
        result = _click(url, probe, centre)
        if _train_status(url).get("status") == "RUNNING":
            versions_during_training.append(result["model_version"])
        time.sleep(3)
    phase(f"run ended; {len(versions_during_training)} clicks answered while it trained")
    assert versions_during_training and versions_during_training[0] == "base", versions_during_training

    info = _info(url)
    first = info["retraining"]["history"][-1]
    assert first["status"] == "promoted", first
    version = first["version_after"]
    assert version != "base" and info["retraining"]["active_version"] == version
    assert info["sam_med2d"]["model_version"] == version
    assert first["metrics"]["best_val_dice"] >= first["metrics"]["baseline_val_dice"]
    assert [v["version"] for v in info["retraining"]["versions"]] == [version]
    assert _click(url, probe, centre)["model_version"] == version
    assert set(versions_during_training) <= {"base", version}  # the new version serves from its publication on

    # a diverging run (manual /train with a huge learning rate) finishes but is not promoted
    response = requests.post(f"{url}/train/sam_med2d", json={**TRAIN, "lr": 1e4, "max_epochs": 2}, timeout=60)
    assert response.status_code == 200, response.text
    _wait(
        lambda: len(_info(url)["retraining"]["history"]) == 2 and not _info(url)["retraining"]["running"],
        300,
        "the diverging run to end",
        url,
        every=2,
    )
    phase("diverging run ended")
    info = _info(url)
    worse = info["retraining"]["history"][-1]
    assert worse["trigger"] == "manual" and worse["status"] == "not_promoted", worse
    assert "Dice would drop" in worse["message"]
    assert info["retraining"]["active_version"] == version
    assert _click(url, probe, centre)["model_version"] == version

    log = server_log(url)
    assert "Retraining: run 1 started (labels:" in log
    assert f"Retraining: run 1 ended: promoted; serving {version}" in log
    assert "Retraining: run 2 ended: not_promoted" in log
    state = json.loads((model_dir / "retraining_state.json").read_text())
    assert [h["status"] for h in state["history"]] == ["promoted", "not_promoted"]

    # the history, the served version and the label count survive a restart: no run starts for the same labels
    url = restart()
    phase("server restarted")
    time.sleep(3)
    info = _info(url)["retraining"]
    assert [h["status"] for h in info["history"]] == ["promoted", "not_promoted"]
    assert info["active_version"] == version and info["running"] is None and info["queued"] is None
    assert _click(url, probe, centre)["model_version"] == version

    # MONAI Label's built-in strategies are served beside sam_uncertainty
    unlabeled = sorted(set(ids) - set(saved))
    assert requests.post(f"{url}/activelearning/first", json={}, timeout=60).json()["id"] == unlabeled[0]
    assert requests.post(f"{url}/activelearning/random", json={}, timeout=60).json()["id"] in unlabeled
